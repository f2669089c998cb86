//! NetworkPolicy on real connections: three pod namespaces (x/a, x/b, x/c of the truth table,
//! with their addresses) routed through a node namespace, the policy programs attached to the
//! node-side veths, and the compiled truth-table policy written to the maps. Real TCP
//! connections show default deny, an allowed peer (whose replies pass through the policy
//! conntrack although x/a's egress is denied), and the node reaching its pod. Privileged.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use serde_json::json;
use weir_common::metrics::Counter;
use weir_policy::{Cluster, Compiler};
use weir_proxy::{
    maps::read_counters,
    policy::{DatapathPolicy, Lowering, PolicyMaps},
    programs::{self, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    echo::{EchoServer, tcp_echo_works},
    netns::Netns,
    policy_cases::{TruthTable, node_ip, pod_ip, policy},
    privileged::require_root,
    routed,
};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

/// Connects to `dst`:80 from inside `from`, sends a line and reads the echo.
fn tcp_works(from: &Netns, dst: Ipv4Addr) -> bool {
    tcp_echo_works(from, SocketAddr::from((dst, 80)), CONNECT_TIMEOUT)
}

#[test]
fn default_deny_and_allow_on_real_connections() -> Result<()> {
    require_root();
    // The node's own address (node-1 of the truth table): connections from the node to its
    // pods leave with it as source.
    let node = routed::node("node", node_ip(0))?;
    let (a, b, c) = (pod_ip(0, 0), pod_ip(0, 1), pod_ip(0, 2));
    let (pod_a, veth_a) = routed::pod(&node, node_ip(0), "pod-a", a)?;
    let (pod_b, veth_b) = routed::pod(&node, node_ip(0), "pod-b", b)?;
    let (pod_c, veth_c) = routed::pod(&node, node_ip(0), "pod-c", c)?;

    let pins = TestPinDir::new("netpol-e2e")?;
    let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
    let mut maps = PolicyMaps::take(&mut loaded.ebpf)?;
    for veth in [&veth_a.b, &veth_b.b, &veth_c.b] {
        routed::attach_policy(&mut loaded.ebpf, &node, veth)?;
    }
    let _servers = [
        EchoServer::tcp(&pod_a, (a, 80).into())?,
        EchoServer::tcp(&pod_b, (b, 80).into())?,
        EchoServer::tcp(&pod_c, (c, 80).into())?,
    ];

    // No policy yet: everything flows.
    assert!(tcp_works(&pod_c, a), "no policy: x/c -> x/a");

    // Default deny both ways in x, plus: x/a takes TCP 80 from x/b, x/b may send to x/a.
    let table = TruthTable::new();
    let policies = [
        policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})),
        policy(
            "x",
            "a-from-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
        ),
        policy(
            "x",
            "b-to-a",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    ];
    let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, &policies, &table.nodes);
    let compiled = Compiler::default().compile(&cluster, None);
    let new = Lowering::default().lower(&compiled, &[std::net::IpAddr::V4(node_ip(0))]);
    maps.set_deny_unknown(true)?;
    maps.apply(&DatapathPolicy::default(), &new)?;

    assert!(tcp_works(&pod_b, a), "x/b -> x/a is allowed (and x/a's replies pass)");
    assert!(!tcp_works(&pod_c, a), "x/c -> x/a is denied");
    assert!(!tcp_works(&pod_a, b), "x/a's egress is denied");
    assert!(!tcp_works(&pod_b, c), "x/b may send only to x/a");
    assert!(tcp_works(&node, a), "the node reaches its pod under default deny");

    let counters = read_counters(&loaded.ebpf)?;
    let get = |which| counters.iter().find(|(c, _)| *c == which).map_or(0, |(_, v)| *v);
    assert!(get(Counter::PolicyReply) > 0, "replies passed through conntrack: {counters:?}");
    // Every denied connection above is stopped at its source's egress (x is default-deny).
    assert!(get(Counter::DropPolicyEgress) > 0, "{counters:?}");
    Ok(())
}
