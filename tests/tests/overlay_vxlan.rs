//! `weir agent --overlay vxlan` on a two-node cluster of namespaces (weir_tests::overlay):
//! pods reach each other across nodes through `weir.vxlan` (VNI 1, UDP 8472, learning off),
//! the pod MTU accounts for the encapsulation, each agent publishes its VTEP on its Node, and
//! the common scenario (masquerade, repair, restarts, node deletion) holds. On a dual-stack
//! cluster IPv6 pod traffic rides the same device over the same IPv4 underlay.
use weir_tests::{
    overlay::{Cluster, scenario, scenario_dual_stack},
    privileged::require_root,
};

fn check_vxlan(cluster: &Cluster) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let other = &cluster.nodes[1 - i];
        let link = node.cni.ns.ip(&["-d", "link", "show", "weir.vxlan"]).unwrap();
        for want in [
            "vxlan id 1 ",
            "dstport 8472",
            "nolearning",
            "mtu 1450",
            &format!("local {}", node.address),
        ] {
            assert!(link.contains(want), "{want:?} in {link}");
        }
        assert_eq!(
            cluster.announced_mtu(i),
            Some(1450),
            "{:?}",
            node.agent.as_ref().unwrap().lines
        );
        let pod_link = cluster.pod(i).ip(&["link", "show", "eth0"]).unwrap();
        assert!(pod_link.contains("mtu 1450"), "pod MTU from the node state file: {pod_link}");

        // Flannel's scheme: <podCIDR network>/32 (/128 for IPv6) on the device; per remote
        // node and family an on-link route via the remote network address and its neighbour
        // entry; one FDB entry per remote node, to its IPv4 address.
        let (code, remote) = cluster.api("GET", &format!("/api/v1/nodes/{}", other.name), None);
        assert_eq!(code, 200, "{remote}");
        let mac =
            remote["metadata"]["annotations"]["weir.dev/vtep-mac"].as_str().expect("vtep mac");
        assert_eq!(
            remote["metadata"]["annotations"]["weir.dev/vtep-ip"],
            other.address.to_string()
        );
        let routes = cluster.weir_routes(i);
        let neigh = node.cni.ns.ip(&["neigh", "show", "dev", "weir.vxlan"]).unwrap();
        for cidr in cluster.pod_cidrs(1 - i) {
            let network = cidr.split('/').next().unwrap();
            let route = routes.lines().find(|l| l.starts_with(&format!("{cidr} via {network} ")));
            assert!(
                route.is_some_and(|r| r.contains("dev weir.vxlan") && r.contains("onlink")),
                "{cidr} in {routes}"
            );
            assert!(neigh.contains(&format!("{network} lladdr {mac} PERMANENT")), "{neigh}");
        }
        let fdb = std::process::Command::new("bridge")
            .args(["-n", node.cni.ns.name(), "fdb", "show", "dev", "weir.vxlan"])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        assert!(fdb.contains(&format!("{mac} dst {} self permanent", other.address)), "{fdb}");
        assert_eq!(fdb.lines().filter(|l| l.contains(mac)).count(), 1, "one VTEP: {fdb}");
        let own = node.cni.ns.ip(&["addr", "show", "dev", "weir.vxlan"]).unwrap();
        for cidr in cluster.pod_cidrs(i) {
            let (network, _) = cidr.split_once('/').unwrap();
            let want = if cidr.contains(':') {
                format!("inet6 {network}/128")
            } else {
                format!("inet {network}/32")
            };
            assert!(own.contains(&want), "{want} in {own}");
        }
    }
}

#[test]
fn overlay_vxlan_pods_reach_each_other_across_nodes() {
    require_root();
    scenario("vxlan", 61, check_vxlan);
}

#[test]
fn overlay_vxlan_dual_stack_pods_reach_each_other_over_ipv6() {
    require_root();
    scenario_dual_stack("vxlan", 65, check_vxlan);
}
