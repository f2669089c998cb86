//! BPF unit tests of the tc load balancer (ebpf/src/lb.rs, nat.rs, packet.rs): packets built in
//! Rust, run through the loaded programs with BPF_PROG_TEST_RUN, and the verdict, rewritten
//! headers, checksums and map side effects checked. Privileged: they load eBPF.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use weir_common::{
    conntrack::{CT_FORWARD, CT_REPLY, CT4_MAP, CtKey4, CtValue4},
    lb::Backend,
    metrics::Counter,
    proto,
};
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::{ServiceEntry, ServiceMaps, read_counters},
    model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty},
    programs::{self, LoadOptions, TC_LB4_FORWARD, TC_LB4_REVERSE},
};
use weir_tests::{
    bpffs::TestPinDir,
    packet::{
        Ipv4Packet, Ipv6Packet, checksum, clear_udp_checksum, fill_l4_checksum6, ipv4_checksum_ok,
        l4_checksum_ok, l4_checksum6_ok,
    },
    privileged::require_root,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 3)];

/// Loads the object with both LB programs and one service VIP:80 (`proto`) whose backends are
/// the first `backends` of [`BACKENDS`] on port 8080.
fn setup(proto: u8, backends: usize) -> (Ebpf, TestPinDir) {
    require_root();
    let pins = TestPinDir::new("rewrite").unwrap();
    let mut loaded =
        programs::load(&LoadOptions::new(pins.path())).expect("load weir's eBPF object");
    let mut maps = ServiceMaps::take(&mut loaded.ebpf).expect("service maps");
    maps.upsert(&ServiceEntry {
        address: VIP,
        port: 80,
        proto,
        rev_nat_index: 7,
        backends: BACKENDS[..backends]
            .iter()
            .zip(1u32..)
            .map(|(addr, id)| (id, Backend::new(addr.octets(), 8080, proto)))
            .collect(),
    })
    .expect("write service");
    (loaded.ebpf, pins)
}

/// Runs `program` once on `packet`; returns the verdict and the packet as the program left it.
fn run(ebpf: &Ebpf, program: &'static str, packet: &[u8]) -> (u32, Vec<u8>) {
    let program = programs::classifier_ref(ebpf, program).expect("program loaded");
    let mut out = vec![0u8; packet.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn counter(ebpf: &Ebpf, which: Counter) -> u64 {
    read_counters(ebpf)
        .expect("read counters")
        .into_iter()
        .find(|(c, _)| *c == which)
        .map(|(_, v)| v)
        .unwrap()
}

/// The conntrack entry for `key`, read from the pinned map (the service maps' owner took the
/// map out of the `Ebpf` object).
fn ct_entry(pins: &TestPinDir, key: CtKey4) -> Option<CtValue4> {
    pins.open_hash::<CtKey4, CtValue4>(CT4_MAP).expect("ct map").get(&key, 0).ok()
}

fn ct_key(p: &Ipv4Packet, direction: u8) -> CtKey4 {
    CtKey4 {
        saddr: u32::from_ne_bytes(p.src.octets()),
        daddr: u32::from_ne_bytes(p.dst.octets()),
        sport: p.sport.to_be(),
        dport: p.dport.to_be(),
        proto: p.proto,
        direction,
        _pad: [0; 2],
    }
}

#[test]
fn lb_tc_hit_is_rewritten_to_the_backend_with_valid_checksums() {
    let (ebpf, pins) = setup(proto::TCP, 1);
    let request = Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80);
    let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, &request.build());

    assert_eq!(verdict, TC_ACT_OK);
    let rewritten = Ipv4Packet::parse(&out).expect("parse output");
    assert_eq!(rewritten.dst, BACKENDS[0]);
    assert_eq!(rewritten.dport, 8080);
    assert_eq!((rewritten.src, rewritten.sport), (CLIENT, 40_000), "source untouched");
    assert_eq!(rewritten.payload, request.payload);
    assert!(ipv4_checksum_ok(&out), "IPv4 header checksum");
    assert!(l4_checksum_ok(&out), "TCP checksum");
    assert_eq!(counter(&ebpf, Counter::Translated), 1);

    // Both directions of the flow are tracked and name the service's reverse-NAT entry.
    let forward = ct_entry(&pins, ct_key(&request, CT_FORWARD)).expect("forward entry");
    assert_eq!((forward.backend_id, forward.rev_nat_index), (1, 7));
    let reply = Ipv4Packet::tcp(BACKENDS[0], 8080, CLIENT, 40_000);
    assert!(ct_entry(&pins, ct_key(&reply, CT_REPLY)).is_some(), "reply entry");
}

