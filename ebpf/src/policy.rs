//! NetworkPolicy enforcement at a pod's host-side veth (IPv4 and IPv6, one code path: the
//! maps hold IPv4 addresses in their IPv4-mapped form, see `weir_common::policy`).
//!
//! `tc_pol_egress` runs on the veth's tc ingress (packets the pod sends: its egress, the
//! endpoint is the source address); `tc_pol_ingress` on the veth's tc egress (packets to the
//! pod: its ingress, the endpoint is the destination address). Per packet, a bounded number of
//! lookups whatever the number of rules (see `weir_common::policy`):
//! 1. the endpoint entry (none: pass, or while `GLOBAL_DENY_UNKNOWN` is set drop everything
//!    but connections from the node and their replies);
//! 2. a reply of a flow this endpoint's other direction allowed passes (conntrack);
//! 3. a direction that is not isolated passes; otherwise the peer's identity and CIDR class
//!    come from one ipcache LPM lookup, and the policy LPM trie is asked for (any peer),
//!    (identity) and (CIDR class), each with protocol and destination port;
//! 4. an allowed packet records its flow (so replies pass), a new flow is reported to the flow
//!    ring buffer; a dropped one is counted by reason and against the isolating policy, and
//!    reported.
//! Ingress from the node itself (host identity) is always allowed (kubelet probes), also to a
//! pod whose endpoint entry is not written yet. ICMPv6 link control (neighbour and multicast
//! listener discovery, `icmpv6_link_control`) always passes, before any lookup: default deny
//! must not cut a pod off its gateway.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use weir_common::{
    metrics::Counter,
    policy::{
        Addr, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, FlowEvent,
        GLOBAL_DENY_UNKNOWN, IpcacheValue, PEER_ANY, PEER_CIDR_CLASS, PEER_IDENTITY,
        POLICY_KEY_FULL_BITS, PolicyCtKey, PolicyDropKey, PolicyKey, PolicyValue, VERDICT_ALLOWED,
        VERDICT_DROPPED,
    },
};

use crate::{
    maps::{FLOWS, IPCACHE, POLICY, POLICY_CT, POLICY_DROPS, POLICY_ENDPOINTS, POLICY_GLOBAL},
    metrics::count,
    packet::{PolicyPacket, parse_policy_packet},
};

const IDENTITY_HOST: u32 = 1;
const IDENTITY_WORLD: u32 = 2;
/// [`lookup_rule`] found no allowing rule (rule ids are small numbers).
const NO_RULE: u32 = u32::MAX;

#[inline(always)]
pub fn try_check(ctx: &TcContext, direction: u8) -> Result<i32, Counter> {
    let mut pkt = PolicyPacket::default();
    if !parse_policy_packet(TcContext::new(ctx.skb.skb), &mut pkt) {
        // Neither IPv4 nor IPv6 (ARP), or truncated.
        return Ok(TC_ACT_OK);
    }
    if pkt.nd {
        return Ok(TC_ACT_OK);
    }
    let (endpoint, peer) =
        if direction == DIR_EGRESS { (&pkt.saddr, &pkt.daddr) } else { (&pkt.daddr, &pkt.saddr) };
    // SAFETY: only read (the entry of a hash map stays valid while the program runs).
    let Some(ep) = (unsafe { POLICY_ENDPOINTS.get(endpoint) }) else {
        let deny_unknown = POLICY_GLOBAL.get(0).is_some_and(|g| g.flags & GLOBAL_DENY_UNKNOWN != 0);
        if !deny_unknown {
            return Ok(TC_ACT_OK);
        }
        // A pod without a policy entry yet may be reached by its own node (kubelet's
        // readiness probes must work right after the pod starts) and may answer it: a
        // connection from a host address is recorded like an allowed flow, and its replies
        // pass through conntrack.
        if is_reply(&pkt, direction) {
            count(Counter::PolicyReply);
            return Ok(TC_ACT_OK);
        }
        if direction == DIR_INGRESS && (ipcache(peer) >> 32) as u32 == IDENTITY_HOST {
            record(&pkt, direction, 0, IDENTITY_HOST);
            return Ok(TC_ACT_OK);
        }
        report(&pkt, direction, VERDICT_DROPPED, Counter::DropPolicyNotReady, 0, 0);
        return Err(Counter::DropPolicyNotReady);
    };

    // A reply: the flow in the other direction was allowed by this endpoint.
    if is_reply(&pkt, direction) {
        count(Counter::PolicyReply);
        return Ok(TC_ACT_OK);
    }

    let (isolated_bit, policy_id) = if direction == DIR_EGRESS {
        (EP_EGRESS_ISOLATED, ep.egress_policy)
    } else {
        (EP_INGRESS_ISOLATED, ep.ingress_policy)
    };
    let packed = ipcache(peer);
    let cache = IpcacheValue { identity: (packed >> 32) as u32, cidr_class: packed as u32 };
    let rule_id = if ep.flags & isolated_bit == 0 {
        0
    } else if direction == DIR_INGRESS && cache.identity == IDENTITY_HOST {
        0
    } else {
        lookup_rule(&pkt, &ep.rules_key, direction, &cache)
    };
    if rule_id == NO_RULE {
        let reason = if direction == DIR_EGRESS {
            Counter::DropPolicyEgress
        } else {
            Counter::DropPolicyIngress
        };
        count_policy_drop(policy_id, direction);
        report(&pkt, direction, VERDICT_DROPPED, reason, policy_id, cache.identity);
        return Err(reason);
    }
    record(&pkt, direction, rule_id, cache.identity);
    Ok(TC_ACT_OK)
}

