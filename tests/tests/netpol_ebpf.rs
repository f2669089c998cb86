//! BPF_PROG_TEST_RUN differential test of NetworkPolicy enforcement (ebpf/src/policy.rs): the
//! truth-table cluster's policies (every fixed case and seeded random ones) are compiled,
//! lowered and written to the maps incrementally, node by node; a packet per (source,
//! destination, protocol, port) runs through the egress program for a source pod on that node
//! and the ingress program for a destination pod on that node, and the combined verdict must
//! equal the independent oracle's. Plus: replies of allowed flows pass through the policy
//! conntrack, unknown endpoints are denied while policies exist, drops are counted and
//! reported as flow events. Every table runs twice: IPv4 packets and IPv6 packets (the
//! pods are dual-stack). Privileged: loads eBPF.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_common::{
    metrics::Counter,
    policy::{FLOWS_MAP, FlowEvent, VERDICT_DROPPED, v4_mapped},
    proto,
};
use weir_proxy::{
    maps::read_counters,
    programs::{TC_POLICY_EGRESS, TC_POLICY_INGRESS},
};
use weir_tests::{
    packet::{Ipv6Ext, Ipv6Packet},
    policy_cases::{Rng, TruthTable, cases, node_ip, node_ip6, random_policies},
    policy_ebpf::{Datapath, TC_ACT_OK, locate_in, packet},
    policy_oracle::{Oracle, Party},
};

const PROTOCOLS: [(&str, u8); 3] =
    [("TCP", proto::TCP), ("UDP", proto::UDP), ("SCTP", proto::SCTP)];
const PORTS: [u16; 3] = [80, 81, 82];
const RANDOM_SEEDS: u64 = 150;

/// Runs every cell of one policy set through the datapath of both nodes, with IPv4 and with
/// IPv6 packets; returns the wrong cells and the number of cells.
fn check(
    dp: &mut Datapath,
    table: &TruthTable,
    name: &str,
    policies: &[NetworkPolicy],
    wrong: &mut Vec<String>,
) -> usize {
    let mut total = 0;
    for ipv6 in [false, true] {
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        let oracle = Oracle { namespaces: &table.namespaces, pods: &table.pods, policies };
        let pairs = TruthTable::pairs_of(ipv6);
        let mut cells = Vec::new();
        for (src, dst) in &pairs {
            for (proto_name, protocol) in PROTOCOLS {
                for port in PORTS {
                    cells.push((src, dst, proto_name, protocol, port));
                }
            }
        }
        let packets: Vec<_> = cells.iter().map(|(s, d, _, p, port)| (*s, *d, *p, *port)).collect();
        let verdicts = dp.verdicts_in(ipv6, table, policies, &packets);
        for ((src, dst, proto_name, _, port), allowed) in cells.iter().zip(&verdicts) {
            let expected = oracle.allowed_in(ipv6, src, dst, proto_name, *port);
            if *allowed != expected {
                wrong.push(format!(
                    "{name} ({family}): {src:?} -> {dst:?} {proto_name}/{port}: oracle {expected}, \
                     eBPF {allowed}"
                ));
            }
        }
        total += cells.len();
    }
    total
}

fn assert_none_wrong(wrong: &[String], cells: usize) {
    let shown = &wrong[..wrong.len().min(30)];
    assert!(wrong.is_empty(), "{} of {cells} cells wrong:\n{}", wrong.len(), shown.join("\n"));
}

#[test]
fn fixed_cases_agree_with_the_oracle() {
    let mut dp = Datapath::new();
    let table = TruthTable::new();
    let (mut wrong, mut cells) = (Vec::new(), 0);
    for case in cases() {
        cells += check(&mut dp, &table, case.name, &case.policies, &mut wrong);
    }
    assert_none_wrong(&wrong, cells);
    let counters = read_counters(&dp.ebpf).unwrap();
    let get = |c| counters.iter().find(|(k, _)| *k == c).unwrap().1;
    assert!(get(Counter::DropPolicyIngress) > 0 && get(Counter::DropPolicyEgress) > 0);
    assert!(get(Counter::PolicyAllowed) > 0);
    eprintln!("{cells} cells");
}

