//! eBPF host routing: which destinations weir's programs forward themselves, past the node's
//! own IP stack (Cilium's "eBPF host routing").
//!
//! `weir_host_route_v1` is an LPM trie of pod CIDRs, keyed by [`Addr`](crate::policy::Addr) (IPv4 in its
//! IPv4-mapped form, as the policy maps hold it) with the prefix length counted over those 128
//! bits, so an IPv4 /24 is a 120-bit prefix. The agent's routing part writes it from the Node
//! objects: this node's pod CIDRs as [`ROUTE_LOCAL_PODS`], every other node's as
//! [`ROUTE_REMOTE_PODS`]. Nothing else is ever forwarded by the programs: traffic to services,
//! to the node or out of the cluster takes the kernel's path as before.

pub const HOST_ROUTES_MAP: &str = "weir_host_route_v1";
/// Capacity: a pod CIDR per node and family.
pub const HOST_ROUTES_MAX: u32 = 16_384;

/// This node's pods: a packet for them arriving from another node goes straight into the pod.
pub const ROUTE_LOCAL_PODS: u32 = 1;
/// Another node's pods: a pod's packet for them goes straight out of the device the node's
/// route names (uplink or VXLAN device).
pub const ROUTE_REMOTE_PODS: u32 = 2;

/// The trie's prefix length for an address of `prefix` bits in its own family.
pub const fn trie_prefix(v6: bool, prefix: u8) -> u32 {
    if v6 { prefix as u32 } else { 96 + prefix as u32 }
}
