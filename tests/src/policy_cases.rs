//! The upstream NetworkPolicy truth-table shape (namespaces x, y, z; pods a, b, c labelled
//! pod=a/b/c in namespaces labelled ns=x/y/z; ports 80 and 81 over TCP and UDP), the policy
//! cases run on it, and a seeded generator of random policies. Shared by the compiler's
//! differential tests, the eBPF differential test and (later) the lab suite.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};

use crate::policy_oracle::Party;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];
pub const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];
pub const NODES: [&str; 2] = ["node-1", "node-2"];
/// An address outside the cluster.
pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

/// An IPv6 address outside the cluster.
pub const EXTERNAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);

pub fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, ns as u8, 10 + pod as u8)
}

/// Every pod is dual-stack: its IPv6 address is `fd00:10:244:<ns>::<10 + pod>`.
pub fn pod_ip6(ns: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, ns as u16, 0, 0, 0, 0x10 + pod as u16)
}

pub fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 50, 1 + node as u8)
}

pub fn node_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x192, 0x168, 0x50, 0, 0, 0, 1 + node as u16)
}

/// Pods a and b run on node-1, c on node-2.
pub fn pod_node(pod: usize) -> usize {
    usize::from(pod == 2)
}

/// The cluster objects of the truth table.
pub struct TruthTable {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
}

impl Default for TruthTable {
    fn default() -> Self {
        Self::new()
    }
}

impl TruthTable {
    pub fn new() -> Self {
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| {
                from(json!({"metadata": {"name": ns, "labels": {
                    "ns": ns, "kubernetes.io/metadata.name": ns}}}))
            })
            .collect();
        let mut pods = Vec::new();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            for (p, pod) in PODS.iter().enumerate() {
                // Named ports as upstream's suite has them; `web` differs between pods so that
                // named ports resolve per destination.
                let web = if p == 2 { 81 } else { 80 };
                pods.push(from(json!({
                    "metadata": {"namespace": ns, "name": pod, "labels": {"pod": pod}},
                    "spec": {"nodeName": NODES[pod_node(p)], "containers": [{
                        "name": "c", "image": "nginx", "ports": [
                            {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
                            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
                            {"name": "serve-81-tcp", "containerPort": 81},
                            {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
                            {"name": "web", "containerPort": web, "protocol": "TCP"}]}]},
                    "status": {"podIP": pod_ip(n, p).to_string(),
                               "podIPs": [{"ip": pod_ip(n, p).to_string()},
                                          {"ip": pod_ip6(n, p).to_string()}]}
                })));
            }
        }
        let nodes = NODES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                from(json!({"metadata": {"name": name}, "status": {"addresses": [
                    {"type": "InternalIP", "address": node_ip(i).to_string()},
                    {"type": "InternalIP", "address": node_ip6(i).to_string()}]}}))
            })
            .collect();
        Self { namespaces, pods, nodes }
    }

    /// Creates the namespaces and pods (with their status: addresses) and `policies` through
    /// `server`'s API.
    pub fn create_in(&self, server: &crate::apiserver::ApiServer, policies: &[NetworkPolicy]) {
        for ns in &self.namespaces {
            let (status, body) =
                server.json("POST", "/api/v1/namespaces", Some(&serde_json::to_value(ns).unwrap()));
            assert_eq!(status, 201, "{body}");
        }
        for pod in &self.pods {
            let ns = pod.metadata.namespace.as_deref().unwrap();
            let name = pod.metadata.name.as_deref().unwrap();
            let value = serde_json::to_value(pod).unwrap();
            let (status, body) =
                server.json("POST", &format!("/api/v1/namespaces/{ns}/pods"), Some(&value));
            assert_eq!(status, 201, "{body}");
            let status_patch = json!({"status": value["status"]});
            let (status, body) = server.json(
                "PATCH",
                &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                Some(&status_patch),
            );
            assert_eq!(status, 200, "{body}");
        }
        for policy in policies {
            let ns = policy.metadata.namespace.as_deref().unwrap();
            let (status, body) = server.json(
                "POST",
                &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"),
                Some(&serde_json::to_value(policy).unwrap()),
            );
            assert_eq!(status, 201, "{body}");
        }
    }

    /// Every party of the table: the nine pods, then the external address and the nodes.
    pub fn parties() -> Vec<Party> {
        Self::parties_of(false)
    }

    /// [`Self::parties`] of one family: pods stand for their address of that family.
    pub fn parties_of(ipv6: bool) -> Vec<Party> {
        let mut parties = Vec::new();
        for ns in NAMESPACES {
            for pod in PODS {
                parties.push(Party::Pod(ns.into(), pod.into()));
            }
        }
        let external = if ipv6 { IpAddr::V6(EXTERNAL6) } else { IpAddr::V4(EXTERNAL) };
        parties.push(Party::Addr { ip: external, node: None });
        for (i, node) in NODES.iter().enumerate() {
            let ip = if ipv6 { IpAddr::V6(node_ip6(i)) } else { IpAddr::V4(node_ip(i)) };
            parties.push(Party::Addr { ip, node: Some(node.to_string()) });
        }
        parties
    }

    /// Every ordered (source, destination) of [`Self::parties`] with at least one pod.
    pub fn pairs() -> Vec<(Party, Party)> {
        Self::pairs_of(false)
    }

    /// [`Self::pairs`] of one family.
    pub fn pairs_of(ipv6: bool) -> Vec<(Party, Party)> {
        let parties = Self::parties_of(ipv6);
        let mut pairs = Vec::new();
        for src in &parties {
            for dst in &parties {
                if !matches!((src, dst), (Party::Addr { .. }, Party::Addr { .. })) {
                    pairs.push((src.clone(), dst.clone()));
                }
            }
        }
        pairs
    }
}

