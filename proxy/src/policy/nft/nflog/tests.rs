use super::*;
use crate::policy::names::PolicyNames;
use weir_policy::{PodRef, PolicyRef};

/// A netlink message of nfnetlink_log carrying `attributes`.
fn packet_message(attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![10u8, 0, 0x0b, 0x65]; // nfgenmsg: AF_INET6, version 0, group 2917
    for (kind, value) in attributes {
        body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let len = 16 + body.len();
    let mut m = Vec::new();
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
    m.extend_from_slice(&[0; 10]);
    m.extend_from_slice(&body);
    m
}

fn ipv4_tcp(source: [u8; 4], destination: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, TCP, 0, 0];
    p.extend_from_slice(&source);
    p.extend_from_slice(&destination);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0; 16]);
    p
}

fn ipv6(next: u8, extension: &[u8], transport: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
    p.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(extension);
    p.extend_from_slice(transport);
    p
}

#[test]
fn config_messages_bind_the_group_in_network_order() {
    let m = config_message(2917, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    assert_eq!(m.len(), 16 + 4 + 8);
    assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
    assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), (4 << 8) | 1);
    assert_eq!(&m[18..20], &2917u16.to_be_bytes());
    assert_eq!(u16::from_ne_bytes(m[20..22].try_into().unwrap()), 5);
    assert_eq!(m[24], NFULNL_CFG_CMD_BIND);
}

#[test]
fn acknowledgements_are_found_by_sequence() {
    let ack = |seq: u32, code: i32| {
        let mut m = 36u32.to_ne_bytes().to_vec();
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    };
    let mut two = ack(1, 0);
    two.extend(ack(2, -libc::EBUSY));
    assert_eq!(ack_status(&two, 1), Some(0));
    assert_eq!(ack_status(&two, 2), Some(-libc::EBUSY));
    assert_eq!(ack_status(&two, 3), None);
    assert_eq!(ack_status(&two[..20], 1), None, "a truncated datagram is no answer");
}

#[test]
fn datagrams_give_their_packets_prefixes_and_payloads() {
    let payload = ipv4_tcp([10, 244, 0, 5], [10, 244, 0, 6], 40000, 80);
    let mut datagram =
        packet_message(&[(1, &[0x08, 0x00, 2, 0]), (NFULA_PREFIX, b"drop-ingress-x/deny\0")]);
    datagram
        .extend(packet_message(&[(NFULA_PAYLOAD, &payload), (NFULA_PREFIX, b"allow-egress\0")]));
    let packets = parse_datagram(&datagram);
    assert_eq!(packets.len(), 2);
    assert_eq!(packets[0].prefix, "drop-ingress-x/deny");
    assert!(packets[0].payload.is_empty());
    assert_eq!((packets[1].prefix.as_str(), &packets[1].payload), ("allow-egress", &payload));
    // Garbage and truncation give nothing, never a panic.
    assert!(parse_datagram(&datagram[..datagram.len() / 2 + 3]).len() <= 1);
    assert!(parse_datagram(&[0xff; 40]).is_empty());
    assert!(parse_datagram(&[]).is_empty());
}

#[test]
fn headers_of_both_families() {
    let v4 = parse_headers(&ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1234, 80)).unwrap();
    assert_eq!(v4.source, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!((v4.protocol, v4.ports), (TCP, Some((1234, 80))));
    // A non-first IPv4 fragment has no ports.
    let mut fragment = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1234, 80);
    fragment[7] = 8;
    assert_eq!(parse_headers(&fragment).unwrap().ports, None);

    let udp = [0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0];
    let plain = parse_headers(&ipv6(UDP, &[], &udp)).unwrap();
    assert_eq!((plain.protocol, plain.ports), (UDP, Some((40000, 53))));
    assert_eq!(plain.destination, "fd00::2".parse::<IpAddr>().unwrap());
    // Hop-by-hop (8 bytes) then destination options (16 bytes) then UDP.
    let mut extensions = vec![60, 0, 0, 0, 0, 0, 0, 0];
    extensions.extend_from_slice(&[UDP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let walked = parse_headers(&ipv6(0, &extensions, &udp)).unwrap();
    assert_eq!((walked.protocol, walked.ports), (UDP, Some((40000, 53))));
    // A first fragment has its ports, a later one has none.
    let first = parse_headers(&ipv6(44, &[UDP, 0, 0, 1, 0, 0, 0, 7], &udp)).unwrap();
    assert_eq!(first.ports, Some((40000, 53)));
    let later = parse_headers(&ipv6(44, &[UDP, 0, 0x05, 0x01, 0, 0, 0, 7], &udp)).unwrap();
    assert_eq!((later.protocol, later.ports), (UDP, None));
    // ICMPv6 has no ports.
    assert_eq!(parse_headers(&ipv6(58, &[], &[128, 0, 0, 0])).unwrap().ports, None);
    let mut bad_length = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1234, 80);
    bad_length[0] = 0x42;
    assert_eq!(parse_headers(&bad_length), None, "a header length under 20 bytes");
    for short in [&[][..], &[0x45, 0, 0], &[0x60; 20], &[0x10; 40]] {
        assert_eq!(parse_headers(short), None);
    }
}

