//! The pure part of the nftables backend: the table's fixed skeleton, the objects of each
//! frontend, and the incremental diff between what is in the table and the desired state.
//!
//! The dispatch is kube-proxy's nftables mode (pkg/proxy/nftables): one table; the `services`
//! chain, jumped to from the nat prerouting and output hooks, looks the packet up in two
//! verdict maps keyed by `ip daddr . meta l4proto . th dport` (`service-ips` for cluster,
//! load-balancer and external IPs, `service-nodeports` for the node's addresses) and goes to
//! the frontend's `service-…` chain. Frontends without a usable endpoint are in
//! `no-endpoint-services`, checked on the filter hooks before DNAT: reject (TCP reset or ICMP
//! port unreachable) when the service has no endpoints, drop when its traffic policy leaves
//! none on this node.
//!
//! Unlike kube-proxy, the endpoints are not objects of their own (an `endpoint-…` chain each
//! and a `numgen … vmap { … }` anonymous map per service): the kernel's cost of creating a
//! set, and of validating a table whose service chains jump through per-service maps, grows
//! with the number of sets and chains, so a table of 10k services took a minute to load and
//! 0.2 s per change. Here all endpoints are elements of shared maps, and a frontend's chain is
//! one DNAT rule that reads its endpoint from the shared `service-endpoints` map:
//!
//! ```text
//! dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map @service-endpoints
//! ```
//!
//! (elements `VIP . proto . port . i : endpoint-address . endpoint-port`, i < N). Replacing an
//! endpoint changes two elements and nothing else; only a different endpoint count rewrites
//! the frontend's chain. ClientIP affinity is one shared dynamic map `service-affinity`
//! (`client . VIP . proto . port : endpoint`, with the service's timeout) that the DNAT rule
//! updates and an earlier rule reads, trusted only while the endpoint is still one of the
//! frontend's (`affinity-endpoints`; an entry naming another endpoint is deleted, so that the
//! client is balanced again and remembered with its new endpoint). Hairpin traffic (an endpoint reaching itself through a
//! service) is found on nat postrouting by `ct status dnat` and `ip saddr . ip daddr` in
//! `hairpin-endpoints` and masqueraded, as kube-proxy's per-endpoint rule does. External
//! frontends with `externalTrafficPolicy: Cluster` mark their traffic for masquerading; the
//! `masquerading` chain on nat postrouting does it.
//!
//! Every frontend chain's first rule carries a fingerprint of its rules, so a restarted agent
//! can read the table back ([`Planner::adopt`]) and rewrite only what differs.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use super::ops::{BaseChain, ElementKey, Op, RejectKind, Remember, SetKind, Stmt, Verdict};
use crate::model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty};

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Prefix of the endpoint maps `service-endpoints-000` … `-255`.
pub const SERVICE_ENDPOINTS: &str = "service-endpoints-";
/// How many endpoint maps the frontends are spread over. The kernel's cost of adding an
/// element grows with the rules bound to its map, and binding a rule walks the map's
/// elements: one shared map would make the load quadratic, a map per frontend makes set
/// creation and lookup by name linear in the number of sets. A fixed number of shards keeps
/// both small (at 100k frontends, ~400 rules and ~1,600 elements per map).
pub const ENDPOINT_SHARDS: u32 = 256;
pub const SERVICE_AFFINITY: &str = "service-affinity";
pub const AFFINITY_ENDPOINTS: &str = "affinity-endpoints";
pub const HAIRPIN_ENDPOINTS: &str = "hairpin-endpoints";
const SERVICES: &str = "services";
const ENDPOINTS_CHECK: &str = "service-endpoints-check";
const REJECT_CHAIN: &str = "reject-chain";
const MASQUERADING: &str = "masquerading";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// kube-proxy's masquerade mark bit.
pub const MASQUERADE_MARK: u32 = 0x4000;
const FINGERPRINT_PREFIX: &str = "weir2:";

// Netfilter hooks.
const PREROUTING: u32 = 0;
const INPUT: u32 = 1;
const FORWARD: u32 = 2;
const OUTPUT: u32 = 3;
const POSTROUTING: u32 = 4;
/// kube-proxy's priorities: DNAT (-100), SNAT (100), and its filter chains at DNAT - 10 so
/// that they see the service address before it is translated.
const DNAT_PRIORITY: i32 = -100;
const SNAT_PRIORITY: i32 = 100;
const FILTER_PRIORITY: i32 = DNAT_PRIORITY - 10;

/// The table's fixed skeleton, idempotent: creates what is missing and rewrites the rules of
/// the fixed chains (in one batch, so no packet sees them empty).
pub fn skeleton() -> Vec<Op> {
    let mut ops = vec![Op::AddTable];
    for set in [SERVICE_IPS, SERVICE_NODEPORTS, NO_ENDPOINT_SERVICES] {
        ops.push(Op::AddSet { name: set.into(), kind: SetKind::ServiceMap });
    }
    for name in endpoint_maps() {
        ops.push(Op::AddSet { name, kind: SetKind::EndpointMap });
    }
    ops.push(Op::AddSet { name: SERVICE_AFFINITY.into(), kind: SetKind::AffinityMap });
    ops.push(Op::AddSet { name: AFFINITY_ENDPOINTS.into(), kind: SetKind::FrontendEndpoints });
    ops.push(Op::AddSet { name: HAIRPIN_ENDPOINTS.into(), kind: SetKind::Hairpin });
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority });
    let chains: Vec<FixedChain> = vec![
        (MARK_FOR_MASQUERADE, None, vec![vec![Stmt::MarkSet(MASQUERADE_MARK)]]),
        (
            MASQUERADING,
            None,
            vec![
                vec![
                    Stmt::HairpinInSet { set: HAIRPIN_ENDPOINTS.into() },
                    Stmt::MarkSet(MASQUERADE_MARK),
                ],
                vec![Stmt::MarkClear(MASQUERADE_MARK), Stmt::Verdict(Verdict::Return)],
                vec![Stmt::MarkToggle(MASQUERADE_MARK)],
                vec![Stmt::Masquerade],
            ],
        ),
        (
            REJECT_CHAIN,
            None,
            vec![
                vec![Stmt::L4Proto(weir_common::proto::TCP), Stmt::Reject(RejectKind::TcpReset)],
                vec![Stmt::Reject(RejectKind::PortUnreachable)],
            ],
        ),
        (
            SERVICES,
            None,
            vec![
                vec![Stmt::ServiceVmap { map: SERVICE_IPS.into() }],
                vec![Stmt::ServiceVmap { map: SERVICE_NODEPORTS.into() }],
            ],
        ),
        (ENDPOINTS_CHECK, None, vec![vec![Stmt::ServiceVmap { map: NO_ENDPOINT_SERVICES.into() }]]),
        ("nat-prerouting", base("nat", PREROUTING, DNAT_PRIORITY), vec![jump(SERVICES)]),
        ("nat-output", base("nat", OUTPUT, DNAT_PRIORITY), vec![jump(SERVICES)]),
        ("nat-postrouting", base("nat", POSTROUTING, SNAT_PRIORITY), vec![jump(MASQUERADING)]),
        ("filter-input", base("filter", INPUT, FILTER_PRIORITY), vec![new_to(ENDPOINTS_CHECK)]),
        ("filter-forward", base("filter", FORWARD, FILTER_PRIORITY), vec![new_to(ENDPOINTS_CHECK)]),
        ("filter-output", base("filter", OUTPUT, FILTER_PRIORITY), vec![new_to(ENDPOINTS_CHECK)]),
    ];
    fixed_chains(&mut ops, chains);
    ops
}

