//! Parsing of Ethernet + IPv4 or IPv6 + TCP/UDP/SCTP headers into the flow tuple the load balancer
//! needs, and of IPv4 or IPv6 packets for the policy check.
//!
//! Headers are read with direct packet access (bounds-checked against `data_end`, as the
//! verifier requires), which costs no helper call per field. When the headers are not in the
//! linear part of the skb, they are pulled in once with `bpf_skb_pull_data`. A packet too short
//! for its headers yields `None` and is never read out of bounds.
use aya_ebpf::programs::TcContext;
use weir_common::{
    policy::{Addr, icmpv6_link_control, v4_mapped},
    proto,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IPV4_MIN_HLEN: usize = 20;
/// The longest header stack parsed: Ethernet, IPv4 with options, TCP up to its checksum (SCTP's
/// ends earlier).
const MAX_PARSED_LEN: usize = ETH_HLEN + 60 + 18;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// More-fragments flag and fragment offset (host order).
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// A flow as seen in one packet, with the offsets needed to rewrite it. Addresses (`u32` for
/// IPv4, `[u32; 4]` for IPv6) and ports are in network byte order, as on the wire.
pub struct Flow<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// SCTP only (0 otherwise): the length of the L4 header and payload, from the IP header
    /// (SCTP's checksum covers them).
    pub l4_len: u16,
}

pub type Flow4 = Flow<u32>;
pub type Flow6 = Flow<[u32; 4]>;

impl<A> Flow<A> {
    /// Offset of the L4 checksum field (16 bits for TCP and UDP, 32 for SCTP).
    pub fn l4_csum_off(&self) -> usize {
        match self.proto {
            proto::TCP => self.l4_off + 16,
            proto::SCTP => self.l4_off + weir_common::sctp::CHECKSUM_OFFSET,
            _ => self.l4_off + 6,
        }
    }
}

/// The flow of a TCP, UDP or SCTP packet whose IP header (addresses at `saddr_off` and
/// `daddr_off`) carries `proto` and whose L4 header of `l4_len` bytes starts at `l4_off`;
/// `None` for another protocol or when the ports or the checksum a rewrite updates are not
/// inside the packet.
#[inline(always)]
fn parse_l4<A: Copy>(
    ctx: &TcContext,
    proto: u8,
    saddr_off: usize,
    daddr_off: usize,
    l4_off: usize,
    l4_len: u16,
) -> Option<Flow<A>> {
    if !has_ports(proto) {
        return None;
    }
    let ports: [u16; 2] = read(ctx, l4_off)?;
    let flow = Flow {
        saddr: read(ctx, saddr_off)?,
        daddr: read(ctx, daddr_off)?,
        sport: ports[0],
        dport: ports[1],
        proto,
        l4_off,
        l4_len,
    };
    if proto == proto::SCTP {
        read::<u32>(ctx, flow.l4_csum_off())?;
    } else {
        read::<u16>(ctx, flow.l4_csum_off())?;
    }
    Some(flow)
}

pub const IP6_SRC_OFF: usize = ETH_HLEN + 8;
pub const IP6_DST_OFF: usize = ETH_HLEN + 24;

/// The IP protocol of an Ethernet + IPv4 or IPv6 packet (the IPv6 next header, without
/// walking extension headers), with whether it is IPv6; two reads, for a cheap first filter.
#[inline(always)]
pub fn ip_protocol(ctx: &TcContext) -> Option<(bool, u8)> {
    match read::<u16>(ctx, 12)? {
        ETH_P_IP_BE => Some((false, read(ctx, ETH_HLEN + 9)?)),
        ETH_P_IPV6_BE => Some((true, read(ctx, ETH_HLEN + 6)?)),
        _ => None,
    }
}

/// Whether an Ethernet frame carries IPv6 (`Some(true)`) or IPv4 (`Some(false)`); `None` for
/// another ethertype. One read: the load balancer's first question.
#[inline(always)]
pub fn carries_ipv6(ctx: &TcContext) -> Option<bool> {
    match read::<u16>(ctx, 12)? {
        ETH_P_IP_BE => Some(false),
        ETH_P_IPV6_BE => Some(true),
        _ => None,
    }
}

/// Parses an IPv6 TCP, UDP or SCTP packet whose L4 header follows the fixed header. `None` for
/// anything else, including packets with extension headers (they pass untranslated; fragments
/// carry a fragment header, so they are among them).
#[inline(always)]
pub fn parse_flow6(ctx: &TcContext) -> Option<Flow6> {
    if read::<u16>(ctx, 12)? != ETH_P_IPV6_BE {
        return None;
    }
    parse_ipv6_flow(ctx)
}

/// [`parse_flow6`] of a frame known to carry IPv6 ([`carries_ipv6`]).
#[inline(always)]
pub fn parse_ipv6_flow(ctx: &TcContext) -> Option<Flow6> {
    let version: u8 = read(ctx, ETH_HLEN)?;
    if version >> 4 != 6 {
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 6)?;
    // Only SCTP's checksum update needs the length; the others skip the read.
    let l4_len =
        if proto == proto::SCTP { u16::from_be(read::<u16>(ctx, ETH_HLEN + 4)?) } else { 0 };
    parse_l4(ctx, proto, IP6_SRC_OFF, IP6_DST_OFF, ETH_HLEN + IPV6_HLEN, l4_len)
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
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
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
    ipv4_header_len_of_ip(ctx)
}

