//! SCTP from the node's own processes to a service frontend.
//!
//! TCP and UDP from the node are translated at the socket (cgroup hooks); the kernel runs no
//! such hook for SCTP, so the node's SCTP packet to a ClusterIP leaves by the VIP's route
//! (normally the default route, out of an uplink) untranslated. `tc_host_sctp_out`, on each
//! uplink's tc egress, translates it there with the per-packet path's selection and conntrack
//! (`lb::forward_sctp_from_host`), then sends it where the backend's route goes
//! (`bpf_fib_lookup`, `bpf_redirect_neigh`): a local pod's host-side veth (whose tc egress runs
//! the pod's ingress policy, `tc_pol_ingress`), or out of the uplink or the overlay device to
//! another node. The source address stays the one the node chose for the VIP's route, so the
//! backend answers the node's own address:
//!
//! ```text
//! node:s -> frontend:p   becomes   node:s -> backend:t   (uplink egress, then redirected)
//! backend:t -> node:s    becomes   frontend:p -> node:s  (CT_HOST_REPLY)
//! ```
//!
//! The answer is turned back where it reaches the node: on the local pod's host-side veth
//! (`tc_pol_egress`, after the pod's egress policy judged it as it was sent: [`is_reply`],
//! [`reverse_from_pod`], which then hands it to the ingress of the device the node routes the
//! frontend by, so that strict reverse-path filtering keeps it) or on the uplink's tc ingress
//! (`tc_host_sctp_in`). The reply entries have a
//! conntrack direction of their own (`CT_HOST_REPLY`), so a pod's association to the same
//! backend is never reverse-translated on the backend's veth.
//!
//! Both uplink programs run before the uplink's other tcx programs (attached first) and pass
//! every packet they do not translate on to them (`TC_ACT_UNSPEC`, tcx's "next"): other
//! packets pay one read of their protocol.
use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_UNSPEC,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use weir_common::{conntrack::CT_HOST_REPLY, metrics::Counter, proto};

use crate::{
    fib,
    lb::{ct_key, forward_sctp_from_host, reverse_sctp_to_host},
    maps::{CT4, CT6},
    metrics::count,
    packet::{IP_DST_OFF, IP6_DST_OFF, ip_protocol, parse_ipv4_flow, parse_ipv6_flow},
    verdict,
};

/// `tc_host_sctp_out`: an SCTP packet to a frontend is translated and redirected towards its
/// backend; every other packet goes on to the next program.
#[inline(always)]
pub fn out(ctx: &TcContext) -> i32 {
    match ip_protocol(ctx) {
        Some((v6, proto::SCTP)) => forward(ctx, v6),
        _ => TC_ACT_UNSPEC,
    }
}

/// `tc_host_sctp_in`: a backend's answer to the node's own SCTP gets the frontend as its
/// source; every other packet goes on to the next program.
#[inline(always)]
pub fn into_node(ctx: &TcContext) -> i32 {
    match ip_protocol(ctx) {
        Some((v6, proto::SCTP)) if is_reply(ctx, v6) => verdict(reverse(ctx, v6)),
        _ => TC_ACT_UNSPEC,
    }
}

#[inline(never)]
fn forward(ctx: &TcContext, v6: bool) -> i32 {
    let asked = destination(ctx, v6);
    let action = match forward_sctp_from_host(ctx, v6) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            return aya_ebpf::bindings::TC_ACT_SHOT;
        }
    };
    match action {
        TC_ACT_OK if asked.is_some() && destination(ctx, v6) != asked => towards_backend(ctx, v6),
        // Not to a frontend: for the next program.
        TC_ACT_OK => TC_ACT_UNSPEC,
        TC_ACT_REDIRECT => {
            // A frontend without backends: `reject` turned the packet into an ICMP error for
            // the sender and redirected it back out of this device; it goes into the node.
            // SAFETY: the context's skb pointer is valid for the program's run.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // SAFETY: bpf_redirect takes any ifindex; the last call before returning decides.
            unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) as i32 }
        }
        dropped => dropped,
    }
}

/// The destination address of the packet (an IPv4 one in the first word).
#[inline(always)]
fn destination(ctx: &TcContext, v6: bool) -> Option<[u32; 4]> {
    if v6 {
        ctx.load::<[u32; 4]>(IP6_DST_OFF).ok()
    } else {
        ctx.load::<u32>(IP_DST_OFF).ok().map(|a| [a, 0, 0, 0])
    }
}

