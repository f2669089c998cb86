//! UDP hygiene when a backend leaves a service:
//! - per-packet path: the conntrack entries of its flows are flushed (so they re-balance on
//!   their next datagram, as kube-proxy's conntrack flush does), while the UDP flows of the
//!   remaining backend and TCP flows are untouched. Flows are created by running tc_lb4_fwd
//!   with BPF_PROG_TEST_RUN;
//! - socket load balancer: connected UDP sockets it gave that backend are terminated, in the
//!   client's own namespace; others are untouched.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use weir_common::conntrack::{CT4_MAP, CtKey4, CtValue4};
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, LoadOptions, TC_LB4_FORWARD},
};
use weir_tests::{
    bpffs::TestPinDir, cgroup::TestCgroup, echo::EchoServer, packet::Ipv4Packet,
    privileged::require_root, probe::Session, topology::ServiceNet,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

fn desired(dns_backends: &[Ipv4Addr]) -> ServiceState {
    let mut state = ServiceState::default();
    for (vip, port, protocol, backends) in
        [(DNS, 53, Protocol::Udp, dns_backends), (WEB, 80, Protocol::Tcp, &[A, B][..])]
    {
        state.frontends.insert(
            Frontend { address: IpAddr::V4(vip), port, protocol },
            FrontendState::cluster_ip(
                format!("default/{vip}"),
                backends.iter().map(|ip| SocketAddr::from((*ip, port))).collect(),
            ),
        );
    }
    state
}

fn send(ebpf: &Ebpf, packet: &Ipv4Packet) -> Ipv4Packet {
    let program = programs::classifier_ref(ebpf, TC_LB4_FORWARD).unwrap();
    let wire = packet.build();
    let mut out = vec![0u8; wire.len()];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&wire),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap();
    assert_eq!(result.return_value, 0);
    Ipv4Packet::parse(&out).unwrap()
}

/// Backend address of every tracked forward flow, by (protocol, client port), read from the
/// pinned conntrack map.
fn tracked(
    pins: &TestPinDir,
    backend_of: &std::collections::HashMap<u32, Ipv4Addr>,
) -> Vec<(u8, u16, Ipv4Addr)> {
    let ct = pins.open_hash::<CtKey4, CtValue4>(CT4_MAP).unwrap();
    let mut flows: Vec<_> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.direction == weir_common::conntrack::CT_FORWARD)
        .map(|(key, value)| (key.proto, u16::from_be(key.sport), backend_of[&value.backend_id]))
        .collect();
    flows.sort();
    flows
}

#[test]
fn lb_conntrack_flushes_udp_flows_of_removed_backends_only() {
    require_root();
    let pins = TestPinDir::new("ct").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    let mut planner = ServicePlanner::new();
    writer.apply(&planner.plan(&desired(&[A, B]))).unwrap();
    let backend_of: std::collections::HashMap<u32, Ipv4Addr> = writer
        .maps()
        .v4
        .backend_entries()
        .into_iter()
        .map(|(id, b)| (id, Ipv4Addr::from(b.address_octets())))
        .collect();

    // UDP flows until both backends have some (bounded), and a few TCP flows.
    let mut udp_to = std::collections::BTreeSet::new();
    for sport in 40_000..40_200u16 {
        udp_to.insert(send(&loaded.ebpf, &Ipv4Packet::udp(CLIENT, sport, DNS, 53)).dst);
        if udp_to.len() == 2 && sport >= 40_010 {
            break;
        }
    }
    assert_eq!(udp_to.len(), 2, "UDP flows reached both backends");
    for sport in 50_000..50_010u16 {
        send(&loaded.ebpf, &Ipv4Packet::tcp(CLIENT, sport, WEB, 80));
    }
    let before = tracked(&pins, &backend_of);

    // A leaves the DNS service.
    let plan = planner.plan(&desired(&[B]));
    let flushed = writer.apply(&plan).unwrap().flushed;
    let after = tracked(&pins, &backend_of);

    let udp_to_a = before.iter().filter(|(p, _, b)| *p == 17 && *b == A).count();
    assert!(udp_to_a > 0);
    assert_eq!(flushed, 2 * udp_to_a, "forward and reply entry of each UDP flow to A");
    let expected: Vec<_> =
        before.iter().filter(|(p, _, b)| !(*p == 17 && *b == A)).copied().collect();
    assert_eq!(after, expected, "UDP flows to B and all TCP flows are untouched");
    assert!(after.iter().any(|(p, _, b)| *p == 6 && *b == A), "TCP flows to A stay (UDP only)");

    // The flushed flows re-balance: their next datagram goes to B.
    let (_, sport, _) = before.iter().find(|(p, _, b)| *p == 17 && *b == A).unwrap();
    assert_eq!(send(&loaded.ebpf, &Ipv4Packet::udp(CLIENT, *sport, DNS, 53)).dst, B);
}

