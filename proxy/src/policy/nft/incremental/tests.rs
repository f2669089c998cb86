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
    let (mut isolated, mut isolated6) = (0, 0);
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
        isolated += usize::from(!expected.ingress.allow.is_empty());
        isolated6 += usize::from(expected.ingress.allow.iter().any(|t| t.endpoint.is_ipv6()));
    }
    assert!(isolated > steps / 2, "{isolated} of {steps} steps had allow tuples");
    assert!(isolated6 > steps / 4, "{isolated6} of {steps} steps had IPv6 allow tuples");
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
