//! Random cluster changes for property tests (fixed seeds): namespaces x, y, z with random
//! labels, pods with random labels, addresses (a few shared), nodes, host networking and named
//! ports, and random NetworkPolicies using every feature (selectors with expressions, peers of
//! each kind, ipBlocks with except, port ranges, named ports, policyTypes, invalid parts).
//! Used by the tests of the incremental compiler here and of the datapath lowerings.
use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use serde_json::{Value, json};

use crate::{
    incremental::Change,
    input::{PodInfo, PodRef, Policy, PolicyRef},
    selector::Labels,
};

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const NODES: [&str; 2] = ["n1", "n2"];

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
    if rng.chance(25) {
        // IPv6 blocks, one of them around the IPv4-mapped range of the datapath maps.
        return match rng.below(3) {
            0 => json!({"ipBlock": {"cidr": "fd00::/125", "except": ["fd00::4/126"]}}),
            1 => json!({"ipBlock": {"cidr": "::/0", "except": ["fd00::/126"]}}),
            _ => json!({"ipBlock": {"cidr": format!("fd00::{:x}/127", 2 * rng.below(4))}}),
        };
    }
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

pub fn policy(rng: &mut Rng, namespace: &str, name: &str) -> NetworkPolicy {
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

pub fn pod(rng: &mut Rng, namespace: &str, name: &str) -> PodInfo {
    let ip = format!("10.0.0.{}", rng.below(12));
    // Some pods are dual-stack, a few IPv6 only.
    let ip6 = format!("fd00::{:x}", rng.below(12));
    let ips: Vec<&str> = match rng.below(10) {
        0..=4 => vec![&ip],
        5..=8 => vec![&ip, &ip6],
        _ => vec![&ip6],
    };
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
        "status": {"podIP": ips[0], "podIPs": ips.iter().map(|ip| json!({"ip": ip}))
            .collect::<Vec<_>>()}
    }))
    .unwrap();
    PodInfo::from_k8s(&pod).unwrap()
}

/// Random changes from one seed.
pub struct RandomChanges {
    rng: Rng,
}

impl RandomChanges {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng(seed.max(1)) }
    }

    /// The next change, described.
    pub fn next_change(&mut self) -> (Change, String) {
        let rng = &mut self.rng;
        let namespace = rng.pick(&NAMESPACES);
        match rng.below(10) {
            0 => {
                let labels =
                    rng.chance(80).then(|| serde_json::from_value::<Labels>(labels(rng)).unwrap());
                let what = format!("namespace {namespace} = {labels:?}");
                (Change::Namespace(namespace.to_string(), labels), what)
            }
            1..=4 => {
                let name = format!("p{}", rng.below(8));
                let id = PodRef::new(namespace, &name);
                let info = rng.chance(80).then(|| pod(rng, namespace, &name));
                let what = format!("pod {id} = {info:?}");
                (Change::Pod(id, info), what)
            }
            5..=8 => {
                let name = format!("np{}", rng.below(6));
                let id = PolicyRef::new(namespace, &name);
                let what = format!("policy {id}");
                if rng.chance(80) {
                    let object = policy(rng, namespace, &name);
                    let mut problems = Vec::new();
                    let parsed = Policy::from_k8s(&object, &mut problems);
                    (Change::Policy(id, parsed, problems), what)
                } else {
                    (Change::Policy(id, None, Vec::new()), what)
                }
            }
            _ => {
                let name = rng.pick(&NODES);
                let ip: IpAddr = format!("192.168.0.{}", rng.below(3)).parse().unwrap();
                let addresses = rng.chance(80).then(|| vec![ip]);
                let what = format!("node {name} = {addresses:?}");
                (Change::Node(name.to_string(), addresses), what)
            }
        }
    }
}
