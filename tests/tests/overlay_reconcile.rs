//! The routing reconciler on its own, in one test namespace (no API server, no agent): a
//! dual-stack remote node switched from native routing to VXLAN gets both its routes moved to
//! `weir.vxlan` (IPv6 refuses to replace an on-link route whose gateway the old route reaches
//! through another device, so the reconciler deletes and adds), a second pass changes nothing,
//! a hand-deleted IPv6 route comes back, and `remove_all` leaves no route of either family.
use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use weir_cni_plugin::netlink::Socket;
use weir_proxy::routing::{
    model::{Overlay, desired},
    reconcile::{Outcome, reconcile, remove_all},
};
use weir_tests::{
    netns::{Netns, Veth},
    privileged::require_root,
};

fn node(name: &str, cidrs: [&str; 2], ips: [&str; 2], mac: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"weir.dev/vtep-mac": mac}},
        "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
        "status": {"addresses": [
            {"type": "InternalIP", "address": ips[0]},
            {"type": "InternalIP", "address": ips[1]},
        ]},
    }))
    .unwrap()
}

#[test]
fn overlay_reconcile_moves_dual_stack_routes_from_native_to_vxlan() {
    require_root();
    let ns = Netns::new("reconcile").unwrap();
    let peer = Netns::new("reconcile-peer").unwrap();
    let veth = Veth::between(&ns, &peer).unwrap();
    ns.ip(&["addr", "add", "10.64.0.11/24", "dev", &veth.a]).unwrap();
    ns.ip(&["addr", "add", "fd00:64::11/64", "dev", &veth.a, "nodad"]).unwrap();
    let nodes = [
        node(
            "a",
            ["10.244.0.0/24", "fd00:10:244::/64"],
            ["10.64.0.11", "fd00:64::11"],
            "02:00:00:00:00:0a",
        ),
        node(
            "b",
            ["10.244.1.0/24", "fd00:10:244:1::/64"],
            ["10.64.0.12", "fd00:64::12"],
            "02:00:00:00:00:0b",
        ),
    ];
    let pass = |overlay: Overlay| -> Outcome {
        let want = desired(&nodes, "a", overlay, &[]);
        ns.run(move || {
            let mut sock = Socket::open().expect("netlink socket");
            reconcile(&mut sock, overlay, &want, None).expect("reconcile")
        })
        .expect("entering the namespace")
    };
    let routes = || ns.ip(&["-6", "route", "show", "proto", "87"]).unwrap();

    let native = pass(Overlay::Native);
    assert!(native.failed.is_empty(), "{native:?}");
    let v6 = routes();
    assert!(v6.contains(&format!("fd00:10:244:1::/64 via fd00:64::12 dev {}", veth.a)), "{v6}");

    let vxlan = pass(Overlay::Vxlan);
    assert!(vxlan.failed.is_empty(), "{vxlan:?}");
    let v6 = routes();
    assert!(v6.contains("fd00:10:244:1::/64 via fd00:10:244:1:: dev weir.vxlan"), "{v6}");
    let v4 = ns.ip(&["-4", "route", "show", "proto", "87"]).unwrap();
    assert!(v4.contains("10.244.1.0/24 via 10.244.1.0 dev weir.vxlan"), "{v4}");
    let neigh = ns.ip(&["-6", "neigh", "show", "dev", "weir.vxlan"]).unwrap();
    assert!(neigh.contains("fd00:10:244:1:: lladdr 02:00:00:00:00:0b PERMANENT"), "{neigh}");
    let own = ns.ip(&["-6", "addr", "show", "dev", "weir.vxlan"]).unwrap();
    assert!(own.contains("inet6 fd00:10:244::/128"), "{own}");

    let again = pass(Overlay::Vxlan);
    assert_eq!((again.changes, again.failed.len()), (0, 0), "idempotent: {again:?}");

    ns.ip(&["route", "del", "fd00:10:244:1::/64", "proto", "87"]).unwrap();
    let repaired = pass(Overlay::Vxlan);
    assert_eq!(repaired.changes, 1, "{repaired:?}");
    assert_eq!(routes(), v6, "the deleted IPv6 route is back as it was");

    let removed = ns
        .run(|| remove_all(&mut Socket::open().expect("netlink socket")).expect("remove_all"))
        .unwrap();
    assert!(removed >= 1, "{removed}");
    assert_eq!(routes(), "", "no weir IPv6 route left");
    assert!(ns.ip(&["link", "show", "weir.vxlan"]).is_err(), "the device is gone");
}
