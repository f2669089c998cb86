//! The service pipeline end to end, without an API server: Kubernetes Service and
//! EndpointSlice objects -> the pure model -> the incremental planner -> the datapath (eBPF
//! maps and the socket-level load balancer, or the nftables table) -> real TCP connections.
//! Runs once per dataplane.
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};
use weir_proxy::model::{self, NodeContext};
use weir_tests::{
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    privileged::require_root,
    probe::{self, spread},
    topology::ServiceNet,
};

const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 203, 0, 2), Ipv4Addr::new(10, 203, 0, 3), Ipv4Addr::new(10, 203, 0, 4)];
const VIP: &str = "10.96.1.1";
const CONNECTIONS: u32 = 3000;
const REFUSED: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const DROPPED: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 3);

fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap()
}

fn slice(backends: &[Ipv4Addr]) -> EndpointSlice {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

#[test]
fn lb_apply_services_and_endpoint_changes_reach_the_datapath() {
    require_root();
    for_each_dataplane(services_and_endpoint_changes);
}

fn services_and_endpoint_changes(dataplane: Dataplane) {
    let net = ServiceNet::new("apply", 203, 3).unwrap();
    assert_eq!(net.backends, BACKENDS);
    let client = &net.client;
    let mut datapath = TestDatapath::new(dataplane, client, "apply").unwrap();
    let node = NodeContext { name: "node-a".into(), addresses: vec![] };

    // Three backends: 3,000 connections spread evenly (each within 5 points of a third).
    datapath.apply(&model::build(&[service()], &[slice(&BACKENDS)], &node)).unwrap();
    let result = spread(client, datapath.cgroup(), &format!("{VIP}:80"), CONNECTIONS);
    assert_eq!(result["ok"], true, "{result}");
    for ip in BACKENDS {
        let n = result["backends"][format!("{ip}:8080")].as_u64().unwrap_or(0);
        let share = n as f64 / f64::from(CONNECTIONS);
        assert!((share - 1.0 / 3.0).abs() <= 0.05, "{ip}: {n} of {CONNECTIONS}: {result}");
    }

    // One endpoint goes away: a small change, and no connection reaches it afterwards.
    let ops = datapath.apply(&model::build(&[service()], &[slice(&BACKENDS[..2])], &node)).unwrap();
    // At most 6 writes for the endpoint. On nftables a shape of service the table has not
    // seen yet (two endpoints) also writes its class once (set, chain, the `services` rules).
    assert!(ops <= 16, "an endpoint removal is a few writes: {ops}");
    let result = spread(client, datapath.cgroup(), &format!("{VIP}:80"), 300);
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["backends"].get(format!("{}:8080", BACKENDS[2])).is_none(), "{result}");
    assert_eq!(result["backends"].as_object().unwrap().len(), 2, "{result}");

    // The service goes away: every entry the applier wrote is gone.
    datapath.apply(&model::build(&[], &[], &node)).unwrap();
    assert_eq!(datapath.live_entries().unwrap(), 0);
    let result = spread(client, datapath.cgroup(), &format!("{VIP}:80"), 1);
    assert_eq!(result["ok"], false, "no service, the VIP answers nothing: {result}");
}

/// A service without endpoints refuses at once (eBPF: at connect(); nftables: TCP reset, ICMP
/// port unreachable for UDP), and one whose traffic policy leaves no endpoint on this node
/// drops (nftables; the eBPF datapath refuses both today, docs/services.md).
#[test]
fn lb_apply_services_without_endpoints_are_refused_or_dropped() {
    require_root();
    for_each_dataplane(|dataplane| {
        let net = ServiceNet::new("noep", 211, 1).unwrap();
        let mut datapath = TestDatapath::new(dataplane, &net.client, "noep").unwrap();
        let (refused, dropped) = (IpAddr::V4(REFUSED), IpAddr::V4(DROPPED));
        datapath.apply(&probe::no_endpoint_state(refused, dropped)).unwrap();
        probe::assert_refused_or_dropped(
            dataplane,
            &net.client,
            datapath.cgroup(),
            refused,
            dropped,
        );
    });
}
