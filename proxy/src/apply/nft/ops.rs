//! The vocabulary of the nftables backend: table objects and rule statements as plain data.
//! The planner emits [`Op`]s; the netlink encoder turns them into messages.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A verdict of a rule or a verdict-map element.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

/// How a service without endpoints refuses a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectKind {
    /// `reject with tcp reset`
    TcpReset,
    /// `reject with icmpx port-unreachable`
    PortUnreachable,
}

/// The longest `log prefix` the kernel takes (`NF_LOG_PREFIXLEN` less the NUL).
pub const MAX_LOG_PREFIX: usize = 127;

/// One statement of a rule; a rule is the conjunction of its statements, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `ip daddr . meta l4proto . th dport vmap @map`
    ServiceVmap {
        map: String,
    },
    /// `ip daddr . meta l4proto . th dport @set` (`ip6 daddr` for [`Family::V6`]; a packet of
    /// the other family does not match).
    FrontendInSet {
        set: String,
        family: Family,
    },
    /// `ct state new`
    CtStateNew,
    /// `ct state established,related`
    CtStateEstablishedRelated,
    /// `ip daddr . meta l4proto . th dport . ip saddr @set` (endpoint = destination) or
    /// `ip saddr . meta l4proto . th dport . ip daddr @set` (endpoint = source), `ip6` for
    /// [`Family::V6`]: a lookup into a set of [`SetKind::PolicyTuples`] of the family.
    PolicyTupleInSet {
        set: String,
        endpoint: AddrField,
        family: Family,
    },
    /// `ip|ip6 saddr|daddr vmap @map`
    AddrVmap {
        field: AddrField,
        map: String,
        family: Family,
    },
    /// `ip|ip6 saddr|daddr @set`
    AddrInSet {
        field: AddrField,
        set: String,
        family: Family,
    },
    /// `meta l4proto ipv6-icmp icmpv6 type LO-HI` (an IPv6 packet only).
    Icmpv6Types(u8, u8),
    /// `counter name NAME`
    CounterRef(String),
    /// `log group GROUP prefix "PREFIX"`: the packet's headers to the nfnetlink_log group
    /// (nothing happens when no process listens on it). The prefix is at most
    /// [`MAX_LOG_PREFIX`] bytes.
    Log {
        group: u16,
        prefix: String,
    },
    /// `meta l4proto P`
    L4Proto(u8),
    /// `ip saddr A`
    SaddrEq(Ipv4Addr),
    /// `ip saddr @set`
    SaddrInSet(String),
    /// `meta mark & BIT == 0`
    MarkClear(u32),
    /// `meta mark set meta mark | BIT`
    MarkSet(u32),
    /// `meta mark set meta mark ^ BIT`
    MarkToggle(u32),
    /// `masquerade fully-random`
    Masquerade,
    /// `dnat ip to A:P`
    Dnat(Ipv4Addr, u16),
    /// `update @set { ip saddr timeout Ns }`
    UpdateSaddr {
        set: String,
        timeout_seconds: u32,
    },
    /// `numgen random mod N vmap { 0 : goto T0, 1 : goto T1, ... }`
    NumgenVmap {
        targets: Vec<String>,
    },
    /// `dnat ip to ip daddr . meta l4proto . th dport . numgen random mod COUNT map @endpoints`,
    /// with `remember`: also `update @map { ip saddr . ip daddr . meta l4proto . th dport
    /// timeout Ns : <the chosen endpoint> }` (ClientIP affinity). `ip6` and `dnat ip6` for
    /// [`Family::V6`]; every statement below matches only packets of its `family`.
    DnatEndpoint {
        endpoints: String,
        count: u32,
        remember: Option<Remember>,
        family: Family,
    },
    /// ClientIP affinity hit: `ip saddr . ip daddr . meta l4proto . th dport` found in
    /// `remember.map`, its endpoint still in `valid` (`ip daddr . meta l4proto . th dport .
    /// <endpoint>`): refresh the entry and DNAT to it. No match: the rule ends.
    DnatRemembered {
        remember: Remember,
        valid: String,
        family: Family,
    },
    /// ClientIP affinity to an endpoint the frontend no longer has: the entry of `ip saddr .
    /// ip daddr . meta l4proto . th dport` in `remember.map` whose endpoint is not in `valid`
    /// is deleted (the dynamic map's `update` refreshes an entry but never replaces it).
    ForgetRemembered {
        remember: Remember,
        valid: String,
        family: Family,
    },
    /// `ct status dnat` and `ip saddr . ip daddr @set` (a hairpin connection: an endpoint
    /// reaching itself through a service).
    HairpinInSet {
        set: String,
        family: Family,
    },
    Reject(RejectKind),
    Counter,
    Verdict(Verdict),
}

