//! Parsing of Ethernet + IPv4 + TCP/UDP headers into the flow tuple the load balancer needs.
//!
//! Headers are read with direct packet access (bounds-checked against `data_end`, as the
//! verifier requires), which costs no helper call per field. When the headers are not in the
//! linear part of the skb, they are pulled in once with `bpf_skb_pull_data`. A packet too short
//! for its headers yields `None` and is never read out of bounds.
use aya_ebpf::programs::TcContext;
use weir_common::proto;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IPV4_MIN_HLEN: usize = 20;
/// The longest header stack parsed: Ethernet, IPv4 with options, TCP up to its checksum.
const MAX_PARSED_LEN: usize = ETH_HLEN + 60 + 18;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset (host order).
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

/// A pointer to a `T` at `offset`, if the linear packet data holds all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` at `offset`; pulls headers into the linear area once if they are not there.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let ptr = match ptr_at::<T>(ctx, offset) {
        Some(ptr) => ptr,
        None => {
            let wanted = offset + core::mem::size_of::<T>();
            if wanted > ctx.len() as usize {
                return None; // truncated: the bytes do not exist
            }
            let pull = if (ctx.len() as usize) < MAX_PARSED_LEN {
                ctx.len()
            } else {
                MAX_PARSED_LEN as u32
            };
            ctx.pull_data(pull).ok()?;
            ptr_at::<T>(ctx, offset)?
        }
    };
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` are inside the packet;
    // the read is unaligned-safe.
    Some(unsafe { core::ptr::read_unaligned(ptr) })
}

/// The IPv4 header length of an Ethernet + IPv4 packet; `None` for another ethertype or IP
/// version, a bad header length, or a truncated header.
#[inline(always)]
fn ipv4_header_len(ctx: &TcContext) -> Option<usize> {
    if read::<u16>(ctx, 12)? != ETH_P_IP_BE {
        return None;
    }
    let version_ihl: u8 = read(ctx, ETH_HLEN)?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = (version_ihl & 0x0f) as usize * 4;
    if ihl < IPV4_MIN_HLEN {
        return None;
    }
    Some(ihl)
}

/// Parses an IPv4 TCP or UDP packet. `None` for anything else: other ethertypes, other
/// protocols, non-first fragments (no ports), or a packet too short for its headers.
#[inline(always)]
pub fn parse_flow4(ctx: &TcContext) -> Option<Flow4> {
    let ihl = ipv4_header_len(ctx)?;
    if u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & IP_MF_AND_OFFSET != 0 {
        // Fragments carry no (or partial) L4 headers; translating them needs fragment
        // tracking, which the datapath does not do yet.
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let ports: [u16; 2] = read(ctx, l4_off)?;
    let flow = Flow4 {
        saddr: read(ctx, IP_SRC_OFF)?,
        daddr: read(ctx, IP_DST_OFF)?,
        sport: ports[0],
        dport: ports[1],
        proto,
        l4_off,
    };
    // The checksum a rewrite updates must be inside the packet too.
    read::<u16>(ctx, flow.l4_csum_off())?;
    Some(flow)
}

/// An IPv4 packet as the policy check sees it: any protocol; ports (network order, as on the
/// wire) for TCP, UDP and SCTP, zero for other protocols and for non-first fragments (which
/// only rules allowing every port of the protocol match).
pub struct Packet4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses any IPv4 packet for the policy check; `None` for other ethertypes or truncated
/// headers.
#[inline(always)]
pub fn parse_packet4(ctx: &TcContext) -> Option<Packet4> {
    let ihl = ipv4_header_len(ctx)?;
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    let fragment_offset = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & 0x1fff;
    let has_ports = fragment_offset == 0
        && (proto == proto::TCP || proto == proto::UDP || proto == proto::SCTP);
    let ports: [u16; 2] = if has_ports { read(ctx, ETH_HLEN + ihl)? } else { [0, 0] };
    Some(Packet4 {
        saddr: read(ctx, IP_SRC_OFF)?,
        daddr: read(ctx, IP_DST_OFF)?,
        sport: ports[0],
        dport: ports[1],
        proto,
    })
}
