//! The compiler's input, read from Kubernetes objects: namespaces with their labels, pods
//! (labels, addresses, node, container ports), nodes' addresses, and NetworkPolicies parsed
//! into rules. Parsing never fails as a whole: a part of a policy that cannot be understood is
//! left out (so it allows less, never more) and reported as a [`Problem`].
use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    cidr::Cidr,
    selector::{Labels, Selector},
};

/// Transport protocol of a policy port or container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// A Kubernetes protocol name; a missing one means TCP.
    pub fn from_k8s(name: Option<&str>) -> Option<Self> {
        match name {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => weir_common::proto::TCP,
            Self::Udp => weir_common::proto::UDP,
            Self::Sctp => weir_common::proto::SCTP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A namespaced object's name (`namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type PodRef = ObjectRef;
pub type PolicyRef = ObjectRef;

/// A container port that has a name (only named ports matter to policies).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub id: PodRef,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// Pods on the host network have the node's addresses and are not enforced.
    pub host_network: bool,
    pub named_ports: Vec<NamedPort>,
}

impl PodInfo {
    pub fn from_k8s(pod: &Pod) -> Option<Self> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone()?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let mut named_ports: Vec<NamedPort> = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?,
                    protocol: Protocol::from_k8s(p.protocol.as_deref())?,
                    port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
                })
            })
            .collect();
        named_ports.sort();
        named_ports.dedup();
        Some(Self {
            id: PodRef::new(namespace, name),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            named_ports,
        })
    }
}

/// Which namespaces a pod peer looks in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// Only the policy's own namespace (a peer with a podSelector and no namespaceSelector).
    Own(String),
    Selected(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    /// Prefixes inside `cidr` that are not part of the block.
    pub except: Vec<Cidr>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains_ip(ip) && !self.except.iter().any(|e| e.contains_ip(ip))
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ipBlock {}", self.cidr)?;
        if !self.except.is_empty() {
            let except: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", except.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSpec {
    Pods { namespaces: NamespaceScope, pods: Selector },
    Block(IpBlock),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// Every port of the protocol.
    All,
    /// `port`..=`endPort` (a single port has both ends equal).
    Range(u16, u16),
    /// A container port name, resolved against the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPort {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// One ingress or egress rule. `None` peers or ports mean all (the field was empty or
/// missing). Entries keep their index in the policy, `None` marks one that was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<(usize, PeerSpec)>>,
    pub ports: Option<Vec<(usize, PolicyPort)>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyRef,
    pub pod_selector: Selector,
    /// Rules per direction; `None` when the policy's types leave that direction out.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// A part of a policy that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub policy: PolicyRef,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkPolicy {}: {}", self.policy, self.message)
    }
}

impl Policy {
    /// Parses a NetworkPolicy. `None` (with a problem) only when the pods it selects cannot be
    /// known (no name, or a bad podSelector).
    pub fn from_k8s(policy: &NetworkPolicy, problems: &mut Vec<Problem>) -> Option<Self> {
        let id = PolicyRef::new(
            policy.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            policy.metadata.name.clone()?,
        );
        let mut problem = |message: String| {
            problems.push(Problem { policy: id.clone(), message });
        };
        let spec = policy.spec.clone().unwrap_or_default();
        let pod_selector = match spec.pod_selector.as_ref().map(Selector::from_k8s) {
            None => Selector::everything(),
            Some(Ok(selector)) => selector,
            Some(Err(err)) => {
                problem(format!("podSelector: {err}; the policy is ignored until it is fixed"));
                return None;
            }
        };
        let (ingress_type, egress_type) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for other in types.iter().filter(|t| *t != "Ingress" && *t != "Egress") {
                    problem(format!("unknown policyType `{other}` (use Ingress or Egress)"));
                }
                (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
            }
            // The API server's default: Ingress always, Egress when there are egress rules.
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };
        let mut rules = |direction: Direction, raw: Vec<RawRule>| -> Vec<Rule> {
            raw.into_iter()
                .enumerate()
                .map(|(rule_index, (peers, ports))| {
                    let mut where_ = |what: String| {
                        problem(format!("{direction} rule {rule_index}: {what}; left out"))
                    };
                    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
                        peers
                            .iter()
                            .enumerate()
                            .filter_map(|(i, peer)| match parse_peer(&id.namespace, peer) {
                                Ok(p) => Some((i, p)),
                                Err(e) => {
                                    where_(format!("peer {i}: {e}"));
                                    None
                                }
                            })
                            .collect()
                    });
                    let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
                        ports
                            .iter()
                            .enumerate()
                            .filter_map(|(i, port)| match parse_port(port) {
                                Ok(p) => Some((i, p)),
                                Err(e) => {
                                    where_(format!("port {i}: {e}"));
                                    None
                                }
                            })
                            .collect()
                    });
                    Rule { peers, ports }
                })
                .collect()
        };
        let ingress = ingress_type.then(|| {
            let raw = spec.ingress.clone().unwrap_or_default();
            rules(Direction::Ingress, raw.into_iter().map(|r| (r.from, r.ports)).collect())
        });
        let egress = egress_type.then(|| {
            let raw = spec.egress.clone().unwrap_or_default();
            rules(Direction::Egress, raw.into_iter().map(|r| (r.to, r.ports)).collect())
        });
        Some(Self { id, pod_selector, ingress, egress })
    }
}

