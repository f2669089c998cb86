//! `weir flows` on the nftables dataplane, on real connections: the policy benchmark's
//! topology (a client and a server pod routed through a node namespace) with 10 policies
//! isolating the server, enforced by `NftPolicy` in the node namespace, and the table's log
//! group read as the agent reads it. The allowed connection's record names the rule that
//! admits it (the last of the 10 policies, found in the applied state), the dropped one the
//! first policy isolating the server; after the allowing policy is deleted the same
//! connection is dropped. Privileged.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use weir_policy::{Change, IncrementalCompiler};
use weir_proxy::policy::{
    PolicyDatapath, SharedPolicyNames,
    flows::{FlowReason, FlowRecord, FlowVerdict},
    nft::{
        NftPolicy,
        nflog::{self, NflogSocket},
        plan::FLOW_LOG_GROUP,
    },
};
use weir_tests::{
    bench::policy::{
        CLIENT_IP, DENIED_PORT, NAMESPACE, NODE, NODE_IP, Objects, PORT, SERVER_IP, policy_node,
    },
    echo::{EchoServer, tcp_echo_works},
    names,
    privileged::require_root,
    routed,
};

const RULES: u32 = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Reads the log group until a record matches (5 s at most); the records seen otherwise.
fn expect_record(
    socket: &NflogSocket,
    names: &SharedPolicyNames,
    what: &str,
    matches: impl Fn(&FlowRecord) -> bool,
) -> FlowRecord {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut poll = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: the buffer is valid for its length; the socket is open while borrowed.
        let len = unsafe {
            libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
        };
        let Ok(len) = usize::try_from(len) else { continue };
        for packet in nflog::parse_datagram(&buf[..len]) {
            let Some(record) = nflog::record(&packet, names, Some(NODE), 0) else { continue };
            if matches(&record) {
                return record;
            }
            seen.push(record.to_text());
        }
    }
    panic!("no flow record of {what} in 5 s; seen:\n{}", seen.join("\n"));
}

#[test]
fn netpol_nft_flows_name_the_admitting_rule_and_the_dropping_policy() {
    require_root();
    let node = routed::node("nflogn", NODE_IP).unwrap();
    let (client, _client_veth) = routed::pod(&node, NODE_IP, "nflogc", CLIENT_IP).unwrap();
    let (server, _server_veth) = routed::pod(&node, NODE_IP, "nflogs", SERVER_IP).unwrap();
    let names = SharedPolicyNames::default();
    let table = names::unique("flows");
    let flow_names = names.clone();
    let mut datapath = node
        .run(move || NftPolicy::open(&table).map(|t| t.with_names(flow_names)))
        .unwrap()
        .unwrap();
    let socket = node.run(|| NflogSocket::bind(FLOW_LOG_GROUP)).unwrap().unwrap();

    let objects = Objects::new(RULES, false);
    let mut compiler = IncrementalCompiler::new(Some(NODE));
    for change in objects.changes() {
        compiler.apply(change);
    }
    compiler.take_delta();
    datapath.apply(compiler.compiled(), &policy_node(RULES)).unwrap();

    let _servers = [PORT, DENIED_PORT]
        .map(|port| EchoServer::tcp(&server, SocketAddr::from((SERVER_IP, port))).unwrap());
    let to = |port| SocketAddr::from((SERVER_IP, port));
    let (client_ip, server_ip) = (IpAddr::V4(CLIENT_IP), IpAddr::V4(SERVER_IP));
    let pod = |name: &str| Some(format!("{NAMESPACE}/{name}"));

    assert!(tcp_echo_works(&client, to(PORT), CONNECT_TIMEOUT), "the allowed connection");
    let allowed = expect_record(&socket, &names, "the allowed connection", |r| {
        r.verdict == FlowVerdict::Allowed && r.destination.port == Some(PORT)
    });
    assert_eq!((allowed.source.ip, allowed.destination.ip), (client_ip, server_ip));
    assert_eq!(
        (allowed.source.pod.as_deref(), allowed.destination.pod.as_deref()),
        (pod("client").as_deref(), pod("server").as_deref())
    );
    assert_eq!(allowed.reason, FlowReason::Rule);
    assert_eq!(
        allowed.rule.as_deref(),
        Some("NetworkPolicy bench/zz-allow-client ingress rule 0, peer 0, port 0"),
        "{}",
        allowed.to_text()
    );

    assert!(!tcp_echo_works(&client, to(DENIED_PORT), CONNECT_TIMEOUT), "port 8081 is dropped");
    let dropped = expect_record(&socket, &names, "the dropped connection", |r| {
        r.verdict == FlowVerdict::Dropped && r.destination.port == Some(DENIED_PORT)
    });
    assert_eq!(dropped.reason, FlowReason::DefaultDeny);
    // Drops count against the first policy isolating the server (in name order).
    assert_eq!(dropped.policy.as_deref(), Some("bench/filler-00001"), "{}", dropped.to_text());

    // The allowing policy goes: the client is dropped, and its records no longer name it.
    let allowing = &objects.policies[0];
    assert_eq!(allowing.metadata.name.as_deref(), Some("zz-allow-client"));
    compiler.apply(Change::policy(allowing, true).unwrap());
    let delta = compiler.take_delta();
    datapath.apply_delta(compiler.compiled(), &delta, &policy_node(RULES)).unwrap();
    assert!(!tcp_echo_works(&client, to(PORT), CONNECT_TIMEOUT), "no rule lets the client in");
    let dropped = expect_record(&socket, &names, "the client dropped on 8080", |r| {
        r.verdict == FlowVerdict::Dropped && r.destination.port == Some(PORT)
    });
    assert_eq!(dropped.policy.as_deref(), Some("bench/filler-00001"));
}
