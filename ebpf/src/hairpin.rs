//! SCTP hairpin: a pod reaching itself through its own service.
//!
//! TCP and UDP never need this: the socket hooks translate the connect() and the pod talks to
//! itself inside its namespace. SCTP is translated per packet at the pod's host-side veth
//! (`lb::forward_sctp_from_pod`), and when the backend chosen is the sending pod itself the
//! translated packet would come back from the pod's own address (a martian, dropped), and the
//! pod's answer would never be turned back into the frontend's. So, as Cilium does with its
//! service loopback address and kube-proxy with masquerade, the packet's source is translated
//! too, here to the frontend address the pod asked for (ports kept), and the packet goes
//! straight back into the pod (`bpf_redirect_peer`, no trip through the node):
//!
//! ```text
//! pod:s -> frontend:p   becomes   frontend:s -> pod:t        (t: the target port)
//! pod:t -> frontend:s   becomes   frontend:p -> pod:s        (the answer, CT_HAIRPIN_REPLY)
//! ```
//!
//! The NetworkPolicy check judges the translated packet as traffic from the pod to itself, in
//! both directions (the pod's egress to the backend, the backend's ingress from the pod);
//! answers pass as replies of that allowed association. SCTP's CRC32c covers no addresses, so
//! only the port changes update it (`nat`).
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect_peer, programs::TcContext};
use weir_common::{
    conntrack::{CT_FORWARD, CT_HAIRPIN_REPLY, CtKey, CtValue4},
    metrics::Counter,
    proto,
};

use crate::{
    lb::ct_key,
    maps::{CT4, CT6, REV_NAT, REV_NAT6},
    metrics::count,
    nat::{End, rewrite4, rewrite6},
    packet::{Flow, ip_protocol, parse_ipv4_flow, parse_ipv6_flow},
};

/// What [`reply`] returns for a packet that is not the answer of a hairpinned association.
pub const NOT_HAIRPIN: i32 = i32::MIN;

/// One address family's maps and rewrites.
trait Family {
    type Addr: Copy + PartialEq;
    fn parse(ctx: &TcContext) -> Option<Flow<Self::Addr>>;
    fn tracked(key: &CtKey<Self::Addr>) -> Option<CtValue4>;
    fn track(key: &CtKey<Self::Addr>, value: &CtValue4);
    /// The frontend (address, port) of a reverse-NAT entry.
    fn frontend(rev_nat_index: u32) -> Option<(Self::Addr, u16)>;
    fn rewrite(
        ctx: &TcContext,
        flow: &Flow<Self::Addr>,
        end: End,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), Counter>;
}

struct V4;
struct V6;

impl Family for V4 {
    type Addr = u32;

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Flow<u32>> {
        parse_ipv4_flow(ctx)
    }

    #[inline(always)]
    fn tracked(key: &CtKey<u32>) -> Option<CtValue4> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { CT4.get(key) }.copied()
    }

    #[inline(always)]
    fn track(key: &CtKey<u32>, value: &CtValue4) {
        // Fails only under memory pressure: the answer is then not translated and the
        // association retries its INIT.
        let _ = CT4.insert(key, value, 0);
    }

    #[inline(always)]
    fn frontend(rev_nat_index: u32) -> Option<(u32, u16)> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { REV_NAT.get(&rev_nat_index) }.map(|f| (f.address, f.port))
    }

    #[inline(always)]
    fn rewrite(
        ctx: &TcContext,
        flow: &Flow<u32>,
        end: End,
        addr: u32,
        port: u16,
    ) -> Result<(), Counter> {
        rewrite4(ctx, flow, end, addr, port)
    }
}

impl Family for V6 {
    type Addr = [u32; 4];

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Flow<[u32; 4]>> {
        parse_ipv6_flow(ctx)
    }

    #[inline(always)]
    fn tracked(key: &CtKey<[u32; 4]>) -> Option<CtValue4> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { CT6.get(key) }.copied()
    }

    #[inline(always)]
    fn track(key: &CtKey<[u32; 4]>, value: &CtValue4) {
        let _ = CT6.insert(key, value, 0);
    }

    #[inline(always)]
    fn frontend(rev_nat_index: u32) -> Option<([u32; 4], u16)> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { REV_NAT6.get(&rev_nat_index) }.map(|f| (f.address, f.port))
    }

    #[inline(always)]
    fn rewrite(
        ctx: &TcContext,
        flow: &Flow<[u32; 4]>,
        end: End,
        addr: [u32; 4],
        port: u16,
    ) -> Result<(), Counter> {
        rewrite6(ctx, flow, end, addr, port)
    }
}