#[test]
fn lb_tc_udp_hit_updates_the_checksum_and_keeps_a_zero_checksum_zero() {
    let (ebpf, _pins) = setup(proto::UDP, 1);
    let request = Ipv4Packet::udp(CLIENT, 40_001, VIP, 80);
    let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, &request.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().dst, BACKENDS[0]);
    assert!(ipv4_checksum_ok(&out) && l4_checksum_ok(&out));

    let mut no_checksum = Ipv4Packet::udp(CLIENT, 40_002, VIP, 80).build();
    clear_udp_checksum(&mut no_checksum);
    let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, &no_checksum);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().dport, 8080);
    assert_eq!(&out[40..42], &[0, 0], "a UDP packet without checksum keeps none");
    assert!(ipv4_checksum_ok(&out));
}

#[test]
fn lb_tc_miss_passes_untouched() {
    let (ebpf, _pins) = setup(proto::TCP, 1);
    for packet in [
        Ipv4Packet::tcp(CLIENT, 40_000, Ipv4Addr::new(10, 96, 0, 11), 80), // other address
        Ipv4Packet::tcp(CLIENT, 40_000, VIP, 81),                          // other port
        Ipv4Packet::udp(CLIENT, 40_000, VIP, 80),                          // other protocol
    ] {
        let wire = packet.build();
        let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, &wire);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, wire, "{packet:?} must pass byte for byte");
    }
    assert_eq!(counter(&ebpf, Counter::Translated), 0);
}

#[test]
fn lb_tc_truncated_packets_are_not_rewritten() {
    let (ebpf, _pins) = setup(proto::TCP, 1);
    let wire = Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80).build();
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than an IPv4 header, so the cuts
    // start there: no L4 header, inside the ports, just before the TCP checksum.
    let mut cases: Vec<Vec<u8>> =
        [14 + 20, 14 + 20 + 3, 14 + 20 + 16].iter().map(|&len| wire[..len].to_vec()).collect();
    // A header length (IHL = 15, 60 bytes) that points past the end of the packet.
    let mut long_ihl = wire.clone();
    long_ihl[14] = 0x4f;
    cases.push(long_ihl);
    for truncated in &cases {
        let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, truncated);
        assert_eq!(verdict, TC_ACT_OK, "length {}", truncated.len());
        assert_eq!(&out, truncated, "length {}: untouched", truncated.len());
    }
    assert_eq!(counter(&ebpf, Counter::Translated), 0);
    assert_eq!(counter(&ebpf, Counter::PassedUnparsed), cases.len() as u64);
}

#[test]
fn lb_tc_reply_is_reverse_translated_to_the_vip() {
    let (ebpf, _pins) = setup(proto::TCP, 1);
    let (verdict, _) =
        run(&ebpf, TC_LB4_FORWARD, &Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80).build());
    assert_eq!(verdict, TC_ACT_OK);

    let reply = Ipv4Packet::tcp(BACKENDS[0], 8080, CLIENT, 40_000);
    let (verdict, out) = run(&ebpf, TC_LB4_REVERSE, &reply.build());
    assert_eq!(verdict, TC_ACT_OK);
    let rewritten = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((rewritten.src, rewritten.sport), (VIP, 80));
    assert_eq!((rewritten.dst, rewritten.dport), (CLIENT, 40_000));
    assert!(ipv4_checksum_ok(&out) && l4_checksum_ok(&out));
    assert_eq!(counter(&ebpf, Counter::ReverseTranslated), 1);

    // A packet from the backend that belongs to no tracked flow is left alone.
    let untracked = Ipv4Packet::tcp(BACKENDS[0], 8080, CLIENT, 40_999).build();
    let (_, out) = run(&ebpf, TC_LB4_REVERSE, &untracked);
    assert_eq!(out, untracked);
}

