//! Service translation (DNAT to a backend) and reverse translation of replies, for IPv4
//! (`weir_ct4_v1`) and IPv6 (`weir_ct6_v1`) packets.
//!
//! Forward: a packet whose (daddr, dport, proto) is a service frontend goes to a backend. A
//! tracked flow keeps its backend while that backend exists; a new flow picks a slot at random
//! in `1..=count`. Both directions of the flow are recorded in `weir_ct4_v1`.
//! Reverse: a packet matching a reply entry gets the frontend address and port as its source.
//!
//! The uplink programs translate every protocol; at a pod's veth only SCTP is translated
//! ([`forward_sctp_from_pod`], [`reverse_sctp_to_pod`]): the socket hooks translate TCP and
//! UDP before a packet exists, and the kernel runs no such hook for SCTP. The node's own SCTP
//! is translated on the uplinks ([`forward_sctp_from_host`], [`reverse_sctp_to_host`], called
//! by `host_sctp`), with reply entries of their own (`CT_HOST_REPLY`).
use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use weir_common::{
    conntrack::{CT_FORWARD, CT_HOST_REPLY, CT_REPLY, CtKey, CtKey4, CtValue4},
    lb::{
        AffinityKey4, AffinityValue4, Backend, Backend6, ServiceKey, ServiceKey6, ServiceValue,
        affinity_scope, service_flags,
    },
    metrics::Counter,
    proto,
};

use crate::{
    maps::{AFFINITY4, BACKENDS, BACKENDS6, CT4, CT6, REV_NAT, REV_NAT6, SERVICES, SERVICES6},
    metrics::count,
    nat::{End, rewrite4, rewrite6},
    packet::{Flow, Flow4, Flow6, carries_ipv6, ip_protocol, parse_ipv4_flow, parse_ipv6_flow},
    reject,
};

pub fn try_forward(ctx: &TcContext) -> Result<i32, Counter> {
    match carries_ipv6(ctx) {
        Some(false) => {
            Ok(reject_if_needed(ctx, forward_packet4::<CT_REPLY>(ctx)?, reject::port_unreachable4))
        }
        Some(true) => {
            Ok(reject_if_needed(ctx, forward_packet6::<CT_REPLY>(ctx)?, reject::port_unreachable6))
        }
        None => {
            count(Counter::PassedUnparsed);
            Ok(TC_ACT_OK)
        }
    }
}

pub fn try_reverse(ctx: &TcContext) -> Result<i32, Counter> {
    match carries_ipv6(ctx) {
        Some(false) => reverse_packet4::<CT_REPLY>(ctx),
        Some(true) => reverse_packet6::<CT_REPLY>(ctx),
        None => {
            count(Counter::PassedUnparsed);
            Ok(TC_ACT_OK)
        }
    }
}

/// [`try_forward`] for the SCTP packets a pod sends (its veth's tc ingress); other packets
/// pass untouched, after one read of their protocol. `TC_ACT_OK` lets the policy check go on;
/// another action (a rejection sent back) ends the program.
#[inline(always)]
pub fn forward_sctp_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    match ip_protocol(ctx) {
        Some((false, proto::SCTP)) => {
            Ok(reject_if_needed(ctx, sctp_from_pod4(ctx)?, reject::port_unreachable4))
        }
        Some((true, proto::SCTP)) => {
            Ok(reject_if_needed(ctx, forward_packet6::<CT_REPLY>(ctx)?, reject::port_unreachable6))
        }
        _ => Ok(TC_ACT_OK),
    }
}

/// [`forward_sctp_from_pod`] for an SCTP packet a node's own process sends (`v6`: IPv6; the
/// caller read the protocol): its replies are recorded as `CT_HOST_REPLY`, which only the
/// programs that hand packets to the node itself translate back (`host_sctp`).
#[inline(always)]
pub fn forward_sctp_from_host(ctx: &TcContext, v6: bool) -> Result<i32, Counter> {
    if v6 {
        Ok(reject_if_needed(ctx, forward_packet6::<CT_HOST_REPLY>(ctx)?, reject::port_unreachable6))
    } else {
        Ok(reject_if_needed(ctx, sctp_from_host4(ctx)?, reject::port_unreachable4))
    }
}

/// The reverse of [`forward_sctp_from_host`]: an SCTP reply to the node's own process gets
/// the frontend as its source.
#[inline(always)]
pub fn reverse_sctp_to_host(ctx: &TcContext, v6: bool) -> Result<(), Counter> {
    if v6 {
        reverse_packet6::<CT_HOST_REPLY>(ctx).map(|_| ())
    } else {
        sctp_to_host4(ctx).map(|_| ())
    }
}

