//! Rejecting a packet to a service frontend that has no backend, as kube-proxy does: the
//! packet becomes an ICMP "port unreachable" (ICMPv6 for IPv6) from the frontend to the
//! client, quoting the packet's IP header and first 8 bytes of payload, and goes back out of
//! the interface it came in on. A TCP client fails at once with "connection refused", a UDP
//! or SCTP client gets ECONNREFUSED, instead of waiting for a timeout. Only packets with a
//! plain IP header are answered (no IPv4 options, no IPv6 extension headers: the parser
//! refuses those before); the rest are dropped.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use weir_common::{metrics::Counter, proto};

use crate::{
    metrics::count,
    packet::{ETH_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, parse_flow4, parse_flow6},
};

const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes: the IP header and 8 bytes of what follows.
const QUOTE4: usize = IPV4_MIN_HLEN + 8;
const QUOTE6: usize = IPV6_HLEN + 8;
const REPLY4_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN + ICMP_HLEN + QUOTE4;
const REPLY6_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + QUOTE6;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// Turns the IPv4 packet into an ICMP port unreachable back to its sender; `TC_ACT_SHOT`
/// when it cannot. Counted as [`Counter::DropNoBackend`] either way. (A plain `i32`: the
/// verifier refuses a call that leaves a pointer to its stack in R0, which an aggregate
/// return value can.)
#[inline(never)]
pub fn port_unreachable4(ctx: &TcContext) -> i32 {
    count(Counter::DropNoBackend);
    reply4(ctx).unwrap_or(TC_ACT_SHOT)
}

/// Turns the IPv6 packet into an ICMPv6 port unreachable back to its sender, as
/// [`port_unreachable4`].
#[inline(never)]
pub fn port_unreachable6(ctx: &TcContext) -> i32 {
    count(Counter::DropNoBackend);
    reply6(ctx).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn reply4(ctx: &TcContext) -> Result<i32, Counter> {
    let flow = parse_flow4(ctx).ok_or(Counter::DropNoBackend)?;
    if flow.l4_off != ETH_HLEN + IPV4_MIN_HLEN {
        return Err(Counter::DropNoBackend);
    }
    let quote: [u8; QUOTE4] = ctx.load(ETH_HLEN).map_err(|_| Counter::DropNoBackend)?;
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Counter::DropNoBackend)?;
    resize(ctx, REPLY4_LEN)?;
    write_ethernet(ctx, &macs, 0x0800)?;

    let mut ip = [0u8; IPV4_MIN_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((REPLY4_LEN - ETH_HLEN) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto::ICMP;
    // The frontend answers: its address is the packet's destination.
    ip[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
    let csum = fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    store(ctx, ETH_HLEN, &ip)?;
    write_icmp(ctx, ETH_HLEN + IPV4_MIN_HLEN, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, &quote, 0)
}

#[inline(always)]
fn reply6(ctx: &TcContext) -> Result<i32, Counter> {
    let flow = parse_flow6(ctx).ok_or(Counter::DropNoBackend)?;
    if flow.l4_off != ETH_HLEN + IPV6_HLEN {
        return Err(Counter::DropNoBackend);
    }
    let quote: [u8; QUOTE6] = ctx.load(ETH_HLEN).map_err(|_| Counter::DropNoBackend)?;
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Counter::DropNoBackend)?;
    resize(ctx, REPLY6_LEN)?;
    write_ethernet(ctx, &macs, 0x86dd)?;

    let payload_len = (ICMP_HLEN + QUOTE6) as u16;
    let [len_high, len_low] = payload_len.to_be_bytes();
    store(ctx, ETH_HLEN, &[0x60, 0, 0, 0, len_high, len_low, proto::ICMPV6, 64])?;
    // The frontend answers: its address is the packet's destination.
    store(ctx, ETH_HLEN + 8, &flow.daddr)?;
    store(ctx, ETH_HLEN + 24, &flow.saddr)?;
    // Pseudo-header: both addresses, the upper-layer length and the next header.
    let pseudo = sum_address(&flow.daddr)
        + sum_address(&flow.saddr)
        + u32::from(payload_len)
        + u32::from(proto::ICMPV6);
    write_icmp(ctx, ETH_HLEN + IPV6_HLEN, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, &quote, pseudo)
}

/// The one's complement sum of an IPv6 address held as four words in network order.
#[inline(always)]
fn sum_address(address: &[u32; 4]) -> u32 {
    let mut total = 0;
    for word in address {
        let [a, b, c, d] = word.to_ne_bytes();
        total += u32::from(u16::from_be_bytes([a, b])) + u32::from(u16::from_be_bytes([c, d]));
    }
    total
}

/// Writes the Ethernet header of the reply: the packet's source MAC becomes the destination.
#[inline(always)]
fn write_ethernet(ctx: &TcContext, macs: &[u8; 12], ethertype: u16) -> Result<(), Counter> {
    let mut header = [0u8; ETH_HLEN];
    header[..6].copy_from_slice(&macs[6..]);
    header[6..12].copy_from_slice(&macs[..6]);
    header[12..].copy_from_slice(&ethertype.to_be_bytes());
    store(ctx, 0, &header)
}

/// Writes the ICMP(v6) error header and the quote at `offset`, with the checksum over both
/// (plus `pseudo`, the IPv6 pseudo-header's sum), and sends the packet back.
#[inline(always)]
fn write_icmp<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    icmp_type: u8,
    code: u8,
    quote: &[u8; N],
    pseudo: u32,
) -> Result<i32, Counter> {
    let mut header = [icmp_type, code, 0, 0, 0, 0, 0, 0];
    let csum = fold(sum(&header, sum(quote, pseudo)));
    header[2..4].copy_from_slice(&csum.to_be_bytes());
    store(ctx, offset, &header)?;
    store(ctx, offset + ICMP_HLEN, quote)?;
    // SAFETY: reading the ifindex field of the program's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; the verdict it returns is the program's.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT as i32)
}

/// Makes the packet `len` bytes long (cutting or extending its tail).
#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), Counter> {
    // SAFETY: the helper gets the program's own skb.
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } {
        0 => Ok(()),
        _ => Err(Counter::DropNoBackend),
    }
}

#[inline(always)]
fn store<T>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), Counter> {
    ctx.store(offset, value, 0).map_err(|_| Counter::DropNoBackend)
}

/// The one's complement sum of `data` (big-endian 16-bit words, even length) plus `initial`.
#[inline(always)]
fn sum(data: &[u8], initial: u32) -> u32 {
    let mut total = initial;
    let mut i = 0;
    while i + 1 < data.len() {
        total += u32::from(u16::from_be_bytes([data[i], data[i + 1]]));
        i += 2;
    }
    total
}

/// The Internet checksum of a sum.
#[inline(always)]
fn fold(mut total: u32) -> u16 {
    total = (total & 0xffff) + (total >> 16);
    total = (total & 0xffff) + (total >> 16);
    !(total as u16)
}
