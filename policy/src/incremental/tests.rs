//! The incremental compiler against the full one: random sequences of namespace, pod, policy
//! and node changes (fixed seeds), the whole compiled state compared after every step, and the
//! delta checked to name everything that changed.
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use serde_json::{Value, json};

use super::*;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 2] = ["n1", "n2"];

fn labels(rng: &mut Rng) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["app", "tier", "env"] {
        if rng.chance(60) {
            out.insert(key.into(), json!(rng.pick(&["a", "b", "c"])));
        }
    }
    Value::Object(out)
}

fn selector(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": rng.pick(&["a", "b", "c"])}}),
        2 => json!({"matchExpressions": [{"key": rng.pick(&["tier", "env"]),
            "operator": rng.pick(&["Exists", "DoesNotExist"])}]}),
        _ => json!({"matchExpressions": [{"key": "app", "operator": rng.pick(&["In", "NotIn"]),
            "values": [rng.pick(&["a", "b"]), "c"]}]}),
    }
}

fn peer(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!({"podSelector": selector(rng)}),
        1 => json!({"namespaceSelector": selector(rng)}),
        2 => json!({"podSelector": selector(rng), "namespaceSelector": selector(rng)}),
        3 => json!({"ipBlock": {"cidr": "10.0.0.0/29", "except": ["10.0.0.4/30"]}}),
        // Sometimes invalid: a problem to report.
        _ if rng.chance(20) => json!({"ipBlock": {"cidr": "10.0.0.0/33"}}),
        _ => json!({"ipBlock": {"cidr": format!("10.0.0.{}/31", 2 * rng.below(4))}}),
    }
}

fn port(rng: &mut Rng) -> Value {
    let protocol = rng.pick(&["TCP", "UDP"]);
    match rng.below(4) {
        0 => json!({"protocol": protocol, "port": 80}),
        1 => json!({"protocol": protocol, "port": 80, "endPort": 90}),
        2 => json!({"protocol": protocol, "port": rng.pick(&["http", "dns"])}),
        _ => json!({"protocol": protocol}),
    }
}

fn rules(rng: &mut Rng, side: &str) -> Value {
    let rules: Vec<Value> = (0..rng.below(3))
        .map(|_| {
            let mut rule = serde_json::Map::new();
            if rng.chance(70) {
                rule.insert(side.into(), (0..1 + rng.below(2)).map(|_| peer(rng)).collect());
            }
            if rng.chance(70) {
                rule.insert("ports".into(), (0..1 + rng.below(2)).map(|_| port(rng)).collect());
            }
            Value::Object(rule)
        })
        .collect();
    Value::Array(rules)
}

fn policy(rng: &mut Rng, namespace: &str, name: &str) -> NetworkPolicy {
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".into(), selector(rng));
    if rng.chance(50) {
        spec.insert(
            "policyTypes".into(),
            json!(match rng.below(3) {
                0 => vec!["Ingress"],
                1 => vec!["Egress"],
                _ => vec!["Ingress", "Egress"],
            }),
        );
    }
    if rng.chance(80) {
        spec.insert("ingress".into(), rules(rng, "from"));
    }
    if rng.chance(60) {
        spec.insert("egress".into(), rules(rng, "to"));
    }
    serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name},
        "spec": spec}))
    .unwrap()
}

fn pod(rng: &mut Rng, namespace: &str, name: &str) -> PodInfo {
    let ip = format!("10.0.0.{}", rng.below(12));
    let mut ports = Vec::new();
    for name in ["http", "dns"] {
        if rng.chance(40) {
            ports.push(json!({"name": name, "containerPort": 8000 + rng.below(3),
                "protocol": if name == "dns" { "UDP" } else { "TCP" }}));
        }
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": namespace, "name": name, "labels": labels(rng)},
        "spec": {"nodeName": rng.pick(&NODES), "hostNetwork": rng.chance(10),
            "containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap();
    PodInfo::from_k8s(&pod).unwrap()
}

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
    let mut rng = Rng(seed);
    let mut incremental = IncrementalCompiler::new(node);
    let mut full = Compiler::default();
    for step in 0..steps {
        let before = incremental.compiled().clone();
        let namespace = rng.pick(&NAMESPACES);
        let what = match rng.below(10) {
            0 => {
                let labels = rng
                    .chance(80)
                    .then(|| serde_json::from_value::<Labels>(labels(&mut rng)).unwrap());
                incremental.set_namespace(namespace, labels.clone());
                format!("namespace {namespace} = {labels:?}")
            }
            1..=4 => {
                let name = format!("p{}", rng.below(8));
                let id = PodRef::new(namespace, &name);
                let info = rng.chance(80).then(|| pod(&mut rng, namespace, &name));
                incremental.set_pod(&id, info.clone());
                format!("pod {id} = {info:?}")
            }
            5..=8 => {
                let name = format!("np{}", rng.below(6));
                let id = PolicyRef::new(namespace, &name);
                if rng.chance(80) {
                    let object = policy(&mut rng, namespace, &name);
                    let mut problems = Vec::new();
                    let parsed = Policy::from_k8s(&object, &mut problems);
                    incremental.set_policy(&id, parsed, problems);
                } else {
                    incremental.set_policy(&id, None, Vec::new());
                }
                format!("policy {id}")
            }
            _ => {
                let name = rng.pick(&NODES);
                let ip: IpAddr = format!("192.168.0.{}", rng.below(3)).parse().unwrap();
                let addresses = rng.chance(80).then(|| vec![ip]);
                incremental.set_node(name, addresses.clone());
                format!("node {name} = {addresses:?}")
            }
        };
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
