//! Connection tracking for translated flows: `weir_ct4_v1` (IPv4) and `weir_ct6_v1` (IPv6, the
//! same shape with 16-byte addresses and the same [`CtValue4`] values).
//!
//! `weir_ct4_v1` is an LRU hash of [`CtKey4`] -> [`CtValue4`]. A translated flow has two entries:
//! - forward (`CT_FORWARD`): the tuple as the client sent it (client -> VIP); it pins the chosen
//!   backend, so later packets of the flow go to the same backend even when slots change;
//! - reply (`CT_REPLY`): the tuple as the backend answers (backend -> client); it names the
//!   reverse-NAT entry that turns the reply's source back into the VIP.
//!
//! - hairpin reply (`CT_HAIRPIN_REPLY`), SCTP only: the tuple as a pod answers an association
//!   it opened to itself through its own service (backend -> frontend address, see the eBPF
//!   `hairpin` module); it names the same reverse-NAT entry.
//! - host reply (`CT_HOST_REPLY`), SCTP only: the reply entry of a flow the node's own process
//!   sent (backend -> node address; the eBPF `host_sctp` module). Only the programs that hand
//!   packets to the node itself look it up, so a pod's flow to the same backend is never
//!   translated early.
//!
//! The LRU evicts the oldest flows when full, so a full table never blocks new flows.

use crate::impl_pod;

pub const CT4_MAP: &str = "weir_ct4_v1";
pub const CT6_MAP: &str = "weir_ct6_v1";

/// Default capacity (Cilium's default for its TCP table).
pub const DEFAULT_CT4_ENTRIES: u32 = 524_288;

pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
pub const CT_HAIRPIN_REPLY: u8 = 2;
pub const CT_HOST_REPLY: u8 = 3;

/// Key of the conntrack maps; `A` is the address as on the wire (`u32` for IPv4, `[u32; 4]`
/// for IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    /// Source address as seen in the packet, network byte order.
    pub saddr: A,
    /// Destination address as seen in the packet, network byte order.
    pub daddr: A,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_FORWARD`, `CT_REPLY`, `CT_HAIRPIN_REPLY` or `CT_HOST_REPLY`.
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Key of `weir_ct4_v1`.
pub type CtKey4 = CtKey<u32>;
/// Key of `weir_ct6_v1`.
pub type CtKey6 = CtKey<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue4 {
    /// Backend chosen for the flow.
    pub backend_id: u32,
    /// Reverse-NAT entry for replies.
    pub rev_nat_index: u32,
    /// Reserved for flow state (TCP closing, reply seen); 0 today.
    pub flags: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<CtValue4>() == 16);

impl_pod!(CtKey4, CtValue4, CtKey6);
