//! Parsing of Ethernet + IPv4 + TCP/UDP headers into the flow tuple the load balancer needs.
//!
//! Everything is read with `bpf_skb_load_bytes` (`TcContext::load`), which bounds-checks
//! against the real packet length, so a truncated packet yields `None` instead of a bad read.
use aya_ebpf::programs::TcContext;
use weir_common::proto;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offsets inside the IPv4 header.
const IP_PROTO_OFF: usize = 9;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset, in host order after `from_be`.
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// An IPv4 flow as seen in one packet, with the offsets needed to rewrite it.
/// Addresses and ports are in network byte order, as on the wire.
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
}

impl Flow4 {
    /// Offset of the L4 checksum field.
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == proto::TCP { self.l4_off + 16 } else { self.l4_off + 6 }
    }
}

/// Parses an IPv4 TCP or UDP packet. `None` for anything else: other ethertypes, other
/// protocols, non-first fragments (no ports), or a packet too short for its headers.
#[inline(always)]
pub fn parse_flow4(ctx: &TcContext) -> Option<Flow4> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = (version_ihl & 0x0f) as usize * 4;
    if ihl < 20 {
        return None;
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if frag & IP_MF_AND_OFFSET != 0 {
        // Fragments carry no (or partial) L4 headers; translating them needs fragment
        // tracking, which the datapath does not do yet.
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + IP_PROTO_OFF).ok()?;
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let saddr: u32 = ctx.load(IP_SRC_OFF).ok()?;
    let daddr: u32 = ctx.load(IP_DST_OFF).ok()?;
    let sport: u16 = ctx.load(l4_off).ok()?;
    let dport: u16 = ctx.load(l4_off + 2).ok()?;
    let flow = Flow4 { saddr, daddr, sport, dport, proto, l4_off };
    // The checksum we may rewrite must be inside the packet too.
    let _: u16 = ctx.load(flow.l4_csum_off()).ok()?;
    Some(flow)
}
