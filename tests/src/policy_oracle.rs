//! An oracle for NetworkPolicy verdicts, written straight from the networking.k8s.io/v1 API
//! reference and independently of `weir-policy` (it shares only the k8s-openapi types), so
//! that the compiler, the trace tool and the datapath can be checked against it.
//!
//! A connection from `src` to `dst` on (protocol, port) is allowed when the source's egress
//! allows it and the destination's ingress allows it. For each side:
//! - only pods (not on the host network) have policies; anything else allows;
//! - the policies that apply are those in the pod's namespace whose podSelector matches the
//!   pod and whose policyTypes include the direction (policyTypes unset: Ingress, plus Egress
//!   when `egress` has at least one rule); none applies: allowed;
//! - otherwise allowed when some rule of some applying policy matches: its peer list (`from`
//!   or `to`) is empty or has a matching peer, and its ports list is empty or has a matching
//!   port;
//! - ingress from the destination pod's own node is always allowed.
//!
//! A peer: an ipBlock matches an address inside `cidr` and outside every `except`; otherwise
//! it matches a pod whose namespace is the policy's (no namespaceSelector) or matches the
//! namespaceSelector, and whose labels match the podSelector (absent: all pods). A port: the
//! protocol (default TCP) is equal, and the port is absent, equal to `port`, inside
//! `port..=endPort`, or the destination pod has a container port of that name and protocol with
//! that number.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    /// A pod, by namespace and name.
    Pod(String, String),
    /// An address that is not a pod's; `node` names the node it belongs to, if any.
    Addr { ip: IpAddr, node: Option<String> },
}

pub struct Oracle<'a> {
    pub namespaces: &'a [Namespace],
    pub pods: &'a [Pod],
    pub policies: &'a [NetworkPolicy],
}

struct Resolved<'a> {
    pod: Option<&'a Pod>,
    ip: IpAddr,
    node: Option<String>,
}

impl<'a> Oracle<'a> {
    pub fn allowed(&self, src: &Party, dst: &Party, protocol: &str, port: u16) -> bool {
        self.allowed_in(false, src, dst, protocol, port)
    }

    /// [`Self::allowed`] for the connection of one family: pods are seen at their address of
    /// that family (IPv6 when `ipv6`).
    pub fn allowed_in(
        &self,
        ipv6: bool,
        src: &Party,
        dst: &Party,
        protocol: &str,
        port: u16,
    ) -> bool {
        let src = self.resolve(src, ipv6);
        let dst = self.resolve(dst, ipv6);
        self.side_allows(&src, &dst, "Egress", &dst, protocol, port)
            && self.side_allows(&dst, &src, "Ingress", &dst, protocol, port)
    }

