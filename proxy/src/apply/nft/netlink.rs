//! nf_tables over netlink, without libnftnl: message encoding (pure, unit-tested) and a small
//! socket that sends batches and runs dumps.
//!
//! Only what the service ruleset needs is encoded: tables, chains (base and regular), rules
//! built from [`Stmt`]s, named and anonymous sets and maps, and their elements. Every number
//! the kernel reads as a 32/64-bit attribute is big-endian; register contents (marks, numgen
//! results) are host-endian, as in the kernel's `nft_regs`.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    os::fd::FromRawFd,
    os::fd::OwnedFd,
};

use super::ops::{
    AddrField, BaseChain, ElementKey, Family, Op, PolicyTuple, RejectKind, Remember, SetKind, Stmt,
    Verdict,
};

// Netlink and nfnetlink.
pub(crate) const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
/// Bytes of each logged packet sent to the log group: an IPv6 header, a few extension headers
/// and the ports.
const LOG_SNAPLEN: u32 = 128;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_ICMPV6: u8 = 58;
const AF_UNSPEC: u8 = 0;

// nf_tables message types.
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFT_MSG_DELOBJ: u16 = 20;

// Attributes.
pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

// nft's datatype numbers (only for `nft list` to print keys nicely).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_BITS: u32 = 6;

// Registers: NFT_REG_VERDICT and the 32-bit registers.
const REG_VERDICT: u32 = 0;
const REG32_00: u32 = 8;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
/// The n-th 32-bit register (a 16-byte IPv6 address takes four).
const fn reg32(n: u32) -> u32 {
    REG32_00 + n
}

/// nft's type of a concatenation (for `nft list`): the field types, TYPE_BITS each.
fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << TYPE_BITS) | t)
}

/// The ClusterIP/NodePort key length of IPv4: ipv4_addr . inet_proto . inet_service, each
/// padded to a 32-bit register.
pub const SERVICE_KEY_LEN: usize = 12;

/// The frontend key length of `family` (`ipv6_addr . inet_proto . inet_service`: 24 bytes).
pub fn service_key_len(family: Family) -> usize {
    address_len(family) + 8
}

/// `address . protocol . port`, each padded to a 32-bit register.
fn service_bytes(address: &IpAddr, protocol: u8, port: u16) -> Vec<u8> {
    let mut key = octets(address);
    key.extend_from_slice(&[protocol, 0, 0, 0]);
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    key
}

/// Encodes a [`ElementKey`] the way the registers hold it.
pub fn key_bytes(key: &ElementKey) -> Vec<u8> {
    match key {
        ElementKey::Service { address, protocol, port } => service_bytes(address, *protocol, *port),
        ElementKey::Index(i) => i.to_ne_bytes().to_vec(),
        ElementKey::Address(address) => octets(address),
        ElementKey::AddressRange(first, _) => octets(first),
        ElementKey::PolicyTuple(t) => {
            tuple_bytes(&t.endpoint, t.protocols.0, t.ports.0, &t.peers.0)
        }
        ElementKey::Endpoint { address, protocol, port, index } => {
            [service_bytes(address, *protocol, *port), index.to_ne_bytes().to_vec()].concat()
        }
        ElementKey::FrontendEndpoint { address, protocol, port, endpoint } => {
            [service_bytes(address, *protocol, *port), endpoint_bytes(endpoint)].concat()
        }
        ElementKey::Hairpin(address) => [octets(address), octets(address)].concat(),
    }
}

/// An endpoint as registers hold it for `dnat`: `ipv4_addr . inet_service` (8 bytes) or
/// `ipv6_addr . inet_service` (20), each field padded to a 32-bit register.
pub fn endpoint_bytes(endpoint: &SocketAddr) -> Vec<u8> {
    let mut bytes = octets(&endpoint.ip());
    bytes.extend_from_slice(&endpoint.port().to_be_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes
}

/// The inverse of [`endpoint_bytes`].
pub fn parse_endpoint(bytes: &[u8]) -> Option<SocketAddr> {
    let (address, port) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    Some(SocketAddr::new(parse_address(address)?, u16::from_be_bytes([port[0], port[1]])))
}

/// An address from its 4 or 16 bytes.
fn parse_address(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(Ipv4Addr::from(v4).into());
    }
    <[u8; 16]>::try_from(bytes).ok().map(|v6| Ipv6Addr::from(v6).into())
}

/// The inverse of [`key_bytes`] for the keys of the endpoint maps, the frontend-endpoint sets
/// and the hairpin sets of both families (their lengths differ: 16, 20 and 8 bytes for IPv4,
/// 28, 44 and 32 for IPv6).
pub fn parse_endpoint_key(bytes: &[u8]) -> Option<ElementKey> {
    let family = match bytes.len() {
        8 | 16 | 20 => Family::V4,
        28 | 32 | 44 => Family::V6,
        _ => return None,
    };
    let (n, key_len) = (address_len(family), service_key_len(family));
    if bytes.len() == 2 * n {
        let (source, destination) = bytes.split_at(n);
        if source != destination {
            return None;
        }
        return parse_address(source).map(ElementKey::Hairpin);
    }
    let Some(ElementKey::Service { address, protocol, port }) =
        parse_service_key(&bytes[..key_len])
    else {
        return None;
    };
    let rest = &bytes[key_len..];
    if rest.len() == 4 {
        let index = u32::from_ne_bytes(rest.try_into().ok()?);
        return Some(ElementKey::Endpoint { address, protocol, port, index });
    }
    let endpoint = parse_endpoint(rest)?;
    (Family::of(&endpoint.ip()) == family).then_some(ElementKey::FrontendEndpoint {
        address,
        protocol,
        port,
        endpoint,
    })
}