/// A rule as written: its peers (`from` or `to`) and ports.
type RawRule = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

fn parse_peer(namespace: &str, peer: &NetworkPolicyPeer) -> Result<PeerSpec, String> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err("ipBlock cannot be combined with podSelector or namespaceSelector".into());
        }
        let cidr: Cidr = block.cidr.parse().map_err(|e| format!("ipBlock.cidr: {e}"))?;
        let mut except = Vec::new();
        for text in block.except.iter().flatten() {
            let e: Cidr = text.parse().map_err(|e| format!("ipBlock.except: {e}"))?;
            if !cidr.contains(&e) {
                return Err(format!("ipBlock.except {e} is not inside cidr {cidr}"));
            }
            except.push(e);
        }
        return Ok(PeerSpec::Block(IpBlock { cidr, except }));
    }
    let selector = |s: &Option<_>| -> Result<Option<Selector>, String> {
        s.as_ref().map(Selector::from_k8s).transpose().map_err(|e| e.to_string())
    };
    let pods = selector(&peer.pod_selector)?;
    let namespaces = selector(&peer.namespace_selector)?;
    match (pods, namespaces) {
        (None, None) => Err("a peer needs a podSelector, a namespaceSelector or an ipBlock".into()),
        (pods, Some(ns)) => Ok(PeerSpec::Pods {
            namespaces: NamespaceScope::Selected(ns),
            pods: pods.unwrap_or_else(Selector::everything),
        }),
        (Some(pods), None) => {
            Ok(PeerSpec::Pods { namespaces: NamespaceScope::Own(namespace.to_string()), pods })
        }
    }
}

fn parse_port(port: &NetworkPolicyPort) -> Result<PolicyPort, String> {
    let protocol = Protocol::from_k8s(port.protocol.as_deref()).ok_or_else(|| {
        format!(
            "unknown protocol `{}` (use TCP, UDP or SCTP)",
            port.protocol.as_deref().unwrap_or_default()
        )
    })?;
    let number = |n: i32| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("port {n} is not in 1-65535"))
    };
    let spec = match (&port.port, port.end_port) {
        (None, None) => PortSpec::All,
        (None, Some(_)) => return Err("endPort needs a port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let start = number(*n)?;
            let end = match end {
                None => start,
                Some(end) => number(end)?,
            };
            if end < start {
                return Err(format!("endPort {end} is below port {start}"));
            }
            PortSpec::Range(start, end)
        }
        (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
            Ok(n) => PortSpec::Range(number(n)?, number(n)?),
            Err(_) => PortSpec::Named(name.clone()),
        },
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err("endPort cannot be used with a named port".into());
        }
    };
    Ok(PolicyPort { protocol, port: spec })
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<Policy>,
    /// Node name -> its addresses (traffic from a pod's own node is always allowed in).
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Parts of policies that were left out.
    pub problems: Vec<Problem>,
}

impl Cluster {
    pub fn from_k8s(
        namespaces: &[Namespace],
        pods: &[Pod],
        policies: &[NetworkPolicy],
        nodes: &[Node],
    ) -> Self {
        let mut problems = Vec::new();
        let policies = policies.iter().filter_map(|p| Policy::from_k8s(p, &mut problems)).collect();
        Self {
            namespaces: namespaces
                .iter()
                .filter_map(|ns| {
                    Some((
                        ns.metadata.name.clone()?,
                        ns.metadata.labels.clone().unwrap_or_default(),
                    ))
                })
                .collect(),
            pods: pods.iter().filter_map(PodInfo::from_k8s).collect(),
            policies,
            nodes: nodes.iter().filter_map(node_addresses).collect(),
            problems,
        }
    }

    /// A namespace's labels; a namespace the cluster does not list has none.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        self.namespaces.get(namespace).cloned().unwrap_or_default()
    }
}

/// A node's name and the addresses its pods' traffic may come from (InternalIP, ExternalIP).
pub fn node_addresses(node: &Node) -> Option<(String, Vec<IpAddr>)> {
    let addrs = node
        .status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    Some((node.metadata.name.clone()?, addrs))
}
