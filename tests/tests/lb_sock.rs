//! Socket-level load balancing end to end: processes in a cgroup with weir's connect4/6,
//! sendmsg4/6, recvmsg4/6 and getpeername4/6 programs reach service VIPs that no route knows,
//! over real TCP and UDP sockets of both families, and see the VIP as their peer. Processes
//! outside the cgroup are not affected (the negative control that proves the programs do the
//! work). The IPv6 cases write their services through the planner and map writer the agent
//! uses.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::Value;
use weir_common::{lb::Backend, metrics::Counter, proto};
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::{ServiceEntry, ServiceMaps, read_counters},
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    echo::{EchoServer, parse_reply},
    netns::{Netns, Veth},
    privileged::require_root,
    probe,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const VIP_NO_BACKENDS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);

struct Setup {
    client: Netns,
    cgroup: TestCgroup,
    ebpf: aya::Ebpf,
    _pins: TestPinDir,
    _servers: Vec<EchoServer>,
    _server: Netns,
}

fn setup() -> Setup {
    require_root();
    let client = Netns::new("sockc").unwrap();
    let server = Netns::new("socks").unwrap();
    let veth = Veth::between(&client, &server).unwrap();
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", &veth.a]).unwrap();
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &veth.b]).unwrap();
    let servers = vec![
        EchoServer::tcp(&server, (SERVER, 8080).into()).unwrap(),
        EchoServer::udp(&server, (SERVER, 5353).into()).unwrap(),
    ];
    let cgroup = TestCgroup::new("socklb").unwrap();
    let pins = TestPinDir::new("sock").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut maps = ServiceMaps::take(&mut loaded.ebpf).unwrap();
    for (rev_nat_index, address, port, proto, backends) in [
        (1, VIP, 80, proto::TCP, vec![(1, Backend::new(SERVER.octets(), 8080, proto::TCP))]),
        (2, VIP, 53, proto::UDP, vec![(2, Backend::new(SERVER.octets(), 5353, proto::UDP))]),
        (3, VIP_NO_BACKENDS, 80, proto::TCP, vec![]),
    ] {
        maps.upsert(&ServiceEntry { address, port, proto, rev_nat_index, backends }).unwrap();
    }
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None).unwrap();
    Setup { client, cgroup, ebpf: loaded.ebpf, _pins: pins, _servers: servers, _server: server }
}

/// Runs weir-probe in the client namespace, inside the LB cgroup or not.
fn probe(setup: &Setup, in_cgroup: bool, mode: &str, target: SocketAddr) -> Value {
    let cgroup = in_cgroup.then_some(&setup.cgroup);
    probe::run(&setup.client, cgroup, &[mode, &target.to_string(), "--timeout-ms", "2000"])
}

fn counter(setup: &Setup, which: Counter) -> u64 {
    read_counters(&setup.ebpf).unwrap().into_iter().find(|(c, _)| *c == which).unwrap().1
}

#[test]
fn lb_sock_tcp_to_the_vip_reaches_the_backend_and_reports_the_vip_as_peer() {
    let setup = setup();
    let result = probe(&setup, true, "tcp", (VIP, 80).into());
    assert_eq!(result["ok"], true, "{result}");
    let (backend, client_seen) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
    assert_eq!(backend, (SERVER, 8080).into(), "the backend answered");
    assert_eq!(client_seen.ip(), CLIENT, "the client address is preserved");
    assert_eq!(result["peer"], "10.96.0.20:80", "getpeername() reports the VIP");
    assert!(counter(&setup, Counter::SockTranslated) >= 1);
    assert!(counter(&setup, Counter::SockReverseTranslated) >= 1);
}

