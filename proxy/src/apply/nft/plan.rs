//! The pure part of the nftables backend: the table's fixed skeleton, the objects of each
//! frontend, and the incremental diff between what is in the table and the desired state.
//!
//! The dispatch follows kube-proxy's nftables mode (pkg/proxy/nftables): one table; the
//! `services` chain, jumped to from the nat prerouting and output hooks, sends a new
//! connection to a frontend (`ip daddr . meta l4proto . th dport`: cluster, load-balancer and
//! external IPs, and node ports on the node's addresses) to the chain that balances it.
//! Frontends without a usable endpoint are in `no-endpoint-reject` or `no-endpoint-drop`,
//! checked on the filter hooks before DNAT: reject (TCP reset or ICMP port unreachable) when
//! the service has no endpoints, drop when its traffic policy leaves none on this node.
//!
//! Unlike kube-proxy there is no chain per service. The cost of one change must not grow with
//! the number of services, and the kernel makes that hard: a commit that adds a rule with a
//! NAT or jump expression, or a verdict-map element that jumps, validates the whole table, and
//! validation walks every element of every verdict map reachable from the base chains (a
//! verdict map of 100k frontends: ~200 ms per change). So frontends are grouped by **class**,
//! the shape of what must happen to their packets (endpoint count, masquerade, ClientIP
//! affinity timeout); every class has a plain set of its frontends and one chain:
//!
//! ```text
//! chain services {
//!     ip daddr . meta l4proto . th dport @class-2-frontends goto class-2
//!     ip daddr . meta l4proto . th dport @class-3-masq-frontends goto class-3-masq
//! }
//! chain class-3-masq {
//!     counter comment "weir3:…"
//!     meta mark set meta mark | 0x4000
//!     dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @service-endpoints
//! }
//! ```
//!
//! The endpoints are elements of the shared `service-endpoints` map (`VIP . proto . port . i :
//! endpoint-address . endpoint-port`, i < N), so a class chain serves every frontend of its
//! shape. A change writes set elements only (elements without verdicts trigger no
//! validation); only a class seen for the first time writes a set, a chain and the `services`
//! rules, and validation then walks those rules and the class chains, whose number is bounded
//! by the distinct shapes, not by the services. A new connection costs one set lookup per
//! class (NAT chains see only the first packet of a connection). Writing a class also binds
//! its DNAT rule to `service-endpoints`, which makes the kernel walk that map (~40 ms at 100k
//! services), so classes no frontend uses are kept (up to [`MAX_UNUSED_CLASSES`], all of them
//! go when no frontend is left): a service scaling back and forth reuses its classes.
//!
//! ClientIP affinity is one shared dynamic map `service-affinity` (`client . VIP . proto .
//! port : endpoint`, with the class's timeout) that the DNAT rule updates and an earlier rule
//! reads, trusted only while the endpoint is still one of the frontend's
//! (`affinity-endpoints`; an entry naming another endpoint is deleted, so that the client is
//! balanced again and remembered with its new endpoint). Hairpin traffic (an endpoint reaching
//! itself through a service) is found on nat postrouting by `ct status dnat` and `ip saddr . ip
//! daddr` in `hairpin-endpoints` and masqueraded, as kube-proxy's per-endpoint rule does.
//! External frontends with `externalTrafficPolicy: Cluster` mark their traffic for
//! masquerading (their class says so); the `masquerading` chain on nat postrouting does it.
//!
//! Every class chain's first rule carries a fingerprint of its rules, and every `services`
//! rule the name of its class, so a restarted agent can read the table back
//! ([`Planner::adopt`]) and rewrite only what differs. A table of the earlier shape (a chain
//! per frontend, verdict maps of frontends, sharded endpoint maps) is converted by the first
//! plan after adoption.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::RangeInclusive,
};

use super::ops::{BaseChain, ElementKey, Family, Op, RejectKind, Remember, SetKind, Stmt, Verdict};
use crate::model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty};

pub const NO_ENDPOINT_REJECT: &str = "no-endpoint-reject";
pub const NO_ENDPOINT_DROP: &str = "no-endpoint-drop";
pub const SERVICE_ENDPOINTS: &str = "service-endpoints";
pub const SERVICE_AFFINITY: &str = "service-affinity";
pub const AFFINITY_ENDPOINTS: &str = "affinity-endpoints";
pub const HAIRPIN_ENDPOINTS: &str = "hairpin-endpoints";
/// The IPv6 twins of the shared sets (and of the class chains and sets) end so:
/// `service-endpoints-v6`, `class-3-masq-v6`.
const V6_SUFFIX: &str = "-v6";

/// The shared sets of one address family: a set's key has one address type, so IPv6
/// frontends have their own (the same names with [`V6_SUFFIX`]), matched by `ip6` statements
/// of the same chains.
#[derive(Debug)]
pub struct FamilySets {
    pub no_endpoint_reject: &'static str,
    pub no_endpoint_drop: &'static str,
    pub endpoints: &'static str,
    pub affinity: &'static str,
    pub affinity_endpoints: &'static str,
    pub hairpin: &'static str,
}

static V4_SETS: FamilySets = FamilySets {
    no_endpoint_reject: NO_ENDPOINT_REJECT,
    no_endpoint_drop: NO_ENDPOINT_DROP,
    endpoints: SERVICE_ENDPOINTS,
    affinity: SERVICE_AFFINITY,
    affinity_endpoints: AFFINITY_ENDPOINTS,
    hairpin: HAIRPIN_ENDPOINTS,
};

