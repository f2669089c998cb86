//! The NetworkPolicy truth table in a real `weir lab`: namespaces x, y, z (labelled ns=x|y|z)
//! with pods a, b, c (labelled pod=a|b|c) spread over two nodes, each pod running upstream's
//! agnhost servers (one container per port and protocol: `cont-80-tcp` with the named port
//! `serve-80-tcp`, ...; TCP and UDP on 80 and 81), like the upstream e2e suite.
//!
//! A case's policies are applied through the API, every ordered pair of pods is probed on 80
//! and 81 over TCP and UDP from inside the pods' network namespaces ([`crate::reachability`]),
//! and the matrix is compared with the independent oracle ([`crate::policy_oracle`]) and with
//! `weir_policy::trace` over the cluster listed back from the API. As upstream does, a matrix
//! with wrong cells is probed once more after a short wait before it counts as failed.
//!
//! The fixed cases ([`crate::policy_cases`]) name the truth table's fixture addresses in their
//! ipBlocks; [`relocate`] rewrites each fixture pod's /32 to the lab pod's real address (the
//! lab's IPAM decides addresses). Ranges stay as written (in the lab `10.244.N.0/24` is a
//! node's pod CIDR, not a namespace's), and an `except` that is no longer inside its `cidr`
//! is dropped, because the API requires excepts inside the block. The oracle always judges
//! the policies actually applied, so the check stays exact.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};
use weir_policy::{Cluster, Compiler, Endpoint, ObjectRef, Protocol, trace};

use crate::{
    lab::Lab,
    policy_cases::{NAMESPACES, PODS, PORTS, pod_ip},
    policy_oracle::{Oracle, Party},
    reachability::{Cell, Observation, ProbePod, Proto, probe_all, render},
    wait::eventually,
};

/// The image of the truth table's pods (any tag works in the lab).
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
/// A probe that gets no answer within this counts as blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait after applying a case before the first probe, and before the one retry.
pub const SETTLE: Duration = Duration::from_millis(700);
pub const RETRY_WAIT: Duration = Duration::from_secs(3);
const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];
/// Wrong cells listed one by one (with their trace) per case; the tables show them all.
const SHOWN_CELLS: usize = 12;

/// Node (1-based) of pod `pod` in namespace `ns`: every namespace has pods on both nodes and
/// same-named pods alternate, so a case sees node-local and cross-node pairs.
pub fn node_of(ns: usize, pod: usize) -> usize {
    1 + (ns + pod) % 2
}

/// The port named `web`: 80 on a and b, 81 on c (as the fixture table, so that a named port
/// resolves to different numbers per destination).
fn web_port(pod: usize) -> u16 {
    if pod == 2 { 81 } else { 80 }
}

/// Objects as one multi-document manifest (each JSON object is a YAML document; kubectl's
/// validation rejects a `kind: List` against the lab's OpenAPI).
pub fn stream(objects: &[Value]) -> String {
    objects.iter().map(Value::to_string).collect::<Vec<_>>().join("\n---\n")
}

/// The manifest of namespaces x, y, z and their nine pods.
pub fn manifest(lab: &Lab) -> Vec<Value> {
    let mut items = Vec::new();
    for ns in NAMESPACES {
        items.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns}}}));
    }
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for (p, pod) in PODS.iter().enumerate() {
            let mut containers = Vec::new();
            for port in PORTS {
                for proto in PROTOS {
                    let lower = proto.name().to_ascii_lowercase();
                    let mut ports = vec![json!({"containerPort": port,
                        "name": format!("serve-{port}-{lower}"), "protocol": proto.name()})];
                    if proto == Proto::Tcp && port == web_port(p) {
                        ports
                            .push(json!({"containerPort": port, "name": "web", "protocol": "TCP"}));
                    }
                    containers.push(json!({
                        "name": format!("cont-{port}-{lower}"),
                        "image": AGNHOST,
                        "command": ["/agnhost", "serve-hostname", format!("--{lower}"),
                                    "--http=false", "--port", port.to_string()],
                        "ports": ports,
                    }));
                }
            }
            items.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": ns, "name": pod, "labels": {"pod": pod}},
                "spec": {"nodeName": lab.node_name(node_of(n, p)),
                         "terminationGracePeriodSeconds": 0, "containers": containers}}));
        }
    }
    items
}

