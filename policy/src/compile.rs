//! The compiler: cluster state -> per pod, whether each direction is isolated and which
//! (peer, protocol, ports) are allowed, every entry remembering the policy, rule, peer and
//! port it came from.
//!
//! Semantics (networking.k8s.io/v1):
//! - a policy selects the pods of its namespace that match its podSelector; it isolates them
//!   for each direction in its policyTypes (default: Ingress, plus Egress when it has egress
//!   rules); a pod no policy isolates in a direction allows everything in that direction;
//! - an isolated direction allows the union of the rules of every policy isolating it; a rule
//!   allows traffic that matches one of its peers and one of its ports (a missing or empty
//!   list matches everything: all peers, or all protocols and ports);
//! - a pod peer is podSelector (own namespace), namespaceSelector (all pods there) or both
//!   (matching pods in matching namespaces); it matches pods only. An ipBlock matches
//!   addresses in its cidr outside every except, pod addresses included;
//! - a named port is resolved against the destination pod's container ports with the same name
//!   and protocol; a pod without it is not allowed by that port;
//! - not in the entries, enforced by the datapath: replies of allowed connections pass, and
//!   the pod's own node may always connect to it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use crate::{
    cidr::Cidr,
    identity::{FIRST_POD_IDENTITY, IdAllocator, IdentityKey},
    input::{
        Cluster, Direction, IpBlock, NamespaceScope, PeerSpec, PodInfo, PodRef, Policy, PolicyRef,
        PortSpec, Problem, Protocol,
    },
    selector::{Labels, Selector},
};

/// Which traffic partner an entry allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    /// Every source or destination (the rule has no peers).
    Any,
    /// Pods of this identity.
    Identity(u32),
    /// Addresses in this block (pods or not).
    Block(IpBlock),
}

/// Where an entry came from: policy, direction, rule index, and the index of the peer and
/// port in that rule (`None` when the rule has no peers or no ports).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub policy: PolicyRef,
    pub direction: Direction,
    pub rule: usize,
    pub peer: Option<usize>,
    pub port: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkPolicy {} {} rule {}", self.policy, self.direction, self.rule)?;
        match self.peer {
            Some(peer) => write!(f, ", peer {peer}")?,
            None => write!(f, ", any peer")?,
        }
        match self.port {
            Some(port) => write!(f, ", port {port}"),
            None => write!(f, ", any port"),
        }
    }
}

/// One allowed (peer, protocol, ports) of a direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub peer: PeerMatch,
    /// `None`: every protocol (the rule has no ports).
    pub protocol: Option<Protocol>,
    /// Inclusive port range; `None`: every port of the protocol.
    pub ports: Option<(u16, u16)>,
    pub origin: Origin,
}