/// An address's bytes (network order), 4 or 16.
fn octets(address: &IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The bytes of an address of `family`.
fn address_len(family: Family) -> usize {
    match family {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

/// The bytes of an endpoint (address . port) of `family`: see [`endpoint_bytes`].
fn endpoint_len(family: Family) -> usize {
    address_len(family) + 4
}

/// The policy tuple key length: endpoint . protocol . port . peer, each field padded to 32-bit
/// registers (16 bytes for IPv4, 40 for IPv6).
pub fn policy_tuple_key_len(family: Family) -> usize {
    2 * address_len(family) + 8
}

/// The bytes of each field of a policy tuple (the set's concatenation description).
fn policy_tuple_fields(family: Family) -> [u32; 4] {
    let address = address_len(family) as u32;
    [address, 1, 2, address]
}

fn tuple_bytes(endpoint: &IpAddr, protocol: u8, port: u16, peer: &IpAddr) -> Vec<u8> {
    let mut key = octets(endpoint);
    key.extend_from_slice(&[protocol, 0, 0, 0]);
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&[0, 0]);
    key.extend_from_slice(&octets(peer));
    key
}

/// The end key of a range element (policy tuples); `None` for single-key elements.
fn key_end_bytes(key: &ElementKey) -> Option<Vec<u8>> {
    match key {
        ElementKey::PolicyTuple(t) => {
            Some(tuple_bytes(&t.endpoint, t.protocols.1, t.ports.1, &t.peers.1))
        }
        _ => None,
    }
}

/// The inverse of [`key_bytes`]/[`key_end_bytes`] for policy tuples.
pub fn parse_policy_tuple(start: &[u8], end: &[u8]) -> Option<PolicyTuple> {
    let family = [Family::V4, Family::V6]
        .into_iter()
        .find(|f| start.len() == policy_tuple_key_len(*f) && end.len() == start.len())?;
    let n = address_len(family);
    let addr = |b: &[u8]| -> IpAddr {
        match family {
            Family::V4 => <[u8; 4]>::try_from(&b[..4]).map(IpAddr::from).expect("4 bytes"),
            Family::V6 => <[u8; 16]>::try_from(&b[..16]).map(IpAddr::from).expect("16 bytes"),
        }
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[n + 4], b[n + 5]]);
    (addr(start) == addr(end)).then(|| PolicyTuple {
        endpoint: addr(start),
        protocols: (start[n], end[n]),
        ports: (port(start), port(end)),
        peers: (addr(&start[n + 8..]), addr(&end[n + 8..])),
    })
}

/// The inverse of [`key_bytes`] for service keys (12 bytes for IPv4, 24 for IPv6).
pub fn parse_service_key(bytes: &[u8]) -> Option<ElementKey> {
    let n = [Family::V4, Family::V6]
        .into_iter()
        .find(|f| bytes.len() == service_key_len(*f))
        .map(address_len)?;
    Some(ElementKey::Service {
        address: parse_address(&bytes[..n])?,
        protocol: bytes[n],
        port: u16::from_be_bytes([bytes[n + 4], bytes[n + 5]]),
    })
}

/// A growing netlink buffer: messages, attributes and nests.
#[derive(Default)]
pub struct Buf {
    pub bytes: Vec<u8>,
    seq: u32,
    last: Option<usize>,
}

impl Buf {
    fn align(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Starts a message; returns its offset for [`Buf::end_msg`].
    pub(crate) fn begin_msg(
        &mut self,
        msg_type: u16,
        flags: u16,
        family: u8,
        res_id: u16,
    ) -> usize {
        self.align();
        let start = self.bytes.len();
        self.last = Some(start);
        self.seq += 1;
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self.bytes.extend_from_slice(&msg_type.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&self.seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self.bytes.extend_from_slice(&[family, 0]);
        self.bytes.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub(crate) fn end_msg(&mut self, start: usize) {
        self.align();
        let len = (self.bytes.len() - start) as u32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub(crate) fn attr(&mut self, kind: u16, payload: &[u8]) {
        self.align();
        let len = (4 + payload.len()) as u16;
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.align();
    }

    fn str(&mut self, kind: u16, value: &str) {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload);
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) {
        self.align();
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        self.align();
        let len = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn nft_msg(&mut self, msg: u16, flags: u16, fill: impl FnOnce(&mut Self)) {
        let start = self.begin_msg(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
        );
        fill(self);
        self.end_msg(start);
    }

    fn value(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |b| b.attr(NFTA_DATA_VALUE, value));
    }

    fn verdict(&mut self, kind: u16, verdict: &Verdict) {
        let (code, chain): (i32, Option<&str>) = match verdict {
            Verdict::Drop => (0, None),
            Verdict::Accept => (1, None),
            Verdict::Return => (-5, None),
            Verdict::Jump(chain) => (-3, Some(chain)),
            Verdict::Goto(chain) => (-4, Some(chain)),
        };
        self.nest(kind, |b| {
            b.nest(NFTA_DATA_VERDICT, |b| {
                b.u32(NFTA_VERDICT_CODE, code as u32);
                if let Some(chain) = chain {
                    b.str(NFTA_VERDICT_CHAIN, chain);
                }
            })
        });
    }

    fn expr(&mut self, name: &str, fill: impl FnOnce(&mut Self)) {
        self.nest(NFTA_LIST_ELEM, |b| {
            b.str(NFTA_EXPR_NAME, name);
            b.nest(NFTA_EXPR_DATA, fill);
        });
    }
}

/// Encodes batches of [`Op`]s for one table.
pub struct Encoder {
    table: String,
    buf: Buf,
    /// Per-batch IDs of anonymous sets.
    next_set_id: u32,
    messages: usize,
    /// Sequence number of the first message of each op since the last [`Encoder::finish`].
    first_seqs: Vec<u32>,
}

impl Encoder {
    pub fn new(table: &str) -> Self {
        Self {
            table: table.to_string(),
            buf: Buf::default(),
            next_set_id: 1,
            messages: 0,
            first_seqs: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// The batch so far, wrapped in BATCH_BEGIN/END; the encoder is reset.
    pub fn finish(&mut self) -> (Vec<u8>, Vec<u32>) {
        // Only the last message asks for an acknowledgement: errors are reported whatever the
        // flags, so that ack marks the end of the kernel's answers to this batch.
        if let Some(last) = self.buf.last {
            let flags = u16::from_ne_bytes([self.buf.bytes[last + 6], self.buf.bytes[last + 7]]);
            self.buf.bytes[last + 6..last + 8].copy_from_slice(&(flags | NLM_F_ACK).to_ne_bytes());
        }
        let mut out = Buf { bytes: Vec::new(), seq: self.buf.seq, last: None };
        let start =
            out.begin_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
        out.end_msg(start);
        out.bytes.extend_from_slice(&self.buf.bytes);
        out.seq = self.buf.seq;
        let start =
            out.begin_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
        out.end_msg(start);
        self.buf = Buf { bytes: Vec::new(), seq: out.seq, last: None };
        self.messages = 0;
        (out.bytes, std::mem::take(&mut self.first_seqs))
    }

    /// Index (since the last finish) of the op whose messages include `seq`.
    pub fn op_of_seq(first_seqs: &[u32], seq: u32) -> Option<usize> {
        first_seqs.iter().rposition(|first| *first <= seq)
    }

    pub fn op(&mut self, op: &Op) {
        self.messages += 1;
        self.first_seqs.push(self.buf.seq + 1);
        let table = self.table.as_str();
        let b = &mut self.buf;
        match op {
            Op::AddTable => {
                b.nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, |b| b.str(NFTA_TABLE_NAME, table))
            }
            Op::DeleteTable => b.nft_msg(NFT_MSG_DELTABLE, 0, |b| b.str(NFTA_TABLE_NAME, table)),
            Op::AddChain { name, base } => b.nft_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |b| {
                b.str(NFTA_CHAIN_TABLE, table);
                b.str(NFTA_CHAIN_NAME, name);
                if let Some(BaseChain { kind, hook, priority }) = base {
                    b.nest(NFTA_CHAIN_HOOK, |b| {
                        b.u32(NFTA_HOOK_HOOKNUM, *hook);
                        b.u32(NFTA_HOOK_PRIORITY, *priority as u32);
                    });
                    b.str(NFTA_CHAIN_TYPE, kind);
                    b.u32(NFTA_CHAIN_POLICY, 1); // accept
                }
            }),
            Op::FlushChain { name } => b.nft_msg(NFT_MSG_DELRULE, 0, |b| {
                b.str(NFTA_RULE_TABLE, table);
                b.str(NFTA_RULE_CHAIN, name);
            }),
            Op::DeleteChain { name } => b.nft_msg(NFT_MSG_DELCHAIN, 0, |b| {
                b.str(NFTA_CHAIN_TABLE, table);
                b.str(NFTA_CHAIN_NAME, name);
            }),
            Op::AddSet { name, kind } => {
                let (flags, key_type, key_len) = match kind {
                    SetKind::ServiceMap => (
                        NFT_SET_MAP,
                        (TYPE_IPADDR << (2 * TYPE_BITS))
                            | (TYPE_INET_PROTOCOL << TYPE_BITS)
                            | TYPE_INET_SERVICE,
                        SERVICE_KEY_LEN as u32,
                    ),
                    SetKind::Frontends(family) => (
                        0,
                        concat_type(&[
                            address_type(*family),
                            TYPE_INET_PROTOCOL,
                            TYPE_INET_SERVICE,
                        ]),
                        service_key_len(*family) as u32,
                    ),
                    SetKind::Affinity => (NFT_SET_TIMEOUT | NFT_SET_EVAL, TYPE_IPADDR, 4),
                    SetKind::PolicyTuples(family) => (
                        NFT_SET_INTERVAL | NFT_SET_CONCAT,
                        concat_type(&[
                            address_type(*family),
                            TYPE_INET_PROTOCOL,
                            TYPE_INET_SERVICE,
                            address_type(*family),
                        ]),
                        policy_tuple_key_len(*family) as u32,
                    ),
                    SetKind::AddressMap(family) => {
                        (NFT_SET_MAP, address_type(*family), address_len(*family) as u32)
                    }
                    SetKind::AddressRanges(family) => {
                        (NFT_SET_INTERVAL, address_type(*family), address_len(*family) as u32)
                    }
                    SetKind::EndpointMap(family) => (
                        NFT_SET_MAP,
                        concat_type(&[
                            address_type(*family),
                            TYPE_INET_PROTOCOL,
                            TYPE_INET_SERVICE,
                            TYPE_INTEGER,
                        ]),
                        service_key_len(*family) as u32 + 4,
                    ),
                    SetKind::AffinityMap(family) => (
                        NFT_SET_MAP | NFT_SET_TIMEOUT | NFT_SET_EVAL,
                        concat_type(&[
                            address_type(*family),
                            address_type(*family),
                            TYPE_INET_PROTOCOL,
                            TYPE_INET_SERVICE,
                        ]),
                        (address_len(*family) + service_key_len(*family)) as u32,
                    ),
                    SetKind::FrontendEndpoints(family) => (
                        0,
                        concat_type(&[
                            address_type(*family),
                            TYPE_INET_PROTOCOL,
                            TYPE_INET_SERVICE,
                            address_type(*family),
                            TYPE_INET_SERVICE,
                        ]),
                        (service_key_len(*family) + endpoint_len(*family)) as u32,
                    ),
                    SetKind::Hairpin(family) => (
                        0,
                        concat_type(&[address_type(*family), address_type(*family)]),
                        2 * address_len(*family) as u32,
                    ),
                };
                let endpoint_data = match kind {
                    SetKind::EndpointMap(family) | SetKind::AffinityMap(family) => Some(*family),
                    _ => None,
                };
                // The kernel requires a batch-local set ID on every new set.
                let id = self.next_set_id;
                self.next_set_id += 1;
                b.nft_msg(NFT_MSG_NEWSET, NLM_F_CREATE, |b| {
                    b.str(NFTA_SET_TABLE, table);
                    b.str(NFTA_SET_NAME, name);
                    b.u32(NFTA_SET_ID, id);
                    b.u32(NFTA_SET_FLAGS, flags);
                    b.u32(NFTA_SET_KEY_TYPE, key_type);
                    b.u32(NFTA_SET_KEY_LEN, key_len);
                    if let Some(family) = endpoint_data {
                        b.u32(
                            NFTA_SET_DATA_TYPE,
                            concat_type(&[address_type(family), TYPE_INET_SERVICE]),
                        );
                        b.u32(NFTA_SET_DATA_LEN, endpoint_len(family) as u32);
                    } else if flags & NFT_SET_MAP != 0 {
                        b.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                    }
                    if let SetKind::PolicyTuples(family) = kind {
                        // The field lengths tell the kernel to use the pipapo backend (ranges
                        // in every field of a concatenation).
                        b.nest(NFTA_SET_DESC, |b| {
                            b.nest(NFTA_SET_DESC_CONCAT, |b| {
                                for len in policy_tuple_fields(*family) {
                                    b.nest(NFTA_LIST_ELEM, |b| b.u32(NFTA_SET_FIELD_LEN, len));
                                }
                            })
                        });
                    }
                })
            }
            Op::DeleteSet { name } => b.nft_msg(NFT_MSG_DELSET, 0, |b| {
                b.str(NFTA_SET_TABLE, table);
                b.str(NFTA_SET_NAME, name);
            }),
            Op::AddElement { set, key, verdict } => {
                new_element(b, table, set, key, |b| b.verdict(NFTA_SET_ELEM_DATA, verdict))
            }
            Op::AddEntry { set, key, endpoint } => new_element(b, table, set, key, |b| {
                if let Some(endpoint) = endpoint {
                    b.value(NFTA_SET_ELEM_DATA, &endpoint_bytes(endpoint));
                }
            }),
            Op::AddSetElement { set, key } => new_element(b, table, set, key, |_| {}),
            Op::DeleteElement { set, key } => b.nft_msg(NFT_MSG_DELSETELEM, 0, |b| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
                b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| element(b, key, |_| {}));
            }),
            Op::FlushSet { set } => b.nft_msg(NFT_MSG_DELSETELEM, 0, |b| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
            }),
            Op::AddCounter { name } => b.nft_msg(NFT_MSG_NEWOBJ, NLM_F_CREATE, |b| {
                b.str(NFTA_OBJ_TABLE, table);
                b.str(NFTA_OBJ_NAME, name);
                b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
                b.nest(NFTA_OBJ_DATA, |b| {
                    b.attr(NFTA_COUNTER_BYTES, &0u64.to_be_bytes());
                    b.attr(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
                });
            }),
            Op::DeleteCounter { name } => b.nft_msg(NFT_MSG_DELOBJ, 0, |b| {
                b.str(NFTA_OBJ_TABLE, table);
                b.str(NFTA_OBJ_NAME, name);
                b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
            }),
            Op::AddRule { chain, stmts, comment } => {
                // Anonymous verdict maps (numgen ... vmap { ... }) are created first, in the
                // same batch, and bound to the rule by their batch-local ID.
                let mut anon_ids = Vec::new();
                for stmt in stmts {
                    if let Stmt::NumgenVmap { targets } = stmt {
                        let id = self.next_set_id;
                        self.next_set_id += 1;
                        anon_ids.push(id);
                        anonymous_map(b, table, id, targets);
                    }
                }
                let mut anon = anon_ids.into_iter();
                b.nft_msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |b| {
                    b.str(NFTA_RULE_TABLE, table);
                    b.str(NFTA_RULE_CHAIN, chain);
                    b.nest(NFTA_RULE_EXPRESSIONS, |b| {
                        for stmt in stmts {
                            encode_stmt(b, stmt, &mut anon);
                        }
                    });
                    if let Some(comment) = comment {
                        b.attr(NFTA_RULE_USERDATA, &comment_udata(comment));
                    }
                })
            }
        }
    }
}

/// One element of a named set; `data` adds its value, if any.
fn new_element(b: &mut Buf, table: &str, set: &str, key: &ElementKey, data: impl FnOnce(&mut Buf)) {
    b.nft_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, |b| {
        b.str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.str(NFTA_SET_ELEM_LIST_SET, set);
        b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| element(b, key, data));
    })
}

