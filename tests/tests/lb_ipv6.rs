//! IPv6 and dual-stack services end to end, without an API server: Service and EndpointSlice
//! objects (or a desired state written by hand) -> the model -> the datapath -> real TCP
//! connections over IPv6 inside test namespaces ([`ServiceNet`]). Runs once per dataplane.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};
use weir_proxy::model::{self, Frontend, FrontendState, NodeContext, Protocol, ServiceState};
use weir_tests::{
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    privileged::require_root,
    probe::{self, spread},
    topology::{BACKEND_PORT, ServiceNet},
};

const VIP4: &str = "10.96.6.1";
const VIP6: &str = "fd00:96::6:1";
const STICKY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 6, 2);
const REFUSED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 6, 3);
const DROPPED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 6, 4);

/// Service `default/web` on port 80 (target 8080) with `cluster_ips`.
fn service(cluster_ips: &[&str]) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                 "ipFamilyPolicy": if cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" },
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .unwrap()
}

/// The EndpointSlice of `default/web` for one address family, as the endpoint slice
/// controller makes one per family.
fn slice(backends: &[IpAddr]) -> EndpointSlice {
    let v6 = backends.first().is_some_and(IpAddr::is_ipv6);
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": if v6 { "web-v6" } else { "web-v4" }, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ips<T: Into<IpAddr> + Copy>(addresses: &[T]) -> Vec<IpAddr> {
    addresses.iter().map(|a| (*a).into()).collect()
}

/// `[address]:8080` / `address:8080`, as the echo servers name themselves.
fn backend(address: impl Into<IpAddr>) -> String {
    SocketAddr::new(address.into(), BACKEND_PORT).to_string()
}

/// The backends a `spread` result reached, checking that every connection succeeded.
fn reached(result: &Value) -> Vec<String> {
    assert_eq!(result["ok"], true, "{result}");
    result["backends"].as_object().unwrap().keys().cloned().collect()
}

fn node() -> NodeContext {
    NodeContext { name: "node-a".into(), addresses: vec![] }
}

#[test]
fn lb_ipv6_cluster_ip_spreads_over_its_backends_and_follows_their_removal() {
    require_root();
    for_each_dataplane(cluster_ip_spreads_and_follows_removal);
}

pub fn cluster_ip_spreads_and_follows_removal(dataplane: Dataplane) {
    const CONNECTIONS: u32 = 1000;
    let net = ServiceNet::new("v6ip", 215, 2).unwrap();
    let client = &net.client;
    let mut datapath = TestDatapath::new(dataplane, client, "v6ip").unwrap();
    let target = format!("[{VIP6}]:80");

    // Two backends: 1,000 connections spread evenly (each within 6 points of a half).
    let backends = ips(&net.backends6);
    datapath.apply(&model::build(&[service(&[VIP6])], &[slice(&backends)], &node())).unwrap();
    let result = spread(client, datapath.cgroup(), &target, CONNECTIONS);
    assert_eq!(reached(&result).len(), 2, "{result}");
    for ip in &net.backends6 {
        let n = result["backends"][backend(*ip)].as_u64().unwrap_or(0);
        let share = n as f64 / f64::from(CONNECTIONS);
        assert!((share - 0.5).abs() <= 0.06, "{ip}: {n} of {CONNECTIONS}: {result}");
    }

    // One endpoint goes away: a small change, and no connection reaches it afterwards.
    let ops = datapath
        .apply(&model::build(&[service(&[VIP6])], &[slice(&backends[..1])], &node()))
        .unwrap();
    // A few writes for the endpoint; on nftables a shape of service the table has not seen
    // yet (one IPv6 endpoint) also writes its class once (set, chain, the `services` rules).
    assert!(ops <= 16, "an endpoint removal is a few writes: {ops}");
    let result = spread(client, datapath.cgroup(), &target, 200);
    assert_eq!(reached(&result), [backend(net.backends6[0])], "{result}");
    if dataplane == Dataplane::Nftables {
        // Operators read the table with `nft list`: it parses the IPv6 rules weir wrote.
        let ruleset = client.nft_ruleset();
        assert!(
            ruleset.contains(
                "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map \
                 @service-endpoints-v6"
            ),
            "{ruleset}"
        );
    }

    // ClientIP affinity for an IPv6 client: every connection to the same backend.
    let mut state = model::build(&[service(&[VIP6])], &[slice(&backends)], &node());
    state.frontends.insert(
        Frontend { address: IpAddr::V6(STICKY6), port: 80, protocol: Protocol::Tcp },
        FrontendState {
            affinity_timeout: Some(300),
            ..FrontendState::cluster_ip(
                "default/sticky",
                backends.iter().map(|ip| SocketAddr::new(*ip, BACKEND_PORT)).collect(),
            )
        },
    );
    datapath.apply(&state).unwrap();
    let result = spread(client, datapath.cgroup(), &format!("[{STICKY6}]:80"), 40);
    assert_eq!(reached(&result).len(), 1, "a ClientIP service keeps its client: {result}");

    // The services go away: every entry the applier wrote is gone.
    datapath.apply(&ServiceState::default()).unwrap();
    assert_eq!(datapath.live_entries().unwrap(), 0);
    let result = spread(client, datapath.cgroup(), &target, 1);
    assert_eq!(result["ok"], false, "no service, the VIP answers nothing: {result}");
}

