//! Service load-balancing maps: services, backend slots, backends, reverse NAT; one set per
//! address family (the IPv6 set has the same layout with 16-byte addresses).
//!
//! Layout (in the shape of Cilium's lb4 maps):
//! - `weir_svc_v1`: [`ServiceKey`] -> [`ServiceValue`]. The entry with `backend_slot == 0` is the
//!   service's master entry and carries the backend count; entries with slots `1..=count` map a
//!   slot to a backend ID. A program picks a slot in `1..=count` and follows it.
//! - `weir_backend_v1`: backend ID (`u32`) -> [`Backend`].
//! - `weir_rev_nat_v1`: reverse-NAT index (`u32`, from the master entry) -> [`RevNat`]: the
//!   address and port that replies must appear to come from (the service's VIP and port).
//! - IPv6: `weir_svc6_v1` ([`ServiceKey6`] -> [`ServiceValue`]), `weir_backend6_v1`
//!   ([`Backend6`]) and `weir_rev_nat6_v1` ([`RevNat6`]), with their own ID and index spaces.

use crate::impl_pod;

pub const SERVICE_MAP: &str = "weir_svc_v1";
pub const BACKEND_MAP: &str = "weir_backend_v1";
pub const REV_NAT_MAP: &str = "weir_rev_nat_v1";
pub const SERVICE6_MAP: &str = "weir_svc6_v1";
pub const BACKEND6_MAP: &str = "weir_backend6_v1";
pub const REV_NAT6_MAP: &str = "weir_rev_nat6_v1";

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

/// Values of [`AffinityKey4::scope`].
pub mod affinity_scope {
    /// IPv4 services at the socket layer (client: netns cookie).
    pub const SOCKET: u32 = 0;
    /// IPv4 services on the tc path (client: IPv4 address).
    pub const TC: u32 = 1;
    /// IPv6 services at the socket layer (client: netns cookie).
    pub const SOCKET6: u32 = 2;
    /// IPv6 services on the tc path (client: its IPv6 address folded to 64 bits; two clients
    /// whose folds collide share one remembered backend, which stays a backend of the service).
    pub const TC6: u32 = 3;
}
pub const DEFAULT_AFFINITY4_ENTRIES: u32 = 65_536;

/// Key of `weir_affinity4_v1` (LRU): a client and a service. IPv6 services keep their socket-layer
/// affinity here too (a netns cookie fits), under their own scope since their reverse-NAT
/// indices are another space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    /// The client: its network namespace cookie at the socket layer (the source address is
    /// not known at connect()), its IPv4 address (network byte order) on the tc path.
    pub client: u64,
    pub rev_nat_index: u32,
    /// One of [`affinity_scope`], so keys of different spaces never collide.
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

/// Key of `weir_svc6_v1`: an IPv6 service frontend and a backend slot ([`ServiceKey`]'s
/// layout with a 16-byte address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    /// VIP, network byte order (the 16 octets as they are on the wire).
    pub address: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// 0 for the master entry, `1..=count` for backend slots.
    pub backend_slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 24);

impl ServiceKey6 {
    pub const fn new(address: [u8; 16], port: u16, proto: u8, backend_slot: u16) -> Self {
        Self { address: words(address), port: port.to_be(), backend_slot, proto, _pad: [0; 3] }
    }

    pub const fn master(self) -> Self {
        self.with_slot(0)
    }

    pub const fn with_slot(mut self, backend_slot: u16) -> Self {
        self.backend_slot = backend_slot;
        self
    }

    pub const fn address_octets(&self) -> [u8; 16] {
        octets(self.address)
    }
}

/// Value of `weir_backend6_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend6 {
    /// Backend address, network byte order.
    pub address: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

impl Backend6 {
    pub const fn new(address: [u8; 16], port: u16, proto: u8) -> Self {
        Self { address: words(address), port: port.to_be(), proto, flags: 0 }
    }

    pub const fn address_octets(&self) -> [u8; 16] {
        octets(self.address)
    }

    pub const fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Value of `weir_rev_nat6_v1` (and of `weir_sock_rev6_v1`): the IPv6 service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat6 {
    /// Frontend address, network byte order.
    pub address: [u32; 4],
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);

impl RevNat6 {
    pub const fn new(address: [u8; 16], port: u16) -> Self {
        Self { address: words(address), port: port.to_be(), _pad: 0 }
    }

    pub const fn address_octets(&self) -> [u8; 16] {
        octets(self.address)
    }
}

/// 16 octets as four words in memory order (what `bpf_sock_addr.user_ip6` holds).
pub const fn words(octets: [u8; 16]) -> [u32; 4] {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The inverse of [`words`].
pub const fn octets(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    ];
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

impl_pod!(
    ServiceKey,
    ServiceValue,
    Backend,
    RevNat,
    AffinityKey4,
    AffinityValue4,
    ServiceKey6,
    Backend6,
    RevNat6
);