fn from<T: k8s_openapi::serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("fixture JSON matches the Kubernetes type")
}

/// A NetworkPolicy `name` in `ns` with this spec.
pub fn policy(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    from(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": ns, "name": name}, "spec": spec}))
}

/// Policy x/a: x/a takes connections from x/b only and may not send anything itself (its
/// replies must still pass).
pub fn a_only_from_b() -> NetworkPolicy {
    policy(
        "x",
        "a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "policyTypes": ["Ingress", "Egress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )
}

fn pod(p: &str) -> Value {
    json!({"matchLabels": {"pod": p}})
}

fn ns(n: &str) -> Value {
    json!({"matchLabels": {"ns": n}})
}

fn expr(key: &str, op: &str, values: &[&str]) -> Value {
    if values.is_empty() {
        json!({"matchExpressions": [{"key": key, "operator": op}]})
    } else {
        json!({"matchExpressions": [{"key": key, "operator": op, "values": values}]})
    }
}

fn cidr6(ns: usize, p: usize) -> String {
    format!("{}/128", pod_ip6(ns, p))
}

fn cidr(ns: usize, p: usize) -> String {
    format!("{}/32", pod_ip(ns, p))
}

/// A named policy case.
pub struct Case {
    pub name: &'static str,
    pub policies: Vec<NetworkPolicy>,
}

/// The fixed policy cases: every feature of networking.k8s.io/v1.
pub fn cases() -> Vec<Case> {
    let p = policy;
    let all = json!({});
    let c = |name, policies| Case { name, policies };
    vec![
        c("no policies", vec![]),
        c("deny all ingress in x (types inferred)", vec![p("x", "deny", json!({"podSelector": {}}))]),
        c("deny all ingress in x (types explicit)", vec![p("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))]),
        c("deny all egress in x", vec![p("x", "deny", json!({"podSelector": {}, "policyTypes": ["Egress"]}))]),
        c("deny all both ways in x", vec![p("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))]),
        c("allow all ingress in x", vec![p("x", "allow", json!({"podSelector": {}, "ingress": [{}]}))]),
        c("allow all egress in x", vec![p("x", "allow", json!({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}))]),
        c("x/a from pod=b in x", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}]}]}))]),
        c("x/a from namespace y", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": ns("y")}]}]}))]),
        c("x/a from ns=y AND pod=b", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": ns("y"), "podSelector": pod("b")}]}]}))]),
        c("x/a from ns=y OR pod=b", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": ns("y")}, {"podSelector": pod("b")}]}]}))]),
        c("x/a from pod=c in all namespaces", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": all, "podSelector": pod("c")}]}]}))]),
        c("x/a from pod In [b, c]", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": expr("pod", "In", &["b", "c"])}]}]}))]),
        c("x/a from namespaces NotIn [y]", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": expr("ns", "NotIn", &["y"])}]}]}))]),
        c("x/a from pods with label pod Exists", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": expr("pod", "Exists", &[])}]}]}))]),
        c("x/a from pods without label pod", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": all, "podSelector": expr("pod", "DoesNotExist", &[])}]}]}))]),
        c("x/a from namespaces In [y, z]", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": expr("ns", "In", &["y", "z"])}]}]}))]),
        c("x/a from pods NotIn a label they lack", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": expr("tier", "NotIn", &["db"])}]}]}))]),
        c("x/a from namespaces without label ns", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": expr("ns", "DoesNotExist", &[])}]}]}))]),
        c("x all pods: TCP 80 from anywhere", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}))]),
        c("x all pods: UDP 81 from anywhere", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}))]),
        c("x all pods: every UDP port", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}))]),
        c("x all pods: TCP 80-81 (endPort)", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 81}]}]}))]),
        c("x all pods: TCP 81-90 (endPort)", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]}))]),
        c("x all pods: TCP 1-65535 (endPort)", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 1, "endPort": 65535}]}]}))]),
        c("x all pods: UDP 79-80 and TCP 81", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 79, "endPort": 80, "protocol": "UDP"}, {"port": 81}]}]}))]),
        c("x all pods: named port serve-80-tcp", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}))]),
        c("x all pods: named port serve-81-udp over UDP", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}))]),
        c("x all pods: named TCP port asked over UDP matches nothing", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}]}))]),
        c("x all pods: named port web differs per pod", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]}))]),
        c("x all pods: named port that no pod has", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}]}))]),
        c("x all pods: SCTP 80 only", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}))]),
        c("x all pods: ipBlock of every pod", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16"}}]}]}))]),
        c("x all pods: ipBlock except x/b", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [cidr(0, 1)]}}]}]}))]),
        c("x all pods: ipBlock namespace y's range except y/b", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24", "except": [cidr(1, 1)]}}]}]}))]),
        c("x all pods: only from outside the pod range", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}]}]}))]),
        c("x all pods: ipBlock /32 of x/c on TCP 80", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr(0, 2)}}], "ports": [{"port": 80}]}]}))]),
        c("x all pods: overlapping ipBlocks with excepts", vec![p("x", "p", json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}], "ports": [{"port": 80}]},
            {"from": [{"ipBlock": {"cidr": "10.244.1.0/24", "except": [cidr(1, 0)]}}], "ports": [{"port": 81}]}]}))]),
        c("x all pods: ipBlock except range or pod=a", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.0.0/24"]}}, {"podSelector": pod("a")}]}]}))]),
        c("x/a egress to pod=b", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": pod("b")}]}]}))]),
        c("x/a egress to namespace z (types inferred)", vec![p("x", "a", json!({"podSelector": pod("a"), "egress": [{"to": [{"namespaceSelector": ns("z")}]}]}))]),
        c("x/a egress to ipBlock on TCP 81", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.0/24"}}], "ports": [{"port": 81}]}]}))]),
        c("x/a egress to ipBlock except", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24", cidr(0, 1)]}}]}]}))]),
        c("x/a egress named port serve-81-tcp", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-81-tcp"}]}]}))]),
        c("x/a egress named port web to pod=c and pod=b", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": all, "podSelector": expr("pod", "In", &["b", "c"])}], "ports": [{"port": "web"}]}]}))]),
        c("x/a egress named UDP port to pod=b", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": pod("b")}], "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}))]),
        c("x/a egress endPort 81-82", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 81, "endPort": 82}]}]}))]),
        c("x/a egress named port to ipBlock", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.244.2.0/24"}}], "ports": [{"port": "serve-80-tcp"}]}]}))]),
        c("union: x/a from pod=b plus from ns=y", vec![
            p("x", "one", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}]}]})),
            p("x", "two", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": ns("y")}]}]}))]),
        c("union: deny all plus allow pod=c", vec![
            p("x", "deny", json!({"podSelector": {}})),
            p("x", "allow", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": pod("c")}]}]}))]),
        c("union: ingress deny and egress deny in two policies", vec![
            p("x", "in", json!({"podSelector": {}, "policyTypes": ["Ingress"]})),
            p("x", "out", json!({"podSelector": pod("b"), "policyTypes": ["Egress"]}))]),
        c("ingress rules ignored when types say Egress", vec![p("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{"from": [{"podSelector": pod("a")}]}]}))]),
        c("types Ingress and Egress with only ingress rules", vec![p("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}]}))]),
        c("empty egress list does not isolate egress", vec![p("x", "p", json!({"podSelector": {}, "egress": [], "ingress": [{"from": [{"podSelector": pod("b")}]}]}))]),
        c("egress rules infer Egress and Ingress", vec![p("x", "p", json!({"podSelector": pod("b"), "egress": [{"to": [{"namespaceSelector": ns("y")}]}]}))]),
        c("policy in y leaves x alone", vec![p("y", "p", json!({"podSelector": pod("b"), "ingress": [{"from": [{"podSelector": pod("a")}]}]}))]),
        c("target pods In [a, b]", vec![p("x", "p", json!({"podSelector": expr("pod", "In", &["a", "b"]), "ingress": [{"from": [{"namespaceSelector": ns("z")}]}]}))]),
        c("target pods NotIn [a]", vec![p("y", "p", json!({"podSelector": expr("pod", "NotIn", &["a"]), "ingress": [{"from": [{"podSelector": pod("a")}]}]}))]),
        c("two rules with their own ports", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [
            {"from": [{"podSelector": pod("b")}], "ports": [{"port": 80}]},
            {"from": [{"podSelector": pod("c")}], "ports": [{"port": 81, "protocol": "UDP"}]}]}))]),
        c("peers times ports", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [
            {"from": [{"podSelector": pod("b")}, {"namespaceSelector": ns("z")}], "ports": [{"port": 80}, {"port": 81, "protocol": "UDP"}]}]}))]),
        c("deny egress allow ingress in one policy", vec![p("x", "p", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}]}))]),
        c("default deny in every namespace", NAMESPACES.iter().map(|n| p(n, "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))).collect()),
        c("default deny everywhere plus DNS-like UDP egress", NAMESPACES.iter().flat_map(|n| [
            p(n, "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})),
            p(n, "udp-out", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]}))]).collect()),
        c("x/a from every pod of its namespace", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": {}}]}]}))]),
        c("x egress to all namespaces on TCP 80", vec![p("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}))]),
        c("x egress to pod=c and to the outside", vec![p("x", "p", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {}, "podSelector": pod("c")}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}))]),
        c("y all pods from x on 81", vec![p("y", "p", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": ns("x")}], "ports": [{"port": 81}, {"port": 81, "protocol": "UDP"}]}]}))]),
        c("z egress to x on UDP 80", vec![p("z", "p", json!({"podSelector": {}, "egress": [{"to": [{"namespaceSelector": ns("x")}], "ports": [{"port": 80, "protocol": "UDP"}]}]}))]),
        c("x/a from ns matchLabels + matchExpressions", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "y"}, "matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]}}]}]}))]),
        c("x/a from pods matchLabels + matchExpressions", vec![p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {
            "matchLabels": {"pod": "b"}, "matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]}}]}]}))]),
        c("ingress from x/b allowed but x/b egress denied", vec![
            p("x", "a", json!({"podSelector": pod("a"), "ingress": [{"from": [{"podSelector": pod("b")}]}]})),
            p("x", "b", json!({"podSelector": pod("b"), "policyTypes": ["Egress"]}))]),
        c("z/c from z/a only", vec![p("z", "c", json!({"podSelector": pod("c"), "ingress": [{"from": [{"podSelector": pod("a")}]}]}))]),
        c("egress and ingress policies on both ends", vec![
            p("x", "out", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": ns("y")}], "ports": [{"port": 80}, {"port": 81}]}]})),
            p("y", "in", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": ns("x"), "podSelector": pod("a")}], "ports": [{"port": 80}]}]}))]),
        // IPv6 ipBlocks (the IPv4 cells see them match nothing, and the reverse).
        c("x all pods: IPv6 ipBlock of every pod", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244::/48"}}]}]}))]),
        c("x all pods: IPv6 ipBlock except x/b", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244::/48", "except": [cidr6(0, 1)]}}]}]}))]),
        c("x all pods: IPv6 ipBlock namespace y's range except y/b on TCP 80", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244:1::/64", "except": [cidr6(1, 1)]}}], "ports": [{"port": 80}]}]}))]),
        c("x all pods: only from outside the IPv6 pod range", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "::/0", "except": ["fd00:10:244::/48"]}}]}]}))]),
        c("x all pods: every IPv6 address but no IPv4 one", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "::/0"}}]}]}))]),
        c("x/a egress to IPv6 ipBlock except, both families' blocks", vec![p("x", "a", json!({"podSelector": pod("a"), "policyTypes": ["Egress"], "egress": [{"to": [
            {"ipBlock": {"cidr": "fd00:10:244::/48", "except": ["fd00:10:244:2::/64", cidr6(0, 1)]}},
            {"ipBlock": {"cidr": "10.244.2.0/24"}}]}]}))]),
        c("allow from the outside only on 81", vec![p("x", "p", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 81}]}]}))]),
    ]
}

