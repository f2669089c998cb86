//! eBPF host routing: pod-to-pod traffic between nodes forwarded by the programs themselves,
//! past the node's IP stack (its routing input, netfilter and one backlog queue per node),
//! as Cilium's "eBPF host routing" does.
//!
//! - [`to_remote`] (end of `tc_pol_egress`, a pod's host veth ingress): a packet the pod's
//!   egress policy allowed, for a pod of another node, goes straight out of the device the
//!   node's route names (the uplink with native routing, `weir.vxlan` with the overlay), with
//!   the Ethernet addresses and the hop count a router would give it.
//! - [`to_local`] (`tc_host_in`, first on the ingress of the VXLAN device or, with native
//!   routing, the uplink): a packet from another node's pod for a pod of this node is judged
//!   by that pod's ingress policy here (the redirect skips the veth's own program) and handed
//!   to the pod's side of its veth (`bpf_redirect_peer`). Every other packet goes on to the
//!   next program of the chain (the uplink's load balancer) with `TC_ACT_UNSPEC`.
//!
//! Only pod-to-pod packets (source and destination both in `weir_host_route_v1`) take this
//! path, in both directions, so the node's conntrack never sees half a flow: the masquerade
//! table only ever acts on traffic with one end outside the pods. The kernel decides the next
//! hop (`bpf_fib_lookup`); when it cannot answer at once (no neighbour entry yet, a packet
//! too big for the device, TTL running out) the packet takes the kernel's path, which deals
//! with it. SCTP to local pods stays on the kernel's path: the veth's ingress program gives
//! replies of SCTP services their frontend as source.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_redirect_peer},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use weir_common::{
    host_route::{ROUTE_LOCAL_PODS, ROUTE_REMOTE_PODS},
    policy::{Addr, DIR_INGRESS, v4_mapped},
    proto,
};

use crate::{
    fib::{self, NextHop},
    maps::HOST_ROUTES,
    packet::{ETH_HLEN, IP_CSUM_OFF, read},
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// IPv4: TTL (then protocol) at this offset; IPv6: hop limit.
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;

/// What forwarding a packet changes or depends on besides its addresses.
#[derive(Clone, Copy)]
struct Hops {
    v6: bool,
    proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    ttl: u8,
}

/// The addresses and hop count of an IPv4 or IPv6 packet. Addresses as the packet has them
/// (network order), IPv4 in the first word: the form `bpf_fib_lookup` takes.
struct Header {
    hops: Hops,
    src: [u32; 4],
    dst: [u32; 4],
}

impl Header {
    #[inline(always)]
    fn read(ctx: &TcContext) -> Option<Self> {
        match read::<u16>(ctx, 12)? {
            ETH_P_IP_BE => {
                let first: u8 = read(ctx, ETH_HLEN)?;
                if first >> 4 != 4 {
                    return None;
                }
                Some(Self {
                    hops: Hops {
                        v6: false,
                        proto: read(ctx, ETH_HLEN + 9)?,
                        ttl: read(ctx, IP_TTL_OFF)?,
                    },
                    src: [read(ctx, ETH_HLEN + 12)?, 0, 0, 0],
                    dst: [read(ctx, ETH_HLEN + 16)?, 0, 0, 0],
                })
            }
            ETH_P_IPV6_BE => Some(Self {
                hops: Hops {
                    v6: true,
                    proto: read(ctx, ETH_HLEN + 6)?,
                    ttl: read(ctx, IP6_HOP_LIMIT_OFF)?,
                },
                src: read(ctx, ETH_HLEN + 8)?,
                dst: read(ctx, ETH_HLEN + 24)?,
            }),
            _ => None,
        }
    }
}

/// What `weir_host_route_v1` says of an address of `header`'s family (0: not a pod CIDR weir
/// routes).
#[inline(always)]
fn route_kind(v6: bool, addr: &[u32; 4]) -> u32 {
    let key: Addr = if v6 {
        // SAFETY: four words and sixteen bytes are the same memory, in the packet's order.
        unsafe { core::mem::transmute::<[u32; 4], Addr>(*addr) }
    } else {
        v4_mapped(addr[0].to_ne_bytes())
    };
    HOST_ROUTES.get(Key::new(128, key)).copied().unwrap_or(0)
}

/// A packet host routing takes from pods of kind `from` to pods of kind `to` (both directions
/// of a flow take it, never one alone), with the kernel's next hop for it: `None` for any
/// other packet, or when the kernel cannot answer at once (no neighbour entry yet, a packet
/// too big, no forwarding route, a TTL running out).
#[inline(always)]
fn pod_to_pod(ctx: &TcContext, from: u32, to: u32) -> Option<(NextHop, Hops)> {
    let header = Header::read(ctx)?;
    let hops = header.hops;
    // SCTP to local pods stays on the veth path (see the module doc).
    if hops.ttl <= 1
        || (to == ROUTE_LOCAL_PODS && hops.proto == proto::SCTP)
        || route_kind(hops.v6, &header.dst) != to
        || route_kind(hops.v6, &header.src) != from
    {
        return None;
    }
    let hop = fib::next_hop(ctx, hops.v6, &header.src, &header.dst, hops.proto, 0)?;
    // SAFETY: the context's skb pointer is valid for the program's run.
    (hop.ifindex != unsafe { (*ctx.skb.skb).ifindex }).then_some((hop, hops))
}

/// Does what a router does to a packet it forwards to `hop`: one hop less to live, the next
/// hop's Ethernet addresses. False when a write failed (the packet then takes the kernel's
/// path unchanged in its addresses; its TTL may already be one less, which is harmless).
#[inline(always)]
fn route(ctx: &TcContext, hops: Hops, hop: &NextHop) -> bool {
    let ttl = hops.ttl - 1;
    let ttl_written = if hops.v6 {
        ctx.store(IP6_HOP_LIMIT_OFF, &ttl, 0).is_ok()
    } else {
        // TTL and protocol form one 16-bit word of the header checksum.
        let old = u16::from_be_bytes([hops.ttl, hops.proto]).to_be();
        let new = u16::from_be_bytes([ttl, hops.proto]).to_be();
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 2).is_ok()
            && ctx.store(IP_TTL_OFF, &ttl, 0).is_ok()
    };
    ttl_written && ctx.store(0, &hop.dmac, 0).is_ok() && ctx.store(6, &hop.smac, 0).is_ok()
}