const ANON_MAP_NAME: &str = "__map%d";

/// The list entries of one element: a range of a plain interval set is two entries (its first
/// key, and the key after its last flagged as the interval's end, omitted at the top of the
/// address space); a policy tuple is one entry with an end key.
fn element(b: &mut Buf, key: &ElementKey, data: impl FnOnce(&mut Buf)) {
    if let ElementKey::AddressRange(first, last) = key {
        b.nest(NFTA_LIST_ELEM, |b| b.value(NFTA_SET_ELEM_KEY, &octets(first)));
        let after = match last {
            IpAddr::V4(v4) => u32::from(*v4).checked_add(1).map(|a| a.to_be_bytes().to_vec()),
            IpAddr::V6(v6) => u128::from(*v6).checked_add(1).map(|a| a.to_be_bytes().to_vec()),
        };
        if let Some(after) = after {
            b.nest(NFTA_LIST_ELEM, |b| {
                b.value(NFTA_SET_ELEM_KEY, &after);
                b.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            });
        }
        return;
    }
    b.nest(NFTA_LIST_ELEM, |b| {
        b.value(NFTA_SET_ELEM_KEY, &key_bytes(key));
        if let Some(end) = key_end_bytes(key) {
            b.value(NFTA_SET_ELEM_KEY_END, &end);
        }
        data(b);
    });
}

fn anonymous_map(b: &mut Buf, table: &str, id: u32, targets: &[String]) {
    b.nft_msg(NFT_MSG_NEWSET, NLM_F_CREATE, |b| {
        b.str(NFTA_SET_TABLE, table);
        b.str(NFTA_SET_NAME, ANON_MAP_NAME);
        b.u32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT | NFT_SET_MAP);
        b.u32(NFTA_SET_KEY_TYPE, TYPE_INTEGER);
        b.u32(NFTA_SET_KEY_LEN, 4);
        b.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        b.u32(NFTA_SET_ID, id);
        // nft's user data "key byte order: host" (numgen results are host-endian), so that
        // `nft list` prints the keys as 0, 1, 2 ...
        let mut udata = vec![0u8, 4];
        udata.extend_from_slice(&1u32.to_ne_bytes());
        b.attr(NFTA_SET_USERDATA, &udata);
    });
    b.nft_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, |b| {
        b.str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.str(NFTA_SET_ELEM_LIST_SET, ANON_MAP_NAME);
        b.u32(NFTA_SET_ELEM_LIST_SET_ID, id);
        b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
            for (index, target) in (0u32..).zip(targets) {
                b.nest(NFTA_LIST_ELEM, |b| {
                    b.value(NFTA_SET_ELEM_KEY, &index.to_ne_bytes());
                    b.verdict(NFTA_SET_ELEM_DATA, &Verdict::Goto(target.clone()));
                });
            }
        });
    });
}

/// A rule comment in nft's user-data TLV format (type 0 = comment, NUL-terminated).
fn comment_udata(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(250)];
    let mut out = vec![0u8, (text.len() + 1) as u8];
    out.extend_from_slice(text);
    out.push(0);
    out
}