/// Everything of the cluster the policy code reads, listed from the API.
pub struct Listed {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    pub nodes: Vec<Node>,
}

fn items<T: k8s_openapi::serde::de::DeserializeOwned>(lab: &Lab, args: &[&str]) -> Vec<T> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend(["-o", "json"]);
    let text = lab.kubectl.ok(&full);
    let list: Value = serde_json::from_str(&text).expect("kubectl -o json prints JSON");
    list["items"]
        .as_array()
        .expect("a list has items")
        .iter()
        .map(|item| serde_json::from_value(item.clone()).expect("API objects parse"))
        .collect()
}

pub fn list(lab: &Lab) -> Listed {
    Listed {
        namespaces: items(lab, &["namespaces"]),
        pods: items(lab, &["pods", "-A"]),
        policies: items(lab, &["networkpolicies", "-A"]),
        nodes: items(lab, &["nodes"]),
    }
}

/// The truth table running in a lab.
pub struct TruthLab<'a> {
    pub lab: &'a Lab,
    /// The nine pods in matrix order (x/a, x/b, x/c, y/a, ...).
    pub pods: Vec<ProbePod>,
    /// Fixture address -> lab address of each pod.
    pub addresses: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

/// What checking one case found.
#[derive(Debug, Default)]
pub struct CaseResult {
    pub cells: usize,
    pub reached: usize,
    /// Readable report of every disagreement (empty when the case passed).
    pub failure: String,
    /// Whether the first probe was wrong and the retry fixed it.
    pub retried: bool,
}

impl<'a> TruthLab<'a> {
    /// Creates the namespaces and pods, waits until they run and every cell is reachable (no
    /// policies yet).
    pub fn start(lab: &'a Lab) -> TruthLab<'a> {
        lab.apply(&stream(&manifest(lab)));
        for ns in NAMESPACES {
            let out = lab.kubectl.run(&[
                "wait",
                "--for=condition=Ready",
                "--timeout=120s",
                "pods",
                "--all",
                "-n",
                ns,
            ]);
            assert!(
                out.status.success(),
                "pods of namespace {ns} not Ready: {}\n{}",
                crate::lab::text(&out),
                lab.kubectl.ok(&["get", "pods", "-A", "-o", "wide"])
            );
        }
        let listed = list(lab);
        let mut pods = Vec::new();
        let mut addresses = BTreeMap::new();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            for (p, name) in PODS.iter().enumerate() {
                let pod = listed
                    .pods
                    .iter()
                    .find(|x| {
                        x.metadata.namespace.as_deref() == Some(ns)
                            && x.metadata.name.as_deref() == Some(name)
                    })
                    .unwrap_or_else(|| panic!("pod {ns}/{name} is not listed"));
                let ip: Ipv4Addr = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or_else(|| panic!("pod {ns}/{name} has no IPv4 address"));
                let uid = pod.metadata.uid.as_deref().expect("pods have uids");
                addresses.insert(pod_ip(n, p), ip);
                pods.push(ProbePod {
                    label: format!("{ns}/{name}"),
                    ip,
                    netns: pod_netns(lab, node_of(n, p), uid),
                    answer: name.to_string(),
                });
            }
        }
        let truth = TruthLab { lab, pods, addresses };
        let cells = truth.cells();
        eventually("every pod reaches every pod (no policies)", Duration::from_secs(60), || {
            let observed = probe_all(&truth.pods, &cells, PROBE_TIMEOUT);
            let missing: Vec<String> = observed
                .iter()
                .filter(|(_, o)| !o.reached)
                .map(|(c, o)| truth.describe(c, o))
                .collect();
            (!missing.is_empty()).then(|| missing.join("\n"))
        });
        truth
    }

