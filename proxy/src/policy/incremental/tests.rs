//! The incremental lowering against the full one over random change sequences (fixed seeds):
//! after every step the map contents and the rule and policy numbering must be equal, and the
//! returned delta must turn the previous contents into the new ones.
use weir_policy::{IncrementalCompiler, random::RandomChanges};

use super::*;
use crate::policy::lower::{Lowering, diff, ip_of};

fn apply<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, diff: &MapDiff<K, V>) {
    for key in &diff.deletes {
        map.remove(key);
    }
    for (key, value) in &diff.upserts {
        map.insert(key.clone(), value.clone());
    }
}

fn run(seed: u64, steps: usize, node: Option<&str>) {
    let mut changes = RandomChanges::new(seed);
    let mut compiler = IncrementalCompiler::new(node);
    let mut incremental = IncrementalLowering::default();
    let mut reference = Lowering::default();
    // The node's addresses sit inside the random ipBlocks (10.0.0.0/29, fd00::/125) and among
    // the pods'.
    let host: Vec<IpAddr> =
        ["10.0.0.3", "192.168.0.1", "fd00::3"].iter().map(|ip| ip.parse().unwrap()).collect();
    let mut written = DatapathPolicy::default();
    let (mut with_rules, mut with_prefixes, mut with_v6) = (0, 0, 0);
    for step in 0..steps {
        let (change, what) = changes.next_change();
        compiler.apply(change);
        let delta = compiler.take_delta();
        let compiled = compiler.compiled();
        let changed = if step % 97 == 96 {
            let before = incremental.desired().clone();
            incremental.rebuild(compiled, &host);
            DatapathDelta {
                endpoints: diff(&before.endpoints, &incremental.desired().endpoints),
                ipcache: diff(&before.ipcache, &incremental.desired().ipcache),
                rules: diff(&before.rules, &incremental.desired().rules),
                rule_ids: BTreeSet::new(),
                policy_ids: BTreeSet::new(),
            }
        } else {
            incremental.update(compiled, &delta, &host)
        };
        let expected = reference.lower(compiled, &host);
        let context = format!("seed {seed}, step {step} ({what})");
        for (name, a, b) in [
            (
                "endpoints",
                format!("{:?}", incremental.desired().endpoints),
                format!("{:?}", expected.endpoints),
            ),
            (
                "ipcache",
                format!("{:?}", incremental.desired().ipcache),
                format!("{:?}", expected.ipcache),
            ),
        ] {
            assert!(a == b, "{context}: {name} differ:\nincremental {a}\nfull        {b}");
        }
        if incremental.desired().rules != expected.rules {
            let d = diff(&expected.rules, &incremental.desired().rules);
            panic!(
                "{context}: rules differ; incremental has {:?} more/other, lacks {:?}",
                d.upserts, d.deletes
            );
        }
        assert_eq!(incremental.rules_by_id, reference.rules_by_id, "{context}");
        assert_eq!(incremental.policies_by_id, reference.policies_by_id, "{context}");
        apply(&mut written.endpoints, &changed.endpoints);
        apply(&mut written.ipcache, &changed.ipcache);
        apply(&mut written.rules, &changed.rules);
        assert!(written == expected, "{context}: the deltas do not add up to the contents");
        with_rules += usize::from(expected.rules.len() > 5);
        with_prefixes += usize::from(expected.ipcache.keys().any(|(bits, _)| *bits < 128));
        with_v6 += usize::from(
            expected.endpoints.keys().any(|a| ip_of(*a).is_ipv6())
                && expected.ipcache.keys().any(|(bits, a)| *bits < 128 && ip_of(*a).is_ipv6()),
        );
    }
    assert!(with_rules > steps / 2 && with_prefixes > steps / 4, "{with_rules} {with_prefixes}");
    assert!(with_v6 > steps / 10, "IPv6 endpoints and prefixes in {with_v6} steps");
}

#[test]
fn random_changes_lower_like_the_full_lowering_for_one_node() {
    for seed in 1..=10u64 {
        run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 400, Some("n1"));
    }
}

#[test]
fn random_changes_lower_like_the_full_lowering_for_all_nodes() {
    for seed in 1..=4u64 {
        run(seed.wrapping_mul(0x5851_f42d_4c95_7f2d), 400, None);
    }
}