/// The comment of a rule's user data, if it has one.
pub fn parse_comment_udata(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if kind == 0 {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

// Expression attribute numbers.
mod ex {
    pub const PAYLOAD_DREG: u16 = 1;
    pub const PAYLOAD_BASE: u16 = 2;
    pub const PAYLOAD_OFFSET: u16 = 3;
    pub const PAYLOAD_LEN: u16 = 4;
    pub const META_DREG: u16 = 1;
    pub const META_KEY: u16 = 2;
    pub const META_SREG: u16 = 3;
    pub const CMP_SREG: u16 = 1;
    pub const CMP_OP: u16 = 2;
    pub const CMP_DATA: u16 = 3;
    pub const IMMEDIATE_DREG: u16 = 1;
    pub const IMMEDIATE_DATA: u16 = 2;
    pub const BITWISE_SREG: u16 = 1;
    pub const BITWISE_DREG: u16 = 2;
    pub const BITWISE_LEN: u16 = 3;
    pub const BITWISE_MASK: u16 = 4;
    pub const BITWISE_XOR: u16 = 5;
    pub const LOOKUP_SET: u16 = 1;
    pub const LOOKUP_SREG: u16 = 2;
    pub const LOOKUP_DREG: u16 = 3;
    pub const LOOKUP_SET_ID: u16 = 4;
    pub const LOOKUP_FLAGS: u16 = 5;
    pub const LOOKUP_F_INV: u32 = 1;
    pub const CT_DREG: u16 = 1;
    pub const CT_KEY: u16 = 2;
    pub const NG_DREG: u16 = 1;
    pub const NG_MODULUS: u16 = 2;
    pub const NG_TYPE: u16 = 3;
    pub const NAT_TYPE: u16 = 1;
    pub const NAT_FAMILY: u16 = 2;
    pub const NAT_REG_ADDR_MIN: u16 = 3;
    pub const NAT_REG_PROTO_MIN: u16 = 5;
    pub const NAT_FLAGS: u16 = 7;
    pub const MASQ_FLAGS: u16 = 1;
    pub const DYNSET_SET_NAME: u16 = 1;
    pub const DYNSET_OP: u16 = 3;
    pub const DYNSET_SREG_KEY: u16 = 4;
    pub const DYNSET_SREG_DATA: u16 = 5;
    pub const DYNSET_TIMEOUT: u16 = 6;
    pub const OBJREF_IMM_TYPE: u16 = 1;
    pub const OBJREF_IMM_NAME: u16 = 2;
    pub const LOG_GROUP: u16 = 1;
    pub const LOG_PREFIX: u16 = 2;
    pub const LOG_SNAPLEN: u16 = 3;
    pub const REJECT_TYPE: u16 = 1;
    pub const REJECT_ICMP_CODE: u16 = 2;

    pub const PAYLOAD_NETWORK: u32 = 1;
    pub const PAYLOAD_TRANSPORT: u32 = 2;
    pub const META_MARK: u32 = 3;
    pub const META_NFPROTO: u32 = 15;
    pub const META_L4PROTO: u32 = 16;
    pub const CMP_EQ: u32 = 0;
    pub const CMP_NEQ: u32 = 1;
    pub const CMP_LTE: u32 = 3;
    pub const CMP_GTE: u32 = 5;
    pub const CT_STATE: u32 = 0;
    pub const CT_STATE_NEW: u32 = 1 << 3;
    pub const CT_STATE_ESTABLISHED: u32 = 1 << 1;
    pub const CT_STATE_RELATED: u32 = 1 << 2;
    pub const CT_STATUS: u32 = 2;
    pub const CT_STATUS_DST_NAT: u32 = 1 << 5;
    pub const NG_RANDOM: u32 = 1;
    pub const NAT_DNAT: u32 = 1;
    pub const NAT_RANGE_MAP_IPS: u32 = 1;
    pub const NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
    pub const NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 16;
    pub const DYNSET_OP_UPDATE: u32 = 1;
    pub const DYNSET_OP_DELETE: u32 = 2;
    pub const REJECT_TCP_RST: u32 = 1;
    pub const REJECT_ICMPX_UNREACH: u32 = 2;
    pub const REJECT_ICMPX_PORT_UNREACH: u8 = 1;
}

fn payload(b: &mut Buf, dreg: u32, base: u32, offset: u32, len: u32) {
    b.expr("payload", |b| {
        b.u32(ex::PAYLOAD_DREG, dreg);
        b.u32(ex::PAYLOAD_BASE, base);
        b.u32(ex::PAYLOAD_OFFSET, offset);
        b.u32(ex::PAYLOAD_LEN, len);
    });
}

fn meta_load(b: &mut Buf, dreg: u32, key: u32) {
    b.expr("meta", |b| {
        b.u32(ex::META_DREG, dreg);
        b.u32(ex::META_KEY, key);
    });
}

fn cmp(b: &mut Buf, op: u32, data: &[u8]) {
    b.expr("cmp", |b| {
        b.u32(ex::CMP_SREG, REG32_00);
        b.u32(ex::CMP_OP, op);
        b.value(ex::CMP_DATA, data);
    });
}

fn bitwise(b: &mut Buf, mask: u32, xor: u32) {
    b.expr("bitwise", |b| {
        b.u32(ex::BITWISE_SREG, REG32_00);
        b.u32(ex::BITWISE_DREG, REG32_00);
        b.u32(ex::BITWISE_LEN, 4);
        b.value(ex::BITWISE_MASK, &mask.to_ne_bytes());
        b.value(ex::BITWISE_XOR, &xor.to_ne_bytes());
    });
}

/// nft's type of an address of `family`.
fn address_type(family: Family) -> u32 {
    match family {
        Family::V4 => TYPE_IPADDR,
        Family::V6 => TYPE_IP6ADDR,
    }
}

/// Loads the packet's `field` address into `dreg` (and the registers after it for IPv6).
fn load_address(b: &mut Buf, dreg: u32, family: Family, field: AddrField) {
    let offset = match (family, field) {
        (Family::V4, AddrField::Saddr) => 12,
        (Family::V4, AddrField::Daddr) => 16,
        (Family::V6, AddrField::Saddr) => 8,
        (Family::V6, AddrField::Daddr) => 24,
    };
    payload(b, dreg, ex::PAYLOAD_NETWORK, offset, address_len(family) as u32);
}

/// The registers an address of `family` takes.
fn address_registers(family: Family) -> u32 {
    address_len(family) as u32 / 4
}

fn lookup(b: &mut Buf, set: &str, set_id: Option<u32>, dreg: Option<u32>) {
    b.expr("lookup", |b| {
        b.str(ex::LOOKUP_SET, set);
        b.u32(ex::LOOKUP_SREG, REG32_00);
        if let Some(dreg) = dreg {
            b.u32(ex::LOOKUP_DREG, dreg);
        }
        if let Some(id) = set_id {
            b.u32(ex::LOOKUP_SET_ID, id);
        }
    });
}

fn immediate(b: &mut Buf, dreg: u32, data: &[u8]) {
    b.expr("immediate", |b| {
        b.u32(ex::IMMEDIATE_DREG, dreg);
        b.value(ex::IMMEDIATE_DATA, data);
    });
}

fn load_mark(b: &mut Buf) {
    meta_load(b, REG32_00, ex::META_MARK);
}

fn store_mark(b: &mut Buf) {
    b.expr("meta", |b| {
        b.u32(ex::META_KEY, ex::META_MARK);
        b.u32(ex::META_SREG, REG32_00);
    });
}

fn ipv4_only(b: &mut Buf) {
    family_only(b, Family::V4);
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

fn family_only(b: &mut Buf, family: Family) {
    meta_load(b, REG32_00, ex::META_NFPROTO);
    cmp(b, ex::CMP_EQ, &[nfproto(family)]);
}

fn encode_stmt(b: &mut Buf, stmt: &Stmt, anon: &mut impl Iterator<Item = u32>) {
    match stmt {
        Stmt::ServiceVmap { map } => {
            ipv4_only(b);
            payload(b, REG32_00, ex::PAYLOAD_NETWORK, 16, 4);
            meta_load(b, REG32_01, ex::META_L4PROTO);
            payload(b, REG32_02, ex::PAYLOAD_TRANSPORT, 2, 2);
            lookup(b, map, None, Some(REG_VERDICT));
        }
        Stmt::FrontendInSet { set, family } => {
            let n = address_registers(*family);
            family_only(b, *family);
            load_address(b, REG32_00, *family, AddrField::Daddr);
            meta_load(b, reg32(n), ex::META_L4PROTO);
            payload(b, reg32(n + 1), ex::PAYLOAD_TRANSPORT, 2, 2);
            lookup(b, set, None, None);
        }
        Stmt::CtStateNew => {
            b.expr("ct", |b| {
                b.u32(ex::CT_DREG, REG32_00);
                b.u32(ex::CT_KEY, ex::CT_STATE);
            });
            bitwise(b, ex::CT_STATE_NEW, 0);
            cmp(b, ex::CMP_NEQ, &0u32.to_ne_bytes());
        }
        Stmt::CtStateEstablishedRelated => {
            b.expr("ct", |b| {
                b.u32(ex::CT_DREG, REG32_00);
                b.u32(ex::CT_KEY, ex::CT_STATE);
            });
            bitwise(b, ex::CT_STATE_ESTABLISHED | ex::CT_STATE_RELATED, 0);
            cmp(b, ex::CMP_NEQ, &0u32.to_ne_bytes());
        }
        Stmt::PolicyTupleInSet { set, endpoint, family } => {
            let peer = match endpoint {
                AddrField::Saddr => AddrField::Daddr,
                AddrField::Daddr => AddrField::Saddr,
            };
            // endpoint . protocol . port . peer in consecutive registers.
            let n = address_registers(*family);
            family_only(b, *family);
            load_address(b, REG32_00, *family, *endpoint);
            meta_load(b, reg32(n), ex::META_L4PROTO);
            payload(b, reg32(n + 1), ex::PAYLOAD_TRANSPORT, 2, 2);
            load_address(b, reg32(n + 2), *family, peer);
            lookup(b, set, None, None);
        }
        Stmt::AddrVmap { field, map, family } => {
            family_only(b, *family);
            load_address(b, REG32_00, *family, *field);
            lookup(b, map, None, Some(REG_VERDICT));
        }
        Stmt::AddrInSet { field, set, family } => {
            family_only(b, *family);
            load_address(b, REG32_00, *family, *field);
            lookup(b, set, None, None);
        }
        Stmt::Icmpv6Types(lo, hi) => {
            family_only(b, Family::V6);
            meta_load(b, REG32_00, ex::META_L4PROTO);
            cmp(b, ex::CMP_EQ, &[IPPROTO_ICMPV6]);
            payload(b, REG32_00, ex::PAYLOAD_TRANSPORT, 0, 1);
            cmp(b, ex::CMP_GTE, &[*lo]);
            cmp(b, ex::CMP_LTE, &[*hi]);
        }
        Stmt::CounterRef(name) => b.expr("objref", |b| {
            b.u32(ex::OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
            b.str(ex::OBJREF_IMM_NAME, name);
        }),
        Stmt::Log { group, prefix } => b.expr("log", |b| {
            b.attr(ex::LOG_GROUP, &group.to_be_bytes());
            b.str(ex::LOG_PREFIX, prefix);
            // The network and transport headers are all a reader needs.
            b.u32(ex::LOG_SNAPLEN, LOG_SNAPLEN);
        }),
        Stmt::L4Proto(proto) => {
            meta_load(b, REG32_00, ex::META_L4PROTO);
            cmp(b, ex::CMP_EQ, &[*proto]);
        }
        Stmt::SaddrEq(address) => {
            ipv4_only(b);
            payload(b, REG32_00, ex::PAYLOAD_NETWORK, 12, 4);
            cmp(b, ex::CMP_EQ, &address.octets());
        }
        Stmt::SaddrInSet(set) => {
            let set = set.clone();
            encode_stmt(
                b,
                &Stmt::AddrInSet { field: AddrField::Saddr, set, family: Family::V4 },
                anon,
            )
        }
        Stmt::MarkClear(bit) => {
            load_mark(b);
            bitwise(b, *bit, 0);
            cmp(b, ex::CMP_EQ, &0u32.to_ne_bytes());
        }
        Stmt::MarkSet(bit) => {
            load_mark(b);
            bitwise(b, !*bit, *bit);
            store_mark(b);
        }
        Stmt::MarkToggle(bit) => {
            load_mark(b);
            bitwise(b, u32::MAX, *bit);
            store_mark(b);
        }
        Stmt::Masquerade => {
            b.expr("masq", |b| b.u32(ex::MASQ_FLAGS, ex::NAT_RANGE_PROTO_RANDOM_FULLY))
        }
        Stmt::Dnat(address, port) => {
            immediate(b, REG32_00, &address.octets());
            immediate(b, REG32_01, &port.to_be_bytes());
            b.expr("nat", |b| {
                b.u32(ex::NAT_TYPE, ex::NAT_DNAT);
                b.u32(ex::NAT_FAMILY, u32::from(NFPROTO_IPV4));
                b.u32(ex::NAT_REG_ADDR_MIN, REG32_00);
                b.u32(ex::NAT_REG_PROTO_MIN, REG32_01);
                b.u32(ex::NAT_FLAGS, ex::NAT_RANGE_MAP_IPS | ex::NAT_RANGE_PROTO_SPECIFIED);
            });
        }
        Stmt::UpdateSaddr { set, timeout_seconds } => {
            ipv4_only(b);
            payload(b, REG32_00, ex::PAYLOAD_NETWORK, 12, 4);
            b.expr("dynset", |b| {
                b.str(ex::DYNSET_SET_NAME, set);
                b.u32(ex::DYNSET_OP, ex::DYNSET_OP_UPDATE);
                b.u32(ex::DYNSET_SREG_KEY, REG32_00);
                b.attr(ex::DYNSET_TIMEOUT, &(u64::from(*timeout_seconds) * 1000).to_be_bytes());
            });
        }
        Stmt::NumgenVmap { targets } => {
            let id = anon.next().expect("an anonymous map per numgen statement");
            b.expr("numgen", |b| {
                b.u32(ex::NG_DREG, REG32_00);
                b.u32(ex::NG_MODULUS, targets.len() as u32);
                b.u32(ex::NG_TYPE, ex::NG_RANDOM);
            });
            lookup(b, ANON_MAP_NAME, Some(id), Some(REG_VERDICT));
        }
        Stmt::DnatEndpoint { endpoints, count, remember, family } => {
            // saddr . daddr . l4proto . th dport . numgen (IPv4: R0 . R1 . R2 . R3 . R4): the
            // endpoint map's key starts at daddr, the affinity key at saddr; the endpoint
            // lands where numgen was (IPv4: R4, R5).
            let r = FrontendRegisters::load(b, *family, remember.is_some());
            b.expr("numgen", |b| {
                b.u32(ex::NG_DREG, r.endpoint);
                b.u32(ex::NG_MODULUS, *count);
                b.u32(ex::NG_TYPE, ex::NG_RANDOM);
            });
            lookup_from(b, endpoints, r.daddr, Some(r.endpoint));
            if let Some(remember) = remember {
                remember_endpoint(b, remember, &r);
            }
            dnat_registers(b, &r);
        }
        Stmt::DnatRemembered { remember, valid, family } => {
            let r = FrontendRegisters::load(b, *family, true);
            lookup_from(b, &remember.map, REG32_00, Some(r.endpoint));
            // daddr . l4proto . th dport . endpoint address . endpoint port, consecutive.
            lookup_from(b, valid, r.daddr, None);
            remember_endpoint(b, remember, &r);
            dnat_registers(b, &r);
        }
        Stmt::ForgetRemembered { remember, valid, family } => {
            let r = FrontendRegisters::load(b, *family, true);
            lookup_from(b, &remember.map, REG32_00, Some(r.endpoint));
            b.expr("lookup", |b| {
                b.str(ex::LOOKUP_SET, valid);
                b.u32(ex::LOOKUP_SREG, r.daddr);
                b.u32(ex::LOOKUP_FLAGS, ex::LOOKUP_F_INV);
            });
            b.expr("dynset", |b| {
                b.str(ex::DYNSET_SET_NAME, &remember.map);
                b.u32(ex::DYNSET_OP, ex::DYNSET_OP_DELETE);
                b.u32(ex::DYNSET_SREG_KEY, REG32_00);
                // The kernel wants the data register of a map's dynset, even to delete.
                b.u32(ex::DYNSET_SREG_DATA, r.endpoint);
            });
        }
        Stmt::HairpinInSet { set, family } => {
            b.expr("ct", |b| {
                b.u32(ex::CT_DREG, REG32_00);
                b.u32(ex::CT_KEY, ex::CT_STATUS);
            });
            bitwise(b, ex::CT_STATUS_DST_NAT, 0);
            cmp(b, ex::CMP_NEQ, &0u32.to_ne_bytes());
            family_only(b, *family);
            // `saddr . daddr` in one load: the addresses are adjacent in both headers.
            let (offset, len) = match family {
                Family::V4 => (12, 8),
                Family::V6 => (8, 32),
            };
            payload(b, REG32_00, ex::PAYLOAD_NETWORK, offset, len);
            lookup(b, set, None, None);
        }
        Stmt::Reject(kind) => b.expr("reject", |b| match kind {
            RejectKind::TcpReset => b.u32(ex::REJECT_TYPE, ex::REJECT_TCP_RST),
            RejectKind::PortUnreachable => {
                b.u32(ex::REJECT_TYPE, ex::REJECT_ICMPX_UNREACH);
                b.attr(ex::REJECT_ICMP_CODE, &[ex::REJECT_ICMPX_PORT_UNREACH]);
            }
        }),
        Stmt::Counter => b.expr("counter", |_| {}),
        Stmt::Verdict(verdict) => {
            b.expr("immediate", |b| {
                b.u32(ex::IMMEDIATE_DREG, REG_VERDICT);
                b.verdict(ex::IMMEDIATE_DATA, verdict);
            });
        }
    }
}

/// Where the DNAT statements keep a packet's frontend and its endpoint: the source address
/// from R0, then the destination address, `meta l4proto`, `th dport`, and the endpoint address
/// and port (IPv4: R0, R1, R2, R3, R4, R5; IPv6, four registers an address: R0, R4, R8, R9,
/// R10, R14).
struct FrontendRegisters {
    family: Family,
    daddr: u32,
    endpoint: u32,
    endpoint_port: u32,
}

impl FrontendRegisters {
    /// Checks the packet's family and loads (the source address when `with_source`,) the
    /// destination address, `meta l4proto` and `th dport`.
    fn load(b: &mut Buf, family: Family, with_source: bool) -> Self {
        let n = address_registers(family);
        let daddr = reg32(n);
        family_only(b, family);
        if with_source {
            load_address(b, REG32_00, family, AddrField::Saddr);
        }
        load_address(b, daddr, family, AddrField::Daddr);
        meta_load(b, reg32(2 * n), ex::META_L4PROTO);
        payload(b, reg32(2 * n + 1), ex::PAYLOAD_TRANSPORT, 2, 2);
        Self { family, daddr, endpoint: reg32(2 * n + 2), endpoint_port: reg32(3 * n + 2) }
    }
}

fn lookup_from(b: &mut Buf, set: &str, sreg: u32, dreg: Option<u32>) {
    b.expr("lookup", |b| {
        b.str(ex::LOOKUP_SET, set);
        b.u32(ex::LOOKUP_SREG, sreg);
        if let Some(dreg) = dreg {
            b.u32(ex::LOOKUP_DREG, dreg);
        }
    });
}

/// `update @map { saddr . daddr . l4proto . th dport timeout Ns : endpoint }`.
fn remember_endpoint(b: &mut Buf, remember: &Remember, r: &FrontendRegisters) {
    b.expr("dynset", |b| {
        b.str(ex::DYNSET_SET_NAME, &remember.map);
        b.u32(ex::DYNSET_OP, ex::DYNSET_OP_UPDATE);
        b.u32(ex::DYNSET_SREG_KEY, REG32_00);
        b.u32(ex::DYNSET_SREG_DATA, r.endpoint);
        b.attr(ex::DYNSET_TIMEOUT, &(u64::from(remember.timeout_seconds) * 1000).to_be_bytes());
    });
}

/// `dnat ip to` (`ip6`) the endpoint the registers hold.
fn dnat_registers(b: &mut Buf, r: &FrontendRegisters) {
    b.expr("nat", |b| {
        b.u32(ex::NAT_TYPE, ex::NAT_DNAT);
        b.u32(ex::NAT_FAMILY, u32::from(nfproto(r.family)));
        b.u32(ex::NAT_REG_ADDR_MIN, r.endpoint);
        b.u32(ex::NAT_REG_PROTO_MIN, r.endpoint_port);
        b.u32(ex::NAT_FLAGS, ex::NAT_RANGE_MAP_IPS | ex::NAT_RANGE_PROTO_SPECIFIED);
    });
}

/// Reads the attributes of one level: (type without flags, payload).
pub fn attrs(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            break;
        }
        out.push((kind, &bytes[4..len]));
        let next = (len + 3) & !3;
        bytes = &bytes[next.min(bytes.len())..];
    }
    out
}

fn attr<'a>(list: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    list.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

fn string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes.strip_suffix(&[0]).unwrap_or(bytes)).into_owned()
}