/// A packet a local pod sends (its egress policy allowed it) to another node's pod: sent out
/// of the next hop's device directly. Any other packet: `TC_ACT_OK`, the kernel's path.
#[inline(never)]
pub fn to_remote(ctx: &TcContext) -> i32 {
    match pod_to_pod(ctx, ROUTE_LOCAL_PODS, ROUTE_REMOTE_PODS) {
        // SAFETY: a plain helper call; an ifindex that is gone makes it drop the packet.
        Some((hop, hops)) if route(ctx, hops, &hop) => unsafe {
            bpf_redirect(hop.ifindex, 0) as i32
        },
        _ => TC_ACT_OK as i32,
    }
}

/// A packet from another node's pod to a pod of this node, arriving on an uplink or the VXLAN
/// device: judged by the pod's ingress policy, then handed to the pod's side of its veth.
/// Any other packet (and SCTP): `TC_ACT_UNSPEC`, on to the next program (or the kernel's
/// path).
///
/// Three steps in frames of their own: the policy check runs from this small frame, so its
/// chain of calls stays within the verifier's 512 bytes of stack.
#[inline(always)]
pub fn to_local(ctx: &TcContext) -> i32 {
    let Some((hop, hops)) = local_hop(ctx) else { return TC_ACT_UNSPEC };
    // The redirect skips the veth's tc egress, where `tc_pol_ingress` would judge it.
    let action = crate::policy_check(ctx, DIR_INGRESS);
    if action != TC_ACT_OK as i32 {
        return action;
    }
    into_pod(ctx, hops, &hop)
}

/// [`pod_to_pod`] from another node's pods to this node's, in a frame of its own.
#[inline(never)]
fn local_hop(ctx: &TcContext) -> Option<(NextHop, Hops)> {
    pod_to_pod(ctx, ROUTE_REMOTE_PODS, ROUTE_LOCAL_PODS)
}

/// Forwards the packet to `hop`, a pod's host veth, and hands it to the pod's side.
#[inline(never)]
fn into_pod(ctx: &TcContext, hops: Hops, hop: &NextHop) -> i32 {
    if !route(ctx, hops, hop) {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a plain helper call; a device without a peer makes it drop the packet (the
    // destination is a pod CIDR of this node, whose routes name pod veths).
    unsafe { bpf_redirect_peer(hop.ifindex, 0) as i32 }
}
