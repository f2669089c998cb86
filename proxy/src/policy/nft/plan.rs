//! The pure part of the nftables policy backend: the table's fixed skeleton, the desired set
//! elements of a compiled policy, and the ops that turn one desired state into another.
//!
//! Table `inet <name>` (default `weir_policy`):
//! ```text
//! chain forward { type filter hook forward priority 0; policy accept;
//!     ct state established,related accept
//!     jump egress                      # the source's egress (pod -> anything)
//!     jump ingress }                   # the destination's ingress
//! chain input { type filter hook input priority 0; policy accept;
//!     ct state established,related accept
//!     jump egress }                    # pod -> this node; output (node -> pod) is not filtered
//! chain ingress {
//!     icmpv6 type 130-137 return       # neighbour and multicast listener discovery
//!     icmpv6 type 143 return
//!     ip daddr . meta l4proto . th dport . ip saddr @ingress-allow log group 2917 prefix "allow-ingress" return
//!     ip6 daddr . meta l4proto . th dport . ip6 saddr @ingress-allow6 log ... return
//!     ip daddr vmap @ingress-endpoints # known pod: return, isolated: goto drop-ingress-<policy>
//!     ip6 daddr vmap @ingress-endpoints6
//!     ip daddr @unknown-pods log group 2917 prefix "not-ready-ingress" goto drop-unknown
//!     ip6 daddr @unknown-pods6 log ... goto drop-unknown }
//! chain egress { the same with saddr and daddr swapped, @egress-allow(6), @egress-endpoints(6) }
//! chain drop-<direction>-<ns>/<policy> {
//!     counter name "drop-<direction>-<ns>/<policy>" log group 2917 prefix "<the chain's name>" drop }
//! chain drop-unknown { counter name "drop-unknown" drop }
//! ```
//! `*-allow` hold (endpoint . protocol range . port range . peer address range) tuples of the
//! isolated endpoints, disjoint (the kernel's pipapo sets refuse overlapping elements), one
//! tuple per box of the union of the endpoint's allow entries; `*-endpoints` map every local
//! pod address to `return` (not isolated in that direction) or to the drop chain of its first
//! isolating policy; `unknown-pods` holds the node's pod ranges minus its known pods while
//! `deny_unknown` is set, and is empty otherwise. The sets ending in `6` hold the IPv6
//! addresses, the others the IPv4 ones. The `log` statements feed `weir flows`
//! ([`super::nflog`], [`FLOW_LOG_GROUP`]).
//!
//! The boxes are computed for both families at once: peer addresses lie on one line of u128,
//! IPv6 as is and IPv4 mapped (`::ffff:a.b.c.d`, as in the eBPF maps), and IPv6 ranges leave
//! the mapped range out, so an IPv6 ipBlock such as `::/0` never admits an IPv4 peer. An
//! endpoint's tuples take the part of each box in its own family.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use weir_policy::{Allow, Compiled, Direction, DirectionPolicy, IpBlock, PeerMatch, PolicyRef};

use crate::{
    apply::nft::{
        ops::{
            AddrField, BaseChain, ElementKey, Family, MAX_LOG_PREFIX, Op, PolicyTuple, SetKind,
            Stmt, Verdict,
        },
        plan::{FixedChain, fixed_chains},
    },
    policy::PolicyNode,
};

pub const INGRESS_ALLOW: &str = "ingress-allow";
pub const EGRESS_ALLOW: &str = "egress-allow";
pub const INGRESS_ENDPOINTS: &str = "ingress-endpoints";
pub const EGRESS_ENDPOINTS: &str = "egress-endpoints";
pub const UNKNOWN_PODS: &str = "unknown-pods";
pub const INGRESS_ALLOW6: &str = "ingress-allow6";
pub const EGRESS_ALLOW6: &str = "egress-allow6";
pub const INGRESS_ENDPOINTS6: &str = "ingress-endpoints6";
pub const EGRESS_ENDPOINTS6: &str = "egress-endpoints6";
pub const UNKNOWN_PODS6: &str = "unknown-pods6";
/// Every set of the table.
pub const SETS: [&str; 10] = [
    INGRESS_ALLOW,
    EGRESS_ALLOW,
    INGRESS_ENDPOINTS,
    EGRESS_ENDPOINTS,
    UNKNOWN_PODS,
    INGRESS_ALLOW6,
    EGRESS_ALLOW6,
    INGRESS_ENDPOINTS6,
    EGRESS_ENDPOINTS6,
    UNKNOWN_PODS6,
];
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
/// Chain and counter of drops of pods the policy does not know yet.
pub const DROP_UNKNOWN: &str = "drop-unknown";
const DROP_PREFIX: &str = "drop-";
const INGRESS: &str = "ingress";
const EGRESS: &str = "egress";

// Netfilter hooks and the filter priority.
const INPUT: u32 = 1;
const FORWARD: u32 = 2;
const FILTER_PRIORITY: i32 = 0;
/// nftables object names are at most this long.
const MAX_NAME: usize = 255;

/// The allow set, the endpoint map and the endpoint's address field of one direction and
/// family.
pub(super) fn sets(
    direction: Direction,
    family: Family,
) -> (&'static str, &'static str, AddrField) {
    match (direction, family) {
        (Direction::Ingress, Family::V4) => (INGRESS_ALLOW, INGRESS_ENDPOINTS, AddrField::Daddr),
        (Direction::Egress, Family::V4) => (EGRESS_ALLOW, EGRESS_ENDPOINTS, AddrField::Saddr),
        (Direction::Ingress, Family::V6) => (INGRESS_ALLOW6, INGRESS_ENDPOINTS6, AddrField::Daddr),
        (Direction::Egress, Family::V6) => (EGRESS_ALLOW6, EGRESS_ENDPOINTS6, AddrField::Saddr),
    }
}