#[test]
fn prefixes_name_verdict_direction_and_policy() {
    let policy = PolicyRef::new("x", "deny");
    let chain = plan::drop_chain(&policy, Direction::Egress);
    assert_eq!(
        parse_prefix(&plan::drop_log_prefix(&chain)),
        Some((
            FlowVerdict::Dropped,
            FlowReason::DefaultDeny,
            Direction::Egress,
            Some("x/deny".into())
        ))
    );
    assert_eq!(
        parse_prefix("allow-ingress"),
        Some((FlowVerdict::Allowed, FlowReason::Rule, Direction::Ingress, None))
    );
    assert_eq!(
        parse_prefix("not-ready-egress"),
        Some((FlowVerdict::Dropped, FlowReason::NotReady, Direction::Egress, None))
    );
    for other in ["", "allow-sideways", "drop-unknown", "something"] {
        assert_eq!(parse_prefix(other), None, "{other}");
    }
    // A policy whose name makes the chain longer than a log prefix: shortened, still a drop
    // of that direction.
    let long = PolicyRef::new("n".repeat(63), "p".repeat(200));
    let prefix = plan::drop_log_prefix(&plan::drop_chain(&long, Direction::Ingress));
    assert!(prefix.len() <= crate::apply::nft::ops::MAX_LOG_PREFIX);
    let (verdict, _, direction, policy) = parse_prefix(&prefix).unwrap();
    assert_eq!((verdict, direction), (FlowVerdict::Dropped, Direction::Ingress));
    assert!(policy.unwrap().starts_with("nnnn"));
}

#[test]
fn records_name_the_pods() {
    let mut names = PolicyNames::default();
    let web = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 6));
    names.pod_ips.insert(web, PodRef::new("x", "web"));
    let packet = LoggedPacket {
        prefix: "drop-ingress-x/deny".into(),
        payload: ipv4_tcp([10, 244, 0, 5], [10, 244, 0, 6], 40000, 80),
    };
    let dropped = record(&packet, &names, Some("node-1"), 1_795_000_000_000_000_000).unwrap();
    assert_eq!((dropped.verdict, dropped.reason), (FlowVerdict::Dropped, FlowReason::DefaultDeny));
    assert_eq!(dropped.direction, FlowDirection::Ingress);
    assert_eq!(dropped.destination.pod.as_deref(), Some("x/web"));
    assert_eq!(dropped.destination.port, Some(80));
    assert_eq!(dropped.policy.as_deref(), Some("x/deny"));
    assert_eq!(dropped.node.as_deref(), Some("node-1"));
    let text = dropped.to_text();
    assert!(text.contains("DROPPED default-deny (NetworkPolicy x/deny)"), "{text}");
    assert_eq!((dropped.source.pod, dropped.source.port), (None, Some(40000)));
    let allowed = LoggedPacket { prefix: "allow-ingress".into(), ..packet.clone() };
    let text = record(&allowed, &names, None, 0).unwrap().to_text();
    assert!(text.contains("ALLOWED by a rule"), "{text}");
    let unknown = LoggedPacket { prefix: "mystery".into(), ..packet };
    assert_eq!(record(&unknown, &names, None, 0), None);
}

/// Answers one packet the way a table's state would.
#[derive(Debug)]
struct OneRule(AdmittedPacket, Admitted);

impl crate::policy::names::Admissions for OneRule {
    fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted> {
        (*packet == self.0).then(|| self.1.clone())
    }
}

#[test]
fn allowed_records_name_the_rule_the_state_finds() {
    let origin = weir_policy::Origin {
        policy: PolicyRef::new("x", "web-from-client"),
        direction: Direction::Ingress,
        rule: 0,
        peer: Some(1),
        port: Some(0),
    };
    let client = [10, 244, 0, 5];
    let web = [10, 244, 0, 6];
    // The flow reader asks with the endpoint of the direction (ingress: the destination).
    let asked = AdmittedPacket {
        direction: Direction::Ingress,
        endpoint: IpAddr::from(web),
        peer: IpAddr::from(client),
        protocol: TCP,
        port: Some(80),
    };
    let names = crate::policy::SharedPolicyNames::default();
    names.set_admissions(Arc::new(OneRule(asked, Admitted::Rule(origin))));
    names.publish(&weir_policy::Compiled::default(), None);
    let allowed =
        LoggedPacket { prefix: "allow-ingress".into(), payload: ipv4_tcp(client, web, 40000, 80) };
    let named = record(&allowed, &names, None, 0).unwrap();
    assert_eq!((named.verdict, named.reason), (FlowVerdict::Allowed, FlowReason::Rule));
    let text = named.to_text();
    assert!(
        text.contains("ALLOWED by NetworkPolicy x/web-from-client ingress rule 0, peer 1, port 0"),
        "{text}"
    );
    // The same flow seen on the client's egress is not what the state admitted.
    let egress = LoggedPacket { prefix: "allow-egress".into(), ..allowed.clone() };
    let text = record(&egress, &names, None, 0).unwrap().to_text();
    assert!(text.contains("ALLOWED by a rule"), "{text}");

    let node = [192, 168, 50, 1];
    let from_node = AdmittedPacket { peer: IpAddr::from(node), ..asked };
    names.set_admissions(Arc::new(OneRule(from_node, Admitted::OwnNode)));
    let probe = LoggedPacket { payload: ipv4_tcp(node, web, 40001, 80), ..allowed };
    let named = record(&probe, &names, None, 0).unwrap();
    assert_eq!((named.reason, named.rule), (FlowReason::OwnNode, None));
}