impl Allow {
    /// Whether this entry allows a partner with this identity and address on this port.
    pub fn matches(&self, identity: u32, ip: IpAddr, protocol: Protocol, port: u16) -> bool {
        let peer = match &self.peer {
            PeerMatch::Any => true,
            PeerMatch::Identity(id) => *id == identity,
            PeerMatch::Block(block) => block.contains(ip),
        };
        peer && self.protocol.is_none_or(|p| p == protocol)
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

/// One direction of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionPolicy {
    /// The policies that isolate this direction (empty: everything is allowed).
    pub isolated_by: Vec<PolicyRef>,
    pub allow: Vec<Allow>,
}

impl DirectionPolicy {
    pub fn is_isolated(&self) -> bool {
        !self.isolated_by.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub identity: u32,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// What the compiler knows of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// `None` for host-network pods (they are the node).
    pub identity: Option<u32>,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub identities: BTreeMap<u32, IdentityKey>,
    pub pods: BTreeMap<PodRef, PodEntry>,
    /// Addresses of pods (not host-network) -> pod (the greatest pod when several share one).
    pub pod_ips: BTreeMap<IpAddr, PodRef>,
    /// Node name -> addresses.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Per pod (of the node compiled for), the policy of both directions. Each direction's
    /// `isolated_by` is sorted, and its `allow` entries are grouped by policy in that order
    /// (a policy's entries are one slice of it).
    pub endpoints: BTreeMap<PodRef, EndpointPolicy>,
    pub problems: Vec<Problem>,
}

/// What one policy gives the pods of one identity it selects, per direction (`None`: the
/// policy does not isolate that direction).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub ingress: Option<Vec<Allow>>,
    pub egress: Option<Vec<Allow>>,
}

impl Contribution {
    pub fn direction(&self, direction: Direction) -> Option<&Vec<Allow>> {
        match direction {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

impl EndpointPolicy {
    pub fn new(identity: u32) -> Self {
        Self { identity, ingress: DirectionPolicy::default(), egress: DirectionPolicy::default() }
    }

    pub fn direction_mut(&mut self, direction: Direction) -> &mut DirectionPolicy {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

impl DirectionPolicy {
    /// The positions of `policy`'s entries in `allow` (entries are grouped by policy, in
    /// policy order).
    pub fn slice_of(&self, policy: &PolicyRef) -> std::ops::Range<usize> {
        let start = self.allow.partition_point(|a| a.origin.policy < *policy);
        let end = start + self.allow[start..].partition_point(|a| a.origin.policy == *policy);
        start..end
    }

    /// Replaces what `policy` contributes (`None`: it does not isolate this direction).
    /// Returns whether anything changed.
    pub fn set_slice(&mut self, policy: &PolicyRef, allow: Option<&[Allow]>) -> bool {
        let range = self.slice_of(policy);
        let isolated = self.isolated_by.binary_search(policy);
        let same = match (isolated, allow) {
            (Ok(_), Some(allow)) => self.allow[range.clone()] == *allow,
            (Err(_), None) => true,
            _ => false,
        };
        if same {
            return false;
        }
        match (isolated, allow.is_some()) {
            (Ok(at), false) => {
                self.isolated_by.remove(at);
            }
            (Err(at), true) => self.isolated_by.insert(at, policy.clone()),
            _ => {}
        }
        self.allow.splice(range, allow.unwrap_or_default().iter().cloned());
        true
    }
}

/// Compiles repeatedly with stable identities.
#[derive(Clone, Debug)]
pub struct Compiler {
    identities: IdAllocator<IdentityKey>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self { identities: IdAllocator::new(FIRST_POD_IDENTITY) }
    }
}

/// The identity key of a pod of `cluster`.
pub fn identity_key(namespace_labels: Labels, pod: &PodInfo) -> IdentityKey {
    IdentityKey {
        namespace: pod.id.namespace.clone(),
        namespace_labels,
        pod_labels: pod.labels.clone(),
        named_ports: pod.named_ports.clone(),
    }
}

impl Compiler {
    /// A compiler continuing from `identities` (numbers already given keep theirs).
    pub fn with_identities(identities: IdAllocator<IdentityKey>) -> Self {
        Self { identities }
    }

    /// Compiles the policy of every pod on `node` (every pod when `None`). The result does
    /// not depend on the order of the cluster's lists.
    pub fn compile(&mut self, cluster: &Cluster, node: Option<&str>) -> Compiled {
        let key_of = |pod: &PodInfo| identity_key(cluster.namespace_labels(&pod.id.namespace), pod);
        let mut pods: Vec<&PodInfo> = cluster.pods.iter().collect();
        pods.sort_by(|a, b| a.id.cmp(&b.id));
        let mut policies: Vec<&Policy> = cluster.policies.iter().collect();
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let enforced = || pods.iter().copied().filter(|p| !p.host_network);
        let ids = self.identities.assign(enforced().map(key_of));
        let mut compiled = Compiled {
            identities: ids.iter().map(|(k, id)| (*id, k.clone())).collect(),
            nodes: cluster.nodes.clone(),
            problems: cluster.problems.clone(),
            ..Compiled::default()
        };
        for pod in &pods {
            let identity = (!pod.host_network).then(|| ids[&key_of(pod)]);
            if identity.is_some() {
                for ip in &pod.ips {
                    compiled.pod_ips.insert(*ip, pod.id.clone());
                }
            }
            compiled.pods.insert(
                pod.id.clone(),
                PodEntry { identity, ips: pod.ips.clone(), node: pod.node.clone() },
            );
        }
        let labels = LabelIndex::new(&compiled.identities);
        let peers = PeerIndex::new(&compiled, &labels);
        let mut endpoints = BTreeMap::new();
        for pod in enforced() {
            if node.is_some_and(|n| pod.node.as_deref() != Some(n)) {
                continue;
            }
            let identity = ids[&key_of(pod)];
            let mut endpoint = EndpointPolicy::new(identity);
            for policy in policies.iter().filter(|p| selects(p, pod)) {
                let contribution = contribute(policy, identity, &peers);
                for direction in [Direction::Ingress, Direction::Egress] {
                    if let Some(allow) = contribution.direction(direction) {
                        let out = endpoint.direction_mut(direction);
                        out.isolated_by.push(policy.id.clone());
                        out.allow.extend(allow.iter().cloned());
                    }
                }
            }
            endpoints.insert(pod.id.clone(), endpoint);
        }
        compiled.endpoints = endpoints;
        compiled
    }
}

/// What `policy` allows the pods of `identity` (which it selects), resolving peers and named
/// ports against what `peers` knows.
pub(crate) fn contribute(policy: &Policy, identity: u32, peers: &PeerIndex) -> Contribution {
    let mut contribution = Contribution::default();
    for direction in [Direction::Ingress, Direction::Egress] {
        let Some(rules) = policy.rules(direction) else { continue };
        let mut out = Vec::new();
        for (rule_index, rule) in rules.iter().enumerate() {
            let origin = |peer, port| Origin {
                policy: policy.id.clone(),
                direction,
                rule: rule_index,
                peer,
                port,
            };
            // `None` peer: the rule lists no peers, so it allows every peer.
            let rule_peers: Vec<(Option<usize>, Option<&PeerSpec>)> = match &rule.peers {
                None => vec![(None, None)],
                Some(list) => list.iter().map(|(i, p)| (Some(*i), Some(p))).collect(),
            };
            for (peer_index, peer) in rule_peers {
                let Some(ports) = &rule.ports else {
                    for peer in peers.resolve(peer) {
                        out.push(Allow {
                            peer,
                            protocol: None,
                            ports: None,
                            origin: origin(peer_index, None),
                        });
                    }
                    continue;
                };
                for (port_index, port) in ports {
                    let origin = origin(peer_index, Some(*port_index));
                    let protocol = Some(port.protocol);
                    let named = match &port.port {
                        PortSpec::All | PortSpec::Range(..) => {
                            let range = match port.port {
                                PortSpec::Range(lo, hi) => Some((lo, hi)),
                                _ => None,
                            };
                            for peer in peers.resolve(peer) {
                                out.push(Allow {
                                    peer,
                                    protocol,
                                    ports: range,
                                    origin: origin.clone(),
                                });
                            }
                            continue;
                        }
                        PortSpec::Named(name) => name,
                    };
                    let resolve = |key: &IdentityKey| {
                        key.named_ports
                            .iter()
                            .find(|p| &p.name == named && p.protocol == port.protocol)
                            .map(|p| p.port)
                    };
                    match direction {
                        // The destination is this pod.
                        Direction::Ingress => {
                            let Some(number) = resolve(&peers.compiled.identities[&identity])
                            else {
                                continue;
                            };
                            for peer in peers.resolve(peer) {
                                out.push(Allow {
                                    peer,
                                    protocol,
                                    ports: Some((number, number)),
                                    origin: origin.clone(),
                                });
                            }
                        }
                        // The destination is an ipBlock: each pod address inside it, with
                        // that pod's number (exact per address: a dual-stack pod's address of
                        // the other family is not in the block; a non-pod address has no
                        // named ports).
                        Direction::Egress if matches!(peer, Some(PeerSpec::Block(_))) => {
                            let Some(PeerSpec::Block(block)) = peer else { continue };
                            for (ip, pod) in &peers.compiled.pod_ips {
                                let id = peers.compiled.pods[pod].identity;
                                let Some(id) = id.filter(|_| block.contains(*ip)) else { continue };
                                if let Some(number) = resolve(&peers.compiled.identities[&id]) {
                                    out.push(Allow {
                                        peer: PeerMatch::Block(IpBlock {
                                            cidr: Cidr::host(*ip),
                                            except: Vec::new(),
                                        }),
                                        protocol,
                                        ports: Some((number, number)),
                                        origin: origin.clone(),
                                    });
                                }
                            }
                        }
                        // The destination is the peer: resolve per peer identity.
                        Direction::Egress => {
                            for id in peers.identities_of(peer) {
                                if let Some(number) = resolve(&peers.compiled.identities[&id]) {
                                    out.push(Allow {
                                        peer: PeerMatch::Identity(id),
                                        protocol,
                                        ports: Some((number, number)),
                                        origin: origin.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        match direction {
            Direction::Ingress => contribution.ingress = Some(out),
            Direction::Egress => contribution.egress = Some(out),
        }
    }
    contribution
}

fn selects(policy: &Policy, pod: &PodInfo) -> bool {
    policy.id.namespace == pod.id.namespace && policy.pod_selector.matches(&pod.labels)
}

/// Whether `policy` selects the pods of identity `key`.
pub(crate) fn selects_key(policy: &Policy, key: &IdentityKey) -> bool {
    policy.id.namespace == key.namespace && policy.pod_selector.matches(&key.pod_labels)
}

/// Identities by pod label, so selectors with a required label look up their candidates.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelIndex {
    /// (label key, value) -> identities whose pods have it.
    by_label: BTreeMap<(String, String), BTreeSet<u32>>,
}

impl LabelIndex {
    pub(crate) fn new(identities: &BTreeMap<u32, IdentityKey>) -> Self {
        let mut index = Self::default();
        for (id, key) in identities {
            index.insert(*id, key);
        }
        index
    }

    pub(crate) fn insert(&mut self, id: u32, key: &IdentityKey) {
        for (k, v) in &key.pod_labels {
            self.by_label.entry((k.clone(), v.clone())).or_default().insert(id);
        }
    }

    pub(crate) fn remove(&mut self, id: u32, key: &IdentityKey) {
        for (k, v) in &key.pod_labels {
            let label = (k.clone(), v.clone());
            if let Some(ids) = self.by_label.get_mut(&label) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_label.remove(&label);
                }
            }
        }
    }

    /// Identities that may match `selector` (a superset; every identity when it requires no
    /// label), in number order.
    pub(crate) fn candidates<'a>(
        &'a self,
        selector: &Selector,
        all: &'a BTreeMap<u32, IdentityKey>,
    ) -> Vec<u32> {
        match selector.required_label() {
            None => all.keys().copied().collect(),
            Some((key, values)) => {
                let ids: BTreeSet<u32> = values
                    .iter()
                    .filter_map(|v| self.by_label.get(&(key.to_string(), v.clone())))
                    .flatten()
                    .copied()
                    .collect();
                ids.into_iter().collect()
            }
        }
    }
}

/// Resolves peers (`None`: every peer) to identities.
pub(crate) struct PeerIndex<'a> {
    compiled: &'a Compiled,
    labels: &'a LabelIndex,
}

impl<'a> PeerIndex<'a> {
    pub(crate) fn new(compiled: &'a Compiled, labels: &'a LabelIndex) -> Self {
        Self { compiled, labels }
    }

    fn resolve(&self, peer: Option<&PeerSpec>) -> Vec<PeerMatch> {
        match peer {
            None => vec![PeerMatch::Any],
            Some(PeerSpec::Block(block)) => vec![PeerMatch::Block(block.clone())],
            Some(PeerSpec::Pods { .. }) => {
                self.identities_of(peer).into_iter().map(PeerMatch::Identity).collect()
            }
        }
    }

    /// Pod identities a peer selects (an ipBlock selects none: named ports of egress rules to
    /// a block are resolved per pod address in [`contribute`]).
    fn identities_of(&self, peer: Option<&PeerSpec>) -> Vec<u32> {
        let identities = &self.compiled.identities;
        match peer {
            None => identities.keys().copied().collect(),
            Some(spec @ PeerSpec::Pods { pods, .. }) => self
                .labels
                .candidates(pods, identities)
                .into_iter()
                .filter(|id| peer_selects(spec, &identities[id]))
                .collect(),
            Some(PeerSpec::Block(_)) => Vec::new(),
        }
    }
}

/// Whether a pod peer selects pods of identity `key` (an ipBlock selects no identity as such).
pub(crate) fn peer_selects(peer: &PeerSpec, key: &IdentityKey) -> bool {
    match peer {
        PeerSpec::Pods { namespaces, pods } => {
            let in_scope = match namespaces {
                NamespaceScope::Own(ns) => &key.namespace == ns,
                NamespaceScope::Selected(sel) => sel.matches(&key.namespace_labels),
            };
            in_scope && pods.matches(&key.pod_labels)
        }
        PeerSpec::Block(_) => false,
    }
}
