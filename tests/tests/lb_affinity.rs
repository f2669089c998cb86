//! ClientIP session affinity, on both dataplanes (the socket load balancer; nftables' per
//! endpoint affinity sets): a client keeps its backend across connections; when that backend
//! leaves the service it gets (and then keeps) another one; a service without affinity still
//! spreads the same client's connections.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::Value;
use weir_proxy::model::{Frontend, FrontendState, Protocol, ServiceState};
use weir_tests::{
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    privileged::require_root,
    probe::spread,
    topology::{BACKEND_PORT, ServiceNet},
};

const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 4, 1);
const SPREAD: Ipv4Addr = Ipv4Addr::new(10, 96, 4, 2);

fn desired(sticky: &[Ipv4Addr], spread: &[Ipv4Addr]) -> ServiceState {
    let mut state = ServiceState::default();
    for (vip, backends, affinity) in [(STICKY, sticky, Some(300)), (SPREAD, spread, None)] {
        state.frontends.insert(
            Frontend { address: IpAddr::V4(vip), port: 80, protocol: Protocol::Tcp },
            FrontendState {
                affinity_timeout: affinity,
                ..FrontendState::cluster_ip(
                    format!("default/{vip}"),
                    backends.iter().map(|ip| SocketAddr::from((*ip, BACKEND_PORT))).collect(),
                )
            },
        );
    }
    state
}

fn backends_reached(result: &Value) -> Vec<String> {
    assert_eq!(result["ok"], true, "{result}");
    result["backends"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn lb_affinity_keeps_a_client_on_its_backend_until_the_backend_leaves() {
    require_root();
    for_each_dataplane(keeps_a_client_on_its_backend);
}

fn keeps_a_client_on_its_backend(dataplane: Dataplane) {
    let net = ServiceNet::new("aff", 208, 3).unwrap();
    let mut datapath = TestDatapath::new(dataplane, &net.client, "affinity").unwrap();
    datapath.apply(&desired(&net.backends, &net.backends)).unwrap();
    let cgroup = datapath.cgroup();

    let sticky = format!("{STICKY}:80");
    let first = backends_reached(&spread(&net.client, cgroup, &sticky, 60));
    assert_eq!(first.len(), 1, "60 connections with affinity, one backend: {first:?}");
    let spread_out = backends_reached(&spread(&net.client, cgroup, &format!("{SPREAD}:80"), 60));
    assert!(spread_out.len() >= 2, "without affinity the same client spreads: {spread_out:?}");

    // The remembered backend leaves the service: the client moves, and sticks again.
    let chosen: SocketAddr = first[0].parse().unwrap();
    let remaining: Vec<Ipv4Addr> =
        net.backends.iter().copied().filter(|ip| IpAddr::V4(*ip) != chosen.ip()).collect();
    datapath.apply(&desired(&remaining, &net.backends)).unwrap();
    let cgroup = datapath.cgroup();
    let after = backends_reached(&spread(&net.client, cgroup, &sticky, 60));
    assert_eq!(after.len(), 1, "sticky again: {after:?}");
    assert_ne!(after[0], first[0], "never the backend that left");
}