    /// Every cell: all ordered pairs of the nine pods (a pod to itself included), 80 and 81,
    /// TCP and UDP.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for from in 0..self.pods.len() {
            for to in 0..self.pods.len() {
                for port in PORTS {
                    for proto in PROTOS {
                        cells.push(Cell { from, to, port, proto });
                    }
                }
            }
        }
        cells
    }

    fn describe(&self, cell: &Cell, o: &Observation) -> String {
        format!(
            "{} -> {} {}/{}: {}",
            self.pods[cell.from].label,
            self.pods[cell.to].label,
            cell.proto.name(),
            cell.port,
            if o.reached { "reached" } else { o.detail.as_str() }
        )
    }

    /// The case's policies with fixture pod addresses replaced by the lab's.
    pub fn relocate(&self, policies: &[NetworkPolicy]) -> Vec<NetworkPolicy> {
        policies.iter().map(|p| relocate(p, &self.addresses)).collect()
    }

    /// Deletes every NetworkPolicy of the lab (only the truth table's namespaces have any).
    pub fn clear(&self) {
        self.lab.kubectl.ok(&["delete", "networkpolicies", "--all", "--all-namespaces"]);
    }

    /// Applies `policies` (already relocated) in one `kubectl apply`.
    pub fn apply(&self, policies: &[NetworkPolicy]) {
        if policies.is_empty() {
            return;
        }
        let objects: Vec<Value> =
            policies.iter().map(|p| serde_json::to_value(p).expect("policies serialize")).collect();
        self.lab.apply(&stream(&objects));
    }

    /// Probes every cell and compares with the oracle for `policies` (the ones in force) and
    /// with `trace` over the cluster listed from the API; probes once more after
    /// [`RETRY_WAIT`] when a cell is wrong.
    pub fn check(&self, case: &str, policies: &[NetworkPolicy]) -> CaseResult {
        let listed = list(self.lab);
        let mut applied: Vec<String> = listed
            .policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref().is_some_and(|n| NAMESPACES.contains(&n)))
            .map(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or(""), name(p)))
            .collect();
        let mut wanted: Vec<String> = policies
            .iter()
            .map(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or(""), name(p)))
            .collect();
        applied.sort();
        wanted.sort();
        assert_eq!(applied, wanted, "{case}: the API lists other policies than applied");

        let cluster =
            Cluster::from_k8s(&listed.namespaces, &listed.pods, &listed.policies, &listed.nodes);
        assert!(
            cluster.problems.is_empty(),
            "{case}: the compiler left out parts of valid policies: {:?}",
            cluster.problems
        );
        let compiled = Compiler::default().compile(&cluster, None);
        let oracle = Oracle { namespaces: &listed.namespaces, pods: &listed.pods, policies };
        let cells = self.cells();
        let labels: Vec<String> = self.pods.iter().map(|p| p.label.clone()).collect();
        let party = |i: usize| {
            let (ns, pod) = labels[i].split_once('/').expect("ns/name");
            Party::Pod(ns.into(), pod.into())
        };
        let endpoint = |i: usize| {
            let (ns, pod) = labels[i].split_once('/').expect("ns/name");
            Endpoint::Pod(ObjectRef::new(ns.to_string(), pod.to_string()))
        };
        let mut expected = BTreeMap::new();
        let mut traced = BTreeMap::new();
        for cell in &cells {
            // A pod's traffic to its own address never leaves its namespace (loopback): no
            // policy applies to it, whatever the oracle says of the pair.
            let allowed = cell.from == cell.to
                || oracle.allowed(&party(cell.from), &party(cell.to), cell.proto.name(), cell.port);
            expected.insert(*cell, allowed);
            if cell.from != cell.to {
                let protocol = match cell.proto {
                    Proto::Tcp => Protocol::Tcp,
                    Proto::Udp => Protocol::Udp,
                };
                let verdict =
                    trace(&compiled, &endpoint(cell.from), &endpoint(cell.to), protocol, cell.port)
                        .unwrap_or_else(|e| panic!("{case}: trace failed: {e}"));
                traced.insert(*cell, verdict);
            }
        }

        let wrong = |observed: &BTreeMap<Cell, Observation>| -> Vec<Cell> {
            cells.iter().filter(|c| observed[c].reached != expected[c]).copied().collect()
        };
        let mut observed = probe_all(&self.pods, &cells, PROBE_TIMEOUT);
        let mut retried = false;
        if !wrong(&observed).is_empty() {
            std::thread::sleep(RETRY_WAIT);
            observed = probe_all(&self.pods, &cells, PROBE_TIMEOUT);
            retried = true;
        }
        let mut failure = String::new();
        let wrong_cells = wrong(&observed);
        if !wrong_cells.is_empty() {
            failure.push_str(&format!(
                "{case}: {} of {} cells wrong after one retry\n{}",
                wrong_cells.len(),
                cells.len(),
                render(&labels, &expected, &observed)
            ));
            for cell in wrong_cells.iter().take(SHOWN_CELLS) {
                let verdict = traced.get(cell).map(|v| v.to_string()).unwrap_or_default();
                failure.push_str(&format!(
                    "  {} (expected {})\n    trace: {}\n",
                    self.describe(cell, &observed[cell]),
                    if expected[cell] { "reached" } else { "blocked" },
                    verdict.replace('\n', "\n    ")
                ));
            }
        }
        if wrong_cells.len() > SHOWN_CELLS {
            failure.push_str(&format!("  ... and {} more\n", wrong_cells.len() - SHOWN_CELLS));
        }
        let trace_wrong: Vec<String> = traced
            .iter()
            .filter(|(cell, v)| v.allowed != observed[*cell].reached)
            .take(SHOWN_CELLS)
            .map(|(cell, v)| {
                format!("  {}\n    trace: {}", self.describe(cell, &observed[cell]), v)
            })
            .collect();
        if !trace_wrong.is_empty() {
            failure.push_str(&format!(
                "{case}: weir policy trace disagrees with the probes in {} cells:\n{}\n",
                trace_wrong.len(),
                trace_wrong.join("\n")
            ));
        }
        if !failure.is_empty() {
            failure.push_str(&format!("  policies applied: {}\n", json!(policies)));
        }
        CaseResult {
            cells: cells.len(),
            reached: observed.values().filter(|o| o.reached).count(),
            failure,
            retried,
        }
    }

    /// Replaces the case's policies with `policies` and checks the matrix.
    pub fn run_case(&self, case: &str, policies: &[NetworkPolicy]) -> CaseResult {
        let started = Instant::now();
        self.clear();
        let policies = self.relocate(policies);
        self.apply(&policies);
        std::thread::sleep(SETTLE);
        let result = self.check(case, &policies);
        eprintln!(
            "netpol lab: {case}: {}/{} reached{}{} ({:.1?})",
            result.reached,
            result.cells,
            if result.retried { ", retried" } else { "" },
            if result.failure.is_empty() { "" } else { ", WRONG" },
            started.elapsed()
        );
        result
    }
}

