//! Conntrack hygiene on the per-packet path: when a backend leaves a UDP service, the
//! conntrack entries of its flows are flushed (so they re-balance on their next datagram, as
//! kube-proxy's conntrack flush does), while the UDP flows of the remaining backend and TCP
//! flows are untouched. Flows are created by running tc_lb4_fwd with BPF_PROG_TEST_RUN.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use weir_common::conntrack::{CT4_MAP, CtKey4, CtValue4};
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, LoadOptions, TC_LB4_FORWARD},
};
use weir_tests::{bpffs::TestPinDir, packet::Ipv4Packet, privileged::require_root};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

fn desired(dns_backends: &[Ipv4Addr]) -> ServiceState {
    let mut state = ServiceState::default();
    for (vip, port, protocol, backends) in
        [(DNS, 53, Protocol::Udp, dns_backends), (WEB, 80, Protocol::Tcp, &[A, B][..])]
    {
        state.frontends.insert(
            Frontend { address: IpAddr::V4(vip), port, protocol },
            FrontendState::cluster_ip(
                format!("default/{vip}"),
                backends.iter().map(|ip| SocketAddr::from((*ip, port))).collect(),
            ),
        );
    }
    state
}

fn send(ebpf: &Ebpf, packet: &Ipv4Packet) -> Ipv4Packet {
    let program = programs::classifier_ref(ebpf, TC_LB4_FORWARD).unwrap();
    let wire = packet.build();
    let mut out = vec![0u8; wire.len()];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&wire),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap();
    assert_eq!(result.return_value, 0);
    Ipv4Packet::parse(&out).unwrap()
}

/// Backend address of every tracked forward flow, by (protocol, client port), read from the
/// pinned conntrack map.
fn tracked(
    pins: &TestPinDir,
    backend_of: &std::collections::HashMap<u32, Ipv4Addr>,
) -> Vec<(u8, u16, Ipv4Addr)> {
    let ct = pins.open_hash::<CtKey4, CtValue4>(CT4_MAP).unwrap();
    let mut flows: Vec<_> = ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.direction == weir_common::conntrack::CT_FORWARD)
        .map(|(key, value)| (key.proto, u16::from_be(key.sport), backend_of[&value.backend_id]))
        .collect();
    flows.sort();
    flows
}

#[test]
fn lb_conntrack_flushes_udp_flows_of_removed_backends_only() {
    require_root();
    let pins = TestPinDir::new("ct").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    let mut planner = ServicePlanner::new();
    writer.apply(&planner.plan(&desired(&[A, B]))).unwrap();
    let backend_of: std::collections::HashMap<u32, Ipv4Addr> = writer
        .maps()
        .v4
        .backend_entries()
        .into_iter()
        .map(|(id, b)| (id, Ipv4Addr::from(b.address_octets())))
        .collect();

    // UDP flows until both backends have some (bounded), and a few TCP flows.
    let mut udp_to = std::collections::BTreeSet::new();
    for sport in 40_000..40_200u16 {
        udp_to.insert(send(&loaded.ebpf, &Ipv4Packet::udp(CLIENT, sport, DNS, 53)).dst);
        if udp_to.len() == 2 && sport >= 40_010 {
            break;
        }
    }
    assert_eq!(udp_to.len(), 2, "UDP flows reached both backends");
    for sport in 50_000..50_010u16 {
        send(&loaded.ebpf, &Ipv4Packet::tcp(CLIENT, sport, WEB, 80));
    }
    let before = tracked(&pins, &backend_of);

    // A leaves the DNS service.
    let plan = planner.plan(&desired(&[B]));
    let flushed = writer.apply(&plan).unwrap();
    let after = tracked(&pins, &backend_of);

    let udp_to_a = before.iter().filter(|(p, _, b)| *p == 17 && *b == A).count();
    assert!(udp_to_a > 0);
    assert_eq!(flushed, 2 * udp_to_a, "forward and reply entry of each UDP flow to A");
    let expected: Vec<_> =
        before.iter().filter(|(p, _, b)| !(*p == 17 && *b == A)).copied().collect();
    assert_eq!(after, expected, "UDP flows to B and all TCP flows are untouched");
    assert!(after.iter().any(|(p, _, b)| *p == 6 && *b == A), "TCP flows to A stay (UDP only)");

    // The flushed flows re-balance: their next datagram goes to B.
    let (_, sport, _) = before.iter().find(|(p, _, b)| *p == 17 && *b == A).unwrap();
    assert_eq!(send(&loaded.ebpf, &Ipv4Packet::udp(CLIENT, *sport, DNS, 53)).dst, B);
}