/// Connected UDP sockets the socket load balancer gave a backend at `connect()` are terminated
/// when that backend leaves the service (their next call fails, so the application reconnects
/// and is balanced again), in the client's own namespace: sockets balanced to the remaining
/// backend and a socket connected to the removed backend directly, not through the service,
/// are untouched. Both families.
#[test]
fn lb_conntrack_terminates_connected_udp_sockets_of_removed_backends_only() {
    require_root();
    let net = ServiceNet::new("ctsock", 209, 2).unwrap();
    let pins = TestPinDir::new("ctsock").unwrap();
    let cgroup = TestCgroup::new("ctsock").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    let families: [(IpAddr, Vec<IpAddr>); 2] = [
        (IpAddr::V4(DNS), net.backends.iter().map(|b| IpAddr::V4(*b)).collect()),
        ("fd00:96::53".parse().unwrap(), net.backends6.iter().map(|b| IpAddr::V6(*b)).collect()),
    ];
    let _servers: Vec<EchoServer> = (families.iter())
        .flat_map(|(_, backends)| backends.iter())
        .map(|backend| EchoServer::udp(&net.server, (*backend, DNS_PORT).into()).unwrap())
        .collect();
    let dns = |backends: &[IpAddr]| {
        let mut state = ServiceState::default();
        for (vip, all) in &families {
            let chosen: Vec<SocketAddr> = (all.iter())
                .filter(|b| backends.contains(b))
                .map(|b| SocketAddr::new(*b, DNS_PORT))
                .collect();
            state.frontends.insert(
                Frontend { address: *vip, port: 53, protocol: Protocol::Udp },
                FrontendState::cluster_ip(format!("default/dns-{vip}"), chosen),
            );
        }
        state
    };
    let mut planner = ServicePlanner::new();
    let mut current: Vec<IpAddr> = families.iter().flat_map(|(_, b)| b.clone()).collect();
    writer.apply(&planner.plan(&dns(&current))).unwrap();

    for (vip, backends) in &families {
        let (removed, kept) = (backends[0], backends[1]);
        let target = SocketAddr::new(*vip, 53).to_string();
        // Sockets until both backends hold at least two (bounded).
        let mut sessions: Vec<(Session, IpAddr)> = Vec::new();
        for _ in 0..60 {
            let mut session = Session::udp(&net.client, Some(&cgroup), &target);
            let backend = backend_of(&session.ping());
            sessions.push((session, backend));
            let held = |b: IpAddr| sessions.iter().filter(|(_, s)| *s == b).count();
            if held(removed) >= 2 && held(kept) >= 2 {
                break;
            }
        }
        let to_removed = sessions.iter().filter(|(_, b)| *b == removed).count();
        assert!(to_removed >= 2 && sessions.len() - to_removed >= 2, "{vip}: both backends used");
        let direct_target = SocketAddr::new(removed, DNS_PORT).to_string();
        let mut direct = Session::udp(&net.client, None, &direct_target);
        assert_eq!(direct.ping()["ok"], true);

        current.retain(|b| *b != removed);
        let cleanup = writer.apply(&planner.plan(&dns(&current))).unwrap();
        assert_eq!(cleanup.sockets, to_removed, "{vip}: every socket balanced to {removed}");

        for (session, backend) in &mut sessions {
            let reply = session.ping();
            if *backend == removed {
                assert_eq!(reply["ok"], false, "{vip}: a terminated socket fails: {reply}");
                let errno = reply["errno"].as_i64().map(|e| e as i32);
                assert!(
                    [Some(libc::ECONNABORTED), Some(libc::EDESTADDRREQ)].contains(&errno),
                    "{vip}: aborted and disconnected by the kernel: {reply}"
                );
            } else {
                assert_eq!(backend_of(&reply), kept, "{vip}: sockets to {kept} are untouched");
            }
        }
        assert_eq!(backend_of(&direct.ping()), removed, "{vip}: not through the service");
        // The application's new socket is balanced to the remaining backend.
        let mut again = Session::udp(&net.client, Some(&cgroup), &target);
        assert_eq!(backend_of(&again.ping()), kept);
    }
}

const DNS_PORT: u16 = 5353;

/// The backend address in an echo reply ("pong from <backend>:<port> to <client>").
fn backend_of(reply: &serde_json::Value) -> IpAddr {
    assert_eq!(reply["ok"], true, "{reply}");
    let text = reply["reply"].as_str().unwrap_or_default();
    let backend = text.split_whitespace().nth(2).unwrap_or_default();
    backend.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{e}: {reply}")).ip()
}