static V6_SETS: FamilySets = FamilySets {
    no_endpoint_reject: "no-endpoint-reject-v6",
    no_endpoint_drop: "no-endpoint-drop-v6",
    endpoints: "service-endpoints-v6",
    affinity: "service-affinity-v6",
    affinity_endpoints: "affinity-endpoints-v6",
    hairpin: "hairpin-endpoints-v6",
};

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// The shared sets of `family`.
pub fn family_sets(family: Family) -> &'static FamilySets {
    match family {
        Family::V4 => &V4_SETS,
        Family::V6 => &V6_SETS,
    }
}
/// The class sets' names end so: `class-3-masq-frontends`.
const CLASS_SET_SUFFIX: &str = "-frontends";
pub(crate) const SERVICES: &str = "services";
const ENDPOINTS_CHECK: &str = "service-endpoints-check";
const REJECT_CHAIN: &str = "reject-chain";
const MASQUERADING: &str = "masquerading";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// kube-proxy's masquerade mark bit.
pub const MASQUERADE_MARK: u32 = 0x4000;
const FINGERPRINT_PREFIX: &str = "weir3:";
const CLASS_PREFIX: &str = "class-";
/// How many classes no frontend uses are kept for reuse.
pub const MAX_UNUSED_CLASSES: usize = 32;
/// Verdict maps of the earlier shape (elements going to per-frontend chains), deleted first
/// when converting such a table.
const LEGACY_VERDICT_MAPS: [&str; 3] = ["service-ips", "service-nodeports", "no-endpoint-services"];
/// Prefix of the earlier shape's sharded endpoint maps (`service-endpoints-000` …).
const LEGACY_ENDPOINT_SHARDS: &str = "service-endpoints-";

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
    // `services` holds one rule per class, written by the plans (the skeleton only makes sure
    // the chain exists; its rules survive a restart).
    // Sets the table lacks are created, for both families (an older table of IPv4 sets only
    // gains the IPv6 ones).
    let mut ops = vec![Op::AddTable, Op::AddChain { name: SERVICES.into(), base: None }];
    for family in FAMILIES {
        let sets = family_sets(family);
        for (name, kind) in [
            (sets.no_endpoint_reject, SetKind::Frontends(family)),
            (sets.no_endpoint_drop, SetKind::Frontends(family)),
            (sets.endpoints, SetKind::EndpointMap(family)),
            (sets.affinity, SetKind::AffinityMap(family)),
            (sets.affinity_endpoints, SetKind::FrontendEndpoints(family)),
            (sets.hairpin, SetKind::Hairpin(family)),
        ] {
            ops.push(Op::AddSet { name: name.into(), kind });
        }
    }
    let base = |kind, hook, priority| Some(BaseChain { kind, hook, priority });
    let mut masquerading: Vec<Vec<Stmt>> = FAMILIES
        .map(|family| {
            let set = family_sets(family).hairpin.into();
            vec![Stmt::HairpinInSet { set, family }, Stmt::MarkSet(MASQUERADE_MARK)]
        })
        .into();
    masquerading.extend([
        vec![Stmt::MarkClear(MASQUERADE_MARK), Stmt::Verdict(Verdict::Return)],
        vec![Stmt::MarkToggle(MASQUERADE_MARK)],
        vec![Stmt::Masquerade],
    ]);
    let endpoints_check: Vec<Vec<Stmt>> = FAMILIES
        .into_iter()
        .flat_map(|family| {
            let sets = family_sets(family);
            [
                vec![
                    Stmt::FrontendInSet { set: sets.no_endpoint_reject.into(), family },
                    Stmt::Verdict(Verdict::Goto(REJECT_CHAIN.into())),
                ],
                vec![
                    Stmt::FrontendInSet { set: sets.no_endpoint_drop.into(), family },
                    Stmt::Verdict(Verdict::Drop),
                ],
            ]
        })
        .collect();
    let chains: Vec<FixedChain> = vec![
        (MARK_FOR_MASQUERADE, None, vec![vec![Stmt::MarkSet(MASQUERADE_MARK)]]),
        (MASQUERADING, None, masquerading),
        (
            // In an inet table both rejects answer in the packet's family (ICMPv6 port
            // unreachable for IPv6).
            REJECT_CHAIN,
            None,
            vec![
                vec![Stmt::L4Proto(weir_common::proto::TCP), Stmt::Reject(RejectKind::TcpReset)],
                vec![Stmt::Reject(RejectKind::PortUnreachable)],
            ],
        ),
        (ENDPOINTS_CHECK, None, endpoints_check),
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

/// Whether a set holds frontends (a class's, or one of the no-endpoint sets): the sets whose
/// elements [`Planner::adopt`] needs.
pub fn is_frontend_set(name: &str) -> bool {
    FAMILIES
        .iter()
        .map(|f| family_sets(*f))
        .any(|sets| name == sets.no_endpoint_reject || name == sets.no_endpoint_drop)
        || name.strip_suffix(CLASS_SET_SUFFIX).and_then(Class::parse).is_some()
}

/// Whether a set holds endpoint elements (`service-endpoints`, `affinity-endpoints`,
/// `hairpin-endpoints`, of either family): the other sets whose elements [`Planner::adopt`]
/// needs.
pub fn is_entry_set(name: &str) -> bool {
    FAMILIES
        .iter()
        .map(|f| family_sets(*f))
        .any(|sets| [sets.endpoints, sets.affinity_endpoints, sets.hairpin].contains(&name))
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

/// `10.96.0.10/tcp/80`: how the earlier shape named a frontend's chain (`service-<id>`).
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

/// Whether a chain or set belongs to the earlier shapes of this table (a chain per frontend,
/// an `endpoint-…` chain and an `affinity-…` set per endpoint, sharded endpoint maps, verdict
/// maps of frontends).
fn is_legacy_chain(name: &str) -> bool {
    name.strip_prefix("service-").and_then(parse_frontend_id).is_some()
        || name.starts_with("endpoint-")
}

fn is_legacy_set(name: &str) -> bool {
    LEGACY_VERDICT_MAPS.contains(&name)
        || name.starts_with("affinity-") && name.contains("__")
        || name
            .strip_prefix(LEGACY_ENDPOINT_SHARDS)
            .is_some_and(|shard| shard.len() == 3 && shard.bytes().all(|b| b.is_ascii_digit()))
}

fn frontend_parts(frontend: &Frontend) -> (IpAddr, u8, u16) {
    (frontend.address, frontend.protocol.number(), frontend.port)
}

fn family_of(frontend: &Frontend) -> Family {
    Family::of(&frontend.address)
}

fn element_key(frontend: &Frontend) -> ElementKey {
    let (address, protocol, port) = frontend_parts(frontend);
    ElementKey::Service { address, protocol, port }
}

fn endpoint_key(frontend: &Frontend, index: u32) -> ElementKey {
    let (address, protocol, port) = frontend_parts(frontend);
    ElementKey::Endpoint { address, protocol, port, index }
}

fn frontend_endpoint_key(frontend: &Frontend, endpoint: SocketAddr) -> ElementKey {
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

fn frontend_of(address: IpAddr, protocol: u8, port: u16) -> Option<Frontend> {
    Some(Frontend { address, port, protocol: parse_protocol(protocol)? })
}

/// The shape of what happens to a frontend's new connections: what its class chain does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Class {
    /// The family of its frontends and endpoints (first: the IPv4 classes' `services` rules
    /// come first).
    family: Family,
    /// Endpoints (at least one).
    count: u32,
    masquerade: bool,
    /// ClientIP affinity timeout, seconds.
    affinity: Option<u32>,
}

impl Class {
    /// `class-3`, `class-3-masq`, `class-3-affinity-10800`, `class-3-masq-affinity-60`;
    /// IPv6: `class-3-v6`, `class-3-masq-affinity-60-v6`.
    fn chain(&self) -> String {
        let mut name = format!("{CLASS_PREFIX}{}", self.count);
        if self.masquerade {
            name.push_str("-masq");
        }
        if let Some(timeout) = self.affinity {
            name.push_str(&format!("-affinity-{timeout}"));
        }
        if self.family == Family::V6 {
            name.push_str(V6_SUFFIX);
        }
        name
    }

    /// The set of the class's frontends: `class-3-masq-frontends`.
    fn set(&self) -> String {
        format!("{}{CLASS_SET_SUFFIX}", self.chain())
    }

    fn parse(chain: &str) -> Option<Class> {
        let (family, rest) = match chain.strip_suffix(V6_SUFFIX) {
            Some(rest) => (Family::V6, rest),
            None => (Family::V4, chain),
        };
        let rest = rest.strip_prefix(CLASS_PREFIX)?;
        let (count, rest) = rest.split_once('-').unwrap_or((rest, ""));
        let count: u32 = count.parse().ok().filter(|c| *c > 0)?;
        let (masquerade, rest) = match rest.strip_prefix("masq") {
            Some(rest) => (true, rest.strip_prefix('-').unwrap_or(rest)),
            None => (false, rest),
        };
        let affinity = match rest {
            "" => None,
            rest => Some(rest.strip_prefix("affinity-")?.parse().ok()?),
        };
        let class = Class { family, count, masquerade, affinity };
        (class.chain() == chain).then_some(class)
    }

    /// The class chain's rules; the first carries the fingerprint.
    fn rules(&self) -> Vec<Vec<Stmt>> {
        let (family, sets) = (self.family, family_sets(self.family));
        let mut rules = vec![vec![Stmt::Counter]];
        if self.masquerade {
            rules.push(vec![Stmt::MarkSet(MASQUERADE_MARK)]);
        }
        let remember = self
            .affinity
            .map(|timeout_seconds| Remember { map: sets.affinity.into(), timeout_seconds });
        if let Some(remember) = &remember {
            let valid = sets.affinity_endpoints.to_string();
            rules.push(vec![Stmt::ForgetRemembered {
                remember: remember.clone(),
                valid: valid.clone(),
                family,
            }]);
            rules.push(vec![Stmt::DnatRemembered { remember: remember.clone(), valid, family }]);
        }
        rules.push(vec![Stmt::DnatEndpoint {
            endpoints: sets.endpoints.into(),
            count: self.count,
            remember,
            family,
        }]);
        rules
    }

    /// A stable digest of the chain's rules (FNV-1a 64 over their debug text).
    fn fingerprint(&self) -> String {
        let text = format!("{:?}", self.rules());
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{FINGERPRINT_PREFIX}{hash:016x}")
    }
}

/// Where a frontend's key goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// In its class's set.
    Class(Class),
    /// In `no-endpoint-reject` or `no-endpoint-drop`.
    Refused(&'static str),
}

impl Placement {
    fn set(&self) -> String {
        match self {
            Placement::Class(class) => class.set(),
            Placement::Refused(set) => set.to_string(),
        }
    }
}

/// The endpoints of one frontend, all of its family, in the compact form the planner keeps
/// for every frontend (6 bytes an IPv4 endpoint, instead of 32 as a `SocketAddr`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Endpoints {
    V4(Box<[SocketAddrV4]>),
    V6(Box<[SocketAddrV6]>),
}

impl Endpoints {
    /// The endpoints of `backends` that are of `family`, in order.
    fn of_family(family: Family, backends: &[SocketAddr]) -> Self {
        let v4 = |b: &SocketAddr| if let SocketAddr::V4(b) = b { Some(*b) } else { None };
        let v6 = |b: &SocketAddr| if let SocketAddr::V6(b) = b { Some(*b) } else { None };
        match family {
            Family::V4 => Endpoints::V4(backends.iter().filter_map(v4).collect()),
            Family::V6 => Endpoints::V6(backends.iter().filter_map(v6).collect()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Endpoints::V4(endpoints) => endpoints.len(),
            Endpoints::V6(endpoints) => endpoints.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn iter(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (0..self.len()).map(move |index| match self {
            Endpoints::V4(endpoints) => SocketAddr::V4(endpoints[index]),
            Endpoints::V6(endpoints) => SocketAddr::V6(endpoints[index]),
        })
    }
}

/// What one frontend renders to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rendered {
    /// The endpoints of the frontend's family.
    backends: Endpoints,
    placement: Placement,
}

impl Rendered {
    fn new(frontend: &Frontend, state: &FrontendState) -> Self {
        let family = family_of(frontend);
        // A frontend balances to endpoints of its own family only (kube-proxy runs one
        // proxier per family). The model already gives it only those, and chooses between
        // reject and drop per family; the filter keeps a state built otherwise (by hand, in
        // tests) from mixing families.
        let backends = Endpoints::of_family(family, &state.backends);
        let placement = if backends.is_empty() {
            // Endpoints of the other family only: this family has none, which kube-proxy's
            // proxier of this family rejects.
            let when_empty =
                if state.backends.is_empty() { state.when_empty } else { WhenEmpty::Reject };
            let sets = family_sets(family);
            Placement::Refused(match when_empty {
                WhenEmpty::Reject => sets.no_endpoint_reject,
                WhenEmpty::Drop => sets.no_endpoint_drop,
            })
        } else {
            Placement::Class(Class {
                family,
                count: backends.len() as u32,
                // kube-proxy masquerades external traffic unless the policy keeps it on this
                // node (then the client address must reach the pod).
                masquerade: state.kind.is_external() && !state.local_traffic_policy,
                affinity: state.affinity_timeout,
            })
        };
        Self { backends, placement }
    }

    fn endpoints(&self) -> BTreeMap<u32, SocketAddr> {
        (0u32..).zip(self.backends.iter()).collect()
    }

    fn affinity_endpoints(&self) -> BTreeSet<SocketAddr> {
        match self.placement {
            Placement::Class(Class { affinity: Some(_), .. }) => self.backends.iter().collect(),
            _ => BTreeSet::new(),
        }
    }
}

/// What the table holds for one frontend: what this planner last wrote, whose elements it
/// derives when asked, or what was read back from a table. Only the rendering is kept for
/// written frontends: a desired state is rendered again to compare (cheap), and keeping each
/// frontend's state, or its elements beside the rendering, cost megabytes at 10k services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    rendered: Option<Rendered>,
    /// The elements found in a table (adopted frontends only; `None` when `rendered` is set).
    found: Option<Box<Found>>,
}

/// The elements of one frontend found in a table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Found {
    /// The sets holding this frontend's key.
    placements: Vec<String>,
    /// `service-endpoints` elements: index -> endpoint (`None`: the value is unknown).
    endpoints: BTreeMap<u32, Option<SocketAddr>>,
    /// `affinity-endpoints` elements.
    affinity_endpoints: BTreeSet<SocketAddr>,
}

impl Applied {
    fn written(rendered: Rendered) -> Self {
        Self { rendered: Some(rendered), found: None }
    }

    fn found_mut(&mut self) -> &mut Found {
        self.found.get_or_insert_with(Box::default)
    }

    /// The sets holding this frontend's key.
    fn placements(&self) -> Vec<String> {
        match (&self.rendered, &self.found) {
            (Some(rendered), _) => vec![rendered.placement.set()],
            (None, Some(found)) => found.placements.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// `service-endpoints` elements: index -> endpoint (`None`: the value is unknown).
    fn endpoints(&self) -> BTreeMap<u32, Option<SocketAddr>> {
        match (&self.rendered, &self.found) {
            (Some(rendered), _) => {
                rendered.endpoints().into_iter().map(|(i, e)| (i, Some(e))).collect()
            }
            (None, Some(found)) => found.endpoints.clone(),
            (None, None) => BTreeMap::new(),
        }
    }

    /// `affinity-endpoints` elements.
    fn affinity_endpoints(&self) -> BTreeSet<SocketAddr> {
        match (&self.rendered, &self.found) {
            (Some(rendered), _) => rendered.affinity_endpoints(),
            (None, Some(found)) => found.affinity_endpoints.clone(),
            (None, None) => BTreeSet::new(),
        }
    }

    /// The endpoints this frontend holds (for reference counts of backends and hairpin
    /// addresses).
    fn known_endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints().into_values().flatten().collect()
    }

    /// The classes whose sets hold this frontend.
    fn classes(&self) -> Vec<Class> {
        self.placements()
            .iter()
            .filter_map(|set| Class::parse(set.strip_suffix(CLASS_SET_SUFFIX)?))
            .collect()
    }
}

/// What [`Planner::adopt`] reads from an existing table.
#[derive(Clone, Debug, Default)]
pub struct TableContents {
    pub chains: Vec<String>,
    /// (chain, comment) of every rule that has a comment, in chain order.
    pub rule_comments: Vec<(String, String)>,
    pub sets: Vec<String>,
    /// How many rules the `services` chain has.
    pub services_rules: usize,
    /// The elements of the sets [`is_frontend_set`] names: (set, key).
    pub frontends: Vec<(String, ElementKey)>,
    /// The elements of the sets [`is_entry_set`] names: `service-endpoints` (key, endpoint),
    /// `affinity-endpoints` and `hairpin-endpoints` (key, `None`).
    pub entries: Vec<(ElementKey, Option<SocketAddr>)>,
}

/// The ops of one step. `groups` are the op indexes where one frontend's changes end: a batch
/// too large for one message may be split there without any frontend seeing half a change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub groups: Vec<usize>,
    /// Frontends this backend cannot serve: none (it serves both families); the agent reports
    /// the eBPF planner's count and this one alike.
    pub skipped: usize,
}

/// Remembers what the table holds and plans the next step.
#[derive(Debug, Default)]
pub struct Planner {
    applied: BTreeMap<Frontend, Applied>,
    /// The classes with a set, a chain holding exactly [`Class::rules`], and a `services`
    /// rule.
    classes: BTreeSet<Class>,
    /// Class -> how many applied frontends its set holds.
    class_users: BTreeMap<Class, usize>,
    /// Whether the `services` rules are exactly one per class of `classes`, in order.
    services_current: bool,
    /// Class sets and chains found in the table that are not (or not exactly) in `classes`:
    /// rewritten when their class is used again, removed by the next plan otherwise.
    stray_class_sets: BTreeSet<String>,
    stray_class_chains: BTreeSet<String>,
    /// Objects of an earlier table shape, removed by the next plan.
    legacy_chains: BTreeSet<String>,
    legacy_sets: BTreeSet<String>,
    /// Endpoint (address and port) -> how many applied frontend endpoints it is: what
    /// [`Planner::backends`] counts, kept so that counting costs nothing per sync; an address
    /// with an endpoint here is an element of `hairpin-endpoints` (or of its IPv6 twin).
    backend_refs: EndpointRefs,
    /// Addresses whose last endpoint left, or whose first came, since the last plan (or whose
    /// element an adopted table has or lacks wrongly), with whether the table holds their
    /// `hairpin-endpoints` element: the next plan adds or deletes the element.
    hairpin_touched: BTreeMap<IpAddr, bool>,
}

/// Reference counts of endpoints, per family in compact keys (an IPv4 endpoint in 6 bytes, not
/// the 32 of a `SocketAddr`: 40k endpoints at 10k services), ordered by address so that
/// whether an address has any endpoint is one range lookup.
#[derive(Debug, Default)]
struct EndpointRefs {
    v4: BTreeMap<SocketAddrV4, u32>,
    v6: BTreeMap<SocketAddrV6, u32>,
}

impl EndpointRefs {
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Counts one more use of `endpoint`; true when its address had no endpoint before.
    fn add(&mut self, endpoint: SocketAddr) -> bool {
        match endpoint {
            SocketAddr::V4(e) => add_ref(&mut self.v4, e, v4_range(*e.ip())),
            SocketAddr::V6(e) => add_ref(&mut self.v6, e, v6_range(*e.ip())),
        }
    }

    /// Counts one use of `endpoint` less; true when its address has no endpoint left.
    fn remove(&mut self, endpoint: SocketAddr) -> bool {
        match endpoint {
            SocketAddr::V4(e) => remove_ref(&mut self.v4, e, v4_range(*e.ip())),
            SocketAddr::V6(e) => remove_ref(&mut self.v6, e, v6_range(*e.ip())),
        }
    }

    /// Whether any endpoint of `address` is counted.
    fn has_address(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(a) => self.v4.range(v4_range(a)).next().is_some(),
            IpAddr::V6(a) => self.v6.range(v6_range(a)).next().is_some(),
        }
    }

    /// The distinct addresses of the counted endpoints.
    fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.keys().map(|e| IpAddr::V4(*e.ip()));
        let v6 = self.v6.keys().map(|e| IpAddr::V6(*e.ip()));
        let mut last = None;
        v4.chain(v6).filter(move |a| last.replace(*a) != Some(*a))
    }
}