/// Which address of the packet a statement reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrField {
    Saddr,
    Daddr,
}

/// The IP version of the packets a statement matches (an `inet` table sees both) and of the
/// addresses a set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(address: &IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// The ClientIP affinity map a rule updates, and the timeout of its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remember {
    pub map: String,
    pub timeout_seconds: u32,
}

/// Base chain parameters: `type KIND hook HOOK priority PRIORITY; policy accept`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: &'static str,
    pub hook: u32,
    pub priority: i32,
}

/// The kinds of named sets the backend creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    /// `type ipv4_addr . inet_proto . inet_service : verdict`
    ServiceMap,
    /// `type ipv4_addr . inet_proto . inet_service`: frontends (`ipv6_addr` for
    /// [`Family::V6`], as in every kind below that takes a family).
    Frontends(Family),
    /// `type ipv4_addr; flags dynamic, timeout` (ClientIP affinity)
    Affinity,
    /// `type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval` (policy:
    /// endpoint . protocol . port . peer, every field a range; elements must not overlap),
    /// `ipv6_addr` for [`Family::V6`]
    PolicyTuples(Family),
    /// `type ipv4_addr : verdict` (`ipv6_addr` for [`Family::V6`])
    AddressMap(Family),
    /// `type ipv4_addr; flags interval` (`ipv6_addr` for [`Family::V6`])
    AddressRanges(Family),
    /// `type ipv4_addr . inet_proto . inet_service . integer : ipv4_addr . inet_service`: a
    /// frontend's endpoint by index (the numgen result).
    EndpointMap(Family),
    /// `type ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;
    /// flags dynamic, timeout`: the endpoint a client was sent to (ClientIP affinity).
    AffinityMap(Family),
    /// `type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service`: the endpoints
    /// of the affinity frontends.
    FrontendEndpoints(Family),
    /// `type ipv4_addr . ipv4_addr`: endpoint addresses, as source and destination.
    Hairpin(Family),
}

/// The key of a set element. The addresses of one key are of one family, the family of the
/// set it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementKey {
    Service {
        address: IpAddr,
        protocol: u8,
        port: u16,
    },
    Index(u32),
    /// An element of an [`SetKind::EndpointMap`].
    Endpoint {
        address: IpAddr,
        protocol: u8,
        port: u16,
        index: u32,
    },
    /// An element of a [`SetKind::FrontendEndpoints`] set.
    FrontendEndpoint {
        address: IpAddr,
        protocol: u8,
        port: u16,
        endpoint: SocketAddr,
    },
    /// An element of a [`SetKind::Hairpin`] set (the address twice).
    Hairpin(IpAddr),
    /// An element of a [`SetKind::AddressMap`].
    Address(IpAddr),
    /// An element of a [`SetKind::AddressRanges`]: inclusive first and last address, of one
    /// family.
    AddressRange(IpAddr, IpAddr),
    /// An element of a [`SetKind::PolicyTuples`]: inclusive ranges.
    PolicyTuple(PolicyTuple),
}

/// One element of a policy tuple set: every field an inclusive range; all addresses of one
/// family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyTuple {
    pub endpoint: IpAddr,
    pub protocols: (u8, u8),
    pub ports: (u16, u16),
    pub peers: (IpAddr, IpAddr),
}

impl PolicyTuple {
    pub fn family(&self) -> Family {
        Family::of(&self.endpoint)
    }
}

/// One change to the table. Within a batch, ops run in order; the whole batch commits
/// atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddTable,
    DeleteTable,
    /// Creates the chain if it is missing (an existing one is left as it is).
    AddChain {
        name: String,
        base: Option<BaseChain>,
    },
    /// Deletes every rule of the chain.
    FlushChain {
        name: String,
    },
    DeleteChain {
        name: String,
    },
    /// Appends a rule; `comment` is stored as the rule's user data.
    AddRule {
        chain: String,
        stmts: Vec<Stmt>,
        comment: Option<String>,
    },
    AddSet {
        name: String,
        kind: SetKind,
    },
    DeleteSet {
        name: String,
    },
    /// Adds an element; `verdict` only for maps.
    AddElement {
        set: String,
        key: ElementKey,
        verdict: Verdict,
    },
    /// Adds an element of a set without data.
    AddSetElement {
        set: String,
        key: ElementKey,
    },
    /// Deletes every element of the set.
    FlushSet {
        set: String,
    },
    /// A named counter (`counter NAME`); an existing one is kept with its values.
    AddCounter {
        name: String,
    },
    DeleteCounter {
        name: String,
    },
    DeleteElement {
        set: String,
        key: ElementKey,
    },
    /// Adds an element of a plain set (`endpoint: None`) or of a map to endpoints.
    AddEntry {
        set: String,
        key: ElementKey,
        endpoint: Option<SocketAddr>,
    },
}
