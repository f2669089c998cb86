//! The incremental nftables state against [`Desired::new`] over random change sequences
//! (fixed seeds): equal after every step, and each change's old/new parts turn the previous
//! state into the next.
use std::net::IpAddr;

use weir_policy::{IncrementalCompiler, random::RandomChanges};

use super::*;

fn apply_set<T: Ord + Clone>(set: &mut BTreeSet<T>, old: &BTreeSet<T>, new: &BTreeSet<T>) {
    for item in old.difference(new) {
        set.remove(item);
    }
    set.extend(new.difference(old).cloned());
}

/// The previous state with one change applied.
fn apply(state: &mut Desired, change: &DesiredChange) {
    for direction in plan::DIRECTIONS {
        let (old, new) = (change.old.side(direction), change.new.side(direction));
        let side = state.side_mut(direction);
        apply_set(&mut side.allow, &old.allow, &new.allow);
        for (ip, verdict) in &old.endpoints {
            if new.endpoints.get(ip) != Some(verdict) {
                side.endpoints.remove(ip);
            }
        }
        side.endpoints.extend(new.endpoints.iter().map(|(k, v)| (*k, v.clone())));
    }
    apply_set(&mut state.unknown_pods, &change.old.unknown_pods, &change.new.unknown_pods);
    apply_set(&mut state.drop_chains, &change.old.drop_chains, &change.new.drop_chains);
}

fn run(seed: u64, steps: usize, node_name: Option<&str>) {
    let mut changes = RandomChanges::new(seed);
    let mut compiler = IncrementalCompiler::new(node_name);
    let mut incremental = IncrementalDesired::default();
    let mut written = Desired::default();
    let host = |a: u8| -> Vec<IpAddr> {
        vec![
            IpAddr::from([10, 0, 0, a]),
            IpAddr::from([192, 168, 0, 1]),
            "fd00:1::1".parse().unwrap(),
        ]
    };
    let mut node = PolicyNode {
        host_addresses: host(3),
        pod_cidrs: vec!["10.0.0.0/28".parse().unwrap(), "fd00::/124".parse().unwrap()],
        deny_unknown: false,
    };
    let (mut isolated, mut isolated6, mut attributed) = (0, 0, 0);
    for step in 0..steps {
        let (change, what) = changes.next_change();
        compiler.apply(change);
        let delta = compiler.take_delta();
        if step % 53 == 52 {
            node.deny_unknown = !node.deny_unknown;
        }
        if step % 151 == 150 {
            node.host_addresses = host(1 + (step % 5) as u8);
        }
        let compiled = compiler.compiled();
        let change = if step % 89 == 88 {
            incremental.rebuild(compiled, &node)
        } else {
            incremental.update(compiled, &delta, &node)
        };
        let expected = Desired::new(compiled, &node);
        let context = format!("seed {seed}, step {step} ({what})");
        for direction in plan::DIRECTIONS {
            let (a, b) = (incremental.desired().side(direction), expected.side(direction));
            assert!(
                a.endpoints == b.endpoints,
                "{context}: {direction} endpoints\n{:?}\n{:?}",
                a.endpoints,
                b.endpoints
            );
            if a.allow != b.allow {
                let more: Vec<_> = a.allow.difference(&b.allow).collect();
                let less: Vec<_> = b.allow.difference(&a.allow).collect();
                panic!(
                    "{context}: {direction} allow: incremental has more {more:?}, lacks {less:?}"
                );
            }
        }
        assert_eq!(incremental.desired().unknown_pods, expected.unknown_pods, "{context}");
        assert_eq!(incremental.desired().drop_chains, expected.drop_chains, "{context}");
        apply(&mut written, &change);
        assert!(written == expected, "{context}: the changes do not add up to the state");
        if step % 5 == 0 {
            attributed +=
                admissions_name_an_entry_that_admits(&incremental, compiled, &node, &context);
        }
        isolated += usize::from(!expected.ingress.allow.is_empty());
        isolated6 += usize::from(expected.ingress.allow.iter().any(|t| t.endpoint.is_ipv6()));
    }
    assert!(isolated > steps / 2, "{isolated} of {steps} steps had allow tuples");
    assert!(isolated6 > steps / 4, "{isolated6} of {steps} steps had IPv6 allow tuples");
    assert!(attributed > steps, "{attributed} allow tuples attributed in {steps} steps");
}

