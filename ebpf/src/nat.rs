//! Header rewrites with incremental checksum updates (IPv4 header checksum, and the TCP/UDP
//! checksum including its pseudo-header; IPv6 has no header checksum). UDP packets without a
//! checksum (0) keep it at 0. SCTP's CRC32c covers no pseudo-header, so only a port change
//! updates it (`weir_common::sctp`).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weir_common::{metrics::Counter, proto, sctp};

use crate::packet::{
    Flow, Flow4, Flow6, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF,
};

/// Which end of the flow to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `flow` in the packet. Not inlined
/// (nor is [`rewrite6`]): their own stack frames keep the callers' within the verifier's
/// limits.
#[inline(never)]
pub fn rewrite4(
    ctx: &TcContext,
    flow: &Flow4,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Counter> {
    let (addr_off, old_addr) = match end {
        End::Source => (IP_SRC_OFF, flow.saddr),
        End::Destination => (IP_DST_OFF, flow.daddr),
    };
    if old_addr != new_addr {
        if flow.proto != proto::SCTP {
            ctx.l4_csum_replace(
                flow.l4_csum_off(),
                old_addr as u64,
                new_addr as u64,
                l4_flags(flow) | BPF_F_PSEUDO_HDR as u64 | 4,
            )
            .map_err(|_| Counter::DropRewriteFailed)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| Counter::DropRewriteFailed)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| Counter::DropRewriteFailed)?;
    }
    rewrite_port(ctx, flow, end, new_port)
}

/// [`rewrite4`] for IPv6: each changed 32-bit word of the address updates the L4 checksum
/// (its pseudo-header covers the addresses).
#[inline(never)]
pub fn rewrite6(
    ctx: &TcContext,
    flow: &Flow6,
    end: End,
    new_addr: [u32; 4],
    new_port: u16,
) -> Result<(), Counter> {
    let (addr_off, old_addr) = match end {
        End::Source => (IP6_SRC_OFF, flow.saddr),
        End::Destination => (IP6_DST_OFF, flow.daddr),
    };
    if old_addr != new_addr {
        if flow.proto != proto::SCTP {
            for i in 0..4 {
                if old_addr[i] != new_addr[i] {
                    ctx.l4_csum_replace(
                        flow.l4_csum_off(),
                        old_addr[i] as u64,
                        new_addr[i] as u64,
                        l4_flags(flow) | BPF_F_PSEUDO_HDR as u64 | 4,
                    )
                    .map_err(|_| Counter::DropRewriteFailed)?;
                }
            }
        }
        ctx.store(addr_off, &new_addr, 0).map_err(|_| Counter::DropRewriteFailed)?;
    }
    rewrite_port(ctx, flow, end, new_port)
}

/// The flags of `l4_csum_replace` for `flow`: a UDP checksum of 0 ("none") stays 0.
#[inline(always)]
fn l4_flags<A>(flow: &Flow<A>) -> u64 {
    if flow.proto == proto::UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// Rewrites the source or destination port of `flow` and updates the L4 checksum.
#[inline(always)]
fn rewrite_port<A>(
    ctx: &TcContext,
    flow: &Flow<A>,
    end: End,
    new_port: u16,
) -> Result<(), Counter> {
    let (port_off, old_port) = match end {
        End::Source => (flow.l4_off, flow.sport),
        End::Destination => (flow.l4_off + 2, flow.dport),
    };
    if old_port == new_port {
        return Ok(());
    }
    let csum_off = flow.l4_csum_off();
    if flow.proto == proto::SCTP {
        // The ports as the little-endian word their four bytes make (bpfel), before and after.
        let old_ports = u32::from(flow.sport) | (u32::from(flow.dport) << 16);
        let new_ports = match end {
            End::Source => u32::from(new_port) | (u32::from(flow.dport) << 16),
            End::Destination => u32::from(flow.sport) | (u32::from(new_port) << 16),
        };
        let crc: u32 = ctx.load(csum_off).map_err(|_| Counter::DropRewriteFailed)?;
        let crc = crc ^ sctp::port_rewrite_delta(old_ports, new_ports, flow.l4_len);
        ctx.store(csum_off, &crc, 0).map_err(|_| Counter::DropRewriteFailed)?;
    } else {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, l4_flags(flow) | 2)
            .map_err(|_| Counter::DropRewriteFailed)?;
    }
    ctx.store(port_off, &new_port, 0).map_err(|_| Counter::DropRewriteFailed)
}