/// The unknown-pods set of a family.
pub(super) fn unknown_set(family: Family) -> &'static str {
    match family {
        Family::V4 => UNKNOWN_PODS,
        Family::V6 => UNKNOWN_PODS6,
    }
}

pub(super) const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

/// The chain (and counter) that drops what `policy` isolates in `direction`:
/// `drop-<direction>-<ns>/<name>`, shortened with a hash when longer than nftables allows.
pub fn drop_chain(policy: &PolicyRef, direction: Direction) -> String {
    shorten(format!("{DROP_PREFIX}{direction}-{policy}"), MAX_NAME)
}

/// `name` if it has at most `max` bytes, else its start and a hash of the whole, `max` bytes.
fn shorten(name: String, max: usize) -> String {
    if name.len() <= max {
        return name;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut cut = max - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &name[..cut])
}

/// The nfnetlink_log group the table logs its decisions to (`weir flows` on nftables): the
/// packets dropped by a policy or as not ready, and the first packet of every flow an allow
/// tuple admits. Nothing is logged while no process listens on the group.
pub const FLOW_LOG_GROUP: u16 = 2917;
/// Log prefix of a packet admitted by an allow tuple of a direction: `allow-<direction>`.
pub const LOG_ALLOW_PREFIX: &str = "allow-";
/// Log prefix of a packet dropped as not ready (a pod the policy does not know yet):
/// `not-ready-<direction>`.
pub const LOG_NOT_READY_PREFIX: &str = "not-ready-";

/// The log prefix of a drop chain's packets: the chain's name, shortened to what the kernel
/// takes.
pub fn drop_log_prefix(chain: &str) -> String {
    shorten(chain.to_string(), MAX_LOG_PREFIX)
}

fn log(prefix: String) -> Stmt {
    Stmt::Log { group: FLOW_LOG_GROUP, prefix }
}

/// Whether a chain or counter name is a policy's drop chain (not the fixed ones; also the
/// `drop-<ns>/<name>` chains of earlier versions, so that a rewrite removes them).
pub fn is_policy_drop(name: &str) -> bool {
    name.starts_with(DROP_PREFIX) && name != DROP_UNKNOWN
}

/// The direction and `<ns>/<name>` of a [`drop_chain`] name (a shortened name gives its
/// shortened policy part).
pub fn parse_drop_chain(name: &str) -> Option<(Direction, &str)> {
    let rest = name.strip_prefix(DROP_PREFIX)?;
    DIRECTIONS.into_iter().find_map(|direction| {
        let policy = rest.strip_prefix(&format!("{direction}-"))?;
        Some((direction, policy))
    })
}

/// The ICMPv6 types that pass without policy, as ranges: `weir_common::policy::
/// icmpv6_link_control`.
const ICMPV6_LINK_CONTROL: [(u8, u8); 2] = [(130, 137), (143, 143)];

/// The table's fixed skeleton, idempotent: creates what is missing and rewrites the rules of
/// the fixed chains in one batch (no packet sees them empty). Set elements are kept.
pub fn skeleton() -> Vec<Op> {
    let mut ops = vec![Op::AddTable];
    for family in FAMILIES {
        for direction in DIRECTIONS {
            let (allow, endpoints, _) = sets(direction, family);
            ops.push(Op::AddSet { name: allow.into(), kind: SetKind::PolicyTuples(family) });
            ops.push(Op::AddSet { name: endpoints.into(), kind: SetKind::AddressMap(family) });
        }
        let unknown = unknown_set(family).into();
        ops.push(Op::AddSet { name: unknown, kind: SetKind::AddressRanges(family) });
    }
    ops.push(Op::AddCounter { name: DROP_UNKNOWN.into() });
    let base = |hook| Some(BaseChain { kind: "filter", hook, priority: FILTER_PRIORITY });
    let established = vec![Stmt::CtStateEstablishedRelated, Stmt::Verdict(Verdict::Accept)];
    let jump = |chain: &str| vec![Stmt::Verdict(Verdict::Jump(chain.into()))];
    let check = |direction| {
        // ICMPv6 link control (neighbour discovery, multicast listener discovery) passes as
        // in the eBPF datapath: without it default deny would cut a pod off its gateway.
        let mut rules: Vec<Vec<Stmt>> = ICMPV6_LINK_CONTROL
            .map(|(lo, hi)| vec![Stmt::Icmpv6Types(lo, hi), Stmt::Verdict(Verdict::Return)])
            .into();
        for family in FAMILIES {
            let (allow, _, endpoint) = sets(direction, family);
            rules.push(vec![
                Stmt::PolicyTupleInSet { set: allow.into(), endpoint, family },
                log(format!("{LOG_ALLOW_PREFIX}{direction}")),
                Stmt::Verdict(Verdict::Return),
            ]);
        }
        for family in FAMILIES {
            let (_, endpoints, field) = sets(direction, family);
            rules.push(vec![Stmt::AddrVmap { field, map: endpoints.into(), family }]);
        }
        for family in FAMILIES {
            let (_, _, field) = sets(direction, family);
            rules.push(vec![
                Stmt::AddrInSet { field, set: unknown_set(family).into(), family },
                log(format!("{LOG_NOT_READY_PREFIX}{direction}")),
                Stmt::Verdict(Verdict::Goto(DROP_UNKNOWN.into())),
            ]);
        }
        rules
    };
    // In dependency order: a chain is written before the chains that jump to it.
    let chains: Vec<FixedChain> = vec![
        (DROP_UNKNOWN, None, vec![drop_rule(DROP_UNKNOWN, None)]),
        (INGRESS, None, check(Direction::Ingress)),
        (EGRESS, None, check(Direction::Egress)),
        ("forward", base(FORWARD), vec![established.clone(), jump(EGRESS), jump(INGRESS)]),
        ("input", base(INPUT), vec![established, jump(EGRESS)]),
    ];
    fixed_chains(&mut ops, chains);
    ops
}