/// A netlink error the kernel answered with.
#[derive(Debug)]
pub struct KernelError {
    pub errno: i32,
    /// Sequence number of the message it answers (the batch's n-th message).
    pub seq: u32,
}

/// One object of a dump, as much of it as the backend reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dumped {
    pub table: String,
    pub name: String,
    /// Rules: the comment; elements: unused.
    pub comment: Option<String>,
    /// Set elements: (key bytes, verdict chain or code).
    pub elements: Vec<(Vec<u8>, Option<DumpedVerdict>)>,
    /// Set elements, in the order of `elements`: (end key of a range element, flags).
    pub element_ends: Vec<(Option<Vec<u8>>, u32)>,
    /// Counters: packets counted.
    pub packets: Option<u64>,
    /// Set elements of maps to values: (key bytes, value bytes).
    pub values: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedVerdict {
    pub code: i32,
    pub chain: Option<String>,
}

impl DumpedVerdict {
    pub fn to_verdict(&self) -> Option<Verdict> {
        match (self.code, &self.chain) {
            (0, _) => Some(Verdict::Drop),
            (1, _) => Some(Verdict::Accept),
            (-5, _) => Some(Verdict::Return),
            (-3, Some(chain)) => Some(Verdict::Jump(chain.clone())),
            (-4, Some(chain)) => Some(Verdict::Goto(chain.clone())),
            _ => None,
        }
    }
}

