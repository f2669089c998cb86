//! The pure part of the nftables backend: the table's fixed skeleton, the objects of each
//! frontend, and the incremental diff between what is in the table and the desired state.
//!
//! The shape is kube-proxy's nftables mode (pkg/proxy/nftables): one table; the `services`
//! chain, jumped to from the nat prerouting and output hooks, looks the packet up in two
//! verdict maps keyed by `ip daddr . meta l4proto . th dport` (`service-ips` for cluster,
//! load-balancer and external IPs, `service-nodeports` for the node's addresses) and goes to
//! the frontend's `service-…` chain. That chain picks an endpoint with `numgen random mod N
//! vmap { … }` (after the ClientIP affinity sets, when the service has affinity) and goes to
//! an `endpoint-…` chain that marks hairpin traffic for masquerading and DNATs. External
//! frontends with `externalTrafficPolicy: Cluster` mark their traffic for masquerading; the
//! `masquerading` chain on nat postrouting does it. Frontends without a usable endpoint are
//! in `no-endpoint-services`, checked on the filter hooks before DNAT: reject (TCP reset or
//! ICMP port unreachable) when the service has no endpoints, drop when its traffic policy
//! leaves none on this node.
//!
//! Every object a frontend owns carries the frontend in its name, and its service chain's
//! first rule carries a fingerprint of what was rendered, so a restarted agent can read the
//! table back ([`Planner::adopt`]) and rewrite only what differs.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use super::ops::{BaseChain, ElementKey, Op, RejectKind, SetKind, Stmt, Verdict};
use crate::model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty};

pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const SERVICES: &str = "services";
const ENDPOINTS_CHECK: &str = "service-endpoints-check";
const REJECT_CHAIN: &str = "reject-chain";
const MASQUERADING: &str = "masquerading";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// kube-proxy's masquerade mark bit.
pub const MASQUERADE_MARK: u32 = 0x4000;
const FINGERPRINT_PREFIX: &str = "weir:";

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
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority });
    let chains: Vec<FixedChain> = vec![
        (MARK_FOR_MASQUERADE, None, vec![vec![Stmt::MarkSet(MASQUERADE_MARK)]]),
        (
            MASQUERADING,
            None,
            vec![
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

fn service_chain(frontend: &Frontend) -> String {
    format!("service-{}", frontend_id(frontend))
}

fn endpoint_chain(frontend: &Frontend, backend: &SocketAddrV4) -> String {
    format!("endpoint-{}__{}/{}", frontend_id(frontend), backend.ip(), backend.port())
}

fn affinity_set(frontend: &Frontend, backend: &SocketAddrV4) -> String {
    format!("affinity-{}__{}/{}", frontend_id(frontend), backend.ip(), backend.port())
}

/// `PREFIX<frontend>__<ip>/<port>` -> (frontend, backend).
fn parse_backend_object(name: &str, prefix: &str) -> Option<(Frontend, SocketAddrV4)> {
    let (frontend, backend) = name.strip_prefix(prefix)?.split_once("__")?;
    let (ip, port) = backend.split_once('/')?;
    Some((parse_frontend_id(frontend)?, SocketAddrV4::new(ip.parse().ok()?, port.parse().ok()?)))
}

fn element_key(frontend: &Frontend) -> ElementKey {
    let IpAddr::V4(address) = frontend.address else { unreachable!("IPv4 frontends only") };
    ElementKey::Service { address, protocol: frontend.protocol.number(), port: frontend.port }
}

/// What one frontend renders to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rendered {
    backends: Vec<SocketAddrV4>,
    affinity: Option<u32>,
    masquerade: bool,
    /// The map element that sends the frontend's traffic somewhere.
    element: (String, Verdict),
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
        })
    }

    /// A stable digest of the rendering (FNV-1a 64 over its canonical text).
    fn fingerprint(&self) -> String {
        let text = format!(
            "{:?}|{:?}|{}|{}|{:?}",
            self.backends, self.affinity, self.masquerade, self.element.0, self.element.1
        );
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{FINGERPRINT_PREFIX}{hash:016x}")
    }
}