#[test]
fn lb_ipv6_a_dual_stack_service_serves_both_families() {
    require_root();
    for_each_dataplane(dual_stack_serves_both_families);
}

pub fn dual_stack_serves_both_families(dataplane: Dataplane) {
    let net = ServiceNet::new("dual", 216, 2).unwrap();
    let client = &net.client;
    let mut datapath = TestDatapath::new(dataplane, client, "dual").unwrap();
    let slices = [slice(&ips(&net.backends)), slice(&ips(&net.backends6))];
    datapath.apply(&model::build(&[service(&[VIP4, VIP6])], &slices, &node())).unwrap();

    // Each family's frontend reaches both backends, over its own family only.
    for (target, expected) in [
        (format!("{VIP4}:80"), net.backends.iter().map(|ip| backend(*ip)).collect::<Vec<_>>()),
        (format!("[{VIP6}]:80"), net.backends6.iter().map(|ip| backend(*ip)).collect()),
    ] {
        let result = spread(client, datapath.cgroup(), &target, 200);
        let mut got = reached(&result);
        got.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(got, expected, "{target}: {result}");
    }

    // The IPv6 endpoints go: the IPv4 frontend still serves, the IPv6 one refuses at once
    // (the service has no endpoint of its family).
    datapath.apply(&model::build(&[service(&[VIP4, VIP6])], &slices[..1], &node())).unwrap();
    let result = spread(client, datapath.cgroup(), &format!("{VIP4}:80"), 50);
    assert_eq!(reached(&result).len(), 2, "{result}");
    let refused = probe::run(client, datapath.cgroup(), &["tcp", &format!("[{VIP6}]:80")]);
    assert_eq!(refused["kind"], probe::refusal(dataplane), "an immediate refusal: {refused}");
}

/// An IPv6 service without endpoints refuses at once (TCP; UDP on nftables: ICMPv6 port
/// unreachable, or the send itself fails), and one whose traffic policy leaves no endpoint on
/// this node drops (nftables).
#[test]
fn lb_ipv6_frontends_without_endpoints_are_refused_or_dropped() {
    require_root();
    for_each_dataplane(without_endpoints_refused_or_dropped);
}

pub fn without_endpoints_refused_or_dropped(dataplane: Dataplane) {
    let net = ServiceNet::new("v6noep", 217, 1).unwrap();
    let mut datapath = TestDatapath::new(dataplane, &net.client, "v6noep").unwrap();
    let (refused, dropped) = (IpAddr::V6(REFUSED6), IpAddr::V6(DROPPED6));
    datapath.apply(&probe::no_endpoint_state(refused, dropped)).unwrap();
    probe::assert_refused_or_dropped(dataplane, &net.client, datapath.cgroup(), refused, dropped);
}