/// Every allow tuple's first packet is admitted, per [`IncrementalDesired::admitted`], by an
/// allow entry of its endpoint direction that matches the packet (or, ingress, by the node).
/// Returns how many tuples it checked.
fn admissions_name_an_entry_that_admits(
    incremental: &IncrementalDesired,
    compiled: &Compiled,
    node: &PolicyNode,
    context: &str,
) -> usize {
    let mut checked = 0;
    let identities_at = |ip: IpAddr| -> BTreeSet<u32> {
        compiled.pods.values().filter(|e| e.ips.contains(&ip)).filter_map(|e| e.identity).collect()
    };
    let endpoints_at = |ip: IpAddr| -> Vec<&PodRef> {
        let has = |p: &&PodRef| compiled.pods.get(*p).is_some_and(|e| e.ips.contains(&ip));
        compiled.endpoints.keys().filter(has).collect()
    };
    for direction in plan::DIRECTIONS {
        for tuple in &incremental.desired().side(direction).allow {
            let [pod] = endpoints_at(tuple.endpoint)[..] else {
                continue; // an address of several pods: the table holds their union
            };
            let packet = AdmittedPacket {
                direction,
                endpoint: tuple.endpoint,
                peer: tuple.peers.0,
                protocol: tuple.protocols.0,
                port: Some(tuple.ports.0),
            };
            checked += 1;
            let admitted = incremental.admitted(&packet);
            let origin = match admitted {
                Some(Admitted::OwnNode) => {
                    assert_eq!(direction, Direction::Ingress, "{context}: {packet:?}");
                    assert!(node.host_addresses.contains(&packet.peer), "{context}: {packet:?}");
                    continue;
                }
                Some(Admitted::Rule(origin)) => origin,
                None => panic!("{context}: nothing admits the first packet of {tuple:?}"),
            };
            let entries = &compiled.endpoints[pod].direction(direction).allow;
            let peers = identities_at(packet.peer);
            let admits = entries.iter().any(|entry| {
                entry.origin == origin
                    && match &entry.peer {
                        PeerMatch::Any => true,
                        PeerMatch::Identity(id) => peers.contains(id),
                        PeerMatch::Block(block) => block.contains(packet.peer),
                    }
                    && entry.protocol.is_none_or(|p| p.number() == packet.protocol)
                    && entry.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&tuple.ports.0))
            });
            assert!(admits, "{context}: {origin} does not admit {packet:?}");
        }
    }
    checked
}

#[test]
fn admissions_of_a_logged_packet() {
    use weir_policy::{EndpointPolicy, Protocol, compile::PodEntry};
    let (web, client) = (PodRef::new("x", "web"), PodRef::new("x", "client"));
    let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
    let origin = |policy: &str, rule: usize| Origin {
        policy: PolicyRef::new("x", policy),
        direction: Direction::Ingress,
        rule,
        peer: Some(0),
        port: Some(0),
    };
    let entry = |peer: PeerMatch, port: u16, origin: Origin| Allow {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: Some((port, port)),
        origin,
    };
    let mut compiled = Compiled::default();
    for (pod, address, identity) in [(&web, "10.244.0.10", 300), (&client, "10.244.0.11", 301)] {
        let ips = vec![ip(address)];
        compiled.pod_ips.insert(ips[0], pod.clone());
        compiled.pods.insert(pod.clone(), PodEntry { identity: Some(identity), ips, node: None });
        compiled.endpoints.insert(
            pod.clone(),
            EndpointPolicy { identity, ingress: Default::default(), egress: Default::default() },
        );
    }
    // web's ingress: x/a-from-client rule 1 admits the client on 80; x/other admits it on 80
    // too (later in policy order) and on 81.
    let ingress = &mut compiled.endpoints.get_mut(&web).unwrap().ingress;
    ingress.isolated_by = vec![PolicyRef::new("x", "a-from-client"), PolicyRef::new("x", "other")];
    ingress.allow = vec![
        entry(PeerMatch::Identity(301), 80, origin("a-from-client", 1)),
        entry(PeerMatch::Identity(301), 80, origin("other", 0)),
        entry(PeerMatch::Identity(301), 81, origin("other", 2)),
    ];
    let node = PolicyNode {
        host_addresses: vec![ip("192.168.50.1")],
        pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
        deny_unknown: false,
    };
    let mut state = IncrementalDesired::default();
    state.rebuild(&compiled, &node);
    let packet = |peer: &str, port: u16| AdmittedPacket {
        direction: Direction::Ingress,
        endpoint: ip("10.244.0.10"),
        peer: ip(peer),
        protocol: weir_common::proto::TCP,
        port: Some(port),
    };
    let rule = |packet: AdmittedPacket| match state.admitted(&packet) {
        Some(Admitted::Rule(origin)) => Some(origin),
        _ => None,
    };
    assert_eq!(rule(packet("10.244.0.11", 80)), Some(origin("a-from-client", 1)));
    assert_eq!(rule(packet("10.244.0.11", 81)), Some(origin("other", 2)));
    assert_eq!(state.admitted(&packet("192.168.50.1", 22)), Some(Admitted::OwnNode));
    assert_eq!(state.admitted(&packet("10.244.0.11", 82)), None, "no rule opens 82");
    assert_eq!(state.admitted(&packet("10.244.0.12", 80)), None, "not the client");
    let egress = AdmittedPacket { direction: Direction::Egress, ..packet("10.244.0.11", 80) };
    assert_eq!(state.admitted(&egress), None, "web's egress is not isolated");
    // The client leaves: its address no longer holds a box.
    compiled.pods.remove(&client);
    compiled.pod_ips.remove(&ip("10.244.0.11"));
    compiled.endpoints.remove(&client);
    let delta = Delta {
        pods: BTreeSet::from([client.clone()]),
        endpoints: BTreeSet::from([client]),
        ..Delta::default()
    };
    state.update(&compiled, &delta, &node);
    assert_eq!(state.admitted(&packet("10.244.0.11", 80)), None);
}

#[test]
fn random_changes_give_the_full_desired_state_for_one_node() {
    for seed in 1..=10u64 {
        run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 400, Some("n1"));
    }
}

#[test]
fn random_changes_give_the_full_desired_state_for_all_nodes() {
    for seed in 1..=4u64 {
        run(seed.wrapping_mul(0x5851_f42d_4c95_7f2d), 400, None);
    }
}