/// Sends the translated packet where the node's routing table sends its new destination: the
/// route's device (`bpf_fib_lookup`), with the neighbour of its next hop resolved by the kernel
/// (`bpf_redirect_neigh`). When the table has no forwarding route for it (a backend on one of
/// the node's own addresses, forwarding off), the packet goes on by the frontend's route,
/// translated.
#[inline(never)]
fn towards_backend(ctx: &TcContext, v6: bool) -> i32 {
    let Some((src, dst)) = addresses(ctx, v6) else { return TC_ACT_OK };
    let Some(hop) = fib::next_hop(ctx, v6, &src, &dst, proto::SCTP, BPF_FIB_LOOKUP_SKIP_NEIGH)
    else {
        return TC_ACT_OK;
    };
    // No next hop given: the kernel looks the route up again for that device and sets it on
    // the packet. With a next hop, the packet would keep the frontend's route, and one queued
    // while its neighbour is resolved would leave by that route's neighbour instead.
    // SAFETY: a null parameter block with length 0 is the documented "look it up" form; the
    // helper fails (TC_ACT_SHOT) for a bad ifindex.
    unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// The source and destination of an SCTP packet as `fib::next_hop` takes them.
#[inline(always)]
fn addresses(ctx: &TcContext, v6: bool) -> Option<([u32; 4], [u32; 4])> {
    if v6 {
        parse_ipv6_flow(ctx).map(|flow| (flow.saddr, flow.daddr))
    } else {
        parse_ipv4_flow(ctx).map(|flow| ([flow.saddr, 0, 0, 0], [flow.daddr, 0, 0, 0]))
    }
}

/// Whether an SCTP packet (`v6`: IPv6) is a backend's answer to the node's own process.
#[inline(never)]
pub fn is_reply(ctx: &TcContext, v6: bool) -> bool {
    if v6 {
        // SAFETY: only checked for presence.
        parse_ipv6_flow(ctx)
            .is_some_and(|flow| unsafe { CT6.get(&ct_key(&flow, CT_HOST_REPLY)) }.is_some())
    } else {
        // SAFETY: only checked for presence.
        parse_ipv4_flow(ctx)
            .is_some_and(|flow| unsafe { CT4.get(&ct_key(&flow, CT_HOST_REPLY)) }.is_some())
    }
}

/// Gives a backend's answer to the node's own process ([`is_reply`]) the frontend as its
/// source; `TC_ACT_OK`: the packet goes on into the node.
#[inline(never)]
pub fn reverse(ctx: &TcContext, v6: bool) -> Result<i32, Counter> {
    reverse_sctp_to_host(ctx, v6).map(|()| TC_ACT_OK)
}

/// [`reverse`] for a local pod's answer (on its veth's tc ingress), which then enters the node
/// through the device the node routes the frontend by, as an answer from the frontend would:
/// strict reverse-path filtering (`rp_filter=1`) drops a packet from the frontend arriving on
/// the pod's veth. When that device is not known (no route, its neighbour not resolved) the
/// answer enters through the veth.
#[inline(never)]
pub fn reverse_from_pod(ctx: &TcContext, v6: bool) -> i32 {
    let action = verdict(reverse(ctx, v6));
    if action != TC_ACT_OK {
        return action;
    }
    through_frontend_route(ctx, v6)
}

#[inline(never)]
fn through_frontend_route(ctx: &TcContext, v6: bool) -> i32 {
    // The way back to the frontend (now the source) from the node (the destination).
    let Some((frontend, node)) = addresses(ctx, v6) else { return TC_ACT_OK };
    let Some(fib) = fib::next_hop(ctx, v6, &node, &frontend, proto::SCTP, 0) else {
        return TC_ACT_OK;
    };
    // Addressed to that device (its own MAC, `smac` of the lookup), from its next hop.
    if ctx.store(0, &fib.smac, 0).is_err() || ctx.store(6, &fib.dmac, 0).is_err() {
        return TC_ACT_OK;
    }
    // SAFETY: bpf_redirect takes any ifindex and fails (TC_ACT_SHOT) for a bad one.
    unsafe { bpf_redirect(fib.ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}
