//! The incremental compiler against the full one: random sequences of namespace, pod, policy
//! and node changes (fixed seeds), the whole compiled state compared after every step, and the
//! delta checked to name everything that changed.
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use super::*;
use crate::random::{RandomChanges, Rng, pod};

/// Whether `delta` names every difference between `old` and `new`.
fn check_delta(old: &Compiled, new: &Compiled, delta: &Delta) {
    let pods: BTreeSet<&PodRef> = old.pods.keys().chain(new.pods.keys()).collect();
    for pod in pods {
        if old.pods.get(pod) != new.pods.get(pod) {
            assert!(delta.pods.contains(pod), "pod {pod} changed, not in {delta:?}");
        }
    }
    let endpoints: BTreeSet<&PodRef> = old.endpoints.keys().chain(new.endpoints.keys()).collect();
    for pod in endpoints {
        let (Some(before), Some(after)) = (old.endpoints.get(pod), new.endpoints.get(pod)) else {
            assert!(delta.endpoints.contains(pod), "endpoint {pod} came or went: {delta:?}");
            continue;
        };
        if before == after || delta.endpoints.contains(pod) {
            continue;
        }
        assert_eq!(before.identity, after.identity, "{pod}: identity changed, not rebuilt");
        for direction in [Direction::Ingress, Direction::Egress] {
            let (b, a) = (before.direction(direction), after.direction(direction));
            let policies: BTreeSet<&PolicyRef> =
                b.isolated_by.iter().chain(&a.isolated_by).collect();
            for policy in policies {
                let slice = |d: &crate::DirectionPolicy| {
                    (d.isolated_by.contains(policy), d.allow[d.slice_of(policy)].to_vec())
                };
                if slice(b) != slice(a) {
                    let key = (pod.clone(), direction, policy.clone());
                    assert!(delta.slices.contains(&key), "{key:?} changed, not in {delta:?}");
                }
            }
        }
    }
    if old.identities != new.identities {
        assert!(!delta.identities.is_empty());
    }
    if old.nodes != new.nodes {
        assert!(delta.nodes);
    }
}

/// The first difference between two compiled states, for the failure message.
fn difference(a: &Compiled, b: &Compiled) -> String {
    fn first<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
        what: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) -> Option<String> {
        let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
        keys.into_iter().find(|k| a.get(k) != b.get(k)).map(|k| {
            format!("{what} {k:?}:\nincremental {:?}\nfull        {:?}", a.get(k), b.get(k))
        })
    }
    first("identity", &a.identities, &b.identities)
        .or_else(|| first("pod", &a.pods, &b.pods))
        .or_else(|| first("pod ip", &a.pod_ips, &b.pod_ips))
        .or_else(|| first("node", &a.nodes, &b.nodes))
        .or_else(|| first("endpoint", &a.endpoints, &b.endpoints))
        .unwrap_or_else(|| format!("problems {:?} / {:?}", a.problems, b.problems))
}

fn run(seed: u64, steps: usize, node: Option<&str>) {
    let mut changes = RandomChanges::new(seed);
    let mut incremental = IncrementalCompiler::new(node);
    let mut full = Compiler::default();
    for step in 0..steps {
        let before = incremental.compiled().clone();
        let (change, what) = changes.next_change();
        incremental.apply(change);
        let delta = incremental.take_delta();
        let expected = full.compile(&incremental.cluster(), node);
        assert!(
            *incremental.compiled() == expected,
            "seed {seed}, step {step} ({what}): incremental and full compile differ: {}",
            difference(incremental.compiled(), &expected)
        );
        check_delta(&before, incremental.compiled(), &delta);
        let mut reference = incremental.reference();
        assert!(reference.compile(&incremental.cluster(), node) == expected, "seed {seed}");
    }
}

#[test]
fn random_changes_match_the_full_compile_for_one_node() {
    for seed in 1..=12u64 {
        run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 400, Some("n1"));
    }
}

#[test]
fn random_changes_match_the_full_compile_for_all_nodes() {
    for seed in 1..=6u64 {
        run(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), 400, None);
    }
}

#[test]
fn one_more_policy_is_one_slice() {
    let mut incremental = IncrementalCompiler::new(Some("n1"));
    let mut rng = Rng(7);
    for i in 0..6 {
        let mut p = pod(&mut rng, "x", &format!("p{i}"));
        p.host_network = false;
        p.node = Some("n1".into());
        p.ips = vec![format!("10.1.0.{i}").parse().unwrap()];
        incremental.set_pod(&p.id.clone(), Some(p));
    }
    incremental.take_delta();
    let object: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "one"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}]}
    }))
    .unwrap();
    let parsed = Policy::from_k8s(&object, &mut Vec::new());
    incremental.set_policy(&PolicyRef::new("x", "one"), parsed, Vec::new());
    let delta = incremental.take_delta();
    assert!(delta.endpoints.is_empty() && delta.pods.is_empty(), "{delta:?}");
    assert_eq!(delta.slices.len(), 6, "one ingress slice per pod: {delta:?}");
    // Setting the same object again changes nothing.
    let parsed = Policy::from_k8s(&object, &mut Vec::new());
    incremental.set_policy(&PolicyRef::new("x", "one"), parsed, Vec::new());
    assert!(incremental.take_delta().is_empty());
}