fn v4_range(address: Ipv4Addr) -> RangeInclusive<SocketAddrV4> {
    SocketAddrV4::new(address, 0)..=SocketAddrV4::new(address, u16::MAX)
}

fn v6_range(address: Ipv6Addr) -> RangeInclusive<SocketAddrV6> {
    SocketAddrV6::new(address, 0, 0, 0)..=SocketAddrV6::new(address, u16::MAX, u32::MAX, u32::MAX)
}

fn add_ref<K: Ord>(refs: &mut BTreeMap<K, u32>, key: K, address: RangeInclusive<K>) -> bool {
    let first = refs.range(address).next().is_none();
    *refs.entry(key).or_default() += 1;
    first
}

fn remove_ref<K: Ord>(refs: &mut BTreeMap<K, u32>, key: K, address: RangeInclusive<K>) -> bool {
    let Some(count) = refs.get_mut(&key) else { return false };
    *count -= 1;
    if *count > 0 {
        return false;
    }
    refs.remove(&key);
    refs.range(address).next().is_none()
}

impl Planner {
    /// A planner for a table holding the skeleton only.
    pub fn new() -> Self {
        Self { services_current: true, ..Self::default() }
    }

    /// A planner for a table that already holds a ruleset (a restarted agent): the objects it
    /// finds become what was applied, so the next plan rewrites only frontends that differ
    /// from the desired state and removes objects nothing wants.
    pub fn adopt(contents: &TableContents) -> Self {
        let mut planner = Planner::new();
        let sets: BTreeSet<&str> = contents.sets.iter().map(String::as_str).collect();
        for chain in &contents.chains {
            let Some(class) = Class::parse(chain) else { continue };
            let fingerprint = contents
                .rule_comments
                .iter()
                .find(|(c, comment)| c == chain && comment.starts_with(FINGERPRINT_PREFIX));
            let current = fingerprint.is_some_and(|(_, f)| *f == class.fingerprint());
            if current && sets.contains(class.set().as_str()) {
                planner.classes.insert(class);
            } else {
                planner.stray_class_chains.insert(chain.clone());
            }
        }
        planner.stray_class_sets = contents
            .sets
            .iter()
            .filter(|s| {
                s.strip_suffix(CLASS_SET_SUFFIX)
                    .and_then(Class::parse)
                    .is_some_and(|c| !planner.classes.contains(&c))
            })
            .cloned()
            .collect();
        let dispatched: Vec<&str> = contents
            .rule_comments
            .iter()
            .filter(|(chain, _)| chain == SERVICES)
            .map(|(_, comment)| comment.as_str())
            .collect();
        planner.services_current = contents.services_rules == dispatched.len()
            && dispatched == planner.services_comments();
        planner.legacy_chains =
            contents.chains.iter().filter(|c| is_legacy_chain(c)).cloned().collect();
        planner.legacy_sets = contents.sets.iter().filter(|s| is_legacy_set(s)).cloned().collect();
        let applied = &mut planner.applied;
        let mut hairpin = BTreeSet::new();
        for (set, key) in &contents.frontends {
            let ElementKey::Service { address, protocol, port } = *key else { continue };
            let Some(frontend) = frontend_of(address, protocol, port) else { continue };
            applied.entry(frontend).or_default().found_mut().placements.push(set.clone());
        }
        for (key, endpoint) in &contents.entries {
            match *key {
                ElementKey::Endpoint { address, protocol, port, index } => {
                    if let Some(frontend) = frontend_of(address, protocol, port) {
                        let found = applied.entry(frontend).or_default().found_mut();
                        found.endpoints.insert(index, *endpoint);
                    }
                }
                ElementKey::FrontendEndpoint { address, protocol, port, endpoint } => {
                    if let Some(frontend) = frontend_of(address, protocol, port) {
                        let found = applied.entry(frontend).or_default().found_mut();
                        found.affinity_endpoints.insert(endpoint);
                    }
                }
                ElementKey::Hairpin(address) => {
                    hairpin.insert(address);
                }
                _ => {}
            }
        }
        for entry in planner.applied.values() {
            for class in entry.classes() {
                *planner.class_users.entry(class).or_default() += 1;
            }
            for endpoint in entry.known_endpoints() {
                planner.backend_refs.add(endpoint);
            }
        }
        // Elements nothing refers to (and references to missing elements) are fixed by the
        // next plan.
        let referred: BTreeSet<IpAddr> = planner.backend_refs.addresses().collect();
        planner.hairpin_touched = hairpin
            .symmetric_difference(&referred)
            .map(|address| (*address, hairpin.contains(address)))
            .collect();
        planner
    }

