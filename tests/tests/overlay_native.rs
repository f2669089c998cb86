//! `weir agent --overlay native` on a two-node cluster of namespaces (weir_tests::overlay):
//! a route per remote pod CIDR via the remote node's address on eth0, the full uplink MTU for
//! pods, no VXLAN device, and the common scenario (masquerade, repair, restarts, node
//! deletion).
use weir_tests::{
    overlay::{Cluster, scenario},
    privileged::require_root,
};

fn check_native(cluster: &Cluster) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let other = &cluster.nodes[1 - i];
        let (code, remote) = cluster.api("GET", &format!("/api/v1/nodes/{}", other.name), None);
        assert_eq!(code, 200, "{remote}");
        let cidr = remote["spec"]["podCIDR"].as_str().unwrap();
        let routes = cluster.weir_routes(i);
        assert!(routes.contains(&format!("{cidr} via {} dev eth0", other.address)), "{routes}");
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
