//! NetworkPolicy on real connections: three pod namespaces (x/a, x/b, x/c of the truth table,
//! with their addresses) routed through a node namespace, the policy programs attached to the
//! node-side veths, and the compiled truth-table policy written to the maps. Real TCP
//! connections show default deny, an allowed peer (whose replies pass through the policy
//! conntrack although x/a's egress is denied), and the node reaching its pod. Privileged.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::TcAttachType;
use serde_json::json;
use weir_common::metrics::Counter;
use weir_policy::{Cluster, Compiler};
use weir_proxy::{
    maps::read_counters,
    policy::{DatapathPolicy, Lowering, PolicyMaps},
    programs::{self, LoadOptions, TC_POLICY_EGRESS, TC_POLICY_INGRESS},
};
use weir_tests::{
    bpffs::TestPinDir,
    echo::{EchoServer, tcp_echo_works},
    netns::{Netns, Veth},
    policy_cases::{TruthTable, node_ip, pod_ip, policy},
    privileged::require_root,
};

const GATEWAY: &str = "169.254.1.1";
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

/// Connects to `dst`:80 from inside `from`, sends a line and reads the echo.
fn tcp_works(from: &Netns, dst: Ipv4Addr) -> bool {
    tcp_echo_works(from, SocketAddr::from((dst, 80)), CONNECT_TIMEOUT)
}

/// A pod namespace wired to the node namespace like weir-cni does (a /32, a link-local gateway
/// on the node side, a host route), with both policy programs on the node-side veth.
fn wire_pod(node: &Netns, role: &str, ip: Ipv4Addr) -> Result<(Netns, Veth)> {
    let pod = Netns::new(role)?;
    let veth = Veth::between(&pod, node)?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", &veth.a])?;
    pod.ip(&["route", "add", GATEWAY, "dev", &veth.a, "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", &veth.a])?;
    node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth.b])?;
    // The node-side veth carries the gateway address here (weir-cni's has none); `src` makes the
    // node's connections leave with its own address, as they do on a real node.
    let src = node_ip(0).to_string();
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth.b, "src", &src])?;
    Ok((pod, veth))
}

#[test]
fn default_deny_and_allow_on_real_connections() -> Result<()> {
    require_root();
    let node = Netns::new("node")?;
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
    // The node's own address (node-1 of the truth table): connections from the node to its
    // pods leave with it as source.
    node.ip(&["addr", "add", &format!("{}/32", node_ip(0)), "dev", "lo"])?;
    let (a, b, c) = (pod_ip(0, 0), pod_ip(0, 1), pod_ip(0, 2));
    let (pod_a, veth_a) = wire_pod(&node, "pod-a", a)?;
    let (pod_b, veth_b) = wire_pod(&node, "pod-b", b)?;
    let (pod_c, veth_c) = wire_pod(&node, "pod-c", c)?;

    let pins = TestPinDir::new("netpol-e2e")?;
    let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
    let mut maps = PolicyMaps::take(&mut loaded.ebpf)?;
    for veth in [&veth_a.b, &veth_b.b, &veth_c.b] {
        for (name, direction) in
            [(TC_POLICY_EGRESS, TcAttachType::Ingress), (TC_POLICY_INGRESS, TcAttachType::Egress)]
        {
            let program = programs::classifier(&mut loaded.ebpf, name)?;
            let interface = veth.as_str();
            node.run(move || program.attach(interface, direction))?
                .with_context(|| format!("attaching {name} to {interface}"))?;
        }
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
    let new = Lowering::default().lower(&compiled, &[node_ip(0)]);
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