#[test]
fn lb_sock_udp_unconnected_and_connected_see_replies_from_the_vip() {
    let setup = setup();
    for mode in ["udp", "udp-connected"] {
        let result = probe(&setup, true, mode, (VIP, 53).into());
        assert_eq!(result["ok"], true, "{mode}: {result}");
        let (backend, client_seen) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
        assert_eq!(backend, (SERVER, 5353).into(), "{mode}");
        assert_eq!(client_seen.ip(), CLIENT, "{mode}");
        assert_eq!(result["peer"], "10.96.0.20:53", "{mode}: the reply comes from the VIP");
    }
}

#[test]
fn lb_sock_service_without_backends_is_refused_at_connect() {
    let setup = setup();
    let result = probe(&setup, true, "tcp", (VIP_NO_BACKENDS, 80).into());
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["kind"], "PermissionDenied", "an immediate error, not a timeout: {result}");
    assert_eq!(counter(&setup, Counter::SockRejectNoBackend), 1);
}

#[test]
fn lb_sock_leaves_other_destinations_and_other_cgroups_alone() {
    let setup = setup();
    // A direct connection to the backend's own address is not translated.
    let direct = probe(&setup, true, "tcp", (SERVER, 8080).into());
    assert_eq!(direct["ok"], true, "{direct}");
    assert_eq!(direct["peer"], "10.202.0.2:8080");
    assert_eq!(counter(&setup, Counter::SockTranslated), 0);
    // Outside the cgroup nothing translates the VIP, and no route leads to it.
    let outside = probe(&setup, false, "tcp", (VIP, 80).into());
    assert_eq!(outside["ok"], false, "the VIP only works through the programs: {outside}");
}

#[test]
fn lb_sock_hairpin_a_pod_reaches_itself_through_its_service() {
    require_root();
    let pod = Netns::new("hairpin").unwrap();
    let peer = Netns::new("hairpinp").unwrap();
    let veth = Veth::between(&pod, &peer).unwrap();
    let pod_ip = Ipv4Addr::new(10, 210, 0, 1);
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", &veth.a]).unwrap();
    let _server = EchoServer::tcp(&pod, (pod_ip, 8080).into()).unwrap();
    let cgroup = TestCgroup::new("hairpin").unwrap();
    let pins = TestPinDir::new("hairpin").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let vip = Ipv4Addr::new(10, 96, 0, 30);
    ServiceMaps::take(&mut loaded.ebpf)
        .unwrap()
        .upsert(&ServiceEntry {
            address: vip,
            port: 80,
            proto: proto::TCP,
            rev_nat_index: 1,
            backends: vec![(1, Backend::new(pod_ip.octets(), 8080, proto::TCP))],
        })
        .unwrap();
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None).unwrap();

    let result = probe::run(&pod, Some(&cgroup), &["tcp", &format!("{vip}:80")]);
    assert_eq!(result["ok"], true, "{result}");
    let (backend, client) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
    assert_eq!((backend.ip(), client.ip()), (pod_ip.into(), pod_ip.into()), "{result}");
    assert_eq!(result["peer"], format!("{vip}:80"), "the pod still sees its service's VIP");
}

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 1);
const SERVERS6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 3),
];
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const VIP6_AFFINITY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x22);
const VIP6_NO_BACKENDS: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x21);