    pub fn frontends(&self) -> usize {
        self.applied.len()
    }

    /// Distinct backends (address and port) across the applied frontends.
    pub fn backends(&self) -> usize {
        self.backend_refs.len()
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
        let mut class_ops: Vec<Op> = Vec::new();
        // The frontends' ops in one vector (not one per frontend: at the first sync that is
        // 10k short-lived allocations among the long-lived ones the planner makes meanwhile,
        // which keeps pages resident after they are freed), and where each frontend's ops end.
        let (mut frontend_ops, mut frontend_groups) = (Vec::new(), Vec::new());
        for frontend in frontends {
            let frontend = &frontend;
            let Some(state) = desired.frontends.get(frontend) else {
                if let Some(applied) = self.applied.remove(frontend) {
                    remove_frontend(&mut frontend_ops, frontend, &applied);
                    frontend_groups.push(frontend_ops.len());
                    self.count_users(&applied, &Applied::default());
                }
                continue;
            };
            let rendered = Rendered::new(frontend, state);
            let known = self.applied.get(frontend).and_then(|a| a.rendered.as_ref());
            if known == Some(&rendered) {
                continue;
            }
            if let Placement::Class(class) = rendered.placement {
                self.ensure_class(class, &mut class_ops);
            }
            let applied = self.applied.remove(frontend).unwrap_or_default();
            let before = frontend_ops.len();
            update_frontend(&mut frontend_ops, frontend, &rendered, &applied);
            if frontend_ops.len() > before {
                frontend_groups.push(frontend_ops.len());
            }
            let now = Applied::written(rendered);
            self.count_users(&applied, &now);
            self.applied.insert(*frontend, now);
        }
        // New classes and hairpin addresses first (harmless before anything uses them), then
        // the frontends, then what nothing uses any more.
        if !self.services_current {
            self.write_services(&mut class_ops);
        }
        if !class_ops.is_empty() {
            plan.ops.extend(class_ops);
            plan.groups.push(plan.ops.len());
        }
        let touched = std::mem::take(&mut self.hairpin_touched);
        let wanted = |(address, in_table): (&IpAddr, &bool)| {
            (self.backend_refs.has_address(*address) != *in_table).then_some(*address)
        };
        let (added, gone): (Vec<IpAddr>, Vec<IpAddr>) =
            touched.iter().filter_map(wanted).partition(|a| !touched[a]);
        for address in &added {
            plan.ops.push(Op::AddEntry {
                set: family_sets(Family::of(address)).hairpin.into(),
                key: ElementKey::Hairpin(*address),
                endpoint: None,
            });
        }
        if !added.is_empty() {
            plan.groups.push(plan.ops.len());
        }
        let offset = plan.ops.len();
        plan.groups.extend(frontend_groups.into_iter().map(|end| offset + end));
        plan.ops.append(&mut frontend_ops);
        for address in &gone {
            plan.ops.push(Op::DeleteElement {
                set: family_sets(Family::of(address)).hairpin.into(),
                key: ElementKey::Hairpin(*address),
            });
        }
        if !gone.is_empty() {
            plan.groups.push(plan.ops.len());
        }
        let before = plan.ops.len();
        self.remove_unused_classes(&mut plan.ops);
        self.remove_legacy(&mut plan.ops);
        if plan.ops.len() > before {
            plan.groups.push(plan.ops.len());
        }
        plan
    }

    /// Writes `class`'s set and chain when the table lacks them (or holds other rules); the
    /// `services` rules are rewritten at the end of the plan.
    fn ensure_class(&mut self, class: Class, ops: &mut Vec<Op>) {
        if self.classes.contains(&class) {
            return;
        }
        let (set, chain) = (class.set(), class.chain());
        ops.push(Op::AddSet { name: set.clone(), kind: SetKind::Frontends(class.family) });
        ops.push(Op::AddChain { name: chain.clone(), base: None });
        ops.push(Op::FlushChain { name: chain.clone() });
        for (index, stmts) in class.rules().into_iter().enumerate() {
            let comment = (index == 0).then(|| class.fingerprint());
            ops.push(Op::AddRule { chain: chain.clone(), stmts, comment });
        }
        self.stray_class_sets.remove(&set);
        self.stray_class_chains.remove(&chain);
        self.classes.insert(class);
        self.services_current = false;
    }

    /// The comments of the `services` rules: the class each dispatches to.
    fn services_comments(&self) -> Vec<String> {
        self.classes.iter().map(Class::chain).collect()
    }

    /// Rewrites `services`: one rule per class, in one batch (flush, then add).
    fn write_services(&mut self, ops: &mut Vec<Op>) {
        ops.push(Op::FlushChain { name: SERVICES.into() });
        for class in &self.classes {
            ops.push(Op::AddRule {
                chain: SERVICES.into(),
                stmts: vec![
                    Stmt::FrontendInSet { set: class.set(), family: class.family },
                    Stmt::Verdict(Verdict::Goto(class.chain())),
                ],
                comment: Some(class.chain()),
            });
        }
        self.services_current = true;
    }

    /// Removes the classes no frontend uses beyond [`MAX_UNUSED_CLASSES`] (all of them when
    /// no frontend is left) and the stray class objects: the `services` rules first, then the
    /// chains, then the sets.
    fn remove_unused_classes(&mut self, ops: &mut Vec<Op>) {
        let mut unused: Vec<Class> = self
            .classes
            .iter()
            .filter(|class| self.class_users.get(class).is_none_or(|n| *n == 0))
            .copied()
            .collect();
        let keep = if self.applied.is_empty() { 0 } else { MAX_UNUSED_CLASSES };
        unused.truncate(unused.len().saturating_sub(keep));
        let mut chains = std::mem::take(&mut self.stray_class_chains);
        let mut sets = std::mem::take(&mut self.stray_class_sets);
        for class in &unused {
            self.classes.remove(class);
            self.class_users.remove(class);
            chains.insert(class.chain());
            sets.insert(class.set());
        }
        if !unused.is_empty() {
            self.write_services(ops);
        }
        ops.extend(chains.iter().map(|name| Op::FlushChain { name: name.clone() }));
        ops.extend(chains.into_iter().map(|name| Op::DeleteChain { name }));
        ops.extend(sets.into_iter().map(|name| Op::DeleteSet { name }));
    }

    /// Removes the objects of an earlier table shape: the verdict maps first (their elements
    /// lead to the chains), then the chains' rules (they use the other sets), then the rest.
    fn remove_legacy(&mut self, ops: &mut Vec<Op>) {
        let sets = std::mem::take(&mut self.legacy_sets);
        let chains = std::mem::take(&mut self.legacy_chains);
        let (maps, others): (Vec<String>, Vec<String>) =
            sets.into_iter().partition(|s| LEGACY_VERDICT_MAPS.contains(&s.as_str()));
        ops.extend(maps.into_iter().map(|name| Op::DeleteSet { name }));
        ops.extend(chains.iter().map(|name| Op::FlushChain { name: name.clone() }));
        ops.extend(chains.into_iter().map(|name| Op::DeleteChain { name }));
        ops.extend(others.into_iter().map(|name| Op::DeleteSet { name }));
    }