/// What the table holds for one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    service_chain: bool,
    /// The service chain's fingerprint rule; `None` when unknown (missing or foreign).
    fingerprint: Option<String>,
    /// Endpoint chains that exist.
    endpoints: BTreeSet<SocketAddrV4>,
    /// What the endpoint chains hold, when known: their affinity timeout.
    endpoint_affinity: Option<Option<u32>>,
    affinity_sets: BTreeSet<SocketAddrV4>,
    /// Map elements with this frontend's key: (map, verdict if known).
    elements: Vec<(String, Option<Verdict>)>,
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
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// A planner for a table that already holds a ruleset (a restarted agent): the objects it
    /// finds become what was applied, so the next plan rewrites only frontends whose
    /// fingerprint differs from the desired state and removes objects nothing wants.
    pub fn adopt(contents: &TableContents) -> Self {
        let mut applied: BTreeMap<Frontend, Applied> = BTreeMap::new();
        for chain in &contents.chains {
            if let Some(frontend) = chain.strip_prefix("service-").and_then(parse_frontend_id) {
                applied.entry(frontend).or_default().service_chain = true;
            } else if let Some((frontend, backend)) = parse_backend_object(chain, "endpoint-") {
                applied.entry(frontend).or_default().endpoints.insert(backend);
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
            if let Some((frontend, backend)) = parse_backend_object(set, "affinity-") {
                applied.entry(frontend).or_default().affinity_sets.insert(backend);
            }
        }
        for (map, key, verdict) in &contents.elements {
            let ElementKey::Service { address, protocol, port } = *key else { continue };
            let protocol = match protocol {
                weir_common::proto::TCP => Protocol::Tcp,
                weir_common::proto::UDP => Protocol::Udp,
                weir_common::proto::SCTP => Protocol::Sctp,
                _ => continue,
            };
            let frontend = Frontend { address: IpAddr::V4(address), port, protocol };
            applied.entry(frontend).or_default().elements.push((map.clone(), verdict.clone()));
        }
        Self { applied }
    }

    pub fn frontends(&self) -> usize {
        self.applied.len()
    }

    /// Distinct backend addresses across the applied frontends.
    pub fn backends(&self) -> usize {
        self.applied.values().flat_map(|a| a.endpoints.iter()).collect::<BTreeSet<_>>().len()
    }

    /// Diffs `desired` against what the table holds. The planner assumes the ops are all
    /// executed; after a failed batch, adopt the table again.
    pub fn plan(&mut self, desired: &ServiceState) -> Plan {
        let mut plan = Plan::default();
        let mut wanted = BTreeMap::new();
        for (frontend, state) in &desired.frontends {
            match Rendered::new(frontend, state) {
                Some(rendered) => {
                    wanted.insert(*frontend, rendered);
                }
                None => plan.skipped += 1,
            }
        }
        let removed: Vec<Frontend> =
            self.applied.keys().filter(|f| !wanted.contains_key(f)).copied().collect();
        for frontend in removed {
            let applied = self.applied.remove(&frontend).expect("listed above");
            remove_frontend(&mut plan.ops, &frontend, &applied);
            plan.groups.push(plan.ops.len());
        }
        for (frontend, rendered) in wanted {
            let applied = self.applied.get(&frontend).cloned().unwrap_or_default();
            if update_frontend(&mut plan.ops, &frontend, &rendered, &applied) {
                plan.groups.push(plan.ops.len());
            }
            self.applied.insert(
                frontend,
                Applied {
                    service_chain: true,
                    fingerprint: Some(rendered.fingerprint()),
                    endpoints: rendered.backends.iter().copied().collect(),
                    endpoint_affinity: Some(rendered.affinity),
                    affinity_sets: if rendered.affinity.is_some() {
                        rendered.backends.iter().copied().collect()
                    } else {
                        BTreeSet::new()
                    },
                    elements: vec![(rendered.element.0.clone(), Some(rendered.element.1.clone()))],
                },
            );
        }
        plan
    }
}

