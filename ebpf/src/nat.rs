//! Header rewrites with incremental checksum updates (IPv4 header checksum, and the TCP/UDP
//! checksum including its pseudo-header; IPv6 has no header checksum). UDP packets without a
//! checksum (0) keep it at 0.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weir_common::{metrics::Counter, proto};

use crate::packet::{Flow4, Flow6, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP6_DST_OFF, IP6_SRC_OFF};

/// Which end of the flow to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `flow` in the packet.
#[inline(always)]
pub fn rewrite4(
    ctx: &TcContext,
    flow: &Flow4,
    end: End,
    new_addr: u32,
    new_port: u16,
) -> Result<(), Counter> {
    let (addr_off, port_off, old_addr, old_port) = match end {
        End::Source => (IP_SRC_OFF, flow.l4_off, flow.saddr, flow.sport),
        End::Destination => (IP_DST_OFF, flow.l4_off + 2, flow.daddr, flow.dport),
    };
    let l4_csum_off = flow.l4_csum_off();
    let l4_flags = if flow.proto == proto::UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };

    if old_addr != new_addr {
        ctx.l4_csum_replace(
            l4_csum_off,
            old_addr as u64,
            new_addr as u64,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| Counter::DropRewriteFailed)?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| Counter::DropRewriteFailed)?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| Counter::DropRewriteFailed)?;
    }
    rewrite_port(ctx, l4_csum_off, l4_flags, port_off, old_port, new_port)
}

/// [`rewrite4`] for IPv6: each changed 32-bit word of the address updates the L4 checksum
/// (its pseudo-header covers the addresses).
#[inline(always)]
pub fn rewrite6(
    ctx: &TcContext,
    flow: &Flow6,
    end: End,
    new_addr: [u32; 4],
    new_port: u16,
) -> Result<(), Counter> {
    let (addr_off, port_off, old_addr, old_port) = match end {
        End::Source => (IP6_SRC_OFF, flow.l4_off, flow.saddr, flow.sport),
        End::Destination => (IP6_DST_OFF, flow.l4_off + 2, flow.daddr, flow.dport),
    };
    let l4_csum_off = flow.l4_csum_off();
    let l4_flags = if flow.proto == proto::UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    if old_addr != new_addr {
        for i in 0..4 {
            if old_addr[i] != new_addr[i] {
                ctx.l4_csum_replace(
                    l4_csum_off,
                    old_addr[i] as u64,
                    new_addr[i] as u64,
                    l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
                )
                .map_err(|_| Counter::DropRewriteFailed)?;
            }
        }
        ctx.store(addr_off, &new_addr, 0).map_err(|_| Counter::DropRewriteFailed)?;
    }
    rewrite_port(ctx, l4_csum_off, l4_flags, port_off, old_port, new_port)
}

/// Rewrites an L4 port and updates the L4 checksum.
#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    l4_csum_off: usize,
    l4_flags: u64,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Counter> {
    if old_port != new_port {
        ctx.l4_csum_replace(l4_csum_off, old_port as u64, new_port as u64, l4_flags | 2)
            .map_err(|_| Counter::DropRewriteFailed)?;
        ctx.store(port_off, &new_port, 0).map_err(|_| Counter::DropRewriteFailed)?;
    }
    Ok(())
}