/// `counter name COUNTER drop`, logged with `prefix` when given.
fn drop_rule(counter: &str, prefix: Option<String>) -> Vec<Stmt> {
    let mut rule = vec![Stmt::CounterRef(counter.into())];
    rule.extend(prefix.map(log));
    rule.push(Stmt::Verdict(Verdict::Drop));
    rule
}

/// What the table holds for one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Side {
    pub allow: BTreeSet<PolicyTuple>,
    /// Local pod address -> `Return` (not isolated) or `Goto(drop chain)`.
    pub endpoints: BTreeMap<IpAddr, Verdict>,
}

/// The desired contents of the table's sets and drop chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub ingress: Side,
    pub egress: Side,
    /// Pod ranges without a known pod (only while `deny_unknown`): first and last address, of
    /// one family.
    pub unknown_pods: BTreeSet<(IpAddr, IpAddr)>,
    /// Drop chains (and counters) of the policies that isolate a local pod first.
    pub drop_chains: BTreeSet<String>,
}

impl Desired {
    pub(super) fn side(&self, direction: Direction) -> &Side {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub(super) fn side_mut(&mut self, direction: Direction) -> &mut Side {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }

    /// Set elements (allow tuples, endpoints, unknown ranges).
    pub fn elements(&self) -> usize {
        self.ingress.allow.len()
            + self.egress.allow.len()
            + self.ingress.endpoints.len()
            + self.egress.endpoints.len()
            + self.unknown_pods.len()
    }

    /// What `compiled` (compiled for this node) asks of the table.
    pub fn new(compiled: &Compiled, node: &PolicyNode) -> Self {
        let mut by_identity: BTreeMap<u32, Vec<u128>> = BTreeMap::new();
        for entry in compiled.pods.values() {
            if let Some(identity) = entry.identity {
                by_identity.entry(identity).or_default().extend(entry.ips.iter().map(|a| line(*a)));
            }
        }
        let addresses = |id: u32| by_identity.get(&id).cloned().unwrap_or_default();
        let hosts = host_boxes(node);
        let mut desired = Self::default();
        let mut known = Vec::new();
        for (pod, endpoint) in &compiled.endpoints {
            let Some(entry) = compiled.pods.get(pod) else { continue };
            let addresses_of_pod = &entry.ips;
            known.extend(addresses_of_pod.iter().copied());
            for direction in DIRECTIONS {
                let policy = endpoint.direction(direction);
                let verdict = endpoint_verdict(policy, direction);
                if let Verdict::Goto(chain) = &verdict {
                    desired.drop_chains.insert(chain.clone());
                }
                let boxes = if policy.is_isolated() {
                    let mut boxes = allow_boxes(&policy.allow, &addresses);
                    if direction == Direction::Ingress {
                        boxes.extend(hosts.iter().copied());
                    }
                    disjoint(&boxes)
                } else {
                    Vec::new()
                };
                let side = desired.side_mut(direction);
                for address in addresses_of_pod {
                    side.endpoints.insert(*address, verdict.clone());
                    side.allow.extend(boxes.iter().flat_map(|b| tuples(*address, b)));
                }
            }
        }
        desired.unknown_pods = unknown_pods(node, &known);
        desired
    }
}

/// The `*-endpoints` verdict of an endpoint's direction: its first isolating policy's drop
/// chain, or return when nothing isolates it.
pub(super) fn endpoint_verdict(policy: &DirectionPolicy, direction: Direction) -> Verdict {
    match policy.isolated_by.first() {
        None => Verdict::Return,
        Some(first) => Verdict::Goto(drop_chain(first, direction)),
    }
}

/// The allow tuples of one box for one endpoint address: the part of the box's peers in the
/// endpoint's family (none, one range, or for IPv6 the two around the mapped IPv4 range).
pub(super) fn tuples(endpoint: IpAddr, b: &Box3) -> Vec<PolicyTuple> {
    let peers = match endpoint {
        IpAddr::V4(_) => intersect(b[2], V4_SPACE).into_iter().collect(),
        IpAddr::V6(_) => subtract(&[b[2]], &[V4_SPACE]),
    };
    peers
        .into_iter()
        .map(|(lo, hi)| PolicyTuple {
            endpoint,
            protocols: (b[0].0 as u8, b[0].1 as u8),
            ports: (b[1].0 as u16, b[1].1 as u16),
            peers: (off_line(lo), off_line(hi)),
        })
        .collect()
}

/// The node's pod ranges minus the `known` pod addresses, while `deny_unknown`.
pub(super) fn unknown_pods(node: &PolicyNode, known: &[IpAddr]) -> BTreeSet<(IpAddr, IpAddr)> {
    if !node.deny_unknown {
        return BTreeSet::new();
    }
    let ranges: Vec<Range> = node
        .pod_cidrs
        .iter()
        .flat_map(|cidr| cidr_ranges(cidr.addr(), cidr.prefix_len()))
        .collect();
    let known: Vec<Range> = known.iter().map(|a| (line(*a), line(*a))).collect();
    subtract(&union(ranges), &union(known))
        .into_iter()
        .map(|(lo, hi)| (off_line(lo), off_line(hi)))
        .collect()
}

/// An inclusive range of one field (protocol, port, or address on the line of [`line`]).
type Range = (u128, u128);
/// A box of (protocols, ports, peers).
pub(super) type Box3 = [Range; 3];

const ALL_PROTOCOLS: Range = (0, 255);
const ALL_PORTS: Range = (0, 65535);
/// Every peer, of both families.
const ALL_ADDRESSES: Range = (0, u128::MAX);
/// The IPv4 addresses on the line: `::ffff:0.0.0.0` to `::ffff:255.255.255.255`.
const V4_SPACE: Range = (0xffff_0000_0000, 0xffff_ffff_ffff);

/// An address on the line of peers: IPv6 as is, IPv4 mapped.
pub(super) fn line(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => V4_SPACE.0 | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address at a point of the line (the mapped range as IPv4).
fn off_line(point: u128) -> IpAddr {
    if (V4_SPACE.0..=V4_SPACE.1).contains(&point) {
        IpAddr::V4(Ipv4Addr::from((point - V4_SPACE.0) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(point))
    }
}

fn intersect(a: Range, b: Range) -> Option<Range> {
    let (lo, hi) = (a.0.max(b.0), a.1.min(b.1));
    (lo <= hi).then_some((lo, hi))
}

/// The boxes of allow entries; `addresses` gives the addresses of an identity's pods on the
/// line of [`line`].
pub(super) fn allow_boxes(allow: &[Allow], addresses: &dyn Fn(u32) -> Vec<u128>) -> Vec<Box3> {
    let mut boxes = Vec::new();
    for allow in allow {
        let (protocols, ports) = match allow.protocol {
            None => (ALL_PROTOCOLS, ALL_PORTS),
            Some(protocol) => {
                let number = u128::from(protocol.number());
                let ports = allow.ports.map_or(ALL_PORTS, |(lo, hi)| (lo.into(), hi.into()));
                ((number, number), ports)
            }
        };
        let peers = match &allow.peer {
            PeerMatch::Any => vec![ALL_ADDRESSES],
            PeerMatch::Identity(id) => addresses(*id).into_iter().map(|a| (a, a)).collect(),
            PeerMatch::Block(block) => block_ranges(block),
        };
        boxes.extend(peers.into_iter().map(|peer| [protocols, ports, peer]));
    }
    boxes
}

/// What an isolated ingress also allows: this node's addresses (kubelet probes; the node's
/// own connections leave through output, not filtered, but a node address routed through
/// forward is the node too).
pub(super) fn host_boxes(node: &PolicyNode) -> Vec<Box3> {
    node.host_addresses.iter().map(|h| [ALL_PROTOCOLS, ALL_PORTS, (line(*h), line(*h))]).collect()
}

/// A CIDR on the line: one range for IPv4; for IPv6 the range minus the mapped IPv4 range
/// (zero to two ranges).
fn cidr_ranges(addr: IpAddr, len: u8) -> Vec<Range> {
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - u32::from(len.min(bits as u8));
    let lo = line(addr) & !mask(host_bits);
    let range = (lo, lo | mask(host_bits));
    if addr.is_ipv4() { vec![range] } else { subtract(&[range], &[V4_SPACE]) }
}

/// The low `bits` bits set.
fn mask(bits: u32) -> u128 {
    if bits >= 128 { u128::MAX } else { (1u128 << bits) - 1 }
}

/// An ipBlock's addresses as disjoint ranges on the line: its cidr minus every except.
fn block_ranges(block: &IpBlock) -> Vec<Range> {
    let cidr = cidr_ranges(block.cidr.addr(), block.cidr.prefix_len());
    let excepts: Vec<Range> =
        block.except.iter().flat_map(|e| cidr_ranges(e.addr(), e.prefix_len())).collect();
    subtract(&cidr, &union(excepts))
}

/// The union of ranges as sorted, disjoint, non-adjacent ranges.
fn union(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if last.1.checked_add(1).is_none_or(|after| lo <= after) => {
                last.1 = last.1.max(hi)
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `ranges` minus `holes`, both sorted and disjoint.
fn subtract(ranges: &[Range], holes: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        // The first point not yet handed out or cut; `None` past the top of the line.
        let mut next = Some(lo);
        for &(hole_lo, hole_hi) in holes {
            let Some(from) = next else { break };
            if hole_hi < from || hole_lo > hi {
                continue;
            }
            if hole_lo > from {
                out.push((from, hole_lo - 1));
            }
            next = hole_hi.checked_add(1);
        }
        if let Some(from) = next
            && from <= hi
        {
            out.push((from, hi));
        }
    }
    out
}

/// Disjoint boxes whose union is the union of `boxes`, canonical for a given set of boxes and
/// local: boxes that overlap nothing are kept as they are, and each group of overlapping boxes
/// is split along protocols, then ports (merging neighbours with equal contents), then its
/// peer ranges are united. So an entry added that overlaps no other adds exactly its own box.
pub(super) fn disjoint(boxes: &[Box3]) -> Vec<Box3> {
    let mut boxes = boxes.to_vec();
    boxes.sort_unstable();
    boxes.dedup();
    let mut out = Vec::new();
    for group in overlapping_groups(&boxes) {
        if let [single] = group[..] {
            out.push(*single);
            continue;
        }
        out.extend(split(&group, 0).into_iter().map(|r| [r[0], r[1], r[2]]));
    }
    out.sort_unstable();
    out
}

pub(super) fn overlap(a: &Box3, b: &Box3) -> bool {
    a.iter().zip(b).all(|(x, y)| x.0 <= y.1 && y.0 <= x.1)
}

/// The connected groups of the "overlaps" relation. `boxes` is sorted, so it is swept along
/// the peer dimension only after sorting by it; each box is compared with the boxes whose
/// peer range is still open.
fn overlapping_groups(boxes: &[Box3]) -> Vec<Vec<&Box3>> {
    let mut parent: Vec<usize> = (0..boxes.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut by_peer: Vec<usize> = (0..boxes.len()).collect();
    by_peer.sort_unstable_by_key(|i| (boxes[*i][2], *i));
    let mut open: Vec<usize> = Vec::new();
    for i in by_peer {
        open.retain(|j| boxes[*j][2].1 >= boxes[i][2].0);
        for j in &open {
            if overlap(&boxes[i], &boxes[*j]) {
                let (a, b) = (root(&mut parent, i), root(&mut parent, *j));
                parent[a.max(b)] = a.min(b);
            }
        }
        open.push(i);
    }
    let mut groups: BTreeMap<usize, Vec<&Box3>> = BTreeMap::new();
    for (i, b) in boxes.iter().enumerate() {
        let r = root(&mut parent, i);
        groups.entry(r).or_default().push(b);
    }
    groups.into_values().collect()
}

/// Disjoint boxes covering `boxes` in dimensions `dim..3`, as the ranges of those dimensions.
fn split(boxes: &[&Box3], dim: usize) -> Vec<Vec<Range>> {
    if dim == 2 {
        return union(boxes.iter().map(|b| b[2]).collect()).into_iter().map(|r| vec![r]).collect();
    }
    // Sweep the dimension: at each boundary boxes start (true) or end (false). Dimensions
    // swept here are protocols and ports, far from the top of u128.
    let mut events: Vec<(u128, bool, usize)> = Vec::with_capacity(boxes.len() * 2);
    for (index, b) in boxes.iter().enumerate() {
        events.push((b[dim].0, true, index));
        events.push((b[dim].1 + 1, false, index));
    }
    events.sort_unstable();
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut pieces: Vec<(Range, Vec<Vec<Range>>)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            let (_, start, index) = events[i];
            if start {
                active.insert(index);
            } else {
                active.remove(&index);
            }
            i += 1;
        }
        if active.is_empty() || i == events.len() {
            continue;
        }
        let range = (at, events[i].0 - 1);
        let inside: Vec<&Box3> = active.iter().map(|a| boxes[*a]).collect();
        let sub = split(&inside, dim + 1);
        match pieces.last_mut() {
            Some((last, last_sub)) if last.1 + 1 == at && *last_sub == sub => last.1 = range.1,
            _ => pieces.push((range, sub)),
        }
    }
    let mut out = Vec::new();
    for (range, subs) in pieces {
        for sub in subs {
            let mut ranges = vec![range];
            ranges.extend(sub);
            out.push(ranges);
        }
    }
    out
}

/// The ops that turn a table holding `old` into one holding `new`, for one atomic batch:
/// new drop chains first, then element deletions (a pipapo set refuses an element that
/// overlaps one still there), additions, and last the drop chains nothing jumps to any more.
pub fn diff(old: &Desired, new: &Desired) -> Vec<Op> {
    let mut ops = Vec::new();
    for chain in new.drop_chains.difference(&old.drop_chains) {
        create_drop_chain(&mut ops, chain, false);
    }
    element_ops(&mut ops, old, new);
    for chain in old.drop_chains.difference(&new.drop_chains) {
        ops.push(Op::FlushChain { name: chain.clone() });
        ops.push(Op::DeleteChain { name: chain.clone() });
        ops.push(Op::DeleteCounter { name: chain.clone() });
    }
    ops
}

/// The ops that make a table whose elements are unknown (adopted at start, or after a failed
/// batch) hold `new`: every set flushed and refilled, drop chains repaired, and the drop
/// chains and counters found (`chains`, `counters`) that `new` does not use deleted.
pub fn rewrite(new: &Desired, chains: &BTreeSet<String>, counters: &BTreeSet<String>) -> Vec<Op> {
    let mut ops = Vec::new();
    for set in SETS {
        ops.push(Op::FlushSet { set: set.into() });
    }
    for chain in &new.drop_chains {
        create_drop_chain(&mut ops, chain, chains.contains(chain));
    }
    element_ops(&mut ops, &Desired::default(), new);
    for chain in chains.iter().filter(|c| is_policy_drop(c) && !new.drop_chains.contains(*c)) {
        ops.push(Op::FlushChain { name: chain.clone() });
        ops.push(Op::DeleteChain { name: chain.clone() });
    }
    for counter in counters.iter().filter(|c| is_policy_drop(c) && !new.drop_chains.contains(*c)) {
        ops.push(Op::DeleteCounter { name: counter.clone() });
    }
    ops
}

fn create_drop_chain(ops: &mut Vec<Op>, chain: &str, exists: bool) {
    ops.push(Op::AddCounter { name: chain.into() });
    ops.push(Op::AddChain { name: chain.into(), base: None });
    if exists {
        ops.push(Op::FlushChain { name: chain.into() });
    }
    let stmts = drop_rule(chain, Some(drop_log_prefix(chain)));
    ops.push(Op::AddRule { chain: chain.into(), stmts, comment: None });
}

fn element_ops(ops: &mut Vec<Op>, old: &Desired, new: &Desired) {
    let mut adds = Vec::new();
    for direction in DIRECTIONS {
        let allow_set = |t: &PolicyTuple| sets(direction, t.family()).0.to_string();
        let endpoint_set = |a: &IpAddr| sets(direction, Family::of(a)).1.to_string();
        let (old, new) = (old.side(direction), new.side(direction));
        for tuple in old.allow.difference(&new.allow) {
            let set = allow_set(tuple);
            ops.push(Op::DeleteElement { set, key: ElementKey::PolicyTuple(*tuple) });
        }
        for tuple in new.allow.difference(&old.allow) {
            let set = allow_set(tuple);
            adds.push(Op::AddSetElement { set, key: ElementKey::PolicyTuple(*tuple) });
        }
        for (address, verdict) in &old.endpoints {
            if new.endpoints.get(address) != Some(verdict) {
                let set = endpoint_set(address);
                ops.push(Op::DeleteElement { set, key: ElementKey::Address(*address) });
            }
        }
        for (address, verdict) in &new.endpoints {
            if old.endpoints.get(address) != Some(verdict) {
                adds.push(Op::AddElement {
                    set: endpoint_set(address),
                    key: ElementKey::Address(*address),
                    verdict: verdict.clone(),
                });
            }
        }
    }
    let unknown_set = |a: &IpAddr| unknown_set(Family::of(a)).to_string();
    for (lo, hi) in old.unknown_pods.difference(&new.unknown_pods) {
        let set = unknown_set(lo);
        ops.push(Op::DeleteElement { set, key: ElementKey::AddressRange(*lo, *hi) });
    }
    for (lo, hi) in new.unknown_pods.difference(&old.unknown_pods) {
        let set = unknown_set(lo);
        adds.push(Op::AddSetElement { set, key: ElementKey::AddressRange(*lo, *hi) });
    }
    ops.extend(adds);
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_policy::{Allow, Cidr, EndpointPolicy, Origin, PodRef, Protocol, compile::PodEntry};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn origin(policy: &str) -> Origin {
        Origin {
            policy: PolicyRef::new("x", policy),
            direction: Direction::Ingress,
            rule: 0,
            peer: None,
            port: None,
        }
    }

    fn allow(peer: PeerMatch, protocol: Option<Protocol>, ports: Option<(u16, u16)>) -> Allow {
        Allow { peer, protocol, ports, origin: origin("p") }
    }

    /// Pods x/a (10.244.0.10 and fd00::a, identity 300) and x/b (10.244.0.11, fd00::b,
    /// identity 301) on this node, x/c (10.244.0.12, fd00::c, identity 302) elsewhere; x/a's
    /// ingress isolated by `policies` with `allows`.
    fn compiled(policies: &[&str], allows: Vec<Allow>) -> Compiled {
        let mut compiled = Compiled::default();
        for (name, last, identity, local) in
            [("a", 10, 300, true), ("b", 11, 301, true), ("c", 12, 302, false)]
        {
            let pod = PodRef::new("x", name);
            let address = IpAddr::V4(Ipv4Addr::new(10, 244, 0, last));
            let address6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last.into()));
            compiled.pods.insert(
                pod.clone(),
                PodEntry { identity: Some(identity), ips: vec![address, address6], node: None },
            );
            compiled.pod_ips.insert(address, pod.clone());
            compiled.pod_ips.insert(address6, pod.clone());
            if local {
                let mut endpoint = EndpointPolicy {
                    identity,
                    ingress: DirectionPolicy::default(),
                    egress: DirectionPolicy::default(),
                };
                if name == "a" {
                    endpoint.ingress = DirectionPolicy {
                        isolated_by: policies.iter().map(|p| PolicyRef::new("x", *p)).collect(),
                        allow: allows.clone(),
                    };
                }
                compiled.endpoints.insert(pod, endpoint);
            }
        }
        compiled
    }

    fn node() -> PolicyNode {
        PolicyNode {
            host_addresses: vec![ip("192.168.50.1"), ip("fd00:50::1")],
            pod_cidrs: vec![cidr("10.244.0.0/24")],
            deny_unknown: false,
        }
    }

    /// Whether the table's sets allow a packet into x/a, evaluated like the ingress chain.
    fn ingress_allows(desired: &Desired, dst: IpAddr, src: IpAddr, proto: u8, port: u16) -> bool {
        let in_tuple = desired.ingress.allow.iter().any(|t| {
            t.endpoint == dst
                && (t.protocols.0..=t.protocols.1).contains(&proto)
                && (t.ports.0..=t.ports.1).contains(&port)
                && (t.peers.0..=t.peers.1).contains(&src)
        });
        in_tuple || desired.ingress.endpoints.get(&dst).is_none_or(|v| *v == Verdict::Return)
    }

    fn overlaps(a: &PolicyTuple, b: &PolicyTuple) -> bool {
        a.endpoint == b.endpoint
            && a.protocols.0 <= b.protocols.1
            && b.protocols.0 <= a.protocols.1
            && a.ports.0 <= b.ports.1
            && b.ports.0 <= a.ports.1
            && a.peers.0 <= b.peers.1
            && b.peers.0 <= a.peers.1
    }

    #[test]
    fn disjoint_boxes_cover_exactly_the_union() {
        // A small deterministic pseudo-random generator (xorshift).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(n)) as u32
        };
        for _ in 0..200 {
            let boxes: Vec<Box3> = (0..1 + next(6))
                .map(|_| {
                    let mut range = |n| {
                        let lo = next(n);
                        (u128::from(lo), u128::from(lo + next(n - lo)))
                    };
                    [range(4), range(10), range(12)]
                })
                .collect();
            let out = disjoint(&boxes);
            for p in 0..4u128 {
                for q in 0..10u128 {
                    for a in 0..12u128 {
                        let inside = |b: &Box3| {
                            (b[0].0..=b[0].1).contains(&p)
                                && (b[1].0..=b[1].1).contains(&q)
                                && (b[2].0..=b[2].1).contains(&a)
                        };
                        let want = boxes.iter().any(inside);
                        let hits = out.iter().filter(|b| inside(b)).count();
                        assert_eq!(hits, usize::from(want), "{boxes:?} -> {out:?} at {p},{q},{a}");
                    }
                }
            }
        }
    }