/// A fixed chain of a skeleton: name, hook (for base chains), rules.
pub(crate) type FixedChain<'a> = (&'a str, Option<BaseChain>, Vec<Vec<Stmt>>);

/// Creates the missing `chains` and rewrites their rules (flush, then add). Within one batch
/// no packet sees a chain half written.
pub(crate) fn fixed_chains(ops: &mut Vec<Op>, chains: Vec<FixedChain>) {
    for (name, base, _) in &chains {
        ops.push(Op::AddChain { name: (*name).into(), base: base.clone() });
    }
    for (name, _, rules) in chains {
        ops.push(Op::FlushChain { name: name.into() });
        for stmts in rules {
            ops.push(Op::AddRule { chain: name.into(), stmts, comment: None });
        }
    }
}

fn jump(chain: &str) -> Vec<Stmt> {
    vec![Stmt::Verdict(Verdict::Jump(chain.into()))]
}

fn new_to(chain: &str) -> Vec<Stmt> {
    vec![Stmt::CtStateNew, Stmt::Verdict(Verdict::Jump(chain.into()))]
}

/// `10.96.0.10/tcp/80`: the frontend part of every object name.
fn frontend_id(frontend: &Frontend) -> String {
    let protocol = match frontend.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    format!("{}/{protocol}/{}", frontend.address, frontend.port)
}

fn parse_frontend_id(id: &str) -> Option<Frontend> {
    let mut parts = id.split('/');
    let address: Ipv4Addr = parts.next()?.parse().ok()?;
    let protocol = match parts.next()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    let port = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(Frontend { address: IpAddr::V4(address), port, protocol })
}

/// The names of all endpoint maps.
pub fn endpoint_maps() -> impl Iterator<Item = String> {
    (0..ENDPOINT_SHARDS).map(|shard| format!("{SERVICE_ENDPOINTS}{shard:03}"))
}