#[test]
fn random_policies_agree_with_the_oracle() {
    let mut dp = Datapath::new();
    let table = TruthTable::new();
    let (mut wrong, mut cells) = (Vec::new(), 0);
    for seed in 0..RANDOM_SEEDS {
        let policies = random_policies(&mut Rng::new(seed));
        cells += check(&mut dp, &table, &format!("seed {seed}"), &policies, &mut wrong);
    }
    assert_none_wrong(&wrong, cells);
    eprintln!("{cells} cells");
}

/// x/a takes connections from x/b only and may not send anything itself: its replies pass
/// through the conntrack entry of the allowed connection, and nothing else leaves it.
#[test]
fn replies_of_allowed_flows_pass() {
    replies_pass(false);
}

#[test]
fn replies_of_allowed_ipv6_flows_pass() {
    replies_pass(true);
}

fn replies_pass(ipv6: bool) {
    let mut dp = Datapath::new();
    let table = TruthTable::new();
    let policies = [weir_tests::policy_cases::a_only_from_b()];
    dp.program(&table, &policies, 0);
    let (a, b, c) = (
        locate_in(&Party::Pod("x".into(), "a".into()), ipv6).0,
        locate_in(&Party::Pod("x".into(), "b".into()), ipv6).0,
        locate_in(&Party::Pod("x".into(), "c".into()), ipv6).0,
    );
    // Without a connection, x/a's packet to x/b is dropped (its egress is isolated).
    assert!(!dp.allows(TC_POLICY_EGRESS, &packet(a, 80, b, 40000, proto::TCP)));
    // x/b connects: its egress is open, x/a's ingress allows it.
    let syn = packet(b, 40000, a, 80, proto::TCP);
    assert!(dp.allows(TC_POLICY_EGRESS, &syn));
    assert!(dp.allows(TC_POLICY_INGRESS, &syn));
    // The reply leaves x/a and enters x/b.
    let reply = packet(a, 80, b, 40000, proto::TCP);
    assert!(dp.allows(TC_POLICY_EGRESS, &reply));
    assert!(dp.allows(TC_POLICY_INGRESS, &reply));
    // Another port, or UDP on the same ports, is not a reply.
    assert!(!dp.allows(TC_POLICY_EGRESS, &packet(a, 80, b, 40001, proto::TCP)));
    assert!(!dp.allows(TC_POLICY_EGRESS, &packet(a, 80, b, 40000, proto::UDP)));
    // x/c may not connect; the drop is counted and reported with the policy's id.
    assert!(!dp.allows(TC_POLICY_INGRESS, &packet(c, 40002, a, 80, proto::TCP)));
    let counters = read_counters(&dp.ebpf).unwrap();
    assert!(counters.contains(&(Counter::PolicyReply, 2)), "{counters:?}");
    let mut flows: RingBuf<MapData> =
        RingBuf::try_from(dp.ebpf.take_map(FLOWS_MAP).unwrap()).unwrap();
    let mut events = Vec::new();
    while let Some(item) = flows.next() {
        assert_eq!(item.len(), size_of::<FlowEvent>());
        // SAFETY: the program writes whole FlowEvents; read unaligned from the ring's bytes.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) });
    }
    let policy_id =
        *dp.lowering.policies_by_id.iter().find(|(_, p)| p.to_string() == "x/a").unwrap().0;
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    assert!(
        events.iter().any(|e| e.verdict == VERDICT_DROPPED
            && e.saddr == addr(c)
            && e.daddr == addr(a)
            && e.rule_id == policy_id),
        "{events:?}"
    );
}

/// Node-1's datapath with one policy of namespace x.
fn node_1_with(spec: serde_json::Value) -> Datapath {
    let mut dp = Datapath::new();
    let policy = weir_tests::policy_cases::policy("x", "p", spec);
    dp.program(&TruthTable::new(), &[policy], 0);
    dp
}

/// The IPv6 address of pod `name` of namespace x.
fn x6(name: &str) -> Ipv6Addr {
    match locate_in(&Party::Pod("x".into(), name.into()), true).0 {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => panic!("{ip} is not IPv6"),
    }
}