fn name(p: &NetworkPolicy) -> &str {
    p.metadata.name.as_deref().unwrap_or("")
}

/// `/run/netns/<lab>.worker<N>.<first 12 hex digits of the uid>`: the node runtime's pod
/// namespace (lab/src/plan.rs gives the prefix, weir_node::rules::netns_name the rest).
pub fn pod_netns(lab: &Lab, node: usize, uid: &str) -> PathBuf {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).take(12).collect();
    PathBuf::from("/run/netns").join(format!("{}.{}", lab.node_netns(node), hex.to_lowercase()))
}

fn parse_cidr(text: &str) -> Option<(u32, u8)> {
    let (ip, len) = text.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((u32::from(ip), len))
}

/// Whether `inner` is strictly inside `outer` (both IPv4 CIDRs).
fn strictly_inside(inner: &str, outer: &str) -> bool {
    let (Some((i, il)), Some((o, ol))) = (parse_cidr(inner), parse_cidr(outer)) else {
        return false;
    };
    let mask = |len: u8| if len == 0 { 0 } else { u32::MAX << (32 - len) };
    il > ol && i & mask(ol) == o & mask(ol)
}

/// `policy` with every `<fixture pod address>/32` of its ipBlocks replaced by the lab pod's
/// address (`addresses`), and excepts no longer inside their cidr dropped.
pub fn relocate(policy: &NetworkPolicy, addresses: &BTreeMap<Ipv4Addr, Ipv4Addr>) -> NetworkPolicy {
    let move_one = |text: &str| -> String {
        match text.strip_suffix("/32").and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
            Some(ip) => match addresses.get(&ip) {
                Some(lab_ip) => format!("{lab_ip}/32"),
                None => text.to_string(),
            },
            None => text.to_string(),
        }
    };
    let mut value = serde_json::to_value(policy).expect("policies serialize");
    for direction in ["ingress", "egress"] {
        let peers_key = if direction == "ingress" { "from" } else { "to" };
        let Some(rules) = value["spec"][direction].as_array_mut() else { continue };
        for rule in rules {
            let Some(peers) = rule[peers_key].as_array_mut() else { continue };
            for peer in peers {
                let Some(block) = peer.get_mut("ipBlock") else { continue };
                let cidr = move_one(block["cidr"].as_str().unwrap_or_default());
                block["cidr"] = json!(cidr);
                if let Some(excepts) = block.get_mut("except").and_then(Value::as_array_mut) {
                    let kept: Vec<Value> = excepts
                        .iter()
                        .filter_map(Value::as_str)
                        .map(move_one)
                        .filter(|e| strictly_inside(e, &cidr))
                        .map(Value::from)
                        .collect();
                    *excepts = kept;
                }
            }
        }
    }
    serde_json::from_value(value).expect("a relocated policy is still a policy")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_cases::policy;

    #[test]
    fn relocation_moves_pod_addresses_and_keeps_excepts_valid() {
        let mut addresses = BTreeMap::new();
        addresses.insert(pod_ip(0, 1), Ipv4Addr::new(10, 244, 2, 7));
        addresses.insert(pod_ip(1, 1), Ipv4Addr::new(10, 244, 1, 9));
        let p = policy(
            "x",
            "p",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.244.0.0/16", "except": [format!("{}/32", pod_ip(0, 1))]}},
                {"ipBlock": {"cidr": "10.244.2.0/24", "except": [format!("{}/32", pod_ip(1, 1))]}},
                {"podSelector": {}}]}],
              "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", pod_ip(1, 1))}}]}]}),
        );
        let moved = serde_json::to_value(relocate(&p, &addresses)).unwrap();
        let from = &moved["spec"]["ingress"][0]["from"];
        assert_eq!(from[0]["ipBlock"]["except"], json!(["10.244.2.7/32"]));
        assert_eq!(from[1]["ipBlock"]["except"], json!([]), "10.244.1.9 is not in 10.244.2.0/24");
        assert_eq!(from[2], json!({"podSelector": {}}));
        assert_eq!(moved["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"], "10.244.1.9/32");
    }

    #[test]
    fn pods_spread_over_both_nodes() {
        for ns in 0..3 {
            let nodes: Vec<usize> = (0..3).map(|p| node_of(ns, p)).collect();
            assert!(nodes.contains(&1) && nodes.contains(&2), "{nodes:?}");
        }
    }
}