/// The endpoint map of a frontend: a stable hash (FNV-1a 32 over address, protocol and port),
/// so that a restarted agent finds the elements where an earlier one put them.
fn endpoint_map(frontend: &Frontend) -> String {
    let (address, protocol, port) = frontend_parts(frontend);
    let mut hash: u32 = 0x811c_9dc5;
    for byte in address.octets().into_iter().chain([protocol]).chain(port.to_be_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{SERVICE_ENDPOINTS}{:03}", hash % ENDPOINT_SHARDS)
}

fn service_chain(frontend: &Frontend) -> String {
    format!("service-{}", frontend_id(frontend))
}

/// The objects of the earlier ruleset shape (an `endpoint-…` chain per endpoint, an
/// `affinity-…` set per endpoint): `PREFIX<frontend>__<ip>/<port>` -> frontend. A table
/// written by an older agent is adopted and these are removed.
fn parse_legacy_object(name: &str, prefix: &str) -> Option<Frontend> {
    let (frontend, backend) = name.strip_prefix(prefix)?.split_once("__")?;
    let (ip, port) = backend.split_once('/')?;
    ip.parse::<Ipv4Addr>().ok()?;
    port.parse::<u16>().ok()?;
    parse_frontend_id(frontend)
}

fn frontend_parts(frontend: &Frontend) -> (Ipv4Addr, u8, u16) {
    let IpAddr::V4(address) = frontend.address else { unreachable!("IPv4 frontends only") };
    (address, frontend.protocol.number(), frontend.port)
}

fn element_key(frontend: &Frontend) -> ElementKey {
    let (address, protocol, port) = frontend_parts(frontend);
    ElementKey::Service { address, protocol, port }
}

fn endpoint_key(frontend: &Frontend, index: u32) -> ElementKey {
    let (address, protocol, port) = frontend_parts(frontend);
    ElementKey::Endpoint { address, protocol, port, index }
}

fn frontend_endpoint_key(frontend: &Frontend, endpoint: SocketAddrV4) -> ElementKey {
    let (address, protocol, port) = frontend_parts(frontend);
    ElementKey::FrontendEndpoint { address, protocol, port, endpoint }
}

fn parse_protocol(number: u8) -> Option<Protocol> {
    match number {
        weir_common::proto::TCP => Some(Protocol::Tcp),
        weir_common::proto::UDP => Some(Protocol::Udp),
        weir_common::proto::SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

fn frontend_of(address: Ipv4Addr, protocol: u8, port: u16) -> Option<Frontend> {
    Some(Frontend { address: IpAddr::V4(address), port, protocol: parse_protocol(protocol)? })
}

/// What one frontend renders to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rendered {
    backends: Vec<SocketAddrV4>,
    affinity: Option<u32>,
    masquerade: bool,
    /// The map element that sends the frontend's traffic somewhere.
    element: (String, Verdict),
    /// The frontend's endpoint map.
    endpoint_map: String,
}

impl Rendered {
    fn new(frontend: &Frontend, state: &FrontendState) -> Option<Self> {
        if !frontend.address.is_ipv4() {
            return None;
        }
        let backends: Vec<SocketAddrV4> = state
            .backends
            .iter()
            .filter_map(|b| match b {
                SocketAddr::V4(v4) => Some(*v4),
                SocketAddr::V6(_) => None,
            })
            .collect();
        let element = if backends.is_empty() {
            let verdict = match state.when_empty {
                WhenEmpty::Reject => Verdict::Goto(REJECT_CHAIN.into()),
                WhenEmpty::Drop => Verdict::Drop,
            };
            (NO_ENDPOINT_SERVICES.to_string(), verdict)
        } else {
            let map = match state.kind {
                crate::model::FrontendKind::NodePort => SERVICE_NODEPORTS,
                _ => SERVICE_IPS,
            };
            (map.to_string(), Verdict::Goto(service_chain(frontend)))
        };
        Some(Self {
            backends,
            affinity: state.affinity_timeout,
            // kube-proxy masquerades external traffic unless the policy keeps it on this node
            // (then the client address must reach the pod).
            masquerade: state.kind.is_external() && !state.local_traffic_policy,
            element,
            endpoint_map: endpoint_map(frontend),
        })
    }

    /// A stable digest of what the frontend's chain holds (FNV-1a 64 over its canonical
    /// text): the endpoint count, not the endpoints, which are map elements.
    fn fingerprint(&self) -> String {
        let text = format!("{}|{:?}|{}", self.backends.len(), self.affinity, self.masquerade);
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{FINGERPRINT_PREFIX}{hash:016x}")
    }

    fn endpoints(&self) -> BTreeMap<u32, SocketAddrV4> {
        (0u32..).zip(self.backends.iter().copied()).collect()
    }

    fn affinity_endpoints(&self) -> BTreeSet<SocketAddrV4> {
        if self.affinity.is_some() && !self.backends.is_empty() {
            self.backends.iter().copied().collect()
        } else {
            BTreeSet::new()
        }
    }

    /// The frontend chain's rules.
    fn rules(&self) -> Vec<Vec<Stmt>> {
        let mut rules = vec![vec![Stmt::Counter]];
        if self.backends.is_empty() {
            return rules;
        }
        if self.masquerade {
            rules.push(vec![Stmt::MarkSet(MASQUERADE_MARK)]);
        }
        let remember = self
            .affinity
            .map(|timeout_seconds| Remember { map: SERVICE_AFFINITY.into(), timeout_seconds });
        if let Some(remember) = &remember {
            rules.push(vec![Stmt::ForgetRemembered {
                remember: remember.clone(),
                valid: AFFINITY_ENDPOINTS.into(),
            }]);
            rules.push(vec![Stmt::DnatRemembered {
                remember: remember.clone(),
                valid: AFFINITY_ENDPOINTS.into(),
            }]);
        }
        rules.push(vec![Stmt::DnatEndpoint {
            endpoints: self.endpoint_map.clone(),
            count: self.backends.len() as u32,
            remember,
        }]);
        rules
    }
}

/// What the table holds for one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    service_chain: bool,
    /// The frontend chain's fingerprint rule; `None` when unknown (missing or foreign).
    fingerprint: Option<String>,
    /// `service-endpoints` elements: index -> endpoint (`None`: the value is unknown).
    endpoints: BTreeMap<u32, Option<SocketAddrV4>>,
    /// `affinity-endpoints` elements.
    affinity_endpoints: BTreeSet<SocketAddrV4>,
    /// Map elements with this frontend's key: (map, verdict if known).
    elements: Vec<(String, Option<Verdict>)>,
    /// Objects of the earlier shape to remove: `endpoint-…` chains, `affinity-…` sets.
    legacy_chains: BTreeSet<String>,
    legacy_sets: BTreeSet<String>,
    /// What this planner last wrote (then the fields above are exactly its rendering), and
    /// the desired state it was rendered from.
    rendered: Option<(Rendered, FrontendState)>,
}

impl Applied {
    fn of(rendered: Rendered, source: FrontendState) -> Self {
        Self {
            service_chain: true,
            fingerprint: Some(rendered.fingerprint()),
            endpoints: rendered.endpoints().into_iter().map(|(i, e)| (i, Some(e))).collect(),
            affinity_endpoints: rendered.affinity_endpoints(),
            elements: vec![(rendered.element.0.clone(), Some(rendered.element.1.clone()))],
            legacy_chains: BTreeSet::new(),
            legacy_sets: BTreeSet::new(),
            rendered: Some((rendered, source)),
        }
    }

    /// Endpoint addresses this frontend holds in `hairpin-endpoints`' reference counts.
    fn hairpin_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.endpoints.values().flatten().map(|e| *e.ip())
    }
}

/// What [`Planner::adopt`] reads from an existing table.
#[derive(Clone, Debug, Default)]
pub struct TableContents {
    pub chains: Vec<String>,
    /// (chain, comment) of every rule that has a comment.
    pub rule_comments: Vec<(String, String)>,
    pub sets: Vec<String>,
    /// (map, key, verdict) of the elements of the three service maps.
    pub elements: Vec<(String, ElementKey, Option<Verdict>)>,
    /// The elements of `service-endpoints` (key, endpoint), `affinity-endpoints` and
    /// `hairpin-endpoints` (key, `None`).
    pub entries: Vec<(ElementKey, Option<SocketAddrV4>)>,
}

/// The ops of one step. `groups` are the op indexes where one frontend's changes end: a batch
/// too large for one message may be split there without any frontend seeing half a change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub groups: Vec<usize>,
    /// Frontends this backend cannot serve yet (IPv6).
    pub skipped: usize,
}

