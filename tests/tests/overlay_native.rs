//! `weir agent --overlay native` on a two-node cluster of namespaces (weir_tests::overlay):
//! a route per remote pod CIDR via the remote node's address on eth0, the full uplink MTU for
//! pods, no VXLAN device, and the common scenario (masquerade, repair, restarts, node
//! deletion). On a dual-stack cluster IPv6 pod CIDRs are routed via the nodes' IPv6 addresses.
use std::net::IpAddr;

use weir_tests::{
    overlay::{Cluster, scenario, scenario_dual_stack},
    privileged::require_root,
};

fn check_native(cluster: &Cluster) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let other = &cluster.nodes[1 - i];
        let routes = cluster.weir_routes(i);
        for cidr in cluster.pod_cidrs(1 - i) {
            let via: IpAddr = match cidr.contains(':') {
                true => other.address_v6.expect("an IPv6 underlay address").into(),
                false => other.address.into(),
            };
            assert!(routes.contains(&format!("{cidr} via {via} dev eth0")), "{routes}");
        }
        assert!(node.cni.ns.ip(&["link", "show", "weir.vxlan"]).is_err(), "no vxlan device");
        assert_eq!(cluster.announced_mtu(i), Some(1500));
        let pod_link = cluster.pod(i).ip(&["link", "show", "eth0"]).unwrap();
        assert!(pod_link.contains("mtu 1500"), "{pod_link}");
    }
}

#[test]
fn overlay_native_pods_reach_each_other_across_nodes() {
    require_root();
    scenario("native", 62, check_native);
}

#[test]
fn overlay_native_dual_stack_pods_reach_each_other_over_ipv6() {
    require_root();
    scenario_dual_stack("native", 66, check_native);
}
