//! ClientIP session affinity in the socket load balancer: a client keeps its backend across
//! connections; when that backend leaves the service it gets (and then keeps) another one; a
//! service without affinity still spreads the same client's connections.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::Value;
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::Planner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
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
    let net = ServiceNet::new("aff", 208, 3).unwrap();
    let cgroup = TestCgroup::new("affinity").unwrap();
    let pins = TestPinDir::new("affinity").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None).unwrap();
    let mut planner = Planner::new();
    writer.execute(&planner.plan(&desired(&net.backends, &net.backends)).ops).unwrap();

    let sticky = format!("{STICKY}:80");
    let first = backends_reached(&spread(&net.client, Some(&cgroup), &sticky, 60));
    assert_eq!(first.len(), 1, "60 connections with affinity, one backend: {first:?}");
    let spread_out =
        backends_reached(&spread(&net.client, Some(&cgroup), &format!("{SPREAD}:80"), 60));
    assert!(spread_out.len() >= 2, "without affinity the same client spreads: {spread_out:?}");

    // The remembered backend leaves the service: the client moves, and sticks again.
    let chosen: SocketAddr = first[0].parse().unwrap();
    let remaining: Vec<Ipv4Addr> =
        net.backends.iter().copied().filter(|ip| IpAddr::V4(*ip) != chosen.ip()).collect();
    writer.execute(&planner.plan(&desired(&remaining, &net.backends)).ops).unwrap();
    let after = backends_reached(&spread(&net.client, Some(&cgroup), &sticky, 60));
    assert_eq!(after.len(), 1, "sticky again: {after:?}");
    assert_ne!(after[0], first[0], "never the backend that left");
}