/// The answer of a hairpinned association (a pod answering the frontend address it was
/// shown), turned back into what the pod's own association expects and redirected into the
/// pod; [`NOT_HAIRPIN`] for every other packet.
#[inline(always)]
pub fn reply(ctx: &TcContext) -> i32 {
    match ip_protocol(ctx) {
        Some((false, proto::SCTP)) => reply_of::<V4>(ctx),
        Some((true, proto::SCTP)) => reply_of::<V6>(ctx),
        _ => NOT_HAIRPIN,
    }
}

#[inline(never)]
fn reply_of<F: Family>(ctx: &TcContext) -> i32 {
    let Some(flow) = F::parse(ctx) else { return NOT_HAIRPIN };
    let Some(entry) = F::tracked(&ct_key(&flow, CT_HAIRPIN_REPLY)) else { return NOT_HAIRPIN };
    let Some((frontend, port)) = F::frontend(entry.rev_nat_index) else {
        // The service is gone: the answer goes on as it is and the association fails.
        return NOT_HAIRPIN;
    };
    // pod:t -> frontend:s  becomes  frontend:p -> pod:s (the destination keeps its port, so the
    // second rewrite reads no port of the first).
    let rewritten = F::rewrite(ctx, &flow, End::Source, frontend, port)
        .and_then(|()| F::rewrite(ctx, &flow, End::Destination, flow.saddr, flow.dport));
    if let Err(reason) = rewritten {
        count(reason);
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    count(Counter::ReverseTranslated);
    into_pod(ctx)
}

/// Where an SCTP packet from a pod was going before the forward translation, kept to tell a
/// hairpin afterwards.
#[derive(Clone, Copy)]
pub enum Asked {
    None,
    V4(u32, u16),
    V6([u32; 4], u16),
}

impl Asked {
    #[inline(never)]
    pub fn of(ctx: &TcContext) -> Self {
        match ip_protocol(ctx) {
            Some((false, proto::SCTP)) => {
                parse_ipv4_flow(ctx).map_or(Self::None, |f| Self::V4(f.daddr, f.dport))
            }
            Some((true, proto::SCTP)) => {
                parse_ipv6_flow(ctx).map_or(Self::None, |f| Self::V6(f.daddr, f.dport))
            }
            _ => Self::None,
        }
    }

    /// Whether the (translated) packet now goes back to its sender: it was sent to a frontend
    /// and the backend chosen is the sender itself.
    #[inline(never)]
    pub fn is_hairpin(&self, ctx: &TcContext) -> bool {
        match *self {
            Self::None => false,
            Self::V4(asked, _) => {
                parse_ipv4_flow(ctx).is_some_and(|f| f.saddr == f.daddr && f.daddr != asked)
            }
            Self::V6(asked, _) => {
                parse_ipv6_flow(ctx).is_some_and(|f| f.saddr == f.daddr && f.daddr != asked)
            }
        }
    }

    /// Shows the translated packet to the pod as coming from the frontend it asked for,
    /// records the association for the pod's answers and redirects the packet into the pod.
    #[inline(always)]
    pub fn send_back(&self, ctx: &TcContext) -> Result<i32, Counter> {
        match *self {
            Self::None => Ok(TC_ACT_OK),
            Self::V4(asked, port) => send_back::<V4>(ctx, asked, port),
            Self::V6(asked, port) => send_back::<V6>(ctx, asked, port),
        }
    }
}

#[inline(never)]
fn send_back<F: Family>(ctx: &TcContext, asked: F::Addr, asked_port: u16) -> Result<i32, Counter> {
    // pod:s -> pod:t, translated from pod:s -> frontend:p.
    let flow = F::parse(ctx).ok_or(Counter::DropRewriteFailed)?;
    let original = CtKey {
        saddr: flow.saddr,
        daddr: asked,
        sport: flow.sport,
        dport: asked_port,
        proto: flow.proto,
        direction: CT_FORWARD,
        _pad: [0; 2],
    };
    let entry = F::tracked(&original).ok_or(Counter::DropNoBackend)?;
    // The answer the pod will send: pod:t -> frontend:s.
    let answer = CtKey {
        saddr: flow.daddr,
        daddr: asked,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        direction: CT_HAIRPIN_REPLY,
        _pad: [0; 2],
    };
    F::track(&answer, &entry);
    F::rewrite(ctx, &flow, End::Source, asked, flow.sport)?;
    Ok(into_pod(ctx))
}

/// Turns a packet the pod sent into one the pod receives (Ethernet addresses swapped) and
/// hands it to the pod's side of the veth it arrived on.
#[inline(always)]
fn into_pod(ctx: &TcContext) -> i32 {
    let (Ok(dst), Ok(src)) = (ctx.load::<[u8; 6]>(0), ctx.load::<[u8; 6]>(6)) else {
        count(Counter::DropRewriteFailed);
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    };
    if ctx.store(0, &src, 0).is_err() || ctx.store(6, &dst, 0).is_err() {
        count(Counter::DropRewriteFailed);
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_redirect_peer takes any ifindex and fails (TC_ACT_SHOT) for a device without
    // a peer.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}
