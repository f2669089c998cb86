//! Hairpin through the nftables dataplane: a pod reaches itself through its own service. The
//! node (its own namespace, holding the table) DNATs the pod's packet back to the pod; without
//! masquerading, the pod would get a packet from its own address on its uplink (a martian,
//! dropped) and its reply would never go back through the node's NAT. The eBPF dataplane's
//! hairpin (translated at connect(), no NAT at all) is in lb_sock.rs.
use std::net::{IpAddr, Ipv4Addr};

use weir_proxy::model::{Frontend, FrontendState, Protocol, ServiceState};
use weir_tests::{
    dataplane::{TestDatapath, table_name},
    echo::{EchoServer, parse_reply},
    netns::{Netns, Veth},
    privileged::require_root,
    probe,
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

#[test]
fn lb_hairpin_a_pod_reaches_itself_through_its_service_on_nftables() {
    require_root();
    let node = Netns::new("hairpinn").unwrap();
    let pod = Netns::new("hairpinp").unwrap();
    let veth = Veth::between(&pod, &node).unwrap();
    pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", &veth.a]).unwrap();
    pod.ip(&["route", "add", "default", "via", &NODE.to_string()]).unwrap();
    node.ip(&["addr", "add", &format!("{NODE}/24"), "dev", &veth.b]).unwrap();
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")).unwrap().unwrap();
    let _server = EchoServer::tcp(&pod, (POD, 8080).into()).unwrap();

    let mut datapath = TestDatapath::nft_table(&node, &table_name("hairpin")).unwrap();
    let mut state = ServiceState::default();
    state.frontends.insert(
        Frontend { address: IpAddr::V4(VIP), port: 80, protocol: Protocol::Tcp },
        FrontendState::cluster_ip("default/self", vec![(POD, 8080).into()]),
    );
    datapath.apply(&state).unwrap();

    let result = probe::run(&pod, None, &["tcp", &format!("{VIP}:80")]);
    assert_eq!(result["ok"], true, "{result}");
    let (backend, client) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
    assert_eq!(backend.ip(), IpAddr::V4(POD), "{result}");
    assert_eq!(client.ip(), IpAddr::V4(NODE), "masqueraded to the node's address: {result}");
    assert_eq!(result["peer"], format!("{VIP}:80"), "the pod sees its service's address");

    // Operators read the table with `nft list`: it parses what weir wrote.
    let ruleset = node.nft_ruleset();
    assert!(
        ruleset.contains("dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map"),
        "{ruleset}"
    );
}