/// [`try_reverse`] for the SCTP packets going to a pod (its veth's tc egress).
#[inline(always)]
pub fn reverse_sctp_to_pod(ctx: &TcContext) -> Result<(), Counter> {
    match ip_protocol(ctx) {
        Some((false, proto::SCTP)) => sctp_to_pod4(ctx).map(|_| ()),
        Some((true, proto::SCTP)) => reverse_packet6::<CT_REPLY>(ctx).map(|_| ()),
        _ => Ok(()),
    }
}

// One function per family and direction. The IPv4 ones are inlined (the hot path: no call,
// as before IPv6 existed); the IPv6 ones are not: their own stack frames keep every
// program's chain of calls within the verifier's 512 bytes of stack. `REPLY` is the direction
// a new flow's reply entry is recorded in (and the reverse ones look up): `CT_REPLY`, or
// `CT_HOST_REPLY` for the node's own SCTP.

#[inline(always)]
fn forward_packet4<const REPLY: u8>(ctx: &TcContext) -> Result<i32, Counter> {
    parse_ipv4_flow(ctx).map_or_else(passed_unparsed, |flow| forward4::<REPLY>(ctx, &flow))
}

#[inline(never)]
fn forward_packet6<const REPLY: u8>(ctx: &TcContext) -> Result<i32, Counter> {
    parse_ipv6_flow(ctx).map_or_else(passed_unparsed, |flow| forward6::<REPLY>(ctx, &flow))
}

#[inline(always)]
fn reverse_packet4<const REPLY: u8>(ctx: &TcContext) -> Result<i32, Counter> {
    parse_ipv4_flow(ctx).map_or_else(passed_unparsed, |flow| reverse4::<REPLY>(ctx, &flow))
}

#[inline(never)]
fn reverse_packet6<const REPLY: u8>(ctx: &TcContext) -> Result<i32, Counter> {
    parse_ipv6_flow(ctx).map_or_else(passed_unparsed, |flow| reverse6::<REPLY>(ctx, &flow))
}

/// [`forward_packet4`] in a frame of its own, for the policy program (whose own frame is
/// large).
#[inline(never)]
fn sctp_from_pod4(ctx: &TcContext) -> Result<i32, Counter> {
    forward_packet4::<CT_REPLY>(ctx)
}

/// [`reverse_packet4`] in a frame of its own, for the policy program.
#[inline(never)]
fn sctp_to_pod4(ctx: &TcContext) -> Result<i32, Counter> {
    reverse_packet4::<CT_REPLY>(ctx)
}

/// [`forward_packet4`] for the node's own SCTP, in a frame of its own.
#[inline(never)]
fn sctp_from_host4(ctx: &TcContext) -> Result<i32, Counter> {
    forward_packet4::<CT_HOST_REPLY>(ctx)
}

/// [`reverse_packet4`] for replies to the node's own SCTP, in a frame of its own.
#[inline(never)]
fn sctp_to_host4(ctx: &TcContext) -> Result<i32, Counter> {
    reverse_packet4::<CT_HOST_REPLY>(ctx)
}

/// A packet without a flow the load balancer can translate (a fragment, a protocol without
/// ports, a truncated header) passes as it is, counted.
#[inline(always)]
fn passed_unparsed() -> Result<i32, Counter> {
    count(Counter::PassedUnparsed);
    Ok(TC_ACT_OK)
}

