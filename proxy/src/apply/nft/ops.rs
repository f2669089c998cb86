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
}

/// The key of a set element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementKey {
    Service { address: Ipv4Addr, protocol: u8, port: u16 },
    Index(u32),
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
    AddElement {
        set: String,
        key: ElementKey,
        verdict: Verdict,
    },
    DeleteElement {
        set: String,
        key: ElementKey,
    },
}