/// Under a default deny of both directions, neighbour discovery (ICMPv6 133-137) and multicast
/// listener discovery (130-132, 143: every interface sends reports from its link-local address
/// as it comes up) still pass both ways, also for a pod whose policy is not written yet; other
/// ICMPv6 (echo) does not.
#[test]
fn neighbour_discovery_always_passes() {
    let spec = serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]});
    let mut dp = node_1_with(spec);
    dp.maps.set_deny_unknown(true).unwrap();
    let a = x6("a");
    let gateway: Ipv6Addr = "fe80::1".parse().unwrap();
    let unknown: Ipv6Addr = "fd00:10:244:9::9".parse().unwrap();
    for pod in [a, unknown] {
        for icmp_type in (130..=137u8).chain([143]) {
            for (program, src, dst) in
                [(TC_POLICY_EGRESS, pod, gateway), (TC_POLICY_INGRESS, gateway, pod)]
            {
                let nd = Ipv6Packet::icmp(src, dst, icmp_type).build();
                assert!(dp.allows(program, &nd), "type {icmp_type} {src} -> {dst}");
            }
        }
        let echo = Ipv6Packet::icmp(gateway, pod, 128).build();
        assert!(!dp.allows(TC_POLICY_INGRESS, &echo), "echo to {pod} is not neighbour discovery");
        // An MLD report from the link-local address, behind its hop-by-hop header (router
        // alert), as the kernel sends it: passes. An echo behind the same header does not.
        let mut mld =
            Ipv6Packet::icmp("fe80::2".parse().unwrap(), "ff02::16".parse().unwrap(), 143);
        mld.ext = vec![Ipv6Ext::HopByHop];
        assert!(dp.allows(TC_POLICY_EGRESS, &mld.build()));
        let mut echo = Ipv6Packet::icmp(pod, gateway, 128);
        echo.ext = vec![Ipv6Ext::HopByHop];
        assert!(!dp.allows(TC_POLICY_EGRESS, &echo.build()));
    }
}

/// Extension headers are walked to the upper-layer header: a TCP packet behind hop-by-hop,
/// destination options and a first fragment header is checked by its port; a non-first
/// fragment has no ports and only a rule allowing every port of its protocol passes it.
#[test]
fn ipv6_extension_headers_and_fragments() {
    // x/a: TCP 80 from anyone; every UDP port from anyone.
    let dp = node_1_with(serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 80}]}, {"ports": [{"protocol": "UDP"}]}]}));
    let (a, c) = (x6("a"), x6("c"));
    let with = |dport: u16, proto: u8, ext: Vec<Ipv6Ext>| {
        let mut p = Ipv6Packet::new(c, 40000, a, dport, proto);
        p.ext = ext;
        dp.allows(TC_POLICY_INGRESS, &p.build())
    };
    let stack = || vec![Ipv6Ext::HopByHop, Ipv6Ext::DestOptions, Ipv6Ext::Fragment { offset: 0 }];
    assert!(with(80, proto::TCP, stack()));
    assert!(!with(81, proto::TCP, stack()), "the port behind the headers is read");
    assert!(!with(80, proto::TCP, vec![Ipv6Ext::Fragment { offset: 8 }]), "no port: no TCP 80");
    assert!(with(53, proto::UDP, vec![Ipv6Ext::Fragment { offset: 8 }]), "every UDP port");
    // More extension headers than the walk takes: only every-protocol rules would match.
    let deep = vec![Ipv6Ext::HopByHop; 5];
    assert!(!with(80, proto::TCP, deep));
}