/// [`try_forward`] for an IPv4 packet.
#[inline(always)]
fn forward4<const REPLY: u8>(ctx: &TcContext, flow: &Flow4) -> Result<i32, Counter> {
    let frontend = ServiceKey {
        address: flow.daddr,
        port: flow.dport,
        backend_slot: 0,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: the map value is only read, and copied out before any other map call.
    let Some(service) = (unsafe { SERVICES.get(&frontend) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    if service.count == 0 {
        return refuse(&service);
    }

    let forward_key = ct_key(flow, CT_FORWARD);
    let backend = match tracked_backend(&forward_key) {
        Some(backend) => backend,
        None => {
            let (backend_id, backend) = select_with_affinity::<V4>(
                &frontend,
                &service,
                u64::from(flow.saddr),
                affinity_scope::TC,
            )?;
            let entry = ct_entry(backend_id, service.rev_nat_index);
            let reply_key = reply_key(flow, backend.address, backend.port, REPLY);
            // The reply entry goes in first, so a tracked flow always has one. An insert can
            // only fail under memory pressure; the packet is still translated, and the next
            // packet of the flow, untracked, retries.
            let _ = CT4.insert(&reply_key, &entry, 0);
            let _ = CT4.insert(&forward_key, &entry, 0);
            backend
        }
    };

    rewrite4(ctx, flow, End::Destination, backend.address, backend.port)?;
    debug!(
        ctx,
        "lb4: translated to {:i}:{}",
        u32::from_be(backend.address),
        u16::from_be(backend.port)
    );
    count(Counter::Translated);
    Ok(TC_ACT_OK)
}

/// [`try_reverse`] for an IPv4 packet.
#[inline(always)]
fn reverse4<const REPLY: u8>(ctx: &TcContext, flow: &Flow4) -> Result<i32, Counter> {
    let key = ct_key(flow, REPLY);
    // SAFETY: read-only lookups, values copied out.
    let Some(entry) = (unsafe { CT4.get(&key) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    let Some(frontend) = (unsafe { REV_NAT.get(&entry.rev_nat_index) }).copied() else {
        // The service is gone; the reply passes as it is and the client resets the flow.
        return Ok(TC_ACT_OK);
    };
    rewrite4(ctx, flow, End::Source, frontend.address, frontend.port)?;
    count(Counter::ReverseTranslated);
    Ok(TC_ACT_OK)
}

/// [`try_forward`] for an IPv6 packet.
#[inline(always)]
fn forward6<const REPLY: u8>(ctx: &TcContext, flow: &Flow6) -> Result<i32, Counter> {
    let frontend = ServiceKey6 {
        address: flow.daddr,
        port: flow.dport,
        backend_slot: 0,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: the map value is only read, and copied out before any other map call.
    let Some(service) = (unsafe { SERVICES6.get(&frontend) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    if service.count == 0 {
        return refuse(&service);
    }
    let forward_key = ct_key(flow, CT_FORWARD);
    // SAFETY: read-only lookups, values copied out.
    let tracked = unsafe { CT6.get(&forward_key) }
        .copied()
        .and_then(|entry| unsafe { BACKENDS6.get(&entry.backend_id) }.copied());
    let backend = match tracked {
        Some(backend) => backend,
        None => {
            let [a, b, c, d] = flow.saddr;
            let client = (u64::from(a ^ c) << 32) | u64::from(b ^ d);
            let (backend_id, backend) =
                select_with_affinity::<V6>(&frontend, &service, client, affinity_scope::TC6)?;
            let entry = ct_entry(backend_id, service.rev_nat_index);
            let reply_key = reply_key(flow, backend.address, backend.port, REPLY);
            let _ = CT6.insert(&reply_key, &entry, 0);
            let _ = CT6.insert(&forward_key, &entry, 0);
            backend
        }
    };
    rewrite6(ctx, flow, End::Destination, backend.address, backend.port)?;
    count(Counter::Translated);
    Ok(TC_ACT_OK)
}

/// [`try_reverse`] for an IPv6 packet.
#[inline(always)]
fn reverse6<const REPLY: u8>(ctx: &TcContext, flow: &Flow6) -> Result<i32, Counter> {
    // SAFETY: read-only lookups, values copied out.
    let Some(entry) = (unsafe { CT6.get(&ct_key(flow, REPLY)) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    let Some(frontend) = (unsafe { REV_NAT6.get(&entry.rev_nat_index) }).copied() else {
        return Ok(TC_ACT_OK);
    };
    rewrite6(ctx, flow, End::Source, frontend.address, frontend.port)?;
    count(Counter::ReverseTranslated);
    Ok(TC_ACT_OK)
}

/// A packet to a frontend without backends: dropped when a traffic policy left it without
/// (kube-proxy drops those: the service has endpoints on other nodes), otherwise
/// [`NEEDS_REJECT`].
#[inline(always)]
fn refuse(service: &ServiceValue) -> Result<i32, Counter> {
    if service.flags & service_flags::EMPTY_BY_POLICY != 0 {
        return Err(Counter::DropNoBackend);
    }
    Ok(NEEDS_REJECT)
}

/// What a forward path returns for a packet to be rejected: the caller turns it into the ICMP
/// error (`reject`) in a call of its own, so that the reply's stack frame never adds to the
/// forward path's. Never a tc verdict.
const NEEDS_REJECT: i32 = i32::MIN;

/// `action` of a forward path, with [`NEEDS_REJECT`] carried out by `reject`.
#[inline(always)]
fn reject_if_needed(ctx: &TcContext, action: i32, reject: fn(&TcContext) -> i32) -> i32 {
    if action == NEEDS_REJECT { reject(ctx) } else { action }
}

/// The conntrack key of `flow` in `direction`.
#[inline(always)]
pub fn ct_key<A: Copy>(flow: &Flow<A>, direction: u8) -> CtKey<A> {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

/// The key of the replies of `flow` once it goes to backend `address:port`, in `direction`.
#[inline(always)]
fn reply_key<A: Copy>(flow: &Flow<A>, address: A, port: u16, direction: u8) -> CtKey<A> {
    CtKey {
        saddr: address,
        daddr: flow.saddr,
        sport: port,
        dport: flow.sport,
        proto: flow.proto,
        direction,
        _pad: [0; 2],
    }
}

/// A conntrack entry of a flow sent to `backend_id` of the service `rev_nat_index` names.
#[inline(always)]
fn ct_entry(backend_id: u32, rev_nat_index: u32) -> CtValue4 {
    CtValue4 { backend_id, rev_nat_index, flags: 0, _pad: [0; 7] }
}

/// The backend a tracked flow uses, if the flow is tracked and its backend still exists.
#[inline(always)]
fn tracked_backend(key: &CtKey4) -> Option<Backend> {
    // SAFETY: read-only lookups, values copied out.
    let entry = unsafe { CT4.get(key) }.copied()?;
    unsafe { BACKENDS.get(&entry.backend_id) }.copied()
}

/// The service maps of one address family, as backend selection reads them.
pub trait ServiceMaps {
    type Key: Copy;
    type Backend: Copy;
    /// The entry of `slot` of the service `key` names (a slot or, for 0, the master).
    fn slot(key: &Self::Key, slot: u16) -> Option<ServiceValue>;
    fn backend(id: u32) -> Option<Self::Backend>;
}

/// `weir_svc_v1` and `weir_backend_v1`.
pub struct V4;

impl ServiceMaps for V4 {
    type Key = ServiceKey;
    type Backend = Backend;

    #[inline(always)]
    fn slot(key: &ServiceKey, slot: u16) -> Option<ServiceValue> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { SERVICES.get(&key.with_slot(slot)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { BACKENDS.get(&id) }.copied()
    }
}

/// `weir_svc6_v1` and `weir_backend6_v1`.
pub struct V6;

impl ServiceMaps for V6 {
    type Key = ServiceKey6;
    type Backend = Backend6;

    #[inline(always)]
    fn slot(key: &ServiceKey6, slot: u16) -> Option<ServiceValue> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { SERVICES6.get(&key.with_slot(slot)) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: read-only lookup, value copied out.
        unsafe { BACKENDS6.get(&id) }.copied()
    }
}

/// Picks a backend for a new flow: a random slot in `1..=count`; returns the backend ID, the
/// backend and its slot.
#[inline(always)]
pub fn select_backend<M: ServiceMaps>(
    frontend: &M::Key,
    count: u16,
) -> Result<(u32, M::Backend, u16), Counter> {
    if count == 0 {
        return Err(Counter::DropNoBackend);
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = (random % count as u32) as u16 + 1;
    let backend_id =
        M::slot(frontend, slot).map(|slot| slot.backend_id).ok_or(Counter::DropNoBackend)?;
    let backend = M::backend(backend_id).ok_or(Counter::DropNoBackend)?;
    Ok((backend_id, backend, slot))
}

/// Backend choice with ClientIP session affinity when the service asks for it: the client's
/// remembered backend while it is fresh and still in its slot, else a new random choice that
/// is remembered. `scope` is one of [`affinity_scope`]. Not inlined: its own stack frame keeps
/// the programs that call it within the verifier's 512 bytes per chain of calls.
#[inline(never)]
pub fn select_with_affinity<M: ServiceMaps>(
    frontend: &M::Key,
    service: &ServiceValue,
    client: u64,
    scope: u32,
) -> Result<(u32, M::Backend), Counter> {
    if service.flags & service_flags::AFFINITY == 0 {
        let (id, backend, _) = select_backend::<M>(frontend, service.count)?;
        return Ok((id, backend));
    }
    let key = AffinityKey4 { client, rev_nat_index: service.rev_nat_index, scope };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.backend_id) * 1_000_000_000;
    // SAFETY: read-only lookup, value copied out.
    if let Some(remembered) = unsafe { AFFINITY4.get(&key) }.copied()
        && now.saturating_sub(remembered.last_used_ns) <= timeout_ns
        && M::slot(frontend, remembered.slot)
            .is_some_and(|slot| slot.backend_id == remembered.backend_id)
        && remembered.slot <= service.count
        && let Some(backend) = M::backend(remembered.backend_id)
    {
        let refreshed = AffinityValue4 { last_used_ns: now, ..remembered };
        let _ = AFFINITY4.insert(&key, &refreshed, 0);
        return Ok((remembered.backend_id, backend));
    }
    let (id, backend, slot) = select_backend::<M>(frontend, service.count)?;
    let chosen = AffinityValue4 { last_used_ns: now, backend_id: id, slot, _pad: 0 };
    let _ = AFFINITY4.insert(&key, &chosen, 0);
    Ok((id, backend))
}