/// [`ipv4_header_len`] of a frame known to carry IPv4.
#[inline(always)]
fn ipv4_header_len_of_ip(ctx: &TcContext) -> Option<usize> {
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

/// Parses an IPv4 TCP, UDP or SCTP packet. `None` for anything else: other ethertypes, other
/// protocols, non-first fragments (no ports), or a packet too short for its headers.
#[inline(always)]
pub fn parse_flow4(ctx: &TcContext) -> Option<Flow4> {
    if read::<u16>(ctx, 12)? != ETH_P_IP_BE {
        return None;
    }
    parse_ipv4_flow(ctx)
}

/// [`parse_flow4`] of a frame known to carry IPv4 ([`carries_ipv6`]).
#[inline(always)]
pub fn parse_ipv4_flow(ctx: &TcContext) -> Option<Flow4> {
    let ihl = ipv4_header_len_of_ip(ctx)?;
    if u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & IP_MF_AND_OFFSET != 0 {
        // Fragments carry no (or partial) L4 headers; translating them needs fragment
        // tracking, which the datapath does not do yet.
        return None;
    }
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    // Only SCTP's checksum update needs the length; the others skip the read.
    let l4_len = if proto == proto::SCTP {
        u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?).checked_sub(ihl as u16)?
    } else {
        0
    };
    parse_l4(ctx, proto, IP_SRC_OFF, IP_DST_OFF, ETH_HLEN + ihl, l4_len)
}

/// A packet as the policy check sees it, IPv4 or IPv6: addresses in the 16-byte form of the
/// policy maps (IPv4-mapped for IPv4); any protocol; ports (network order, as on the wire) for
/// TCP, UDP and SCTP, zero for other protocols and for non-first fragments (which only rules
/// allowing every port of the protocol match).
#[derive(Default)]
pub struct PolicyPacket {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// ICMPv6 neighbour or multicast listener discovery ([`icmpv6_link_control`]): always
    /// passes.
    pub nd: bool,
}

const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
pub const IPV6_HLEN: usize = 40;
/// Extension headers walked before giving up (Cilium walks 4 too).
const IPV6_MAX_EXT_HEADERS: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

#[inline(always)]
fn has_ports(proto: u8) -> bool {
    proto == proto::TCP || proto == proto::UDP || proto == proto::SCTP
}

/// Parses an IPv4 or IPv6 packet for the policy check into `out`; false for other ethertypes
/// or truncated headers. Not inlined: the parse's temporaries get their own stack frame.
#[inline(never)]
pub fn parse_policy_packet(ctx: TcContext, out: &mut PolicyPacket) -> bool {
    let parsed = match read::<u16>(&ctx, 12) {
        Some(ETH_P_IPV6_BE) => parse_packet6(&ctx),
        Some(_) => parse_packet4(&ctx),
        None => None,
    };
    match parsed {
        Some(packet) => {
            *out = packet;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_packet4(ctx: &TcContext) -> Option<PolicyPacket> {
    let ihl = ipv4_header_len(ctx)?;
    let proto: u8 = read(ctx, ETH_HLEN + 9)?;
    let fragment_offset = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?) & 0x1fff;
    let ports: [u16; 2] =
        if fragment_offset == 0 && has_ports(proto) { read(ctx, ETH_HLEN + ihl)? } else { [0, 0] };
    Some(PolicyPacket {
        saddr: v4_mapped(read(ctx, IP_SRC_OFF)?),
        daddr: v4_mapped(read(ctx, IP_DST_OFF)?),
        sport: ports[0],
        dport: ports[1],
        proto,
        nd: false,
    })
}

/// IPv6: the fixed header by direct access, then a bounded walk over the extension headers
/// (hop-by-hop, routing, destination options, fragment, authentication) with
/// `bpf_skb_load_bytes` (their offsets vary). The upper-layer protocol is the first header
/// that is not one of those. A non-first fragment has no upper-layer header: its protocol is
/// the fragment header's next header and its ports are zero, as for IPv4. A packet with more
/// extension headers than the walk takes keeps the last unparsed header's number as its
/// protocol and zero ports: only rules allowing every protocol and port match it.
#[inline(always)]
fn parse_packet6(ctx: &TcContext) -> Option<PolicyPacket> {
    let version: u8 = read(ctx, ETH_HLEN)?;
    if version >> 4 != 6 {
        return None;
    }
    let saddr: Addr = read(ctx, ETH_HLEN + 8)?;
    let daddr: Addr = read(ctx, ETH_HLEN + 24)?;
    let mut proto: u8 = read(ctx, ETH_HLEN + 6)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut first_fragment = true;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let len = match proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                (hdr[1] as usize + 1) * 8
            }
            NEXTHDR_AUTH => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                (hdr[1] as usize + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let hdr: [u8; 4] = ctx.load(off).ok()?;
                let offset = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                first_fragment = offset == 0;
                8
            }
            _ => break,
        };
        proto = ctx.load::<u8>(off).ok()?;
        off += len;
        if !first_fragment {
            break;
        }
    }
    let mut packet = PolicyPacket { saddr, daddr, sport: 0, dport: 0, proto, nd: false };
    if !first_fragment {
        return Some(packet);
    }
    if has_ports(proto) {
        let ports: [u16; 2] = ctx.load(off).ok()?;
        packet.sport = ports[0];
        packet.dport = ports[1];
    } else if proto == proto::ICMPV6 {
        let icmp_type: u8 = ctx.load(off).ok()?;
        packet.nd = icmpv6_link_control(icmp_type);
    }
    Some(packet)
}