/// Remembers what the table holds and plans the next step.
#[derive(Debug, Default)]
pub struct Planner {
    applied: BTreeMap<Frontend, Applied>,
    /// Endpoint address -> how many applied frontend endpoints use it.
    hairpin_refs: BTreeMap<Ipv4Addr, usize>,
    /// The elements of `hairpin-endpoints`.
    hairpin: BTreeSet<Ipv4Addr>,
    /// Addresses whose reference count went to or from zero since the last plan.
    hairpin_touched: BTreeSet<Ipv4Addr>,
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// A planner for a table that already holds a ruleset (a restarted agent): the objects it
    /// finds become what was applied, so the next plan rewrites only frontends that differ
    /// from the desired state and removes objects nothing wants.
    pub fn adopt(contents: &TableContents) -> Self {
        let mut applied: BTreeMap<Frontend, Applied> = BTreeMap::new();
        for chain in &contents.chains {
            if let Some(frontend) = chain.strip_prefix("service-").and_then(parse_frontend_id) {
                applied.entry(frontend).or_default().service_chain = true;
            } else if let Some(frontend) = parse_legacy_object(chain, "endpoint-") {
                applied.entry(frontend).or_default().legacy_chains.insert(chain.clone());
            }
        }
        for (chain, comment) in &contents.rule_comments {
            if let Some(frontend) = chain.strip_prefix("service-").and_then(parse_frontend_id)
                && comment.starts_with(FINGERPRINT_PREFIX)
                && let Some(entry) = applied.get_mut(&frontend)
            {
                entry.fingerprint = Some(comment.clone());
            }
        }
        for set in &contents.sets {
            if let Some(frontend) = parse_legacy_object(set, "affinity-") {
                applied.entry(frontend).or_default().legacy_sets.insert(set.clone());
            }
        }
        for (map, key, verdict) in &contents.elements {
            let ElementKey::Service { address, protocol, port } = *key else { continue };
            let Some(frontend) = frontend_of(address, protocol, port) else { continue };
            applied.entry(frontend).or_default().elements.push((map.clone(), verdict.clone()));
        }
        let mut hairpin = BTreeSet::new();
        for (key, endpoint) in &contents.entries {
            match *key {
                ElementKey::Endpoint { address, protocol, port, index } => {
                    if let Some(frontend) = frontend_of(address, protocol, port) {
                        applied.entry(frontend).or_default().endpoints.insert(index, *endpoint);
                    }
                }
                ElementKey::FrontendEndpoint { address, protocol, port, endpoint } => {
                    if let Some(frontend) = frontend_of(address, protocol, port) {
                        applied.entry(frontend).or_default().affinity_endpoints.insert(endpoint);
                    }
                }
                ElementKey::Hairpin(address) => {
                    hairpin.insert(address);
                }
                _ => {}
            }
        }
        let mut hairpin_refs = BTreeMap::new();
        for entry in applied.values() {
            for address in entry.hairpin_addresses() {
                *hairpin_refs.entry(address).or_default() += 1;
            }
        }
        // Elements nothing refers to (and references to missing elements) are fixed by the
        // next plan.
        let hairpin_touched = hairpin
            .symmetric_difference(&hairpin_refs.keys().copied().collect())
            .copied()
            .collect();
        Self { applied, hairpin_refs, hairpin, hairpin_touched }
    }

    pub fn frontends(&self) -> usize {
        self.applied.len()
    }

    /// Distinct backend addresses across the applied frontends.
    pub fn backends(&self) -> usize {
        self.applied
            .values()
            .flat_map(|a| a.endpoints.values().flatten())
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Diffs `desired` against what the table holds. The planner assumes the ops are all
    /// executed; after a failed batch, adopt the table again.
    ///
    /// Cost: one comparison per desired frontend; ops only for frontends that differ.
    /// [`Planner::plan_changed`] compares only the frontends a change touched.
    pub fn plan(&mut self, desired: &ServiceState) -> Plan {
        let frontends: Vec<Frontend> = desired.frontends_and_removed(self.applied.keys()).collect();
        self.plan_frontends(desired, frontends)
    }

    /// Like [`Planner::plan`], but looks only at `changed` (e.g. from
    /// [`crate::model::ServiceIndex::set_service`]): each is written as `desired` has it, or
    /// removed when `desired` lacks it; every other frontend is assumed unchanged.
    pub fn plan_changed<'a>(
        &mut self,
        desired: &ServiceState,
        changed: impl IntoIterator<Item = &'a Frontend>,
    ) -> Plan {
        self.plan_frontends(desired, changed.into_iter().copied())
    }

    fn plan_frontends(
        &mut self,
        desired: &ServiceState,
        frontends: impl IntoIterator<Item = Frontend>,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut groups: Vec<Vec<Op>> = Vec::new();
        for frontend in frontends {
            let frontend = &frontend;
            let Some(state) = desired.frontends.get(frontend) else {
                if let Some(applied) = self.applied.remove(frontend) {
                    let mut ops = Vec::new();
                    remove_frontend(&mut ops, frontend, &applied);
                    groups.push(ops);
                    self.count_hairpin(&applied, &Applied::default());
                }
                continue;
            };
            let applied = self.applied.get_mut(frontend);
            let known = applied.as_ref().and_then(|a| a.rendered.as_ref());
            if known.is_some_and(|(_, source)| source == state) {
                continue;
            }
            let Some(rendered) = Rendered::new(frontend, state) else {
                plan.skipped += 1;
                continue;
            };
            if let Some(applied) = applied
                && let Some((known, source)) = &mut applied.rendered
                && *known == rendered
            {
                *source = state.clone();
                continue;
            }
            let applied = self.applied.get(frontend);
            let applied = applied.cloned().unwrap_or_default();
            let mut ops = Vec::new();
            update_frontend(&mut ops, frontend, &rendered, &applied);
            if !ops.is_empty() {
                groups.push(ops);
            }
            let now = Applied::of(rendered, state.clone());
            self.count_hairpin(&applied, &now);
            self.applied.insert(*frontend, now);
        }
        // Hairpin addresses: new ones first (harmless before their endpoints exist), unused
        // ones last (after nothing DNATs to them).
        let touched = std::mem::take(&mut self.hairpin_touched);
        let added: Vec<Ipv4Addr> = touched
            .iter()
            .filter(|a| self.hairpin_refs.contains_key(a) && !self.hairpin.contains(a))
            .copied()
            .collect();
        let gone: Vec<Ipv4Addr> = touched
            .iter()
            .filter(|a| !self.hairpin_refs.contains_key(a) && self.hairpin.contains(a))
            .copied()
            .collect();
        for address in &added {
            plan.ops.push(Op::AddEntry {
                set: HAIRPIN_ENDPOINTS.into(),
                key: ElementKey::Hairpin(*address),
                endpoint: None,
            });
            self.hairpin.insert(*address);
        }
        if !added.is_empty() {
            plan.groups.push(plan.ops.len());
        }
        for ops in groups {
            plan.ops.extend(ops);
            plan.groups.push(plan.ops.len());
        }
        for address in &gone {
            plan.ops.push(Op::DeleteElement {
                set: HAIRPIN_ENDPOINTS.into(),
                key: ElementKey::Hairpin(*address),
            });
            self.hairpin.remove(address);
        }
        if !gone.is_empty() {
            plan.groups.push(plan.ops.len());
        }
        plan
    }