/// SCTP has no pseudo-header: the address rewrite leaves its CRC32c alone, the port rewrite
/// updates it incrementally (weir_common::sctp); the result must equal a CRC computed from
/// scratch, for a short INIT and for a packet near the MTU, in both directions.
#[test]
fn lb_tc_sctp_hit_and_reply_keep_a_valid_crc32c() {
    let (ebpf, pins) = setup(proto::SCTP, 1);
    for (sport, payload_len) in [(40_000u16, 0usize), (40_001, 1_400)] {
        let mut request = Ipv4Packet::sctp(CLIENT, sport, VIP, 80);
        request.payload.extend((0..payload_len).map(|i| (i * 7) as u8));
        let (verdict, out) = run(&ebpf, TC_LB4_FORWARD, &request.build());
        assert_eq!(verdict, TC_ACT_OK);
        let rewritten = Ipv4Packet::parse(&out).expect("parse output");
        assert_eq!((rewritten.dst, rewritten.dport), (BACKENDS[0], 8080));
        assert_eq!(rewritten.payload, request.payload, "chunks untouched");
        assert!(ipv4_checksum_ok(&out), "IPv4 header checksum");
        assert!(l4_checksum_ok(&out), "SCTP CRC32c after DNAT ({payload_len} bytes of payload)");
        let forward = ct_entry(&pins, ct_key(&request, CT_FORWARD)).expect("forward entry");
        assert_eq!(forward.rev_nat_index, 7);

        let mut reply = Ipv4Packet::sctp(BACKENDS[0], 8080, CLIENT, sport);
        reply.payload.extend((0..payload_len).map(|i| (i * 3) as u8));
        let (verdict, out) = run(&ebpf, TC_LB4_REVERSE, &reply.build());
        assert_eq!(verdict, TC_ACT_OK);
        let rewritten = Ipv4Packet::parse(&out).unwrap();
        assert_eq!((rewritten.src, rewritten.sport), (VIP, 80), "the reply comes from the VIP");
        assert!(ipv4_checksum_ok(&out) && l4_checksum_ok(&out), "CRC32c after reverse NAT");
    }
    assert_eq!(counter(&ebpf, Counter::Translated), 2);
    assert_eq!(counter(&ebpf, Counter::ReverseTranslated), 2);

    // A TCP packet to the SCTP frontend's address and port is no hit.
    let tcp = Ipv4Packet::tcp(CLIENT, 40_002, VIP, 80).build();
    assert_eq!(run(&ebpf, TC_LB4_FORWARD, &tcp), (TC_ACT_OK, tcp));
}

#[test]
fn lb_tc_flow_keeps_its_backend_and_new_flows_spread() {
    let (ebpf, _pins) = setup(proto::TCP, 3);
    let first = |sport: u16| {
        let (_, out) = run(&ebpf, TC_LB4_FORWARD, &Ipv4Packet::tcp(CLIENT, sport, VIP, 80).build());
        Ipv4Packet::parse(&out).unwrap().dst
    };
    let chosen = first(50_000);
    for _ in 0..20 {
        assert_eq!(first(50_000), chosen, "a tracked flow keeps its backend");
    }
    let mut seen = std::collections::BTreeSet::new();
    for sport in 50_001..50_201 {
        seen.insert(first(sport));
    }
    assert_eq!(seen.len(), 3, "200 new flows over 3 backends reach all of them: {seen:?}");
}