    fn count_users(&mut self, before: &Applied, after: &Applied) {
        // An address whose first endpoint comes was not in `hairpin-endpoints`; one whose
        // last endpoint leaves was (unless a change earlier since the last plan says else).
        for endpoint in after.known_endpoints() {
            if self.backend_refs.add(endpoint) {
                self.hairpin_touched.entry(endpoint.ip()).or_insert(false);
            }
        }
        for endpoint in before.known_endpoints() {
            if self.backend_refs.remove(endpoint) {
                self.hairpin_touched.entry(endpoint.ip()).or_insert(true);
            }
        }
        for class in after.classes() {
            *self.class_users.entry(class).or_default() += 1;
        }
        for class in before.classes() {
            if let Some(count) = self.class_users.get_mut(&class) {
                *count = count.saturating_sub(1);
            }
        }
    }
}

fn remove_frontend(ops: &mut Vec<Op>, frontend: &Frontend, applied: &Applied) {
    let (key, sets) = (element_key(frontend), family_sets(family_of(frontend)));
    for set in applied.placements() {
        ops.push(Op::DeleteElement { set, key });
    }
    for index in applied.endpoints().keys() {
        ops.push(Op::DeleteElement {
            set: sets.endpoints.into(),
            key: endpoint_key(frontend, *index),
        });
    }
    for endpoint in &applied.affinity_endpoints() {
        ops.push(Op::DeleteElement {
            set: sets.affinity_endpoints.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
        });
    }
}