/// The program's verdict code for an IPv6 packet of a pod without a policy is "pass" when no
/// policy exists, and the unknown-pod drop while policies exist (the no-window rule).
#[test]
fn unknown_ipv6_endpoints_are_denied_while_policies_exist() {
    let mut dp = Datapath::new();
    let unknown: IpAddr = "fd00:10:244:9::9".parse().unwrap();
    let pod = locate_in(&Party::Pod("x".into(), "a".into()), true).0;
    let pkt = packet(pod, 40000, unknown, 80, proto::TCP);
    assert_eq!(dp.run(TC_POLICY_INGRESS, &pkt), TC_ACT_OK);
    dp.maps.set_deny_unknown(true).unwrap();
    assert!(!dp.allows(TC_POLICY_INGRESS, &pkt));
    // The node's own IPv6 address may still probe it.
    let table = TruthTable::new();
    dp.program(&table, &[], 0);
    let probe = packet(IpAddr::V6(node_ip6(0)), 41000, unknown, 8080, proto::TCP);
    assert!(dp.allows(TC_POLICY_INGRESS, &probe));
}

/// While policies exist, an address without an endpoint entry (a pod whose policy is not
/// programmed yet) is denied; without the flag it passes.
#[test]
fn unknown_endpoints_are_denied_while_policies_exist() {
    let mut dp = Datapath::new();
    let unknown = IpAddr::V4(Ipv4Addr::new(10, 244, 9, 9));
    let pod = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 10));
    let pkt = packet(pod, 40000, unknown, 80, proto::TCP);
    assert!(dp.allows(TC_POLICY_INGRESS, &pkt));
    dp.maps.set_deny_unknown(true).unwrap();
    assert!(!dp.allows(TC_POLICY_INGRESS, &pkt));
    assert!(!dp.allows(TC_POLICY_EGRESS, &packet(unknown, 40000, pod, 80, proto::TCP)));
    let counters = read_counters(&dp.ebpf).unwrap();
    assert!(counters.contains(&(Counter::DropPolicyNotReady, 2)), "{counters:?}");
    dp.maps.set_deny_unknown(false).unwrap();
    assert!(dp.allows(TC_POLICY_INGRESS, &pkt));
}

/// A pod without an endpoint entry yet (while policies exist) is reachable from its own node
/// only (kubelet's readiness probe), and its replies to the node pass; another pod is still
/// denied, and the unknown pod cannot open connections to the node.
#[test]
fn the_node_reaches_a_pod_before_its_policy_is_written() {
    let mut dp = Datapath::new();
    let table = TruthTable::new();
    dp.program(&table, &[], 0);
    dp.maps.set_deny_unknown(true).unwrap();
    let unknown = IpAddr::V4(Ipv4Addr::new(10, 244, 9, 9));
    let node = IpAddr::V4(node_ip(0));
    let probe = packet(node, 41000, unknown, 8080, proto::TCP);
    assert!(dp.allows(TC_POLICY_INGRESS, &probe), "the node's probe reaches the new pod");
    let reply = packet(unknown, 8080, node, 41000, proto::TCP);
    assert!(dp.allows(TC_POLICY_EGRESS, &reply), "the new pod answers its node");
    let other_node = IpAddr::V4(node_ip(1));
    assert!(!dp.allows(TC_POLICY_INGRESS, &packet(other_node, 41000, unknown, 8080, proto::TCP)));
    let pod = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 10));
    assert!(!dp.allows(TC_POLICY_INGRESS, &packet(pod, 41001, unknown, 8080, proto::TCP)));
    assert!(
        !dp.allows(TC_POLICY_EGRESS, &packet(unknown, 41002, node, 22, proto::TCP)),
        "a connection the node did not open is not a reply"
    );
}

/// One more rule among many changes only its own entries.
#[test]
fn one_more_rule_writes_only_its_entries() {
    let mut dp = Datapath::new();
    let table = TruthTable::new();
    let rule = |i: u16| {
        weir_tests::policy_cases::policy(
            "x",
            &format!("p{i}"),
            serde_json::json!({
        "podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": format!("172.16.{}.{}/32", i / 256, i % 256)}}], "ports": [{"port": 1000 + i}]}]}),
        )
    };
    let mut policies: Vec<NetworkPolicy> = (0..500).map(rule).collect();
    let first = dp.program(&table, &policies, 0);
    policies.push(rule(500));
    let second = dp.program(&table, &policies, 0);
    assert!(first > 1000, "{first}");
    // One ipcache prefix, and one entry per pod of x on node-1 (x/a and x/b).
    assert_eq!(second, 3, "writes for +1 rule");
}