/// A small deterministic random number generator (xorshift64*), so that a failing seed can be
/// replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

fn random_selector(rng: &mut Rng, key: &str, values: &[&str]) -> Value {
    match rng.below(6) {
        0 => json!({}),
        1 | 2 => json!({"matchLabels": {key: rng.pick(values)}}),
        3 => {
            let op = rng.pick(&["In", "NotIn"]);
            let a = rng.pick(values);
            let b = rng.pick(values);
            expr(key, op, &[a, b])
        }
        4 => expr(key, rng.pick(&["Exists", "DoesNotExist"]), &[]),
        _ => {
            let op = rng.pick(&["Exists", "DoesNotExist", "NotIn", "In"]);
            let values: &[&str] = if op.ends_with("In") { &["a", "x"] } else { &[] };
            expr(rng.pick(&[key, "other"]), op, values)
        }
    }
}

fn random_cidr(rng: &mut Rng) -> Value {
    let n = rng.below(3);
    match rng.below(9) {
        0 => json!({"cidr": "10.244.0.0/16", "except": [format!("10.244.{n}.0/24")]}),
        1 => json!({"cidr": format!("10.244.{n}.0/24"), "except": [cidr(n, rng.below(3))]}),
        2 => json!({"cidr": cidr(n, rng.below(3))}),
        3 => json!({"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}),
        6 => json!({"cidr": "fd00:10:244::/48", "except": [format!("fd00:10:244:{n}::/64")]}),
        7 => json!({"cidr": format!("fd00:10:244:{n}::/64"), "except": [cidr6(n, rng.below(3))]}),
        8 => json!({"cidr": "::/0", "except": ["fd00:10:244::/48"]}),
        4 => json!({"cidr": "0.0.0.0/0"}),
        5 => json!({"cidr": format!("10.244.{n}.0/24")}),
        _ => json!({"cidr": format!("fd00:10:244:{n}::/64")}),
    }
}

fn random_peer(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!({"podSelector": random_selector(rng, "pod", &PODS)}),
        1 => json!({"namespaceSelector": random_selector(rng, "ns", &NAMESPACES)}),
        2 => json!({"namespaceSelector": random_selector(rng, "ns", &NAMESPACES),
                    "podSelector": random_selector(rng, "pod", &PODS)}),
        3 => json!({"ipBlock": random_cidr(rng)}),
        _ => json!({"podSelector": {"matchLabels": {"pod": rng.pick(&PODS)}}}),
    }
}

fn random_port(rng: &mut Rng) -> Value {
    let protocol = rng.pick(&["TCP", "UDP", "TCP", "SCTP"]);
    match rng.below(6) {
        0 => json!({"protocol": protocol}),
        1 | 2 => json!({"protocol": protocol, "port": rng.pick(&[80, 81, 82])}),
        3 => {
            let start = rng.pick(&[1, 79, 80, 81]);
            json!({"protocol": protocol, "port": start, "endPort": start + rng.pick(&[0, 1, 5, 1000])})
        }
        4 => {
            json!({"protocol": protocol, "port": rng.pick(&["serve-80-tcp", "serve-81-udp", "web", "serve-80-udp"])})
        }
        _ => json!({"port": 80}),
    }
}

fn random_rules(rng: &mut Rng, peers_key: &str) -> Value {
    let rules: Vec<Value> = (0..rng.below(3))
        .map(|_| {
            let mut rule = serde_json::Map::new();
            if rng.chance(70) {
                rule.insert(
                    peers_key.into(),
                    (0..1 + rng.below(2)).map(|_| random_peer(rng)).collect(),
                );
            }
            if rng.chance(60) {
                rule.insert(
                    "ports".into(),
                    (0..1 + rng.below(2)).map(|_| random_port(rng)).collect(),
                );
            }
            Value::Object(rule)
        })
        .collect();
    Value::Array(rules)
}

/// 1-4 random, valid policies on the truth-table cluster.
pub fn random_policies(rng: &mut Rng) -> Vec<NetworkPolicy> {
    (0..1 + rng.below(4))
        .map(|i| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), random_selector(rng, "pod", &PODS));
            match rng.below(4) {
                0 => {}
                1 => {
                    spec.insert("policyTypes".into(), json!(["Ingress"]));
                }
                2 => {
                    spec.insert("policyTypes".into(), json!(["Egress"]));
                }
                _ => {
                    spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
                }
            }
            if rng.chance(80) {
                spec.insert("ingress".into(), random_rules(rng, "from"));
            }
            if rng.chance(60) {
                spec.insert("egress".into(), random_rules(rng, "to"));
            }
            policy(rng.pick(&NAMESPACES), &format!("random-{i}"), Value::Object(spec))
        })
        .collect()
}