/// A frontend without backends answers with an ICMP port unreachable from the frontend,
/// sent back out of the interface (TC_ACT_REDIRECT), as kube-proxy's reject does; when a
/// traffic policy emptied it (the service has endpoints elsewhere) the packet is dropped.
#[test]
fn lb_tc_service_without_backends_rejects_with_icmp_and_drops_when_emptied_by_policy() {
    require_root();
    let client6: Ipv6Addr = "fd00::1".parse().unwrap();
    let vip6: Ipv6Addr = "fd00:96::a".parse().unwrap();
    let pins = TestPinDir::new("reject").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut desired = ServiceState::default();
    for (address, port, when_empty) in [
        (IpAddr::from(VIP), 80, WhenEmpty::Reject),
        (IpAddr::from(vip6), 80, WhenEmpty::Reject),
        (IpAddr::from(VIP), 81, WhenEmpty::Drop),
    ] {
        let mut state = FrontendState::cluster_ip("default/web", vec![]);
        state.when_empty = when_empty;
        desired.frontends.insert(Frontend { address, port, protocol: Protocol::Tcp }, state);
    }
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    writer.execute(&ServicePlanner::new().plan(&desired)).unwrap();
    let ebpf = &loaded.ebpf;

    let request = Ipv4Packet::tcp(CLIENT, 40_000, VIP, 80).build();
    let (verdict, out) = run(ebpf, TC_LB4_FORWARD, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[..6], &out[6..12]), (&request[6..12], &request[..6]), "MACs swapped");
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(out[14 + 9], 1, "ICMP");
    assert_eq!((&out[26..30], &out[30..34]), (&VIP.octets()[..], &CLIENT.octets()[..]));
    assert!(ipv4_checksum_ok(&out), "IPv4 header checksum");
    assert_eq!((out[34], out[35]), (3, 3), "destination unreachable, port unreachable");
    assert_eq!(checksum(&out[34..], 0), 0, "ICMP checksum");
    assert_eq!(&out[42..], &request[14..14 + 28], "quotes the IP header and 8 bytes");

    let mut request6 = Ipv6Packet::new(client6, 40_000, vip6, 80, proto::TCP).build();
    fill_l4_checksum6(&mut request6);
    let (verdict, out) = run(ebpf, TC_LB4_FORWARD, &request6);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    assert_eq!(out[14 + 6], 58, "ICMPv6");
    assert_eq!((&out[22..38], &out[38..54]), (&vip6.octets()[..], &client6.octets()[..]));
    assert_eq!((out[54], out[55]), (1, 4), "destination unreachable, port unreachable");
    let mut pseudo = out[22..54].to_vec();
    pseudo.extend_from_slice(&56u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&out[54..]);
    assert_eq!(checksum(&pseudo, 0), 0, "ICMPv6 checksum over the pseudo-header");
    assert_eq!(&out[62..], &request6[14..14 + 48]);

    let (verdict, _) = run(ebpf, TC_LB4_FORWARD, &Ipv4Packet::tcp(CLIENT, 40_001, VIP, 81).build());
    assert_eq!(verdict, TC_ACT_SHOT, "emptied by a traffic policy: dropped");
    assert_eq!(counter(ebpf, Counter::DropNoBackend), 3);
}

#[test]
fn lb_tc_ipv6_hit_and_reply_are_rewritten_with_valid_checksums() {
    // TCP, UDP and SCTP (whose CRC32c covers no pseudo-header).
    require_root();
    let client: Ipv6Addr = "fd00::1".parse().unwrap();
    let vip: Ipv6Addr = "fd00:96::a".parse().unwrap();
    let backend: Ipv6Addr = "fd00:1:2:3::4".parse().unwrap();
    let pins = TestPinDir::new("rewrite6").unwrap();
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut desired = ServiceState::default();
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        desired.frontends.insert(
            Frontend { address: vip.into(), port: 80, protocol },
            FrontendState::cluster_ip("default/web", vec![(backend, 8080).into()]),
        );
    }
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    writer.execute(&ServicePlanner::new().plan(&desired)).unwrap();

    for proto in [proto::TCP, proto::UDP, proto::SCTP] {
        let mut request = Ipv6Packet::new(client, 40_000, vip, 80, proto).build();
        fill_l4_checksum6(&mut request);
        let (verdict, out) = run(&loaded.ebpf, TC_LB4_FORWARD, &request);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out[38..54], &backend.octets(), "destination is the backend");
        assert_eq!(&out[56..58], &8080u16.to_be_bytes(), "destination port");
        assert_eq!(&out[22..38], &client.octets(), "source untouched");
        assert!(l4_checksum6_ok(&out), "L4 checksum after DNAT (proto {proto})");

        let mut reply = Ipv6Packet::new(backend, 8080, client, 40_000, proto).build();
        fill_l4_checksum6(&mut reply);
        let (verdict, out) = run(&loaded.ebpf, TC_LB4_REVERSE, &reply);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out[22..38], &vip.octets(), "the reply comes from the VIP");
        assert_eq!(&out[54..56], &80u16.to_be_bytes(), "from the service port");
        assert!(l4_checksum6_ok(&out), "L4 checksum after reverse NAT (proto {proto})");
    }
    assert_eq!(counter(&loaded.ebpf, Counter::Translated), 3);
    assert_eq!(counter(&loaded.ebpf, Counter::ReverseTranslated), 3);

    // An IPv6 packet to an address that is no frontend passes untouched.
    let mut other = Ipv6Packet::new(client, 40_001, backend, 80, proto::TCP).build();
    fill_l4_checksum6(&mut other);
    let (verdict, out) = run(&loaded.ebpf, TC_LB4_FORWARD, &other);
    assert_eq!((verdict, out), (TC_ACT_OK, other));
}