/// An IPv6 client and two IPv6 backends (TCP 8080, UDP 5353 each), with services written
/// through [`ServicePlanner`]: VIP6 (TCP 80, UDP 53) over both backends, VIP6_AFFINITY (TCP 80)
/// with ClientIP affinity, VIP6_NO_BACKENDS (TCP 80) without endpoints.
fn setup6() -> Setup {
    require_root();
    let client = Netns::new("sock6c").unwrap();
    let server = Netns::new("sock6s").unwrap();
    let veth = Veth::between(&client, &server).unwrap();
    client.ip(&["addr", "add", &format!("{CLIENT6}/64"), "dev", &veth.a, "nodad"]).unwrap();
    let mut servers = Vec::new();
    for backend in SERVERS6 {
        server.ip(&["addr", "add", &format!("{backend}/64"), "dev", &veth.b, "nodad"]).unwrap();
        servers.push(EchoServer::tcp(&server, (backend, 8080).into()).unwrap());
        servers.push(EchoServer::udp(&server, (backend, 5353).into()).unwrap());
    }
    let cgroup = TestCgroup::new("socklb6").unwrap();
    let pins = TestPinDir::new("sock6").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut desired = ServiceState::default();
    let backends = |port: u16| SERVERS6.iter().map(|ip| SocketAddr::from((*ip, port))).collect();
    let mut add = |vip: Ipv6Addr, port: u16, protocol: Protocol, state: FrontendState| {
        desired.frontends.insert(Frontend { address: vip.into(), port, protocol }, state);
    };
    add(VIP6, 80, Protocol::Tcp, FrontendState::cluster_ip("default/web", backends(8080)));
    add(VIP6, 53, Protocol::Udp, FrontendState::cluster_ip("default/dns", backends(5353)));
    add(
        VIP6_AFFINITY,
        80,
        Protocol::Tcp,
        FrontendState {
            affinity_timeout: Some(600),
            ..FrontendState::cluster_ip("default/sticky", backends(8080))
        },
    );
    add(VIP6_NO_BACKENDS, 80, Protocol::Tcp, FrontendState::cluster_ip("default/none", vec![]));
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    let plan = ServicePlanner::new().plan(&desired);
    assert!(plan.v4.ops.is_empty(), "IPv6 services write no IPv4 entry: {:?}", plan.v4);
    writer.apply(&plan).unwrap();
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None).unwrap();
    Setup { client, cgroup, ebpf: loaded.ebpf, _pins: pins, _servers: servers, _server: server }
}

#[test]
fn lb_sock_ipv6_tcp_and_udp_reach_backends_and_report_the_vip_as_peer() {
    let setup = setup6();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let result = probe(&setup, true, "tcp", (VIP6, 80).into());
        assert_eq!(result["ok"], true, "{result}");
        let (backend, client_seen) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
        assert_eq!(client_seen.ip(), CLIENT6, "the client address is preserved");
        assert_eq!(result["peer"], "[fd00:96::20]:80", "getpeername() reports the VIP");
        seen.insert(backend);
    }
    let both: std::collections::BTreeSet<SocketAddr> =
        SERVERS6.iter().map(|ip| SocketAddr::from((*ip, 8080))).collect();
    assert_eq!(seen, both, "20 connections reach both backends");
    for mode in ["udp", "udp-connected"] {
        let result = probe(&setup, true, mode, (VIP6, 53).into());
        assert_eq!(result["ok"], true, "{mode}: {result}");
        let (backend, _) = parse_reply(result["reply"].as_str().unwrap()).unwrap();
        assert_eq!(backend.port(), 5353, "{mode}");
        assert_eq!(result["peer"], "[fd00:96::20]:53", "{mode}: the reply comes from the VIP");
    }
    assert!(counter(&setup, Counter::SockReverseTranslated) >= 22);
}

#[test]
fn lb_sock_ipv6_affinity_pins_the_client_and_an_empty_service_is_refused() {
    let setup = setup6();
    let backends: std::collections::BTreeSet<SocketAddr> = (0..10)
        .map(|_| {
            let result = probe(&setup, true, "tcp", (VIP6_AFFINITY, 80).into());
            assert_eq!(result["ok"], true, "{result}");
            parse_reply(result["reply"].as_str().unwrap()).unwrap().0
        })
        .collect();
    assert_eq!(backends.len(), 1, "ClientIP affinity keeps one backend: {backends:?}");

    let refused = probe(&setup, true, "tcp", (VIP6_NO_BACKENDS, 80).into());
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["kind"], "PermissionDenied", "an immediate error: {refused}");
    assert_eq!(counter(&setup, Counter::SockRejectNoBackend), 1);

    // Outside the cgroup nothing translates the VIP.
    let outside = probe(&setup, false, "tcp", (VIP6, 80).into());
    assert_eq!(outside["ok"], false, "the VIP only works through the programs: {outside}");
}