    fn count_hairpin(&mut self, before: &Applied, after: &Applied) {
        for address in after.hairpin_addresses() {
            let count = self.hairpin_refs.entry(address).or_default();
            *count += 1;
            if *count == 1 {
                self.hairpin_touched.insert(address);
            }
        }
        for address in before.hairpin_addresses() {
            if let Some(count) = self.hairpin_refs.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    self.hairpin_refs.remove(&address);
                    self.hairpin_touched.insert(address);
                }
            }
        }
    }
}

fn remove_frontend(ops: &mut Vec<Op>, frontend: &Frontend, applied: &Applied) {
    let key = element_key(frontend);
    for (set, _) in &applied.elements {
        ops.push(Op::DeleteElement { set: set.clone(), key });
    }
    for index in applied.endpoints.keys() {
        ops.push(Op::DeleteElement {
            set: endpoint_map(frontend),
            key: endpoint_key(frontend, *index),
        });
    }
    for endpoint in &applied.affinity_endpoints {
        ops.push(Op::DeleteElement {
            set: AFFINITY_ENDPOINTS.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
        });
    }
    if applied.service_chain {
        ops.push(Op::FlushChain { name: service_chain(frontend) });
    }
    remove_legacy(ops, applied);
    if applied.service_chain {
        ops.push(Op::DeleteChain { name: service_chain(frontend) });
    }
}

/// Removes the earlier shape's objects (after the frontend chain no longer refers to them).
fn remove_legacy(ops: &mut Vec<Op>, applied: &Applied) {
    for chain in &applied.legacy_chains {
        ops.push(Op::FlushChain { name: chain.clone() });
    }
    for chain in &applied.legacy_chains {
        ops.push(Op::DeleteChain { name: chain.clone() });
    }
    for set in &applied.legacy_sets {
        ops.push(Op::DeleteSet { name: set.clone() });
    }
}

