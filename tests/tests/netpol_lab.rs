//! The NetworkPolicy truth table in a real lab, once per dataplane: namespaces x, y, z with
//! pods a, b, c (agnhost servers on 80/81 TCP/UDP) over two nodes; every fixed policy case and
//! a few seeded random ones applied through the API; every ordered pod pair probed from inside
//! the pods' namespaces and compared with the oracle and with `weir_policy::trace`; then a
//! sequence of updates and deletions while background traffic runs. See
//! tests/src/netpol_lab.rs and docs/network-policy.md.
use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use weir_tests::{
    lab::Lab,
    netpol_lab::{PROBE_TIMEOUT, SETTLE, TruthLab},
    policy_cases::{Rng, cases, policy, random_policies},
    privileged::require_root,
    reachability::{Cell, Proto, probe_all},
};

/// Seeded random policy sets per dataplane (override with WEIR_NETPOL_LAB_SEEDS).
const RANDOM_SEEDS: u64 = 6;
/// Failing cases printed in full.
const SHOWN_CASES: usize = 4;

fn truth_table(dataplane: &str) {
    require_root();
    let lab = Lab::up(2, dataplane, "vxlan");
    let truth = TruthLab::start(&lab);
    let mut failures = Vec::new();
    let mut count = 0;
    for case in cases() {
        count += 1;
        let result = truth.run_case(case.name, &case.policies);
        failures.extend((!result.failure.is_empty()).then_some(result.failure));
    }
    let seeds = std::env::var("WEIR_NETPOL_LAB_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RANDOM_SEEDS);
    for seed in 0..seeds {
        count += 1;
        let mut rng = Rng::new(seed);
        let name = format!("random seed {seed}");
        let result = truth.run_case(&name, &random_policies(&mut rng));
        failures.extend((!result.failure.is_empty()).then_some(result.failure));
    }
    count += 1;
    failures.extend(updates_while_traffic_runs(&truth));
    truth.clear();
    // Every failing case is named; the first few are shown in full (tables, cells, traces).
    let names: Vec<&str> = failures.iter().filter_map(|f| f.split(':').next()).collect();
    assert!(
        failures.is_empty(),
        "{dataplane}: {} of {count} cases had wrong cells: {}\n\n{}",
        failures.len(),
        names.join("; "),
        failures.iter().take(SHOWN_CASES).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One API change of the update sequence (all in namespace x).
enum Change<'a> {
    Apply(&'a NetworkPolicy),
    Delete(&'static str),
}
use Change::{Apply, Delete};

/// Policies created, changed and deleted one step at a time while pods keep connecting;
/// after each step the whole matrix matches the policies then in force.
fn updates_while_traffic_runs(truth: &TruthLab) -> Vec<String> {
    truth.clear();
    let a_from_b = policy(
        "x",
        "a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let a_from_y = policy(
        "x",
        "a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                            "ports": [{"port": 80}, {"port": 81, "protocol": "UDP"}]}]}),
    );
    let b_to_z = policy(
        "x",
        "out",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    );
    let b_anywhere = policy(
        "x",
        "out",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
               "egress": [{}]}),
    );
    let stop = AtomicBool::new(false);
    let (sent, reached) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        // Background traffic: y/b and x/b keep opening connections to x/a (TCP 80, UDP 81).
        scope.spawn(|| {
            let cells = [
                Cell { from: 4, to: 0, port: 80, proto: Proto::Tcp },
                Cell { from: 1, to: 0, port: 81, proto: Proto::Udp },
            ];
            while !stop.load(Ordering::Relaxed) {
                let seen = probe_all(&truth.pods, &cells, PROBE_TIMEOUT);
                sent.fetch_add(seen.len(), Ordering::Relaxed);
                reached.fetch_add(seen.values().filter(|o| o.reached).count(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let steps = [
            ("update step 1: create x/a from pod=b", Apply(&a_from_b), vec![a_from_b.clone()]),
            (
                "update step 2: change x/a to from ns=y on TCP 80 and UDP 81",
                Apply(&a_from_y),
                vec![a_from_y.clone()],
            ),
            (
                "update step 3: add x/out (x/b egress only to z)",
                Apply(&b_to_z),
                vec![a_from_y.clone(), b_to_z.clone()],
            ),
            ("update step 4: delete x/a", Delete("a"), vec![b_to_z.clone()]),
            (
                "update step 5: change x/out to allow all egress",
                Apply(&b_anywhere),
                vec![b_anywhere.clone()],
            ),
            ("update step 6: delete x/out", Delete("out"), vec![]),
        ];
        for (name, change, in_force) in steps {
            match change {
                Apply(policy) => truth.apply(std::slice::from_ref(policy)),
                Delete(name) => {
                    truth.lab.kubectl.ok(&["delete", "networkpolicy", name, "-n", "x"]);
                }
            }
            std::thread::sleep(SETTLE);
            let result = truth.check(name, &in_force);
            eprintln!(
                "netpol lab: {name}: {}/{} reached{}{}",
                result.reached,
                result.cells,
                if result.retried { ", retried" } else { "" },
                if result.failure.is_empty() { "" } else { ", WRONG" }
            );
            failures.extend((!result.failure.is_empty()).then_some(result.failure));
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "netpol lab: background traffic during the updates: {} of {} probes answered",
        reached.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed)
    );
    failures
}

#[test]
fn netpol_truth_table_in_the_lab_ebpf() {
    truth_table("ebpf");
}

#[test]
fn netpol_truth_table_in_the_lab_nftables() {
    truth_table("nftables");
}
