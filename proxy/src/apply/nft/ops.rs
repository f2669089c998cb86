//! The vocabulary of the nftables backend: table objects and rule statements as plain data.
//! The planner emits [`Op`]s; the netlink encoder turns them into messages.
use std::net::Ipv4Addr;

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

/// One statement of a rule; a rule is the conjunction of its statements, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `ip daddr . meta l4proto . th dport vmap @map`
    ServiceVmap {
        map: String,
    },
    /// `ct state new`
    CtStateNew,
    /// `ct state established,related`
    CtStateEstablishedRelated,
    /// `ip daddr . meta l4proto . th dport . ip saddr @set` (endpoint = destination) or
    /// `ip saddr . meta l4proto . th dport . ip daddr @set` (endpoint = source): a lookup into
    /// a set of [`SetKind::PolicyTuples`].
    PolicyTupleInSet {
        set: String,
        endpoint: AddrField,
    },
    /// `ip saddr|daddr vmap @map`
    AddrVmap {
        field: AddrField,
        map: String,
    },
    /// `ip saddr|daddr @set`
    AddrInSet {
        field: AddrField,
        set: String,
    },
    /// `counter name NAME`
    CounterRef(String),
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
    Reject(RejectKind),
    Counter,
    Verdict(Verdict),
}

/// Which IPv4 address of the packet a statement reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrField {
    Saddr,
    Daddr,
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
    /// `type ipv4_addr; flags dynamic, timeout` (ClientIP affinity)
    Affinity,
    /// `type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval` (policy:
    /// endpoint . protocol . port . peer, every field a range; elements must not overlap)
    PolicyTuples,
    /// `type ipv4_addr : verdict`
    AddressMap,
    /// `type ipv4_addr; flags interval`
    AddressRanges,
}

/// The key of a set element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementKey {
    Service {
        address: Ipv4Addr,
        protocol: u8,
        port: u16,
    },
    Index(u32),
    /// An element of a [`SetKind::AddressMap`].
    Address(Ipv4Addr),
    /// An element of a [`SetKind::AddressRanges`]: inclusive first and last address.
    AddressRange(Ipv4Addr, Ipv4Addr),
    /// An element of a [`SetKind::PolicyTuples`]: inclusive ranges.
    PolicyTuple(PolicyTuple),
}

/// One element of a policy tuple set: every field an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyTuple {
    pub endpoint: Ipv4Addr,
    pub protocols: (u8, u8),
    pub ports: (u16, u16),
    pub peers: (Ipv4Addr, Ipv4Addr),
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
}