    #[test]
    fn ip_blocks_lose_their_excepts_and_ranges_merge() {
        let block = IpBlock {
            cidr: cidr("10.0.0.0/8"),
            except: vec![cidr("10.1.0.0/16"), cidr("10.1.2.0/24")],
        };
        let on_line = |a: &str, b: &str| (line(ip(a)), line(ip(b)));
        assert_eq!(
            block_ranges(&block),
            [on_line("10.0.0.0", "10.0.255.255"), on_line("10.2.0.0", "10.255.255.255")]
        );
        assert_eq!(union(vec![(5, 9), (1, 4), (20, 30), (25, 26)]), [(1, 9), (20, 30)]);
        assert_eq!(union(vec![(0, u128::MAX), (7, u128::MAX)]), [(0, u128::MAX)]);
        assert_eq!(
            subtract(&[(0, u128::MAX)], &[(0, 0), (u128::MAX, u128::MAX)]),
            [(1, u128::MAX - 1)]
        );
        // IPv6 blocks leave the mapped IPv4 range out: `::/0` admits no IPv4 peer.
        let everything6 = IpBlock { cidr: cidr("::/0"), except: vec![cidr("fd00::/8")] };
        assert_eq!(
            block_ranges(&everything6),
            [
                (0, V4_SPACE.0 - 1),
                (V4_SPACE.1 + 1, line(ip("fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))),
                (line(ip("fe00::")), u128::MAX)
            ]
        );
        assert_eq!(block_ranges(&IpBlock { cidr: cidr("0.0.0.0/0"), except: vec![] }), [V4_SPACE]);
    }

    #[test]
    fn an_isolated_pod_allows_its_entries_and_its_node_and_drops_to_its_first_policy() {
        let allows = vec![
            allow(PeerMatch::Identity(301), Some(Protocol::Tcp), Some((80, 81))),
            allow(PeerMatch::Any, Some(Protocol::Udp), None),
            allow(
                PeerMatch::Block(IpBlock {
                    cidr: cidr("10.244.0.0/24"),
                    except: vec![cidr("10.244.0.11/32")],
                }),
                Some(Protocol::Tcp),
                Some((80, 80)),
            ),
        ];
        let desired = Desired::new(&compiled(&["first", "second"], allows), &node());
        let (a, b, c) = (ip("10.244.0.10"), ip("10.244.0.11"), ip("10.244.0.12"));
        assert!(ingress_allows(&desired, a, b, 6, 81));
        assert!(!ingress_allows(&desired, a, b, 6, 82));
        assert!(!ingress_allows(&desired, a, c, 6, 81));
        assert!(ingress_allows(&desired, a, c, 6, 80), "the block");
        assert!(ingress_allows(&desired, a, ip("203.0.113.9"), 17, 5353), "any UDP");
        assert!(!ingress_allows(&desired, a, ip("203.0.113.9"), 132, 80));
        assert!(ingress_allows(&desired, a, ip("192.168.50.1"), 132, 80), "the node");
        assert!(ingress_allows(&desired, b, c, 132, 80), "x/b is not isolated");
        assert_eq!(desired.ingress.endpoints[&a], Verdict::Goto("drop-ingress-x/first".into()));
        assert_eq!(desired.ingress.endpoints[&b], Verdict::Return);
        assert_eq!(desired.egress.endpoints[&a], Verdict::Return);
        assert!(!desired.ingress.endpoints.contains_key(&c), "x/c is not on this node");
        assert_eq!(desired.drop_chains, BTreeSet::from(["drop-ingress-x/first".to_string()]));
        let tuples: Vec<&PolicyTuple> = desired.ingress.allow.iter().collect();
        for (i, t) in tuples.iter().enumerate() {
            for u in &tuples[i + 1..] {
                assert!(!overlaps(t, u), "{t:?} overlaps {u:?}");
            }
        }
    }

    #[test]
    fn a_dual_stack_pod_gets_the_tuples_of_each_family_in_that_familys_sets() {
        let allows = vec![
            allow(PeerMatch::Identity(301), Some(Protocol::Tcp), Some((80, 81))),
            allow(
                PeerMatch::Block(IpBlock { cidr: cidr("::/0"), except: vec![cidr("fd00::c/128")] }),
                Some(Protocol::Udp),
                None,
            ),
            allow(
                PeerMatch::Block(IpBlock { cidr: cidr("10.244.0.0/24"), except: vec![] }),
                Some(Protocol::Tcp),
                Some((80, 80)),
            ),
        ];
        let desired = Desired::new(&compiled(&["first"], allows), &node());
        let (a, b, c) = (ip("fd00::a"), ip("fd00::b"), ip("fd00::c"));
        assert!(ingress_allows(&desired, a, b, 6, 81), "x/b by identity, over IPv6");
        assert!(ingress_allows(&desired, ip("10.244.0.10"), ip("10.244.0.11"), 6, 81));
        assert!(!ingress_allows(&desired, a, c, 6, 80), "the IPv4 block admits no IPv6 peer");
        assert!(ingress_allows(&desired, ip("10.244.0.10"), ip("10.244.0.12"), 6, 80));
        assert!(ingress_allows(&desired, a, ip("2001:db8::1"), 17, 53), "::/0 over UDP");
        assert!(!ingress_allows(&desired, a, c, 17, 53), "the except");
        assert!(!ingress_allows(&desired, a, ip("::ffff:203.0.113.9"), 17, 53), "mapped IPv4");
        assert!(!ingress_allows(&desired, ip("10.244.0.10"), ip("203.0.113.9"), 17, 53));
        assert!(ingress_allows(&desired, a, ip("fd00:50::1"), 132, 9), "the node, over IPv6");
        assert_eq!(desired.ingress.endpoints[&a], Verdict::Goto("drop-ingress-x/first".into()));
        assert_eq!(desired.ingress.endpoints[&b], Verdict::Return);
        for t in &desired.ingress.allow {
            assert_eq!(Family::of(&t.peers.0), t.family(), "{t:?}");
            assert_eq!(Family::of(&t.peers.1), t.family(), "{t:?}");
        }
        // Each family's elements go to that family's sets.
        let ops = diff(&Desired::default(), &desired);
        let set_of = |family: Family| {
            ops.iter()
                .filter_map(|op| match op {
                    Op::AddSetElement { set, key: ElementKey::PolicyTuple(t) } => {
                        Some((set.as_str(), t.family()))
                    }
                    Op::AddElement { set, key: ElementKey::Address(a), .. } => {
                        Some((set.as_str(), Family::of(a)))
                    }
                    _ => None,
                })
                .filter(|(_, f)| *f == family)
                .map(|(set, _)| set)
                .collect::<BTreeSet<&str>>()
        };
        assert_eq!(
            set_of(Family::V4),
            BTreeSet::from([INGRESS_ALLOW, INGRESS_ENDPOINTS, EGRESS_ENDPOINTS])
        );
        assert_eq!(
            set_of(Family::V6),
            BTreeSet::from([INGRESS_ALLOW6, INGRESS_ENDPOINTS6, EGRESS_ENDPOINTS6])
        );
    }

    #[test]
    fn the_skeleton_passes_exactly_the_icmpv6_link_control_types() {
        let passed: Vec<u8> = ICMPV6_LINK_CONTROL.iter().flat_map(|(lo, hi)| *lo..=*hi).collect();
        let expected: Vec<u8> =
            (0..=255).filter(|t| weir_common::policy::icmpv6_link_control(*t)).collect();
        assert_eq!(passed, expected);
        let rules = skeleton()
            .into_iter()
            .filter(|op| matches!(op, Op::AddRule { stmts, .. } if matches!(stmts[0], Stmt::Icmpv6Types(..))))
            .count();
        assert_eq!(rules, 2 * ICMPV6_LINK_CONTROL.len(), "in the ingress and egress chains");
    }

    #[test]
    fn unknown_pods_are_the_pod_ranges_minus_known_pods_while_denying() {
        let compiled = compiled(&[], Vec::new());
        assert!(Desired::new(&compiled, &node()).unknown_pods.is_empty());
        let denying = PolicyNode { deny_unknown: true, ..node() };
        let unknown = Desired::new(&compiled, &denying).unknown_pods;
        assert_eq!(
            unknown.into_iter().collect::<Vec<_>>(),
            [(ip("10.244.0.0"), ip("10.244.0.9")), (ip("10.244.0.12"), ip("10.244.0.255"))]
        );
        let dual =
            PolicyNode { pod_cidrs: vec![cidr("10.244.0.0/24"), cidr("fd00::/120")], ..denying };
        let unknown = Desired::new(&compiled, &dual).unknown_pods;
        assert_eq!(
            unknown.into_iter().collect::<Vec<_>>(),
            [
                (ip("10.244.0.0"), ip("10.244.0.9")),
                (ip("10.244.0.12"), ip("10.244.0.255")),
                (ip("fd00::"), ip("fd00::9")),
                (ip("fd00::c"), ip("fd00::ff"))
            ]
        );
    }

    #[test]
    fn one_more_rule_among_ten_thousand_writes_only_its_element() {
        let rule = |i: u32| {
            allow(
                PeerMatch::Block(IpBlock {
                    cidr: Cidr::host(IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i))),
                    except: Vec::new(),
                }),
                Some(Protocol::Tcp),
                Some((1000 + (i % 20000) as u16, 1000 + (i % 20000) as u16)),
            )
        };
        let mut allows: Vec<Allow> = (0..10_000).map(rule).collect();
        let old = Desired::new(&compiled(&["p"], allows.clone()), &node());
        allows.push(rule(10_000));
        let new = Desired::new(&compiled(&["p"], allows), &node());
        let ops = diff(&old, &new);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(matches!(&ops[0], Op::AddSetElement { set, .. } if set == INGRESS_ALLOW));
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn policy_changes_create_and_remove_drop_chains_around_the_elements() {
        let old = Desired::new(&compiled(&["p"], Vec::new()), &node());
        let new = Desired::new(&compiled(&["q"], Vec::new()), &node());
        let ops = diff(&old, &new);
        let position = |wanted: &dyn Fn(&Op) -> bool| ops.iter().position(wanted).unwrap();
        let create =
            position(&|op| matches!(op, Op::AddChain { name, .. } if name == "drop-ingress-x/q"));
        let element = position(
            &|op| matches!(op, Op::AddElement { verdict: Verdict::Goto(c), .. } if c == "drop-ingress-x/q"),
        );
        let remove =
            position(&|op| matches!(op, Op::DeleteChain { name } if name == "drop-ingress-x/p"));
        let unlink =
            position(&|op| matches!(op, Op::DeleteElement { set, .. } if set == INGRESS_ENDPOINTS));
        assert!(create < element && unlink < remove, "{ops:#?}");
        assert!(ops.contains(&Op::DeleteCounter { name: "drop-ingress-x/p".into() }));
        // A rewrite removes stale drop chains it finds and keeps the fixed ones.
        let found: BTreeSet<String> =
            ["drop-ingress-x/p", "drop-ingress-x/q", DROP_UNKNOWN].map(String::from).into();
        let ops = rewrite(&new, &found, &found);
        assert!(ops.contains(&Op::DeleteChain { name: "drop-ingress-x/p".into() }));
        assert!(!ops.iter().any(|op| matches!(op, Op::DeleteChain { name } | Op::DeleteCounter { name } if name != "drop-ingress-x/p")));
        assert!(matches!(&ops[0], Op::FlushSet { .. }));
    }

    #[test]
    fn long_policy_names_are_shortened_to_valid_object_names() {
        let long = PolicyRef::new("n".repeat(63), "p".repeat(253));
        let name = drop_chain(&long, Direction::Egress);
        assert!(name.len() <= MAX_NAME && is_policy_drop(&name));
        let other = PolicyRef::new("n".repeat(63), "q".repeat(253));
        assert_ne!(name, drop_chain(&other, Direction::Egress));
        assert_eq!(parse_drop_chain(&name).map(|(d, _)| d), Some(Direction::Egress));
        let short = drop_chain(&PolicyRef::new("x", "a"), Direction::Ingress);
        assert_eq!(short, "drop-ingress-x/a");
        assert_eq!(parse_drop_chain(&short), Some((Direction::Ingress, "x/a")));
        assert_eq!(parse_drop_chain(DROP_UNKNOWN), None);
        assert_eq!(parse_drop_chain("drop-x/a"), None, "an earlier version's name");
    }
}