/// Appends the ops that turn `applied` into `rendered` (none when nothing differs).
fn update_frontend(ops: &mut Vec<Op>, frontend: &Frontend, rendered: &Rendered, applied: &Applied) {
    let (key, sets) = (element_key(frontend), family_sets(family_of(frontend)));
    let wanted = rendered.placement.set();
    let placements = applied.placements();
    // 1. Placements that send traffic elsewhere go.
    for set in &placements {
        if *set != wanted {
            ops.push(Op::DeleteElement { set: set.clone(), key });
        }
    }
    // 2. Endpoints, by index: a changed one is deleted and added again (in the same batch).
    let wanted_endpoints = rendered.endpoints();
    let applied_endpoints = applied.endpoints();
    for (index, endpoint) in &applied_endpoints {
        if wanted_endpoints.get(index) != endpoint.as_ref() {
            ops.push(Op::DeleteElement {
                set: sets.endpoints.into(),
                key: endpoint_key(frontend, *index),
            });
        }
    }
    for (index, endpoint) in &wanted_endpoints {
        if applied_endpoints.get(index) != Some(&Some(*endpoint)) {
            ops.push(Op::AddEntry {
                set: sets.endpoints.into(),
                key: endpoint_key(frontend, *index),
                endpoint: Some(*endpoint),
            });
        }
    }
    let wanted_valid = rendered.affinity_endpoints();
    let applied_valid = applied.affinity_endpoints();
    for endpoint in applied_valid.difference(&wanted_valid) {
        ops.push(Op::DeleteElement {
            set: sets.affinity_endpoints.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
        });
    }
    for endpoint in wanted_valid.difference(&applied_valid) {
        ops.push(Op::AddEntry {
            set: sets.affinity_endpoints.into(),
            key: frontend_endpoint_key(frontend, *endpoint),
            endpoint: None,
        });
    }
    // 3. The element that sends traffic to the class (or refuses it).
    if !placements.contains(&wanted) {
        ops.push(Op::AddSetElement { set: wanted, key });
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
        /// Elements of verdict maps.
        elements: BTreeMap<(String, ElementKey), Verdict>,
        /// Elements of plain sets (`None`) and of maps to endpoints.
        entries: BTreeMap<(String, ElementKey), Option<SocketAddr>>,
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
                            | Stmt::FrontendInSet { set: s, .. }
                            | Stmt::HairpinInSet { set: s, .. } => refs.push(s.clone()),
                            Stmt::DnatEndpoint { endpoints, remember, .. } => {
                                refs.push(endpoints.clone());
                                refs.extend(remember.iter().map(|r| r.map.clone()));
                            }
                            Stmt::DnatRemembered { remember, valid, .. }
                            | Stmt::ForgetRemembered { remember, valid, .. } => {
                                refs.extend([remember.map.clone(), valid.clone()])
                            }
                            _ => {}
                        }
                    }
                }
            }
            refs
        }

        fn has(&self, set: &str, key: &ElementKey) -> bool {
            let k = (set.to_string(), *key);
            self.elements.contains_key(&k) || self.entries.contains_key(&k)
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
                        self.elements.retain(|(set, _), _| set != name);
                        self.entries.retain(|(set, _), _| set != name);
                    }
                    Op::AddElement { set, key, verdict } => {
                        assert!(self.sets.contains(set), "element in missing {set}");
                        if let Verdict::Goto(c) = verdict {
                            assert!(self.chains.contains_key(c), "element to missing {c}");
                        }
                        assert!(!self.has(set, key), "element {key:?} exists in {set}");
                        self.elements.insert((set.clone(), *key), verdict.clone());
                    }
                    Op::AddEntry { set, key, endpoint } => {
                        assert!(self.sets.contains(set), "element in missing {set}");
                        assert!(!self.has(set, key), "element {key:?} exists in {set}");
                        self.entries.insert((set.clone(), *key), *endpoint);
                    }
                    Op::AddSetElement { set, key } => {
                        assert!(self.sets.contains(set), "element in missing {set}");
                        assert!(!self.has(set, key), "element {key:?} exists in {set}");
                        self.entries.insert((set.clone(), *key), None);
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

        /// What the backend reads back from the kernel (see `NftDataplane::read_table`).
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
                services_rules: self.chains.get(SERVICES).map_or(0, Vec::len),
                frontends: self
                    .entries
                    .keys()
                    .filter(|(set, _)| is_frontend_set(set))
                    .cloned()
                    .collect(),
                entries: self
                    .entries
                    .iter()
                    .filter(|((set, _), _)| is_entry_set(set))
                    .map(|((_, key), e)| (*key, *e))
                    .collect(),
            }
        }

        /// The endpoints of a frontend, by index.
        fn endpoints(&self, fe: &Frontend) -> Vec<SocketAddr> {
            let set = family_sets(family_of(fe)).endpoints;
            (0..)
                .map_while(|i| self.entries.get(&(set.into(), endpoint_key(fe, i))))
                .map(|e| e.expect("an endpoint value"))
                .collect()
        }

        /// The elements of the hairpin sets, checking each is in its family's.
        fn hairpin(&self) -> BTreeSet<IpAddr> {
            self.entries
                .keys()
                .filter_map(|(set, k)| match k {
                    ElementKey::Hairpin(a) => {
                        assert_eq!(set, family_sets(Family::of(a)).hairpin);
                        Some(*a)
                    }
                    _ => None,
                })
                .collect()
        }

        /// The chain a frontend's packets go to: its class's, through the class's set and
        /// the `services` rule that matches it.
        fn class_chain(&self, fe: &Frontend) -> &[Rule] {
            let key = element_key(fe);
            let (set, _) = self
                .entries
                .keys()
                .find(|(set, k)| *k == key && set.ends_with(CLASS_SET_SUFFIX))
                .unwrap_or_else(|| panic!("{fe:?} is in no class set"));
            let rule = self.chains[SERVICES]
                .iter()
                .find(|(stmts, _)| {
                    stmts[0] == Stmt::FrontendInSet { set: set.clone(), family: family_of(fe) }
                })
                .unwrap_or_else(|| panic!("no services rule matches {set}"));
            let Stmt::Verdict(Verdict::Goto(chain)) = &rule.0[1] else {
                panic!("{rule:?} goes to no chain");
            };
            &self.chains[chain]
        }

        fn class_chains(&self) -> BTreeSet<String> {
            self.chains.keys().filter(|c| c.starts_with(CLASS_PREFIX)).cloned().collect()
        }
    }

    fn table() -> FakeTable {
        let mut table = FakeTable::default();
        table.execute(&skeleton());
        table
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn dnat(count: u32, remember: Option<Remember>) -> Vec<Stmt> {
        dnat_in(Family::V4, count, remember)
    }

    fn dnat_in(family: Family, count: u32, remember: Option<Remember>) -> Vec<Stmt> {
        let endpoints = family_sets(family).endpoints.into();
        vec![Stmt::DnatEndpoint { endpoints, count, remember, family }]
    }

    #[test]
    fn the_skeleton_is_kube_proxys_shape_and_idempotent() {
        let mut table = table();
        table.execute(&skeleton());
        for chain in ["nat-prerouting", "nat-output", "nat-postrouting", "filter-output"] {
            assert_eq!(table.chains[chain].len(), 1, "{chain}");
        }
        assert_eq!(table.chains[SERVICES].len(), 0);
        // Reject and drop, for each family; six shared sets for each.
        assert_eq!(table.chains[ENDPOINTS_CHECK].len(), 4);
        assert_eq!(table.sets.len(), 12);
    }

    #[test]
    fn a_service_gets_a_class_number_whose_chain_dnats_to_an_endpoint_of_the_shared_map() {
        let mut table = table();
        let mut planner = Planner::new();
        let plan = planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        table.execute(&plan.ops);
        let fe = frontend("10.96.0.1", 80);
        let chain = table.class_chain(&fe);
        assert_eq!(chain.last().unwrap().0, dnat(2, None));
        assert_eq!(table.class_chains(), ["class-2".to_string()].into());
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
    fn services_of_one_shape_share_a_class_and_a_change_writes_elements_only() {
        let mut table = table();
        let mut planner = Planner::new();
        let ips: Vec<String> =
            (0..500).map(|i| format!("10.96.{}.{}", i / 250, i % 250 + 1)).collect();
        let entries: Vec<(&str, u16, &[&str])> =
            ips.iter().map(|ip| (ip.as_str(), 80, &["10.0.0.1:8080"][..])).collect();
        table.execute(&planner.plan(&state(&entries)).ops);
        assert_eq!(table.class_chains(), ["class-1".to_string()].into());

        // One service gets a second endpoint: a new class (once), then elements.
        let mut changed = entries.clone();
        changed[100].2 = &["10.0.0.1:8080", "10.0.0.2:8080"];
        let plan = planner.plan(&state(&changed));
        table.execute(&plan.ops);
        assert_eq!(table.class_chains(), ["class-1".to_string(), "class-2".to_string()].into());
        // Another service gets a second endpoint: the class exists, so no rule (nothing that
        // makes the kernel validate the table), only set elements.
        changed[200].2 = &["10.0.0.1:8080", "10.0.0.3:8080"];
        let plan = planner.plan_changed(&state(&changed), &[frontend(&ips[200], 80)]);
        table.execute(&plan.ops);
        for op in &plan.ops {
            assert!(
                matches!(
                    op,
                    Op::AddSetElement { .. } | Op::AddEntry { .. } | Op::DeleteElement { .. }
                ),
                "{op:?}"
            );
        }
        // The hairpin address, the endpoint, the frontend moved from one class set to the
        // other (delete, add).
        assert_eq!(plan.ops.len(), 4, "{:#?}", plan.ops);
        let fe = frontend(&ips[200], 80);
        assert_eq!(table.endpoints(&fe), [sa("10.0.0.1:8080"), sa("10.0.0.3:8080")]);
        assert_eq!(table.class_chain(&fe).last().unwrap().0, dnat(2, None));

        // The same count with another endpoint: two elements, nothing else.
        changed[200].2 = &["10.0.0.1:8080", "10.0.0.4:8080"];
        let plan = planner.plan_changed(&state(&changed), &[fe]);
        table.execute(&plan.ops);
        let endpoint_ops = plan
            .ops
            .iter()
            .filter(|op| {
                matches!(op, Op::AddEntry { set, .. } | Op::DeleteElement { set, .. }
                    if set == SERVICE_ENDPOINTS)
            })
            .count();
        assert_eq!(endpoint_ops, 2, "{:#?}", plan.ops);
        assert!(
            !plan.ops.iter().any(|op| matches!(op, Op::AddRule { .. } | Op::AddSetElement { .. }))
        );
        assert!(!table.hairpin().contains(&"10.0.0.3".parse().unwrap()));
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
        assert!(table.chains[SERVICES].is_empty());
        assert_eq!(planner.frontends(), 0);
    }

    #[test]
    fn classes_nothing_uses_are_kept_for_reuse_up_to_a_bound() {
        let mut table = table();
        let mut planner = Planner::new();
        let fe = frontend("10.96.0.1", 80);
        let endpoints: Vec<String> = (1..=40).map(|i| format!("10.0.0.{i}:80")).collect();
        let with = |n: usize| {
            let list: Vec<&str> = endpoints[..n].iter().map(String::as_str).collect();
            state(&[("10.96.0.1", 80, &list)])
        };
        table.execute(&planner.plan(&with(1)).ops);
        table.execute(&planner.plan_changed(&with(2), &[fe]).ops);
        // Back to one endpoint: class-1 is kept and reused, nothing but elements is written.
        let plan = planner.plan_changed(&with(1), &[fe]);
        assert!(!plan.ops.iter().any(|op| matches!(op, Op::AddRule { .. })), "{plan:#?}");
        table.execute(&plan.ops);
        assert_eq!(table.class_chains().len(), 2);
        // Scaling through 40 shapes keeps at most MAX_UNUSED_CLASSES unused ones.
        for n in 3..=40 {
            table.execute(&planner.plan_changed(&with(n), &[fe]).ops);
        }
        assert_eq!(table.class_chains().len(), MAX_UNUSED_CLASSES + 1);
        assert_eq!(table.chains[SERVICES].len(), MAX_UNUSED_CLASSES + 1);
        assert_eq!(planner.plan(&with(40)), Plan::default());
        // No frontend left: every class goes.
        table.execute(&planner.plan(&ServiceState::default()).ops);
        assert!(table.class_chains().is_empty());
    }

    #[test]
    fn no_endpoints_rejects_and_local_policy_without_local_endpoints_drops() {
        let mut table = table();
        let mut planner = Planner::new();
        let mut desired = state(&[("10.96.0.1", 80, &[]), ("10.96.0.2", 80, &[])]);
        desired.frontends.get_mut(&frontend("10.96.0.2", 80)).unwrap().when_empty = WhenEmpty::Drop;
        table.execute(&planner.plan(&desired).ops);
        let key = |ip| element_key(&frontend(ip, 80));
        assert!(table.has(NO_ENDPOINT_REJECT, &key("10.96.0.1")));
        assert!(table.has(NO_ENDPOINT_DROP, &key("10.96.0.2")));
        assert!(table.class_chains().is_empty());
        // Endpoints appear: the reject element goes, the class element comes.
        table.execute(&planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:80"])])).ops);
        assert!(!table.has(NO_ENDPOINT_REJECT, &key("10.96.0.1")));
        assert!(!table.has(NO_ENDPOINT_DROP, &key("10.96.0.2")));
        assert!(table.has("class-1-frontends", &key("10.96.0.1")));
    }

    #[test]
    fn affinity_remembers_in_a_shared_map_and_external_cluster_traffic_is_masqueraded() {
        for (vip, endpoints, suffix) in [
            ("10.0.9.9", ["10.0.0.1:8080", "10.0.0.2:8080"], ""),
            ("fd00:9::9", ["[fd00::1]:8080", "[fd00::2]:8080"], "-v6"),
        ] {
            let mut table = table();
            let mut planner = Planner::new();
            let mut desired = state(&[(vip, 30080, &endpoints)]);
            let fe = frontend(vip, 30080);
            let (family, sets) = (family_of(&fe), family_sets(family_of(&fe)));
            {
                let f = desired.frontends.get_mut(&fe).unwrap();
                f.kind = FrontendKind::NodePort;
                f.affinity_timeout = Some(60);
            }
            table.execute(&planner.plan(&desired).ops);
            let chain = table.class_chain(&fe).to_vec();
            let class = format!("class-2-masq-affinity-60{suffix}");
            assert_eq!(table.class_chains(), [class].into());
            assert_eq!(chain[1].0, [Stmt::MarkSet(MASQUERADE_MARK)]);
            let remember = Remember { map: sets.affinity.into(), timeout_seconds: 60 };
            let valid = sets.affinity_endpoints.to_string();
            assert_eq!(
                chain[2].0,
                [Stmt::ForgetRemembered {
                    remember: remember.clone(),
                    valid: valid.clone(),
                    family
                }]
            );
            assert_eq!(
                chain[3].0,
                [Stmt::DnatRemembered { remember: remember.clone(), valid, family }]
            );
            assert_eq!(chain[4].0, dnat_in(family, 2, Some(remember)));
            let valid = |t: &FakeTable| {
                t.entries.keys().filter(|(set, _)| set == sets.affinity_endpoints).count()
            };
            assert_eq!(valid(&table), 2);
            // An endpoint goes: a client remembered with it is no longer sent there.
            desired.frontends.get_mut(&fe).unwrap().backends = vec![sa(endpoints[0])];
            table.execute(&planner.plan(&desired).ops);
            assert_eq!(valid(&table), 1);
            // Affinity off: no affinity rule nor elements.
            desired.frontends.get_mut(&fe).unwrap().affinity_timeout = None;
            table.execute(&planner.plan(&desired).ops);
            assert_eq!(valid(&table), 0);
            assert_eq!(table.class_chain(&fe).len(), 3);
            // Hairpin traffic of the family is masqueraded.
            let hairpin = Stmt::HairpinInSet { set: sets.hairpin.into(), family };
            assert!(table.chains[MASQUERADING].iter().any(|(stmts, _)| stmts[0] == hairpin));
        }
    }

    #[test]
    fn class_names_parse_back() {
        for family in FAMILIES {
            for class in [
                Class { family, count: 3, masquerade: false, affinity: None },
                Class { family, count: 1, masquerade: true, affinity: None },
                Class { family, count: 12, masquerade: false, affinity: Some(10800) },
                Class { family, count: 2, masquerade: true, affinity: Some(60) },
            ] {
                assert_eq!(Class::parse(&class.chain()), Some(class), "{}", class.chain());
            }
        }
        assert_eq!(
            Class::parse("class-2-masq-affinity-60-v6"),
            Some(Class { family: Family::V6, count: 2, masquerade: true, affinity: Some(60) })
        );
        for bad in [
            "class-0",
            "class-x",
            "class-3-",
            "class-3-affinity-",
            "class-3-masq-masq",
            "class-3-v6-v6",
            "class-v6",
            "class-3-v6-masq",
        ] {
            assert_eq!(Class::parse(bad), None, "{bad}");
        }
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

        // Damage: one class's rules and an endpoint are gone, a stray service is left over.
        let fe2 = frontend("10.96.0.2", 80);
        live.execute(&[
            Op::FlushChain { name: "class-1".into() },
            Op::DeleteElement { set: SERVICE_ENDPOINTS.into(), key: endpoint_key(&fe2, 0) },
        ]);
        let stray = state(&[("10.96.0.9", 80, &["10.0.0.9:80"])]);
        live.execute(
            &Planner::adopt(&live.contents()).plan_changed(&stray, stray.frontends.keys()).ops,
        );
        let mut restarted = Planner::adopt(&live.contents());
        let plan = restarted.plan(&desired);
        live.execute(&plan.ops);
        assert!(
            !plan
                .ops
                .iter()
                .any(|op| matches!(op, Op::AddRule { chain, .. } if chain == "class-2"))
        );
        let mut fresh = table();
        fresh.execute(&Planner::new().plan(&desired).ops);
        assert_eq!(live.contents().chains, fresh.contents().chains);
        assert_eq!(live.entries, fresh.entries);
        assert_eq!(live.chains["class-1"], fresh.chains["class-1"]);
        assert_eq!(restarted.plan(&desired), Plan::default());
    }

    #[test]
    fn a_table_of_the_earlier_shape_is_converted_in_place() {
        let mut live = FakeTable::default();
        let fe = frontend("10.96.0.1", 80);
        let old_chain = "service-10.96.0.1/tcp/80";
        let old_endpoint = "endpoint-10.96.0.1/tcp/80__10.0.0.1/8080";
        let old_set = "affinity-10.96.0.1/tcp/80__10.0.0.1/8080";
        let shard = "service-endpoints-042";
        live.execute(&[
            Op::AddSet { name: "service-ips".into(), kind: SetKind::ServiceMap },
            Op::AddSet { name: shard.into(), kind: SetKind::EndpointMap(Family::V4) },
            Op::AddSet { name: old_set.into(), kind: SetKind::Affinity },
            Op::AddChain { name: old_endpoint.into(), base: None },
            Op::AddRule {
                chain: old_endpoint.into(),
                stmts: vec![Stmt::UpdateSaddr { set: old_set.into(), timeout_seconds: 5 }],
                comment: None,
            },
            Op::AddChain { name: old_chain.into(), base: None },
            Op::AddRule {
                chain: old_chain.into(),
                stmts: vec![Stmt::NumgenVmap { targets: vec![old_endpoint.into()] }],
                comment: Some("weir2:0123456789abcdef".into()),
            },
            Op::AddRule {
                chain: old_chain.into(),
                stmts: vec![Stmt::DnatEndpoint {
                    endpoints: shard.into(),
                    count: 1,
                    remember: None,
                    family: Family::V4,
                }],
                comment: None,
            },
            Op::AddElement {
                set: "service-ips".into(),
                key: element_key(&fe),
                verdict: Verdict::Goto(old_chain.into()),
            },
        ]);
        live.execute(&[Op::AddChain { name: SERVICES.into(), base: None }]);
        live.execute(&[Op::AddRule {
            chain: SERVICES.into(),
            stmts: vec![Stmt::ServiceVmap { map: "service-ips".into() }],
            comment: None,
        }]);
        // The agent writes the new skeleton first.
        live.execute(&skeleton());
        let desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]);
        let mut planner = Planner::adopt(&live.contents());
        live.execute(&planner.plan(&desired).ops);
        let mut fresh = table();
        fresh.execute(&Planner::new().plan(&desired).ops);
        assert_eq!(live.contents().chains, fresh.contents().chains);
        assert_eq!(live.sets, fresh.sets);
        assert_eq!(live.entries, fresh.entries);
        assert_eq!(live.chains[SERVICES], fresh.chains[SERVICES]);
    }

    const V6_SERVICE_SETS: [&str; 3] =
        ["service-endpoints-v6", "affinity-endpoints-v6", "hairpin-endpoints-v6"];

    /// The elements of the IPv6 shared sets and classes.
    fn v6_elements(table: &FakeTable) -> usize {
        table
            .entries
            .keys()
            .filter(|(set, _)| V6_SERVICE_SETS.contains(&set.as_str()) || set.contains("-v6"))
            .count()
    }

    #[test]
    fn ipv6_frontends_render_into_the_ip6_twins_of_the_shared_sets() {
        let mut table = table();
        let mut planner = Planner::new();
        let desired = state(&[("fd00:96::1", 80, &["[fd00::2]:8080", "[fd00::3]:8080"])]);
        let plan = planner.plan(&desired);
        assert_eq!(plan.skipped, 0);
        table.execute(&plan.ops);
        let fe = frontend("fd00:96::1", 80);
        assert_eq!(table.class_chains(), ["class-2-v6".to_string()].into());
        assert!(table.has("class-2-v6-frontends", &element_key(&fe)));
        let chain = table.class_chain(&fe);
        assert_eq!(chain.last().unwrap().0, dnat_in(Family::V6, 2, None));
        assert_eq!(table.endpoints(&fe), [sa("[fd00::2]:8080"), sa("[fd00::3]:8080")]);
        assert_eq!(
            table.hairpin(),
            ["fd00::2".parse().unwrap(), "fd00::3".parse().unwrap()].into()
        );
        // The IPv4 sets hold nothing of it; the `services` rule matches `ip6 daddr`.
        assert!(
            !table
                .entries
                .keys()
                .any(|(set, _)| [SERVICE_ENDPOINTS, HAIRPIN_ENDPOINTS].contains(&set.as_str()))
        );
        assert_eq!(
            table.chains[SERVICES][0].0[0],
            Stmt::FrontendInSet { set: "class-2-v6-frontends".into(), family: Family::V6 }
        );
        assert_eq!(planner.backends(), 2);
        assert_eq!(planner.plan(&desired), Plan::default());
    }

    #[test]
    fn a_dual_stack_service_balances_each_family_to_its_own_endpoints() {
        let mut table = table();
        let mut planner = Planner::new();
        // A state whose frontends list the endpoints of both families (built by hand).
        let endpoints: &[&str] = &["10.0.0.1:8080", "[fd00::1]:8080", "[fd00::2]:8080"];
        let desired = state(&[("10.96.0.1", 80, endpoints), ("fd00:96::1", 80, endpoints)]);
        table.execute(&planner.plan(&desired).ops);
        let (v4, v6) = (frontend("10.96.0.1", 80), frontend("fd00:96::1", 80));
        assert_eq!(table.endpoints(&v4), [sa("10.0.0.1:8080")]);
        assert_eq!(table.endpoints(&v6), [sa("[fd00::1]:8080"), sa("[fd00::2]:8080")]);
        assert_eq!(table.class_chain(&v4).last().unwrap().0, dnat_in(Family::V4, 1, None));
        assert_eq!(table.class_chain(&v6).last().unwrap().0, dnat_in(Family::V6, 2, None));
        // One `services` rule per class, the IPv4 ones first.
        let comments: Vec<_> =
            table.chains[SERVICES].iter().map(|(_, c)| c.clone().unwrap()).collect();
        assert_eq!(comments, ["class-1", "class-2-v6"]);
        assert_eq!(planner.backends(), 3);

        // The IPv6 endpoints go: the IPv6 frontend rejects (the service has no endpoint of
        // its family), the IPv4 one is untouched.
        let only_v4 =
            state(&[("10.96.0.1", 80, &endpoints[..1]), ("fd00:96::1", 80, &endpoints[..1])]);
        let plan = planner.plan(&only_v4);
        assert!(
            plan.ops.iter().all(|op| !matches!(op, Op::AddEntry { set, .. } | Op::DeleteElement { set, .. } if set == SERVICE_ENDPOINTS)),
            "{plan:#?}"
        );
        table.execute(&plan.ops);
        assert!(table.has("no-endpoint-reject-v6", &element_key(&v6)));
        assert!(table.endpoints(&v6).is_empty());
        assert_eq!(table.endpoints(&v4), [sa("10.0.0.1:8080")]);
        assert!(table.hairpin().iter().all(IpAddr::is_ipv4));
    }

    #[test]
    fn an_ipv6_endpoint_change_writes_elements_only_and_removal_leaves_nothing() {
        let mut table = table();
        let empty = table.contents();
        let mut planner = Planner::new();
        let ips: Vec<String> = (1..=20).map(|i| format!("fd00:96::{i:x}")).collect();
        let two: &[&str] = &["[fd00::1]:8080", "[fd00::2]:8080"];
        let entries: Vec<(&str, u16, &[&str])> =
            ips.iter().map(|ip| (ip.as_str(), 80, two)).collect();
        table.execute(&planner.plan(&state(&entries)).ops);
        assert_eq!(table.class_chains(), ["class-2-v6".to_string()].into());

        // One endpoint of one service changes: its endpoint element is replaced, the new
        // address joins the hairpin set; nothing that makes the kernel validate the table.
        let mut changed = entries.clone();
        changed[5].2 = &["[fd00::1]:8080", "[fd00::3]:8080"];
        let fe = frontend(&ips[5], 80);
        let plan = planner.plan_changed(&state(&changed), &[fe]);
        table.execute(&plan.ops);
        assert!(
            plan.ops.iter().all(|op| matches!(op, Op::AddEntry { .. } | Op::DeleteElement { .. })),
            "{plan:#?}"
        );
        // Delete and add the endpoint, add the hairpin address.
        assert_eq!(plan.ops.len(), 3, "{:#?}", plan.ops);
        assert_eq!(table.endpoints(&fe), [sa("[fd00::1]:8080"), sa("[fd00::3]:8080")]);
        assert!(table.hairpin().contains(&"fd00::3".parse::<IpAddr>().unwrap()));

        // An endpoint goes from every service, then every service goes.
        let one: Vec<(&str, u16, &[&str])> =
            ips.iter().map(|ip| (ip.as_str(), 80, &two[..1])).collect();
        table.execute(&planner.plan(&state(&one)).ops);
        assert_eq!(table.endpoints(&fe), [sa("[fd00::1]:8080")]);
        assert_eq!(table.hairpin(), ["fd00::1".parse().unwrap()].into());
        table.execute(&planner.plan(&ServiceState::default()).ops);
        assert_eq!(table.contents().chains, empty.chains);
        assert_eq!(v6_elements(&table), 0);
        assert!(table.entries.is_empty());
        assert_eq!(planner.frontends(), 0);
    }

    #[test]
    fn ipv6_frontends_without_endpoints_reject_or_drop_in_their_own_sets() {
        let mut table = table();
        let mut planner = Planner::new();
        let mut desired = state(&[("fd00:96::1", 80, &[]), ("fd00:96::2", 80, &[])]);
        {
            let dropped = desired.frontends.get_mut(&frontend("fd00:96::2", 80)).unwrap();
            dropped.when_empty = WhenEmpty::Drop;
            dropped.local_traffic_policy = true;
        }
        table.execute(&planner.plan(&desired).ops);
        let key = |ip| element_key(&frontend(ip, 80));
        assert!(table.has("no-endpoint-reject-v6", &key("fd00:96::1")));
        assert!(table.has("no-endpoint-drop-v6", &key("fd00:96::2")));
        assert!(!table.entries.keys().any(|(set, _)| set == NO_ENDPOINT_REJECT));
        // The skeleton checks both families' sets before DNAT.
        let check = &table.chains[ENDPOINTS_CHECK];
        assert!(check.iter().any(|(stmts, _)| stmts[0]
            == Stmt::FrontendInSet { set: "no-endpoint-reject-v6".into(), family: Family::V6 }
            && stmts[1] == Stmt::Verdict(Verdict::Goto(REJECT_CHAIN.into()))));
        assert!(check.iter().any(|(stmts, _)| stmts[0]
            == Stmt::FrontendInSet { set: "no-endpoint-drop-v6".into(), family: Family::V6 }
            && stmts[1] == Stmt::Verdict(Verdict::Drop)));
    }

    #[test]
    fn a_table_written_before_ipv6_gains_its_sets_and_keeps_its_services() {
        // An IPv4-only table of the previous version: its skeleton lacked the IPv6 sets, and
        // its class chains carry fingerprints of rules without a family.
        let desired = state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]),
            ("10.96.0.2", 80, &["10.0.0.3:8080"]),
        ]);
        let mut live = table();
        live.execute(&Planner::new().plan(&desired).ops);
        for set in V6_SERVICE_SETS.iter().chain(&["no-endpoint-reject-v6", "no-endpoint-drop-v6"]) {
            live.sets.remove(*set);
        }
        live.sets.remove("service-affinity-v6");
        for rules in live.chains.values_mut() {
            for (_, comment) in rules.iter_mut() {
                if comment.as_deref().is_some_and(|c| c.starts_with(FINGERPRINT_PREFIX)) {
                    *comment = Some(format!("{FINGERPRINT_PREFIX}0123456789abcdef"));
                }
            }
        }
        // The agent writes the skeleton, adopts, plans.
        live.execute(&skeleton());
        let mut planner = Planner::adopt(&live.contents());
        assert_eq!(planner.frontends(), 2);
        let plan = planner.plan(&desired);
        // The class chains are rewritten once; no frontend element is.
        assert!(
            !plan.ops.iter().any(|op| matches!(op, Op::AddEntry { .. } | Op::AddSetElement { .. })),
            "{plan:#?}"
        );
        live.execute(&plan.ops);
        let mut fresh = table();
        fresh.execute(&Planner::new().plan(&desired).ops);
        assert_eq!(live.sets, fresh.sets);
        assert_eq!(live.chains, fresh.chains);
        assert_eq!(live.entries, fresh.entries);
        assert_eq!(Planner::adopt(&live.contents()).plan(&desired), Plan::default());
        // IPv6 services can be added now.
        let dual =
            state(&[("10.96.0.1", 80, &["10.0.0.1:8080"]), ("fd00:96::1", 80, &["[fd00::1]:80"])]);
        live.execute(&planner.plan(&dual).ops);
        assert_eq!(live.endpoints(&frontend("fd00:96::1", 80)), [sa("[fd00::1]:80")]);
    }

    #[test]
    fn an_adopting_planner_reads_ipv6_frontends_back() {
        let desired = state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "[fd00::1]:8080"]),
            ("fd00:96::1", 80, &["10.0.0.1:8080", "[fd00::1]:8080", "[fd00::2]:8080"]),
            ("fd00:96::2", 80, &[]),
        ]);
        let mut live = table();
        live.execute(&Planner::new().plan(&desired).ops);
        let mut restarted = Planner::adopt(&live.contents());
        assert_eq!((restarted.frontends(), restarted.backends()), (3, 3));
        assert_eq!(restarted.plan(&desired), Plan::default(), "a restart writes nothing");
    }

    #[test]
    fn endpoint_refs_track_addresses_across_ports_and_families() {
        let mut refs = EndpointRefs::default();
        assert!(refs.add(sa("10.0.0.1:80")), "first endpoint of its address");
        assert!(!refs.add(sa("10.0.0.1:443")), "second port of the same address");
        assert!(!refs.add(sa("10.0.0.1:80")), "the same endpoint again");
        assert!(refs.add(sa("[fd00::1]:80")));
        assert!(refs.add(sa("10.0.0.2:80")));
        assert_eq!(refs.len(), 4);
        assert_eq!(
            refs.addresses().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.2", "fd00::1"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert!(!refs.remove(sa("10.0.0.1:80")));
        assert!(!refs.remove(sa("10.0.0.1:80")), "port 443 is left");
        assert!(refs.has_address("10.0.0.1".parse().unwrap()));
        assert!(refs.remove(sa("10.0.0.1:443")), "the address's last endpoint");
        assert!(!refs.has_address("10.0.0.1".parse().unwrap()));
        assert!(!refs.remove(sa("10.0.0.1:443")), "not counted any more");
        assert!(refs.remove(sa("[fd00::1]:80")));
        assert_eq!(refs.len(), 1);
    }

    #[test]
    fn legacy_object_names_are_recognised() {
        assert!(is_legacy_chain("service-10.96.0.1/tcp/80"));
        assert!(is_legacy_chain("endpoint-10.96.0.1/tcp/80__10.0.0.1/8080"));
        assert!(!is_legacy_chain("service-endpoints-check"));
        assert!(!is_legacy_chain("class-3"));
        assert!(is_legacy_set("service-endpoints-255"));
        assert!(is_legacy_set("service-ips"));
        assert!(!is_legacy_set(SERVICE_ENDPOINTS));
        assert!(!is_legacy_set(SERVICE_AFFINITY));
    }

    /// `state` made dual-stack: every frontend gets an IPv6 twin (`10.96.a.b` ->
    /// `fd00:96::a:b`), every endpoint one too (`10.0.0.x` -> `fd00::x`), and every frontend
    /// the endpoints of both families (a mixed state, which the planner must sort out).
    fn dual_stack(state: &ServiceState, changed: &[Frontend]) -> (ServiceState, Vec<Frontend>) {
        let twin = |address: IpAddr| -> IpAddr {
            let IpAddr::V4(v4) = address else { return address };
            let [_, _, a, b] = v4.octets();
            std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, u16::from(a), u16::from(b)).into()
        };
        let twin_frontend = |f: &Frontend| Frontend { address: twin(f.address), ..*f };
        let mut out = ServiceState::default();
        for (frontend, fs) in &state.frontends {
            let mut fs = fs.clone();
            let twins: Vec<SocketAddr> =
                fs.backends.iter().map(|b| SocketAddr::new(twin(b.ip()), b.port())).collect();
            fs.backends.extend(twins);
            out.frontends.insert(twin_frontend(frontend), fs.clone());
            out.frontends.insert(*frontend, fs);
        }
        let changed = changed.iter().flat_map(|f| [*f, twin_frontend(f)]).collect();
        (out, changed)
    }

    #[test]
    fn random_incremental_changes_end_in_the_state_a_full_plan_gives() {
        for (seed, dual) in (1..=25u64).map(|s| (s, s % 2 == 0)) {
            let (mut planner, mut table) = (Planner::new(), table());
            let sequence = crate::model::random::sequence(seed, 120);
            let sequence: Vec<(ServiceState, Vec<Frontend>)> = if dual {
                sequence.iter().map(|(s, c)| dual_stack(s, c)).collect()
            } else {
                sequence
            };
            for (step, (desired, changed)) in sequence.iter().enumerate() {
                table.execute(&planner.plan_changed(desired, changed).ops);
                // Now and then: the planner and the table both hold exactly the desired state.
                if step % 20 == 19 {
                    assert_eq!(planner.plan(desired).ops, [], "seed {seed} step {step}");
                    let distinct: BTreeSet<SocketAddr> =
                        table.entries.values().flatten().copied().collect();
                    assert_eq!(planner.backends(), distinct.len(), "seed {seed} step {step}");
                    let adopted = Planner::adopt(&table.contents()).plan(desired);
                    assert_eq!(adopted.ops, [], "seed {seed} step {step}");
                    let mut fresh = super::tests::table();
                    fresh.execute(&Planner::new().plan(desired).ops);
                    assert_eq!(table.entries, fresh.entries, "seed {seed} step {step}");
                }
            }
        }
    }
}
