//! Service load-balancing maps (IPv4): services, backend slots, backends, reverse NAT.
//!
//! Layout (in the shape of Cilium's lb4 maps):
//! - `weir_svc_v1`: [`ServiceKey`] -> [`ServiceValue`]. The entry with `backend_slot == 0` is the
//!   service's master entry and carries the backend count; entries with slots `1..=count` map a
//!   slot to a backend ID. A program picks a slot in `1..=count` and follows it.
//! - `weir_backend_v1`: backend ID (`u32`) -> [`Backend`].
//! - `weir_rev_nat_v1`: reverse-NAT index (`u32`, from the master entry) -> [`RevNat`]: the
//!   address and port that replies must appear to come from (the service's VIP and port).

use crate::impl_pod;

pub const SERVICE_MAP: &str = "weir_svc_v1";
pub const BACKEND_MAP: &str = "weir_backend_v1";
pub const REV_NAT_MAP: &str = "weir_rev_nat_v1";

/// Default capacities (at least Cilium's defaults). The agent may override them at load time.
pub const DEFAULT_SERVICE_ENTRIES: u32 = 65_536;
pub const DEFAULT_BACKEND_ENTRIES: u32 = 65_536;
pub const DEFAULT_REV_NAT_ENTRIES: u32 = 65_536;

/// Key of `weir_svc_v1`: a service frontend (VIP, port, protocol) and a backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP, network byte order.
    pub address: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// 0 for the master entry, `1..=count` for backend slots.
    pub backend_slot: u16,
    /// IP protocol number ([`crate::proto`]).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);

impl ServiceKey {
    /// A key from host-order values: `address` as its four octets, `port` as a plain number.
    pub const fn new(address: [u8; 4], port: u16, proto: u8, backend_slot: u16) -> Self {
        Self {
            address: u32::from_ne_bytes(address),
            port: port.to_be(),
            backend_slot,
            proto,
            _pad: [0; 3],
        }
    }

    /// The master entry's key for the same frontend.
    pub const fn master(self) -> Self {
        self.with_slot(0)
    }

    pub const fn with_slot(mut self, backend_slot: u16) -> Self {
        self.backend_slot = backend_slot;
        self
    }
}

/// Value of `weir_svc_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Slot entries: the backend ID. Master entry: the ClientIP session affinity timeout in
    /// seconds when `flags` has [`service_flags::AFFINITY`], else 0 (Cilium's layout).
    pub backend_id: u32,
    /// Index into `weir_rev_nat_v1` (master entry only); never 0 for a live service. 32 bits:
    /// a node may serve more than 65,535 frontends.
    pub rev_nat_index: u32,
    /// Number of backend slots (master entry only).
    pub count: u16,
    /// [`service_flags`] bits (master entry only).
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

impl ServiceValue {
    pub const fn master(count: u16, rev_nat_index: u32, flags: u8) -> Self {
        Self { backend_id: 0, rev_nat_index, count, flags, _pad: 0 }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self { backend_id, rev_nat_index: 0, count: 0, flags: 0, _pad: 0 }
    }
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    pub const NONE: u8 = 0;
    /// The frontend has no backend because its traffic policy allows none on this node,
    /// although the service has endpoints elsewhere: kube-proxy drops such traffic instead of
    /// rejecting it.
    pub const EMPTY_BY_POLICY: u8 = 1 << 0;
    /// ClientIP session affinity: a client keeps its backend while it keeps using it within the
    /// timeout held in the master entry's `backend_id`.
    pub const AFFINITY: u8 = 1 << 1;
}

pub const AFFINITY4_MAP: &str = "weir_affinity4_v1";
pub const DEFAULT_AFFINITY4_ENTRIES: u32 = 65_536;

/// Key of `weir_affinity4_v1` (LRU): a client and a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    /// The client: its network namespace cookie at the socket layer (the source address is
    /// not known at connect()), its IPv4 address (network byte order) on the tc path.
    pub client: u64,
    pub rev_nat_index: u32,
    /// 0 for socket-layer keys, 1 for tc-path keys, so the two never collide.
    pub scope: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey4>() == 16);

/// Value of `weir_affinity4_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue4 {
    /// When the client last used the backend (bpf_ktime_get_ns).
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// The slot the backend held when chosen: re-checked on use, so a backend that left the
    /// service is never used again through affinity.
    pub slot: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AffinityValue4>() == 16);

/// Value of `weir_backend_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network byte order.
    pub address: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

impl Backend {
    pub const fn new(address: [u8; 4], port: u16, proto: u8) -> Self {
        Self { address: u32::from_ne_bytes(address), port: port.to_be(), proto, flags: 0 }
    }

    pub const fn address_octets(&self) -> [u8; 4] {
        self.address.to_ne_bytes()
    }

    pub const fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Value of `weir_rev_nat_v1`: what replies are rewritten to (the service frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    /// Frontend address, network byte order.
    pub address: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);

impl RevNat {
    pub const fn new(address: [u8; 4], port: u16) -> Self {
        Self { address: u32::from_ne_bytes(address), port: port.to_be(), _pad: 0 }
    }
}

impl_pod!(ServiceKey, ServiceValue, Backend, RevNat, AffinityKey4, AffinityValue4);
