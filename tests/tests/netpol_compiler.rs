//! Differential tests of the policy compiler and `trace` against the independent oracle, on the
//! upstream truth-table shape: every fixed case and a few hundred seeded random policy sets,
//! every ordered pair of parties (nine pods, an outside address, two nodes), ports 80-82, TCP,
//! UDP and SCTP. No privileges needed.
use std::net::IpAddr;

use weir_policy::{Cluster, Compiler, Endpoint, ObjectRef, Protocol, trace};
use weir_tests::{
    policy_cases::{Rng, TruthTable, cases, random_policies},
    policy_oracle::{Oracle, Party},
};

const PROTOCOLS: [(&str, Protocol); 3] =
    [("TCP", Protocol::Tcp), ("UDP", Protocol::Udp), ("SCTP", Protocol::Sctp)];
const PORTS: [u16; 3] = [80, 81, 82];
const RANDOM_SEEDS: u64 = 400;

fn endpoint(party: &Party) -> Endpoint {
    match party {
        Party::Pod(ns, name) => Endpoint::Pod(ObjectRef::new(ns.clone(), name.clone())),
        Party::Addr { ip, .. } => Endpoint::Ip(*ip),
    }
}

#[derive(Default)]
struct Tally {
    cells: usize,
    allowed: usize,
    wrong: Vec<String>,
}

fn check(
    table: &TruthTable,
    name: &str,
    policies: &[k8s_openapi::api::networking::v1::NetworkPolicy],
    tally: &mut Tally,
) {
    let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, policies, &table.nodes);
    assert!(
        cluster.problems.is_empty(),
        "{name}: the compiler rejected part of a valid policy: {:?}",
        cluster.problems
    );
    let compiled = Compiler::default().compile(&cluster, None);
    let oracle = Oracle { namespaces: &table.namespaces, pods: &table.pods, policies };
    for (src, dst) in &TruthTable::pairs() {
        for (proto_name, protocol) in PROTOCOLS {
            for port in PORTS {
                let expected = oracle.allowed(src, dst, proto_name, port);
                let verdict = trace(&compiled, &endpoint(src), &endpoint(dst), protocol, port)
                    .unwrap_or_else(|e| panic!("{name}: trace failed: {e}"));
                tally.cells += 1;
                tally.allowed += usize::from(expected);
                if verdict.allowed != expected {
                    tally.wrong.push(format!(
                        "{name}: {src:?} -> {dst:?} {proto_name}/{port}: oracle {expected}, trace {verdict}"
                    ));
                }
            }
        }
    }
}

impl Tally {
    fn assert_none_wrong(&self) {
        let shown = &self.wrong[..self.wrong.len().min(30)];
        assert!(
            self.wrong.is_empty(),
            "{} of {} cells wrong:\n{}",
            self.wrong.len(),
            self.cells,
            shown.join("\n")
        );
    }
}

#[test]
fn fixed_cases_agree_with_the_oracle() {
    let table = TruthTable::new();
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut names = std::collections::BTreeSet::new();
    let mut tally = Tally::default();
    for case in &cases {
        assert!(names.insert(case.name), "case name {} twice", case.name);
        check(&table, case.name, &case.policies, &mut tally);
    }
    tally.assert_none_wrong();
    assert!(tally.allowed > 0 && tally.allowed < tally.cells, "the cases must both allow and deny");
    eprintln!("{} cases, {} cells, {} allowed", cases.len(), tally.cells, tally.allowed);
}

#[test]
fn random_policies_agree_with_the_oracle() {
    let table = TruthTable::new();
    let mut tally = Tally::default();
    for seed in 0..RANDOM_SEEDS {
        let mut rng = Rng::new(seed);
        let policies = random_policies(&mut rng);
        check(&table, &format!("seed {seed}"), &policies, &mut tally);
    }
    tally.assert_none_wrong();
    assert!(
        tally.allowed > tally.cells / 10 && tally.allowed < tally.cells * 9 / 10,
        "random policies should mix verdicts: {} of {}",
        tally.allowed,
        tally.cells
    );
    eprintln!("{RANDOM_SEEDS} seeds, {} cells, {} allowed", tally.cells, tally.allowed);
}

/// The deciding rule is reported: which policy, direction, rule, peer and port.
#[test]
fn trace_names_the_deciding_rule() {
    let table = TruthTable::new();
    let case = cases().into_iter().find(|c| c.name == "two rules with their own ports").unwrap();
    let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, &case.policies, &table.nodes);
    let compiled = Compiler::default().compile(&cluster, None);
    let pod = |ns: &str, name: &str| Endpoint::Pod(ObjectRef::new(ns, name));
    let verdict = trace(&compiled, &pod("x", "c"), &pod("x", "a"), Protocol::Udp, 81).unwrap();
    assert!(verdict.allowed);
    assert_eq!(
        verdict.ingress.to_string(),
        "allowed by NetworkPolicy x/a ingress rule 1, peer 0, port 0"
    );
    assert_eq!(verdict.egress.to_string(), "allowed: no NetworkPolicy isolates it");
    let verdict = trace(&compiled, &pod("x", "c"), &pod("x", "a"), Protocol::Tcp, 80).unwrap();
    assert!(!verdict.allowed);
    assert_eq!(verdict.ingress.to_string(), "denied: no rule allows it (isolated by x/a)");
    // The node of x/a may always connect; an outside address may not.
    let node: IpAddr = "192.168.50.1".parse().unwrap();
    let verdict = trace(&compiled, &Endpoint::Ip(node), &pod("x", "a"), Protocol::Tcp, 80).unwrap();
    assert!(verdict.allowed, "{verdict}");
    let err = trace(&compiled, &pod("x", "nope"), &pod("x", "a"), Protocol::Tcp, 80).unwrap_err();
    assert!(err.to_string().contains("x/nope is not known"));
}