    fn resolve(&self, party: &Party, ipv6: bool) -> Resolved<'a> {
        match party {
            Party::Pod(ns, name) => {
                let pod = self
                    .pods
                    .iter()
                    .find(|p| {
                        p.metadata.namespace.as_deref() == Some(ns)
                            && p.metadata.name.as_deref() == Some(name)
                    })
                    .unwrap_or_else(|| panic!("oracle: no pod {ns}/{name}"));
                let ip = pod_ips(pod)
                    .into_iter()
                    .find(|ip| ip.is_ipv6() == ipv6)
                    .unwrap_or_else(|| panic!("oracle: pod {ns}/{name} has no IP of the family"));
                Resolved {
                    pod: Some(pod),
                    ip,
                    node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                }
            }
            Party::Addr { ip, node } => {
                let pod = self.pods.iter().find(|p| pod_ips(p).contains(ip) && !host_network(p));
                Resolved { pod, ip: *ip, node: node.clone() }
            }
        }
    }

    /// Whether `subject`'s policies for `direction` allow traffic with `peer`; `dst` is the
    /// destination (for named ports).
    fn side_allows(
        &self,
        subject: &Resolved,
        peer: &Resolved,
        direction: &str,
        dst: &Resolved,
        protocol: &str,
        port: u16,
    ) -> bool {
        let Some(pod) = subject.pod.filter(|p| !host_network(p)) else { return true };
        if direction == "Ingress"
            && peer.pod.is_none()
            && peer.node.is_some()
            && peer.node == subject.node
        {
            return true;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let applying: Vec<&NetworkPolicy> = self
            .policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == ns)
            .filter(|p| {
                let spec = p.spec.as_ref().unwrap();
                selector_matches(spec.pod_selector.as_ref(), labels_of(&pod.metadata.labels))
                    && policy_types(p).iter().any(|t| t == direction)
            })
            .collect();
        if applying.is_empty() {
            return true;
        }
        applying.iter().any(|policy| {
            let spec = policy.spec.as_ref().unwrap();
            let rules: Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> = if direction
                == "Ingress"
            {
                spec.ingress
                    .iter()
                    .flatten()
                    .map(|r| {
                        (r.from.clone().unwrap_or_default(), r.ports.clone().unwrap_or_default())
                    })
                    .collect()
            } else {
                spec.egress
                    .iter()
                    .flatten()
                    .map(|r| {
                        (r.to.clone().unwrap_or_default(), r.ports.clone().unwrap_or_default())
                    })
                    .collect()
            };
            rules.iter().any(|(peers, ports)| {
                (peers.is_empty() || peers.iter().any(|p| self.peer_matches(ns, p, peer)))
                    && (ports.is_empty()
                        || ports.iter().any(|p| port_matches(p, dst, protocol, port)))
            })
        })
    }

    fn peer_matches(&self, policy_ns: &str, peer: &NetworkPolicyPeer, who: &Resolved) -> bool {
        if let Some(block) = &peer.ip_block {
            return in_cidr(&block.cidr, who.ip)
                && !block.except.iter().flatten().any(|e| in_cidr(e, who.ip));
        }
        let Some(pod) = who.pod.filter(|p| !host_network(p)) else { return false };
        let pod_ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let ns_ok = match &peer.namespace_selector {
            None => pod_ns == policy_ns,
            Some(sel) => {
                let ns_labels = self
                    .namespaces
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(pod_ns))
                    .and_then(|n| n.metadata.labels.clone())
                    .unwrap_or_default();
                selector_matches(Some(sel), ns_labels)
            }
        };
        ns_ok && selector_matches(peer.pod_selector.as_ref(), labels_of(&pod.metadata.labels))
    }
}

fn policy_types(policy: &NetworkPolicy) -> Vec<String> {
    let spec = policy.spec.as_ref().unwrap();
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.clone(),
        _ => {
            let mut types = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress".to_string());
            }
            types
        }
    }
}

fn port_matches(rule_port: &NetworkPolicyPort, dst: &Resolved, protocol: &str, port: u16) -> bool {
    if rule_port.protocol.as_deref().unwrap_or("TCP") != protocol {
        return false;
    }
    match &rule_port.port {
        None => true,
        Some(IntOrString::Int(p)) => match rule_port.end_port {
            None => i32::from(port) == *p,
            Some(end) => (*p..=end).contains(&i32::from(port)),
        },
        Some(IntOrString::String(name)) => {
            let Some(pod) = dst.pod else { return false };
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                        && cp.container_port == i32::from(port)
                })
        }
    }
}

fn labels_of(labels: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    labels.clone().unwrap_or_default()
}

/// A missing selector matches everything, as does `{}`.
fn selector_matches(selector: Option<&LabelSelector>, labels: BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else { return true };
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => !value.is_some_and(|v| values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("oracle: operator {other}"),
        }
    });
    labels_ok && exprs_ok
}

/// `status.podIPs` (or `status.podIP` when that is unset).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let listed: Vec<IpAddr> =
        status.pod_ips.iter().flatten().filter_map(|ip| ip.ip.parse().ok()).collect();
    if !listed.is_empty() {
        return listed;
    }
    status.pod_ip.iter().filter_map(|ip| ip.parse().ok()).collect()
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

/// `ip` inside `cidr` (text like 10.0.0.0/8), compared bit by bit.
fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    let (net, len) = cidr.split_once('/').expect("oracle: CIDR");
    let net: IpAddr = net.parse().expect("oracle: CIDR address");
    let len: u32 = len.parse().expect("oracle: CIDR length");
    let bits = |a: IpAddr| -> (Vec<bool>, bool) {
        let bytes = match a {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        (
            bytes.iter().flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1)).collect(),
            a.is_ipv4(),
        )
    };
    let (net_bits, net_v4) = bits(net);
    let (ip_bits, ip_v4) = bits(ip);
    net_v4 == ip_v4 && net_bits[..len as usize] == ip_bits[..len as usize]
}
