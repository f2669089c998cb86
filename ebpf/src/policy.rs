//! NetworkPolicy enforcement at a pod's host-side veth (IPv4).
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
//! pod whose endpoint entry is not written yet.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use weir_common::{
    metrics::Counter,
    policy::{
        DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, FlowEvent,
        GLOBAL_DENY_UNKNOWN, IpcacheValue, PEER_ANY, PEER_CIDR_CLASS, PEER_IDENTITY,
        POLICY_KEY_FULL_BITS, PolicyCtKey, PolicyKey, PolicyValue, VERDICT_ALLOWED,
        VERDICT_DROPPED,
    },
};

use crate::{
    maps::{FLOWS, IPCACHE4, POLICY, POLICY_CT4, POLICY_DROPS, POLICY_ENDPOINTS, POLICY_GLOBAL},
    metrics::count,
    packet::{Packet4, parse_packet4},
};

const IDENTITY_HOST: u32 = 1;
const IDENTITY_WORLD: u32 = 2;

pub fn try_check(ctx: &TcContext, direction: u8) -> Result<i32, Counter> {
    let Some(pkt) = parse_packet4(ctx) else {
        // Not IPv4 (ARP, IPv6: IPv4 only for now) or truncated.
        return Ok(TC_ACT_OK);
    };
    let (endpoint, peer) =
        if direction == DIR_EGRESS { (pkt.saddr, pkt.daddr) } else { (pkt.daddr, pkt.saddr) };
    // SAFETY: values are copied out before any other map call.
    let Some(ep) = (unsafe { POLICY_ENDPOINTS.get(&endpoint) }).copied() else {
        let deny_unknown = POLICY_GLOBAL.get(0).is_some_and(|g| g.flags & GLOBAL_DENY_UNKNOWN != 0);
        if deny_unknown && !node_flow_of_unknown(&pkt, direction, peer) {
            report(&pkt, direction, VERDICT_DROPPED, Counter::DropPolicyNotReady, 0, 0);
            return Err(Counter::DropPolicyNotReady);
        }
        return Ok(TC_ACT_OK);
    };

    // A reply: the flow in the other direction was allowed by this endpoint.
    let reply = reversed(&flow_key(&pkt, direction));
    // SAFETY: only checked for presence.
    if unsafe { POLICY_CT4.get(&reply) }.is_some() {
        count(Counter::PolicyReply);
        return Ok(TC_ACT_OK);
    }

    let (isolated_bit, policy_id) = if direction == DIR_EGRESS {
        (EP_EGRESS_ISOLATED, ep.egress_policy)
    } else {
        (EP_INGRESS_ISOLATED, ep.ingress_policy)
    };
    let cache = IPCACHE4
        .get(Key::new(32, peer))
        .copied()
        .unwrap_or(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: 0 });
    let rule_id = if ep.flags & isolated_bit == 0 {
        Some(0)
    } else if direction == DIR_INGRESS && cache.identity == IDENTITY_HOST {
        Some(0)
    } else {
        lookup_rule(&pkt, endpoint, direction, &cache)
    };
    let Some(rule_id) = rule_id else {
        let reason = if direction == DIR_EGRESS {
            Counter::DropPolicyEgress
        } else {
            Counter::DropPolicyIngress
        };
        count_policy_drop(policy_id);
        report(&pkt, direction, VERDICT_DROPPED, reason, policy_id, cache.identity);
        return Err(reason);
    };
    record(&pkt, direction, rule_id, cache.identity);
    Ok(TC_ACT_OK)
}

/// A pod without a policy entry yet may be reached by its own node (kubelet's readiness
/// probes must work right after the pod starts) and may answer it: a connection from a host
/// address is recorded like an allowed flow, and its replies pass through conntrack.
#[inline(always)]
fn node_flow_of_unknown(pkt: &Packet4, direction: u8, peer: [u8; 4]) -> bool {
    // SAFETY: only checked for presence.
    if unsafe { POLICY_CT4.get(&reversed(&flow_key(pkt, direction))) }.is_some() {
        count(Counter::PolicyReply);
        return true;
    }
    let from_host = direction == DIR_INGRESS
        && IPCACHE4.get(Key::new(32, peer)).is_some_and(|c| c.identity == IDENTITY_HOST);
    if from_host {
        record(pkt, direction, 0, IDENTITY_HOST);
    }
    from_host
}

#[inline(always)]
fn lookup_rule(
    pkt: &Packet4,
    endpoint: [u8; 4],
    direction: u8,
    cache: &IpcacheValue,
) -> Option<u32> {
    let mut key = PolicyKey {
        endpoint,
        direction,
        peer_kind: PEER_ANY,
        _pad: [0; 2],
        peer: [0; 4],
        proto: pkt.proto,
        port: pkt.dport.to_ne_bytes(),
        _pad2: 0,
    };
    if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
        return Some(value.rule_id);
    }
    key.peer_kind = PEER_IDENTITY;
    key.peer = cache.identity.to_be_bytes();
    if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
        return Some(value.rule_id);
    }
    if cache.cidr_class != 0 {
        key.peer_kind = PEER_CIDR_CLASS;
        key.peer = cache.cidr_class.to_be_bytes();
        if let Some(value) = POLICY.get(Key::new(POLICY_KEY_FULL_BITS, key)) {
            return Some(value.rule_id);
        }
    }
    None
}

/// The conntrack key of this packet's flow as checked in `direction`.
#[inline(always)]
fn flow_key(pkt: &Packet4, direction: u8) -> PolicyCtKey {
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
#[inline(always)]
fn record(pkt: &Packet4, direction: u8, rule_id: u32, peer_identity: u32) {
    let key = flow_key(pkt, direction);
    count(Counter::PolicyAllowed);
    // SAFETY: only checked for presence.
    if unsafe { POLICY_CT4.get(&key) }.is_some() {
        return;
    }
    let value = PolicyValue { rule_id, _pad: 0 };
    // Fails only if another CPU inserted it first, or under memory pressure (the next packet
    // retries); either way the packet is allowed.
    let _ = POLICY_CT4.insert(&key, &value, BPF_NOEXIST as u64);
    report(pkt, direction, VERDICT_ALLOWED, Counter::PolicyAllowed, rule_id, peer_identity);
}

#[inline(always)]
fn count_policy_drop(policy_id: u32) {
    if let Some(slot) = POLICY_DROPS.get_ptr_mut(&policy_id) {
        // SAFETY: a per-CPU value of this CPU; tc programs run with preemption off.
        unsafe { *slot += 1 };
    } else {
        let _ = POLICY_DROPS.insert(&policy_id, &1, BPF_NOEXIST as u64);
    }
}

#[inline(always)]
fn report(
    pkt: &Packet4,
    direction: u8,
    verdict: u8,
    reason: Counter,
    rule_id: u32,
    peer_identity: u32,
) {
    let event = FlowEvent {
        // SAFETY: a helper without preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        direction,
        verdict,
        _pad: 0,
        rule_id,
        reason: reason as u32,
        peer_identity,
    };
    // A full ring buffer loses the event, never the packet.
    let _ = FLOWS.output::<FlowEvent>(&event, 0);
}