// The helpers below are not inlined: each has its own stack frame (16-byte addresses make the
// keys large; inlined together they pass LLVM's 512-byte frame limit), and none calls
// another, so the program's frame plus one of theirs stays under the verifier's 512 bytes.

/// Whether the packet is a reply of a flow this endpoint's other direction allowed.
#[inline(never)]
fn is_reply(pkt: &PolicyPacket, direction: u8) -> bool {
    // SAFETY: only checked for presence.
    unsafe { POLICY_CT.get(&reversed(&flow_key(pkt, direction))) }.is_some()
}

/// The ipcache's (identity << 32 | CIDR class) of an address; world and no class when no
/// prefix holds it.
#[inline(never)]
fn ipcache(peer: &Addr) -> u64 {
    let value = IPCACHE
        .get(Key::new(128, *peer))
        .copied()
        .unwrap_or(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: 0 });
    (u64::from(value.identity) << 32) | u64::from(value.cidr_class)
}

/// The allowing rule's id, or [`NO_RULE`].
#[inline(never)]
fn lookup_rule(pkt: &PolicyPacket, endpoint: &Addr, direction: u8, cache: &IpcacheValue) -> u32 {
    let mut key = PolicyKey {
        endpoint: *endpoint,
        direction,
        peer_kind: PEER_ANY,
        _pad: [0; 2],
        peer: [0; 4],
        proto: pkt.proto,
        port: pkt.dport.to_ne_bytes(),
        _pad2: 0,
    };
    if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
        return value.rule_id;
    }
    key.peer_kind = PEER_IDENTITY;
    key.peer = cache.identity.to_be_bytes();
    if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
        return value.rule_id;
    }
    if cache.cidr_class != 0 {
        key.peer_kind = PEER_CIDR_CLASS;
        key.peer = cache.cidr_class.to_be_bytes();
        if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
            return value.rule_id;
        }
    }
    NO_RULE
}

/// The conntrack key of this packet's flow as checked in `direction`.
#[inline(always)]
fn flow_key(pkt: &PolicyPacket, direction: u8) -> PolicyCtKey {
    PolicyCtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        direction,
        _pad: [0; 2],
    }
}

/// The key of the other direction of a flow (what a reply finds).
#[inline(always)]
fn reversed(key: &PolicyCtKey) -> PolicyCtKey {
    PolicyCtKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        direction: if key.direction == DIR_EGRESS { DIR_INGRESS } else { DIR_EGRESS },
        _pad: [0; 2],
    }
}

/// Records an allowed flow so that its replies pass; a new flow is reported.
#[inline(never)]
fn record(pkt: &PolicyPacket, direction: u8, rule_id: u32, peer_identity: u32) {
    let key = flow_key(pkt, direction);
    count(Counter::PolicyAllowed);
    // SAFETY: only checked for presence.
    if unsafe { POLICY_CT.get(&key) }.is_some() {
        return;
    }
    let value = PolicyValue { rule_id, _pad: 0 };
    // Fails only if another CPU inserted it first, or under memory pressure (the next packet
    // retries); either way the packet is allowed.
    let _ = POLICY_CT.insert(&key, &value, BPF_NOEXIST as u64);
    report(pkt, direction, VERDICT_ALLOWED, Counter::PolicyAllowed, rule_id, peer_identity);
}

#[inline(always)]
fn count_policy_drop(policy_id: u32, direction: u8) {
    let key = PolicyDropKey { policy: policy_id, direction, _pad: [0; 3] };
    if let Some(slot) = POLICY_DROPS.get_ptr_mut(&key) {
        // SAFETY: a per-CPU value of this CPU; tc programs run with preemption off.
        unsafe { *slot += 1 };
    } else {
        let _ = POLICY_DROPS.insert(&key, &1, BPF_NOEXIST as u64);
    }
}

#[inline(always)]
fn report(
    pkt: &PolicyPacket,
    direction: u8,
    verdict: u8,
    reason: Counter,
    rule_id: u32,
    peer_identity: u32,
) {
    // Written in place in the ring (no copy of the event on the stack, which is short).
    // A full ring buffer loses the event, never the packet.
    let Some(mut entry) = FLOWS.reserve::<FlowEvent>(0) else { return };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved, writable FlowEvent in the ring; every field is
    // written before it is submitted.
    unsafe {
        (*event).time_ns = bpf_ktime_get_ns();
        (*event).saddr = pkt.saddr;
        (*event).daddr = pkt.daddr;
        (*event).sport = pkt.sport;
        (*event).dport = pkt.dport;
        (*event).proto = pkt.proto;
        (*event).direction = direction;
        (*event).verdict = verdict;
        (*event)._pad = 0;
        (*event).rule_id = rule_id;
        (*event).reason = reason as u32;
        (*event).peer_identity = peer_identity;
        (*event)._pad2 = 0;
    }
    entry.submit(0);
}