fn remove_frontend(ops: &mut Vec<Op>, frontend: &Frontend, applied: &Applied) {
    let key = element_key(frontend);
    for (set, _) in &applied.elements {
        ops.push(Op::DeleteElement { set: set.clone(), key });
    }
    if applied.service_chain {
        ops.push(Op::FlushChain { name: service_chain(frontend) });
    }
    for backend in &applied.endpoints {
        ops.push(Op::FlushChain { name: endpoint_chain(frontend, backend) });
    }
    for backend in &applied.endpoints {
        ops.push(Op::DeleteChain { name: endpoint_chain(frontend, backend) });
    }
    if applied.service_chain {
        ops.push(Op::DeleteChain { name: service_chain(frontend) });
    }
    for backend in &applied.affinity_sets {
        ops.push(Op::DeleteSet { name: affinity_set(frontend, backend) });
    }
}

/// Appends the ops that turn `applied` into `rendered`; false when nothing differs.
fn update_frontend(
    ops: &mut Vec<Op>,
    frontend: &Frontend,
    rendered: &Rendered,
    applied: &Applied,
) -> bool {
    let fingerprint = rendered.fingerprint();
    let wanted_backends: BTreeSet<SocketAddrV4> = rendered.backends.iter().copied().collect();
    let wanted_sets =
        if rendered.affinity.is_some() { wanted_backends.clone() } else { BTreeSet::new() };
    let wanted_element = (rendered.element.0.clone(), Some(rendered.element.1.clone()));
    let same_fingerprint = applied.fingerprint.as_ref() == Some(&fingerprint);
    if same_fingerprint
        && applied.service_chain
        && applied.endpoints == wanted_backends
        && applied.affinity_sets == wanted_sets
        && applied.elements == [wanted_element.clone()]
    {
        return false;
    }
    // The endpoint chains' content is known from a matching fingerprint or from this planner.
    let endpoint_affinity =
        if same_fingerprint { Some(rendered.affinity) } else { applied.endpoint_affinity };
    let key = element_key(frontend);
    let service = service_chain(frontend);

    // 1. Stop references to what changes: wrong elements, the service chain's rules.
    for (set, verdict) in &applied.elements {
        if (set, verdict) != (&wanted_element.0, &wanted_element.1) {
            ops.push(Op::DeleteElement { set: set.clone(), key });
        }
    }
    if applied.service_chain {
        ops.push(Op::FlushChain { name: service.clone() });
    } else {
        ops.push(Op::AddChain { name: service.clone(), base: None });
    }
    // 2. Endpoint chains: gone ones emptied (deleted below), stale ones rewritten, new ones made.
    for backend in applied.endpoints.difference(&wanted_backends) {
        ops.push(Op::FlushChain { name: endpoint_chain(frontend, backend) });
    }
    for backend in wanted_sets.difference(&applied.affinity_sets) {
        ops.push(Op::AddSet { name: affinity_set(frontend, backend), kind: SetKind::Affinity });
    }
    for backend in &rendered.backends {
        let chain = endpoint_chain(frontend, backend);
        if applied.endpoints.contains(backend) {
            if endpoint_affinity == Some(rendered.affinity) {
                continue;
            }
            ops.push(Op::FlushChain { name: chain.clone() });
        } else {
            ops.push(Op::AddChain { name: chain.clone(), base: None });
        }
        let rule = |stmts| Op::AddRule { chain: chain.clone(), stmts, comment: None };
        ops.push(rule(vec![
            Stmt::SaddrEq(*backend.ip()),
            Stmt::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into())),
        ]));
        if let Some(timeout_seconds) = rendered.affinity {
            ops.push(rule(vec![Stmt::UpdateSaddr {
                set: affinity_set(frontend, backend),
                timeout_seconds,
            }]));
        }
        ops.push(rule(vec![Stmt::Dnat(*backend.ip(), backend.port())]));
    }
    // 3. The service chain.
    let rule = |stmts, comment| Op::AddRule { chain: service.clone(), stmts, comment };
    ops.push(rule(vec![Stmt::Counter], Some(fingerprint)));
    if !rendered.backends.is_empty() {
        if rendered.masquerade {
            ops.push(rule(vec![Stmt::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into()))], None));
        }
        if rendered.affinity.is_some() {
            for backend in &rendered.backends {
                ops.push(rule(
                    vec![
                        Stmt::SaddrInSet(affinity_set(frontend, backend)),
                        Stmt::Verdict(Verdict::Goto(endpoint_chain(frontend, backend))),
                    ],
                    None,
                ));
            }
        }
        let targets = rendered.backends.iter().map(|b| endpoint_chain(frontend, b)).collect();
        ops.push(rule(vec![Stmt::NumgenVmap { targets }], None));
    }
    // 4. The element that sends traffic here (or refuses it), then what nothing uses any more.
    if !applied.elements.contains(&wanted_element) {
        ops.push(Op::AddElement {
            set: rendered.element.0.clone(),
            key,
            verdict: rendered.element.1.clone(),
        });
    }
    for backend in applied.endpoints.difference(&wanted_backends) {
        ops.push(Op::DeleteChain { name: endpoint_chain(frontend, backend) });
    }
    for backend in applied.affinity_sets.difference(&wanted_sets) {
        ops.push(Op::DeleteSet { name: affinity_set(frontend, backend) });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FrontendKind;
    use crate::model::testing::{frontend, state};

    /// A rule's statements and comment.
    type Rule = (Vec<Stmt>, Option<String>);

    /// Executes ops on an in-memory table, checking what the kernel checks: references point
    /// at existing objects, and a referenced object is not deleted.
    #[derive(Default, Debug)]
    struct FakeTable {
        chains: BTreeMap<String, Vec<Rule>>,
        sets: BTreeSet<String>,
        elements: BTreeMap<(String, ElementKey), Verdict>,
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
                            Stmt::SaddrInSet(s) | Stmt::UpdateSaddr { set: s, .. } => {
                                refs.push(s.clone())
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
                        if let Verdict::Goto(c) = verdict {
                            assert!(self.chains.contains_key(c), "element to missing {c}");
                        }
                        let old = self.elements.insert((set.clone(), *key), verdict.clone());
                        assert!(old.is_none(), "element {key:?} exists in {set}");
                    }
                    Op::DeleteElement { set, key } => {
                        assert!(self.elements.remove(&(set.clone(), *key)).is_some());
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
            }
        }
    }

    fn table() -> FakeTable {
        let mut table = FakeTable::default();
        table.execute(&skeleton());
        table
    }

    #[test]
    fn the_skeleton_is_kube_proxys_shape_and_idempotent() {
        let mut table = table();
        table.execute(&skeleton());
        for chain in ["nat-prerouting", "nat-output", "nat-postrouting", "filter-output"] {
            assert_eq!(table.chains[chain].len(), 1, "{chain}");
        }
        assert_eq!(table.chains[SERVICES].len(), 2);
        assert_eq!(table.sets.len(), 3);
    }

    #[test]
    fn a_service_dispatches_to_its_chain_which_picks_an_endpoint_chain_that_dnats() {
        let mut table = table();
        let mut planner = Planner::new();
        let plan = planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        table.execute(&plan.ops);
        let key = element_key(&frontend("10.96.0.1", 80));
        assert_eq!(
            table.elements[&(SERVICE_IPS.into(), key)],
            Verdict::Goto("service-10.96.0.1/tcp/80".into())
        );
        let service = &table.chains["service-10.96.0.1/tcp/80"];
        assert_eq!(
            service.last().unwrap().0,
            [Stmt::NumgenVmap {
                targets: vec![
                    "endpoint-10.96.0.1/tcp/80__10.0.0.1/8080".into(),
                    "endpoint-10.96.0.1/tcp/80__10.0.0.2/8080".into()
                ]
            }]
        );
        let endpoint = &table.chains["endpoint-10.96.0.1/tcp/80__10.0.0.2/8080"];
        assert_eq!(endpoint[0].0[0], Stmt::SaddrEq("10.0.0.2".parse().unwrap()), "hairpin");
        assert_eq!(endpoint[1].0, [Stmt::Dnat("10.0.0.2".parse().unwrap(), 8080)]);
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
        assert_eq!(plan.groups.len(), 1);
        let touched: BTreeSet<String> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::FlushChain { name } | Op::AddChain { name, .. } => Some(name.clone()),
                Op::AddRule { chain, .. } => Some(chain.clone()),
                _ => None,
            })
            .collect();
        assert!(touched.iter().all(|c| c.contains(&ips[100])), "{touched:?}");
        // Flush of the service chain, a new endpoint chain with two rules, the service chain
        // rewritten (fingerprint and numgen): nothing else.
        assert_eq!(plan.ops.len(), 6, "{:#?}", plan.ops);
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
        assert!(!table.chains.contains_key("endpoint-10.96.0.1/tcp/80__10.0.0.2/8080"));
        table.execute(&planner.plan(&ServiceState::default()).ops);
        assert_eq!(table.contents().chains, empty.chains);
        assert!(table.elements.is_empty());
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
    fn affinity_uses_a_set_per_endpoint_and_external_cluster_traffic_is_masqueraded() {
        let mut table = table();
        let mut planner = Planner::new();
        let mut desired = state(&[("10.0.9.9", 30080, &["10.0.0.1:8080"])]);
        let fe = desired.frontends.get_mut(&frontend("10.0.9.9", 30080)).unwrap();
        fe.kind = FrontendKind::NodePort;
        fe.affinity_timeout = Some(60);
        table.execute(&planner.plan(&desired).ops);
        let key = element_key(&frontend("10.0.9.9", 30080));
        assert!(table.elements.contains_key(&(SERVICE_NODEPORTS.into(), key)));
        let service = &table.chains["service-10.0.9.9/tcp/30080"];
        assert_eq!(service[1].0, [Stmt::Verdict(Verdict::Jump(MARK_FOR_MASQUERADE.into()))]);
        assert!(matches!(&service[2].0[0], Stmt::SaddrInSet(s) if s.starts_with("affinity-")));
        assert_eq!(table.sets.len(), 4);
        // Affinity off: the set goes, the endpoint chain is rewritten without the update.
        desired.frontends.values_mut().next().unwrap().affinity_timeout = None;
        table.execute(&planner.plan(&desired).ops);
        assert_eq!(table.sets.len(), 3);
        assert_eq!(table.chains["endpoint-10.0.9.9/tcp/30080__10.0.0.1/8080"].len(), 2);
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

        // Damage: an endpoint chain of one service is gone, a stray service is left over.
        live.execute(&[
            Op::FlushChain { name: "service-10.96.0.2/tcp/80".into() },
            Op::FlushChain { name: "endpoint-10.96.0.2/tcp/80__10.0.0.3/8080".into() },
            Op::DeleteChain { name: "endpoint-10.96.0.2/tcp/80__10.0.0.3/8080".into() },
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
        assert_eq!(
            live.chains["service-10.96.0.2/tcp/80"],
            fresh.chains["service-10.96.0.2/tcp/80"]
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
        let b = SocketAddrV4::new("10.0.0.1".parse().unwrap(), 8080);
        assert_eq!(parse_frontend_id(&frontend_id(&f)), Some(f));
        assert_eq!(parse_backend_object(&endpoint_chain(&f, &b), "endpoint-"), Some((f, b)));
        assert_eq!(parse_backend_object(&affinity_set(&f, &b), "affinity-"), Some((f, b)));
        assert_eq!(
            "service-endpoints-check".strip_prefix("service-").and_then(parse_frontend_id),
            None
        );
    }
}