/// Appends the ops that turn `applied` into `rendered` (none when nothing differs).
fn update_frontend(ops: &mut Vec<Op>, frontend: &Frontend, rendered: &Rendered, applied: &Applied) {
    let key = element_key(frontend);
    let service = service_chain(frontend);
    let wanted_element = (rendered.element.0.clone(), Some(rendered.element.1.clone()));
    let legacy = !applied.legacy_chains.is_empty() || !applied.legacy_sets.is_empty();
    let rewrite_chain = legacy
        || !applied.service_chain
        || applied.fingerprint.as_ref() != Some(&rendered.fingerprint());

    // 1. Elements that send traffic elsewhere go.
    for (set, verdict) in &applied.elements {
        if (set, verdict) != (&wanted_element.0, &wanted_element.1) {
            ops.push(Op::DeleteElement { set: set.clone(), key });
        }
    }
    // 2. Endpoints, by index: a changed one is deleted and added again (in the same batch).
    let wanted_endpoints = rendered.endpoints();
    for (index, endpoint) in &applied.endpoints {
        if wanted_endpoints.get(index) != endpoint.as_ref() {
            ops.push(Op::DeleteElement {
                set: rendered.endpoint_map.clone(),
                key: endpoint_key(frontend, *index),
            });
        }
    }
    for (index, endpoint) in &wanted_endpoints {
        if applied.endpoints.get(index) != Some(&Some(*endpoint)) {
            ops.push(Op::AddEntry {
                set: rendered.endpoint_map.clone(),
                key: endpoint_key(frontend, *index),
                endpoint: Some(*endpoint),
            });
        }
    }
    let wanted_valid = rendered.affinity_endpoints();
    for endpoint in applied.affinity_endpoints.difference(&wanted_valid) {
        ops.push(Op::DeleteElement {
            set: AFFINITY_ENDPOINTS.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
        });
    }
    for endpoint in wanted_valid.difference(&applied.affinity_endpoints) {
        ops.push(Op::AddEntry {
            set: AFFINITY_ENDPOINTS.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
            endpoint: None,
        });
    }
    // 3. The frontend chain, when its rules differ.
    if rewrite_chain {
        if applied.service_chain {
            ops.push(Op::FlushChain { name: service.clone() });
        } else {
            ops.push(Op::AddChain { name: service.clone(), base: None });
        }
        for (index, stmts) in rendered.rules().into_iter().enumerate() {
            let comment = (index == 0).then(|| rendered.fingerprint());
            ops.push(Op::AddRule { chain: service.clone(), stmts, comment });
        }
        remove_legacy(ops, applied);
    }
    // 4. The element that sends traffic here (or refuses it).
    if !applied.elements.contains(&wanted_element) {
        ops.push(Op::AddElement {
            set: rendered.element.0.clone(),
            key,
            verdict: rendered.element.1.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FrontendKind;
    use crate::model::testing::{frontend, state};

    /// A rule's statements and comment.
    type Rule = (Vec<Stmt>, Option<String>);

    /// Executes ops on an in-memory table, checking what the kernel checks: references point
    /// at existing objects, a referenced object is not deleted, an element is not added twice
    /// nor deleted when missing.
    #[derive(Default, Debug)]
    struct FakeTable {
        chains: BTreeMap<String, Vec<Rule>>,
        sets: BTreeSet<String>,
        elements: BTreeMap<(String, ElementKey), Verdict>,
        entries: BTreeMap<(String, ElementKey), Option<SocketAddrV4>>,
    }

    impl FakeTable {
        fn references(&self) -> Vec<String> {
            fn target(v: &Verdict) -> Option<String> {
                match v {
                    Verdict::Jump(c) | Verdict::Goto(c) => Some(c.clone()),
                    _ => None,
                }
            }
            let mut refs: Vec<String> = self.elements.values().filter_map(target).collect();
            for rules in self.chains.values() {
                for (stmts, _) in rules {
                    for stmt in stmts {
                        match stmt {
                            Stmt::Verdict(v) => refs.extend(target(v)),
                            Stmt::NumgenVmap { targets } => refs.extend(targets.iter().cloned()),
                            Stmt::SaddrInSet(s)
                            | Stmt::UpdateSaddr { set: s, .. }
                            | Stmt::ServiceVmap { map: s }
                            | Stmt::HairpinInSet { set: s } => refs.push(s.clone()),
                            Stmt::DnatEndpoint { endpoints, remember, .. } => {
                                refs.push(endpoints.clone());
                                refs.extend(remember.iter().map(|r| r.map.clone()));
                            }
                            Stmt::DnatRemembered { remember, valid }
                            | Stmt::ForgetRemembered { remember, valid } => {
                                refs.extend([remember.map.clone(), valid.clone()])
                            }
                            _ => {}
                        }
                    }
                }
            }
            refs
        }

        fn execute(&mut self, ops: &[Op]) {
            for op in ops {
                match op {
                    Op::AddTable | Op::DeleteTable => {}
                    Op::AddChain { name, .. } => {
                        self.chains.entry(name.clone()).or_default();
                    }
                    Op::FlushChain { name } => {
                        self.chains.get_mut(name).unwrap_or_else(|| panic!("flush {name}")).clear()
                    }
                    Op::DeleteChain { name } => {
                        assert!(!self.references().contains(name), "{name} still referenced");
                        assert!(self.chains.remove(name).is_some(), "delete missing {name}");
                    }
                    Op::AddRule { chain, stmts, comment } => {
                        self.chains
                            .get_mut(chain)
                            .unwrap_or_else(|| panic!("rule in missing {chain}"))
                            .push((stmts.clone(), comment.clone()));
                        for r in self.references() {
                            assert!(
                                self.chains.contains_key(&r) || self.sets.contains(&r),
                                "{r} referenced before it exists"
                            );
                        }
                    }
                    Op::AddSet { name, .. } => {
                        self.sets.insert(name.clone());
                    }
                    Op::DeleteSet { name } => {
                        assert!(!self.references().contains(name), "{name} still referenced");
                        assert!(self.sets.remove(name));
                    }
                    Op::AddElement { set, key, verdict } => {
                        assert!(self.sets.contains(set), "element in missing {set}");
                        if let Verdict::Goto(c) = verdict {
                            assert!(self.chains.contains_key(c), "element to missing {c}");
                        }
                        let old = self.elements.insert((set.clone(), *key), verdict.clone());
                        assert!(old.is_none(), "element {key:?} exists in {set}");
                    }
                    Op::AddEntry { set, key, endpoint } => {
                        assert!(self.sets.contains(set), "element in missing {set}");
                        let old = self.entries.insert((set.clone(), *key), *endpoint);
                        assert!(old.is_none(), "element {key:?} exists in {set}");
                    }
                    Op::DeleteElement { set, key } => {
                        let k = (set.clone(), *key);
                        assert!(
                            self.elements.remove(&k).is_some() || self.entries.remove(&k).is_some(),
                            "delete missing {key:?} from {set}"
                        );
                    }
                    other => panic!("the service planner does not emit {other:?}"),
                }
            }
        }

        fn contents(&self) -> TableContents {
            TableContents {
                chains: self.chains.keys().cloned().collect(),
                rule_comments: self
                    .chains
                    .iter()
                    .flat_map(|(c, rules)| {
                        rules.iter().filter_map(|(_, comment)| Some((c.clone(), comment.clone()?)))
                    })
                    .collect(),
                sets: self.sets.iter().cloned().collect(),
                elements: self
                    .elements
                    .iter()
                    .map(|((set, key), v)| (set.clone(), *key, Some(v.clone())))
                    .collect(),
                entries: self.entries.iter().map(|((_, key), e)| (*key, *e)).collect(),
            }
        }

        /// The endpoints of a frontend, by index.
        fn endpoints(&self, fe: &Frontend) -> Vec<SocketAddrV4> {
            (0..)
                .map_while(|i| self.entries.get(&(endpoint_map(fe), endpoint_key(fe, i))))
                .map(|e| e.expect("an endpoint value"))
                .collect()
        }

        fn hairpin(&self) -> BTreeSet<Ipv4Addr> {
            self.entries
                .keys()
                .filter_map(|(_, k)| match k {
                    ElementKey::Hairpin(a) => Some(*a),
                    _ => None,
                })
                .collect()
        }
    }

    fn table() -> FakeTable {
        let mut table = FakeTable::default();
        table.execute(&skeleton());
        table
    }

    fn sa(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    #[test]
    fn the_skeleton_is_kube_proxys_shape_and_idempotent() {
        let mut table = table();
        table.execute(&skeleton());
        for chain in ["nat-prerouting", "nat-output", "nat-postrouting", "filter-output"] {
            assert_eq!(table.chains[chain].len(), 1, "{chain}");
        }
        assert_eq!(table.chains[SERVICES].len(), 2);
        assert_eq!(table.sets.len(), 6 + ENDPOINT_SHARDS as usize);
    }

    #[test]
    fn a_service_dispatches_to_its_chain_which_dnats_to_an_endpoint_of_the_shared_map() {
        let mut table = table();
        let mut planner = Planner::new();
        let plan = planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        table.execute(&plan.ops);
        let fe = frontend("10.96.0.1", 80);
        assert_eq!(
            table.elements[&(SERVICE_IPS.into(), element_key(&fe))],
            Verdict::Goto("service-10.96.0.1/tcp/80".into())
        );
        let service = &table.chains["service-10.96.0.1/tcp/80"];
        assert_eq!(
            service.last().unwrap().0,
            [Stmt::DnatEndpoint { endpoints: endpoint_map(&fe), count: 2, remember: None }]
        );
        assert_eq!(table.endpoints(&fe), [sa("10.0.0.1:8080"), sa("10.0.0.2:8080")]);
        assert_eq!(
            table.hairpin(),
            ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()].into()
        );
        assert!(
            planner
                .plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]))
                .ops
                .is_empty()
        );
    }

    #[test]
    fn one_changed_service_among_many_touches_only_its_own_objects() {
        let mut table = table();
        let mut planner = Planner::new();
        let ips: Vec<String> =
            (0..500).map(|i| format!("10.96.{}.{}", i / 250, i % 250 + 1)).collect();
        let entries: Vec<(&str, u16, &[&str])> =
            ips.iter().map(|ip| (ip.as_str(), 80, &["10.0.0.1:8080"][..])).collect();
        table.execute(&planner.plan(&state(&entries)).ops);
        let mut changed = entries.clone();
        changed[100].2 = &["10.0.0.1:8080", "10.0.0.2:8080"];
        let plan = planner.plan(&state(&changed));
        table.execute(&plan.ops);
        // The new address joins the hairpin set (its own group), then the frontend's group.
        assert_eq!(plan.groups.len(), 2);
        let touched: BTreeSet<String> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::FlushChain { name } | Op::AddChain { name, .. } => Some(name.clone()),
                Op::AddRule { chain, .. } => Some(chain.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(touched, [format!("service-{}/tcp/80", ips[100])].into());
        // The hairpin address, the endpoint element, the chain flushed and its two rules
        // (fingerprint, DNAT with the new count): nothing else.
        assert_eq!(plan.ops.len(), 5, "{:#?}", plan.ops);

        // The same count with another endpoint: two elements, no rule.
        changed[100].2 = &["10.0.0.1:8080", "10.0.0.3:8080"];
        let plan = planner.plan(&state(&changed));
        table.execute(&plan.ops);
        assert!(!plan.ops.iter().any(|op| matches!(op, Op::AddRule { .. })), "{:#?}", plan.ops);
        let fe = frontend(&ips[100], 80);
        assert_eq!(table.endpoints(&fe), [sa("10.0.0.1:8080"), sa("10.0.0.3:8080")]);
        assert!(!table.hairpin().contains(&"10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn removing_endpoints_and_services_leaves_nothing_behind() {
        let mut table = table();
        let empty = table.contents();
        let mut planner = Planner::new();
        table.execute(
            &planner
                .plan(&state(&[
                    ("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]),
                    ("10.96.0.2", 80, &["10.0.0.2:8080"]),
                ]))
                .ops,
        );
        table.execute(&planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])])).ops);
        assert_eq!(table.endpoints(&frontend("10.96.0.1", 80)), [sa("10.0.0.1:8080")]);
        assert_eq!(table.hairpin(), ["10.0.0.1".parse().unwrap()].into());
        table.execute(&planner.plan(&ServiceState::default()).ops);
        assert_eq!(table.contents().chains, empty.chains);
        assert!(table.elements.is_empty());
        assert!(table.entries.is_empty());
        assert_eq!(planner.frontends(), 0);
    }

    #[test]
    fn no_endpoints_rejects_and_local_policy_without_local_endpoints_drops() {
        let mut table = table();
        let mut planner = Planner::new();
        let mut desired = state(&[("10.96.0.1", 80, &[]), ("10.96.0.2", 80, &[])]);
        desired.frontends.get_mut(&frontend("10.96.0.2", 80)).unwrap().when_empty = WhenEmpty::Drop;
        table.execute(&planner.plan(&desired).ops);
        let verdict = |ip| {
            table.elements[&(NO_ENDPOINT_SERVICES.into(), element_key(&frontend(ip, 80)))].clone()
        };
        assert_eq!(verdict("10.96.0.1"), Verdict::Goto(REJECT_CHAIN.into()));
        assert_eq!(verdict("10.96.0.2"), Verdict::Drop);
        // Endpoints appear: the reject element goes, the dispatch element comes.
        table.execute(&planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:80"])])).ops);
        assert_eq!(table.elements.len(), 1);
        assert!(
            table
                .elements
                .contains_key(&(SERVICE_IPS.into(), element_key(&frontend("10.96.0.1", 80))))
        );
    }

    #[test]
    fn affinity_remembers_in_a_shared_map_and_external_cluster_traffic_is_masqueraded() {
        let mut table = table();
        let mut planner = Planner::new();
        let mut desired = state(&[("10.0.9.9", 30080, &["10.0.0.1:8080", "10.0.0.2:8080"])]);
        let fe = frontend("10.0.9.9", 30080);
        {
            let f = desired.frontends.get_mut(&fe).unwrap();
            f.kind = FrontendKind::NodePort;
            f.affinity_timeout = Some(60);
        }
        table.execute(&planner.plan(&desired).ops);
        assert!(table.elements.contains_key(&(SERVICE_NODEPORTS.into(), element_key(&fe))));
        let service = &table.chains["service-10.0.9.9/tcp/30080"];
        assert_eq!(service[1].0, [Stmt::MarkSet(MASQUERADE_MARK)]);
        let remember = Remember { map: SERVICE_AFFINITY.into(), timeout_seconds: 60 };
        assert_eq!(
            service[2].0,
            [Stmt::ForgetRemembered {
                remember: remember.clone(),
                valid: AFFINITY_ENDPOINTS.into()
            }]
        );
        assert_eq!(
            service[3].0,
            [Stmt::DnatRemembered { remember: remember.clone(), valid: AFFINITY_ENDPOINTS.into() }]
        );
        assert_eq!(
            service[4].0,
            [Stmt::DnatEndpoint {
                endpoints: endpoint_map(&fe),
                count: 2,
                remember: Some(remember)
            }]
        );
        let valid =
            |t: &FakeTable| t.entries.keys().filter(|(set, _)| set == AFFINITY_ENDPOINTS).count();
        assert_eq!(valid(&table), 2);
        // An endpoint goes: a client remembered with it is no longer sent there.
        desired.frontends.get_mut(&fe).unwrap().backends = vec![([10, 0, 0, 1], 8080).into()];
        table.execute(&planner.plan(&desired).ops);
        assert_eq!(valid(&table), 1);
        // Affinity off: no affinity rule nor elements.
        desired.frontends.get_mut(&fe).unwrap().affinity_timeout = None;
        table.execute(&planner.plan(&desired).ops);
        assert_eq!(valid(&table), 0);
        assert_eq!(table.chains["service-10.0.9.9/tcp/30080"].len(), 3);
    }

    #[test]
    fn an_adopting_planner_rewrites_nothing_unchanged_and_repairs_the_rest() {
        let mut live = table();
        let desired = state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]),
            ("10.96.0.2", 80, &["10.0.0.3:8080"]),
        ]);
        live.execute(&Planner::new().plan(&desired).ops);
        let mut restarted = Planner::adopt(&live.contents());
        assert_eq!((restarted.frontends(), restarted.backends()), (2, 3));
        assert_eq!(restarted.plan(&desired), Plan::default(), "a restart writes nothing");

        // Damage: one service's rules and an endpoint are gone, a stray service is left over.
        let fe2 = frontend("10.96.0.2", 80);
        live.execute(&[
            Op::FlushChain { name: "service-10.96.0.2/tcp/80".into() },
            Op::DeleteElement { set: endpoint_map(&fe2), key: endpoint_key(&fe2, 0) },
        ]);
        live.execute(&Planner::new().plan(&state(&[("10.96.0.9", 80, &["10.0.0.9:80"])])).ops);
        let mut restarted = Planner::adopt(&live.contents());
        let plan = restarted.plan(&desired);
        live.execute(&plan.ops);
        assert!(
            !plan
                .ops
                .iter()
                .any(|op| matches!(op, Op::AddRule { chain, .. } if chain.contains("10.96.0.1")))
        );
        let mut fresh = table();
        fresh.execute(&Planner::new().plan(&desired).ops);
        assert_eq!(live.contents().chains, fresh.contents().chains);
        assert_eq!(live.elements, fresh.elements);
        assert_eq!(live.entries, fresh.entries);
        assert_eq!(
            live.chains["service-10.96.0.2/tcp/80"],
            fresh.chains["service-10.96.0.2/tcp/80"]
        );
    }

    #[test]
    fn a_table_of_the_earlier_shape_is_converted_in_place() {
        let mut live = table();
        let fe = frontend("10.96.0.1", 80);
        let old_endpoint = "endpoint-10.96.0.1/tcp/80__10.0.0.1/8080";
        let old_set = "affinity-10.96.0.1/tcp/80__10.0.0.1/8080";
        live.execute(&[
            Op::AddSet { name: old_set.into(), kind: SetKind::Affinity },
            Op::AddChain { name: old_endpoint.into(), base: None },
            Op::AddRule {
                chain: old_endpoint.into(),
                stmts: vec![Stmt::UpdateSaddr { set: old_set.into(), timeout_seconds: 5 }],
                comment: None,
            },
            Op::AddChain { name: "service-10.96.0.1/tcp/80".into(), base: None },
            Op::AddRule {
                chain: "service-10.96.0.1/tcp/80".into(),
                stmts: vec![Stmt::NumgenVmap { targets: vec![old_endpoint.into()] }],
                comment: Some("weir:0123456789abcdef".into()),
            },
            Op::AddElement {
                set: SERVICE_IPS.into(),
                key: element_key(&fe),
                verdict: Verdict::Goto("service-10.96.0.1/tcp/80".into()),
            },
        ]);
        let desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]);
        let mut planner = Planner::adopt(&live.contents());
        live.execute(&planner.plan(&desired).ops);
        let mut fresh = table();
        fresh.execute(&Planner::new().plan(&desired).ops);
        assert_eq!(live.contents().chains, fresh.contents().chains);
        assert_eq!(live.sets, fresh.sets);
        assert_eq!(live.entries, fresh.entries);
        assert_eq!(
            live.chains["service-10.96.0.1/tcp/80"],
            fresh.chains["service-10.96.0.1/tcp/80"]
        );
    }

    #[test]
    fn ipv6_frontends_are_skipped_and_counted() {
        let plan = Planner::new().plan(&state(&[("fd00::1", 80, &["[fd00::2]:8080"])]));
        assert_eq!((plan.ops.len(), plan.skipped), (0, 1));
    }

    #[test]
    fn object_names_parse_back() {
        let f = frontend("10.96.0.1", 80);
        assert_eq!(parse_frontend_id(&frontend_id(&f)), Some(f));
        assert_eq!(
            parse_legacy_object("endpoint-10.96.0.1/tcp/80__10.0.0.1/8080", "endpoint-"),
            Some(f)
        );
        assert_eq!(
            "service-endpoints-check".strip_prefix("service-").and_then(parse_frontend_id),
            None
        );
    }

    #[test]
    fn random_incremental_changes_end_in_the_state_a_full_plan_gives() {
        for seed in 1..=25u64 {
            let (mut planner, mut table) = (Planner::new(), table());
            for (step, (desired, changed)) in
                crate::model::random::sequence(seed, 120).iter().enumerate()
            {
                table.execute(&planner.plan_changed(desired, changed).ops);
                // Now and then: the planner and the table both hold exactly the desired state.
                if step % 20 == 19 {
                    assert_eq!(planner.plan(desired).ops, [], "seed {seed} step {step}");
                    let adopted = Planner::adopt(&table.contents()).plan(desired);
                    assert_eq!(adopted.ops, [], "seed {seed} step {step}");
                }
            }
        }
    }
}
