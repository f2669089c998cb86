//! `weir agent --overlay vxlan` on a two-node cluster of namespaces (weir_tests::overlay):
//! pods reach each other across nodes through `weir.vxlan` (VNI 1, UDP 8472, learning off),
//! the pod MTU accounts for the encapsulation, each agent publishes its VTEP on its Node, and
//! the common scenario (masquerade, repair, restarts, node deletion) holds.
use weir_tests::{
    overlay::{Cluster, scenario},
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

        // Flannel's scheme: <podCIDR network>/32 on the device; per remote node an on-link
        // route via the remote network address, its neighbour entry and its FDB entry.
        let (code, remote) = cluster.api("GET", &format!("/api/v1/nodes/{}", other.name), None);
        assert_eq!(code, 200, "{remote}");
        let mac =
            remote["metadata"]["annotations"]["weir.dev/vtep-mac"].as_str().expect("vtep mac");
        assert_eq!(
            remote["metadata"]["annotations"]["weir.dev/vtep-ip"],
            other.address.to_string()
        );
        let cidr = remote["spec"]["podCIDR"].as_str().unwrap();
        let network = cidr.split('/').next().unwrap();
        let routes = cluster.weir_routes(i);
        assert!(
            routes.contains(&format!("{cidr} via {network} dev weir.vxlan"))
                && routes.contains("onlink"),
            "{routes}"
        );
        let neigh = node.cni.ns.ip(&["neigh", "show", "dev", "weir.vxlan"]).unwrap();
        assert!(neigh.contains(&format!("{network} lladdr {mac} PERMANENT")), "{neigh}");
        let fdb = std::process::Command::new("bridge")
            .args(["-n", node.cni.ns.name(), "fdb", "show", "dev", "weir.vxlan"])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        assert!(fdb.contains(&format!("{mac} dst {} self permanent", other.address)), "{fdb}");
        let own = node.cni.ns.ip(&["-4", "addr", "show", "dev", "weir.vxlan"]).unwrap();
        let (code, me) = cluster.api("GET", &format!("/api/v1/nodes/{}", node.name), None);
        assert_eq!(code, 200);
        let own_network =
            me["spec"]["podCIDR"].as_str().unwrap().split('/').next().unwrap().to_string();
        assert!(own.contains(&format!("inet {own_network}/32")), "{own}");
    }
}

#[test]
fn overlay_vxlan_pods_reach_each_other_across_nodes() {
    require_root();
    scenario("vxlan", 61, check_vxlan);
}