/// What to dump.
#[derive(Clone, Copy, Debug)]
pub enum DumpKind {
    Chains,
    Rules,
    Sets,
    Elements,
    Counters,
}

fn parse_dumped(kind: DumpKind, payload: &[u8]) -> Dumped {
    let list = attrs(payload);
    let text = |k| attr(&list, k).map(string).unwrap_or_default();
    match kind {
        DumpKind::Chains => Dumped {
            table: text(NFTA_CHAIN_TABLE),
            name: text(NFTA_CHAIN_NAME),
            ..Dumped::default()
        },
        DumpKind::Rules => Dumped {
            table: text(NFTA_RULE_TABLE),
            name: text(NFTA_RULE_CHAIN),
            comment: attr(&list, NFTA_RULE_USERDATA).and_then(parse_comment_udata),
            ..Dumped::default()
        },
        DumpKind::Sets => {
            Dumped { table: text(NFTA_SET_TABLE), name: text(NFTA_SET_NAME), ..Dumped::default() }
        }
        DumpKind::Elements => {
            let mut elements = Vec::new();
            let mut element_ends = Vec::new();
            let mut values = Vec::new();
            for (_, element) in
                attr(&list, NFTA_SET_ELEM_LIST_ELEMENTS).map(attrs).unwrap_or_default()
            {
                let element = attrs(element);
                let key = attr(&element, NFTA_SET_ELEM_KEY)
                    .and_then(|k| attr(&attrs(k), NFTA_DATA_VALUE))
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                let verdict = attr(&element, NFTA_SET_ELEM_DATA)
                    .and_then(|d| attr(&attrs(d), NFTA_DATA_VERDICT))
                    .map(|v| {
                        let v = attrs(v);
                        DumpedVerdict {
                            code: attr(&v, NFTA_VERDICT_CODE)
                                .and_then(|c| c.try_into().ok())
                                .map(i32::from_be_bytes)
                                .unwrap_or(i32::MIN),
                            chain: attr(&v, NFTA_VERDICT_CHAIN).map(string),
                        }
                    });
                if let Some(value) = attr(&element, NFTA_SET_ELEM_DATA)
                    .and_then(|d| attr(&attrs(d), NFTA_DATA_VALUE))
                {
                    values.push((key.clone(), value.to_vec()));
                }
                elements.push((key, verdict));
                let end = attr(&element, NFTA_SET_ELEM_KEY_END)
                    .and_then(|k| attr(&attrs(k), NFTA_DATA_VALUE))
                    .map(<[u8]>::to_vec);
                let flags = attr(&element, NFTA_SET_ELEM_FLAGS)
                    .and_then(|f| f.try_into().ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                element_ends.push((end, flags));
            }
            Dumped {
                table: text(NFTA_SET_ELEM_LIST_TABLE),
                name: text(NFTA_SET_ELEM_LIST_SET),
                elements,
                element_ends,
                values,
                ..Dumped::default()
            }
        }
        DumpKind::Counters => Dumped {
            table: text(NFTA_OBJ_TABLE),
            name: text(NFTA_OBJ_NAME),
            packets: attr(&list, NFTA_OBJ_DATA)
                .and_then(|d| attr(&attrs(d), NFTA_COUNTER_PACKETS))
                .and_then(|p| p.try_into().ok())
                .map(u64::from_be_bytes),
            ..Dumped::default()
        },
    }
}

/// A NETLINK_NETFILTER socket in the network namespace of the thread that opened it.
pub struct Socket {
    fd: OwnedFd,
    buffer: Vec<u8>,
}

/// Send and receive buffer sizes: a batch of thousands of services is sent in one message.
const SOCKET_BUFFER: i32 = 64 << 20;
/// Dumps interrupted by a concurrent change (NLM_F_DUMP_INTR) are retried this many times.
const DUMP_RETRIES: usize = 5;

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Socket {
    /// The first `len` bytes of the last datagram [`Socket::recv`] received.
    pub(crate) fn received(&self, len: usize) -> &[u8] {
        &self.buffer[..len.min(self.buffer.len())]
    }

    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for (option, value) in
            [(libc::SO_SNDBUFFORCE, SOCKET_BUFFER), (libc::SO_RCVBUFFORCE, SOCKET_BUFFER)]
        {
            // SAFETY: setsockopt with a valid int option value; failure is tolerated (without
            // CAP_NET_ADMIN the default sizes stay and large batches are split smaller).
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&value as *const i32).cast(),
                    size_of::<i32>() as u32,
                );
            }
        }
        let one: i32 = 1;
        // SAFETY: as above; NETLINK_CAP_ACK keeps error messages short (no echoed request).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_CAP_ACK,
                (&one as *const i32).cast(),
                size_of::<i32>() as u32,
            );
        }
        let timeout = libc::timeval { tv_sec: 10, tv_usec: 0 };
        // SAFETY: as above, with a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Self { fd, buffer: vec![0; 1 << 20] })
    }

    pub(crate) fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sendto with a buffer we own and a valid sockaddr_nl for the kernel (pid 0).
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into [`Socket::received`]; `Ok(None)` when nothing is queued and
    /// `dont_wait`.
    pub(crate) fn recv(&mut self, dont_wait: bool) -> io::Result<Option<usize>> {
        let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: recv into our own buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buffer.as_mut_ptr().cast(),
                self.buffer.len(),
                flags,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if dont_wait && err.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(n as usize))
    }

    /// Sends one batch and returns the kernel's error answers (empty: committed). nfnetlink
    /// commits all of a batch or none of it; it reports every failing message, then the
    /// acknowledgement of the last one (the only one that asks), which ends the answers.
    pub fn send_batch(&mut self, batch: &[u8]) -> io::Result<Vec<KernelError>> {
        self.send(batch)?;
        let Some(last_seq) = messages(batch)
            .iter()
            .filter(|(h, _)| h.flags & NLM_F_ACK != 0)
            .map(|(h, _)| h.seq)
            .next_back()
        else {
            return Ok(Vec::new());
        };
        let mut errors = Vec::new();
        loop {
            let Some(n) = self.recv(false)? else { return Ok(errors) };
            for (header, payload) in messages(&self.buffer[..n]) {
                if header.kind == NLMSG_ERROR && payload.len() >= 4 {
                    let errno = i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                    if errno != 0 {
                        errors.push(KernelError { errno: -errno, seq: header.seq });
                    }
                    if header.seq == last_seq {
                        return Ok(errors);
                    }
                }
            }
        }
    }

    /// Dumps the objects of `kind` of table `table` (for elements: of set `set`).
    pub fn dump(
        &mut self,
        kind: DumpKind,
        table: &str,
        set: Option<&str>,
    ) -> io::Result<Vec<Dumped>> {
        let msg = match kind {
            DumpKind::Chains => NFT_MSG_GETCHAIN,
            DumpKind::Rules => NFT_MSG_GETRULE,
            DumpKind::Sets => NFT_MSG_GETSET,
            DumpKind::Elements => NFT_MSG_GETSETELEM,
            DumpKind::Counters => NFT_MSG_GETOBJ,
        };
        for _ in 0..DUMP_RETRIES {
            let mut buf = Buf::default();
            buf.nft_msg(msg, NLM_F_DUMP, |b| match kind {
                DumpKind::Chains => b.str(NFTA_CHAIN_TABLE, table),
                DumpKind::Rules => b.str(NFTA_RULE_TABLE, table),
                DumpKind::Sets => b.str(NFTA_SET_TABLE, table),
                DumpKind::Elements => {
                    b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                    b.str(NFTA_SET_ELEM_LIST_SET, set.unwrap_or_default());
                }
                DumpKind::Counters => {
                    b.str(NFTA_OBJ_TABLE, table);
                    b.u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
                }
            });
            self.send(&buf.bytes)?;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: while let Some(n) = self.recv(false)? {
                for (header, payload) in messages(&self.buffer[..n]) {
                    interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
                    match header.kind {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            let errno = payload
                                .get(..4)
                                .map(|e| i32::from_ne_bytes(e.try_into().expect("4 bytes")))
                                .unwrap_or(0);
                            if errno == 0 {
                                continue;
                            }
                            if -errno == libc::ENOENT {
                                return Ok(Vec::new());
                            }
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        _ => {
                            // Skip the nfgenmsg header.
                            let dumped = parse_dumped(kind, payload.get(4..).unwrap_or_default());
                            if dumped.table == table || dumped.table.is_empty() {
                                out.push(dumped);
                            }
                        }
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(io::Error::other("nftables dump kept being interrupted by concurrent changes"))
    }
}

/// The header fields of a netlink message that the readers here look at.
pub(crate) struct Header {
    pub(crate) kind: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
}

/// The messages of a datagram: header and payload.
pub(crate) fn messages(mut bytes: &[u8]) -> Vec<(Header, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 16 {
        let len = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        if len < 16 || len > bytes.len() {
            break;
        }
        let header = Header {
            kind: u16::from_ne_bytes([bytes[4], bytes[5]]),
            flags: u16::from_ne_bytes([bytes[6], bytes[7]]),
            seq: u32::from_ne_bytes(bytes[8..12].try_into().expect("4 bytes")),
        };
        out.push((header, &bytes[16..len]));
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
    }
    out
}

/// How many messages of a batch asked for an acknowledgement.
#[cfg(test)]
fn count_acked(batch: &[u8]) -> usize {
    messages(batch).iter().filter(|(h, _)| h.flags & NLM_F_ACK != 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_pad_each_field_to_a_register_and_parse_back() {
        let address = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let key = ElementKey::Service { address, protocol: 6, port: 8080 };
        let bytes = key_bytes(&key);
        assert_eq!(bytes, [10, 96, 0, 10, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(parse_service_key(&bytes), Some(key));
        assert_eq!(parse_service_key(&bytes[..8]), None);
        // IPv6: the address takes four registers.
        let address: IpAddr = "fd00:96::a".parse().unwrap();
        let key6 = ElementKey::Service { address, protocol: 17, port: 53 };
        let bytes = key_bytes(&key6);
        assert_eq!(bytes.len(), service_key_len(Family::V6));
        assert_eq!(&bytes[16..], [17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(parse_service_key(&bytes), Some(key6));
    }

    #[test]
    fn endpoint_keys_and_values_of_both_families_parse_back() {
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let sa = |text: &str| -> SocketAddr { text.parse().unwrap() };
        for (frontend, endpoint) in
            [(ip("10.96.0.1"), sa("10.0.0.1:8080")), (ip("fd00:96::1"), sa("[fd00::1]:8080"))]
        {
            let keys = [
                ElementKey::Endpoint { address: frontend, protocol: 6, port: 80, index: 7 },
                ElementKey::FrontendEndpoint { address: frontend, protocol: 6, port: 80, endpoint },
                ElementKey::Hairpin(endpoint.ip()),
            ];
            for key in keys {
                assert_eq!(parse_endpoint_key(&key_bytes(&key)), Some(key), "{key:?}");
            }
            let value = endpoint_bytes(&endpoint);
            assert_eq!(value.len(), endpoint_len(Family::of(&frontend)));
            assert_eq!(parse_endpoint(&value), Some(endpoint));
        }
        // A frontend of one family with an endpoint of the other is no key of ours.
        let mixed = [
            key_bytes(&ElementKey::Service { address: ip("fd00::1"), protocol: 6, port: 1 }),
            vec![0; 8],
        ]
        .concat();
        assert_eq!(parse_endpoint_key(&mixed), None);
        // Nor is a pair of different addresses in a hairpin set.
        assert_eq!(parse_endpoint_key(&[1, 2, 3, 4, 1, 2, 3, 5]), None);
    }

    /// An expression of a rule: its name and its attributes.
    type Expr = (String, Vec<(u16, Vec<u8>)>);

    /// The expressions of a rule of `stmt` alone.
    fn rule_exprs(stmt: Stmt) -> Vec<Expr> {
        let mut encoder = Encoder::new("weir");
        encoder.op(&Op::AddRule { chain: "c".into(), stmts: vec![stmt], comment: None });
        let (batch, _) = encoder.finish();
        let msgs = messages(&batch);
        let rule = attrs(&msgs[1].1[4..]);
        let exprs = attr(&rule, NFTA_RULE_EXPRESSIONS).unwrap();
        attrs(exprs)
            .into_iter()
            .map(|(_, e)| {
                let e = attrs(e);
                let name = attr(&e, NFTA_EXPR_NAME).map(string).unwrap();
                let data = attr(&e, NFTA_EXPR_DATA).map(attrs).unwrap_or_default();
                (name, data.into_iter().map(|(k, v)| (k, v.to_vec())).collect())
            })
            .collect()
    }

    fn u32_attr(attrs: &[(u16, Vec<u8>)], kind: u16) -> u32 {
        let value = &attrs.iter().find(|(k, _)| *k == kind).unwrap().1;
        u32::from_be_bytes(value[..4].try_into().unwrap())
    }

    #[test]
    fn an_ipv6_dnat_keeps_its_registers_within_the_sixteen() {
        let remember = Remember { map: "a".into(), timeout_seconds: 60 };
        let exprs = rule_exprs(Stmt::DnatEndpoint {
            endpoints: "e".into(),
            count: 3,
            remember: Some(remember),
            family: Family::V6,
        });
        let names: Vec<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "meta", "cmp", "payload", "payload", "meta", "payload", "numgen", "lookup",
                "dynset", "nat"
            ]
        );
        // nfproto ipv6; saddr at R0 (16 bytes), daddr at R4, l4proto R8, dport R9.
        assert_eq!(exprs[1].1.iter().find(|(k, _)| *k == ex::CMP_DATA).unwrap().1[4], NFPROTO_IPV6);
        assert_eq!(u32_attr(&exprs[2].1, ex::PAYLOAD_OFFSET), 8);
        assert_eq!(u32_attr(&exprs[2].1, ex::PAYLOAD_LEN), 16);
        assert_eq!(u32_attr(&exprs[3].1, ex::PAYLOAD_DREG), reg32(4));
        assert_eq!(u32_attr(&exprs[3].1, ex::PAYLOAD_OFFSET), 24);
        assert_eq!(u32_attr(&exprs[4].1, ex::META_DREG), reg32(8));
        assert_eq!(u32_attr(&exprs[5].1, ex::PAYLOAD_DREG), reg32(9));
        // numgen and the endpoint at R10; the endpoint's 20 bytes end at R14.
        assert_eq!(u32_attr(&exprs[6].1, ex::NG_DREG), reg32(10));
        assert_eq!(u32_attr(&exprs[7].1, ex::LOOKUP_SREG), reg32(4));
        assert_eq!(u32_attr(&exprs[7].1, ex::LOOKUP_DREG), reg32(10));
        assert_eq!(u32_attr(&exprs[8].1, ex::DYNSET_SREG_DATA), reg32(10));
        let nat = &exprs[9].1;
        assert_eq!(u32_attr(nat, ex::NAT_FAMILY), u32::from(NFPROTO_IPV6));
        assert_eq!(u32_attr(nat, ex::NAT_REG_ADDR_MIN), reg32(10));
        assert_eq!(u32_attr(nat, ex::NAT_REG_PROTO_MIN), reg32(14));
    }

    #[test]
    fn an_ipv4_dnat_is_encoded_as_before() {
        let exprs = rule_exprs(Stmt::DnatEndpoint {
            endpoints: "e".into(),
            count: 2,
            remember: None,
            family: Family::V4,
        });
        // nfproto, daddr R1, l4proto R2, dport R3, numgen R4, lookup R1 -> R4, nat R4 . R5.
        assert_eq!(u32_attr(&exprs[2].1, ex::PAYLOAD_DREG), reg32(1));
        assert_eq!(u32_attr(&exprs[5].1, ex::NG_DREG), reg32(4));
        assert_eq!(u32_attr(&exprs[6].1, ex::LOOKUP_SREG), reg32(1));
        assert_eq!(u32_attr(&exprs[7].1, ex::NAT_FAMILY), u32::from(NFPROTO_IPV4));
        assert_eq!(u32_attr(&exprs[7].1, ex::NAT_REG_PROTO_MIN), reg32(5));
    }

    #[test]
    fn policy_tuples_encode_as_start_and_end_keys_and_parse_back() {
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let tuple = PolicyTuple {
            endpoint: ip("10.244.0.10"),
            protocols: (6, 6),
            ports: (80, 81),
            peers: (ip("10.0.0.0"), ip("10.255.255.255")),
        };
        let key = ElementKey::PolicyTuple(tuple);
        let (start, end) = (key_bytes(&key), key_end_bytes(&key).unwrap());
        assert_eq!(start, [10, 244, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0, 10, 0, 0, 0]);
        assert_eq!(end, [10, 244, 0, 10, 6, 0, 0, 0, 0, 81, 0, 0, 10, 255, 255, 255]);
        assert_eq!(parse_policy_tuple(&start, &end), Some(tuple));
        assert_eq!(parse_policy_tuple(&start, &end[..8]), None);
        // IPv6: 16-byte addresses, four registers each.
        let tuple6 = PolicyTuple {
            endpoint: ip("fd00::a"),
            protocols: (17, 17),
            ports: (53, 53),
            peers: (ip("fd00:1::"), ip("fd00:1::ffff")),
        };
        let key = ElementKey::PolicyTuple(tuple6);
        let (start, end) = (key_bytes(&key), key_end_bytes(&key).unwrap());
        assert_eq!(start.len(), 40);
        assert_eq!(&start[16..24], [17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(&end[38..], [0xff, 0xff]);
        assert_eq!(parse_policy_tuple(&start, &end), Some(tuple6));
        assert_eq!(parse_policy_tuple(&start, &end[..16]), None);
    }

    #[test]
    fn an_address_range_is_a_start_and_a_flagged_end_except_at_the_top() {
        let elements = |first: &str, last: &str| {
            let key = ElementKey::AddressRange(first.parse().unwrap(), last.parse().unwrap());
            let mut encoder = Encoder::new("weir");
            encoder.op(&Op::AddSetElement { set: "r".into(), key });
            let (batch, _) = encoder.finish();
            parse_dumped(DumpKind::Elements, &messages(&batch)[1].1[4..])
        };
        let low = elements("10.0.0.0", "10.0.0.255");
        assert_eq!(low.elements.len(), 2);
        assert_eq!(low.elements[1].0, [10, 0, 1, 0]);
        assert_eq!(low.element_ends, [(None, 0), (None, NFT_SET_ELEM_INTERVAL_END)]);
        assert_eq!(elements("255.0.0.0", "255.255.255.255").elements.len(), 1);
        let low6 = elements("fd00::", "fd00::ffff");
        assert_eq!(low6.elements[1].0, "fd00::1:0".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let top6 = elements("ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(top6.elements.len(), 1);
    }

    #[test]
    fn a_batch_is_framed_and_every_message_asks_for_an_ack() {
        let mut encoder = Encoder::new("weir");
        encoder.op(&Op::AddTable);
        encoder.op(&Op::AddChain { name: "services".into(), base: None });
        let (batch, _) = encoder.finish();
        let msgs = messages(&batch);
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].0.kind, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[3].0.kind, NFNL_MSG_BATCH_END);
        assert_eq!(msgs[1].0.kind, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE);
        assert_eq!(count_acked(&batch), 1, "only the last message asks for an ack");
        assert_ne!(msgs[2].0.flags & NLM_F_ACK, 0);
        let chain = attrs(&msgs[2].1[4..]);
        assert_eq!(attr(&chain, NFTA_CHAIN_NAME).map(string), Some("services".into()));
        assert!(encoder.is_empty());
    }

    #[test]
    fn a_numgen_rule_brings_its_anonymous_map_in_the_same_batch() {
        let mut encoder = Encoder::new("weir");
        encoder.op(&Op::AddRule {
            chain: "service-x".into(),
            stmts: vec![Stmt::NumgenVmap { targets: vec!["a".into(), "b".into()] }],
            comment: Some("hello".into()),
        });
        let (batch, _) = encoder.finish();
        let kinds: Vec<u16> = messages(&batch).iter().map(|(h, _)| h.kind & 0xff).collect();
        assert_eq!(kinds, [0x10, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWRULE, 0x11]);
        let elements = parse_dumped(DumpKind::Elements, &messages(&batch)[2].1[4..]);
        assert_eq!(elements.elements.len(), 2);
        assert_eq!(
            elements.elements[1].1.as_ref().and_then(DumpedVerdict::to_verdict),
            Some(Verdict::Goto("b".into()))
        );
        let rule = parse_dumped(DumpKind::Rules, &messages(&batch)[3].1[4..]);
        assert_eq!(rule.comment.as_deref(), Some("hello"));
        assert_eq!(rule.name, "service-x");
    }
}
