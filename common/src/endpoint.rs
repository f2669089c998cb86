//! Local endpoints: which pod address lives behind which interface on this node.
//!
//! `weir_endpoints_v1` is a hash map `EndpointKey -> EndpointInfo`, created and pinned by the
//! agent at `<bpffs dir>/weir_endpoints_v1` (default dir `/sys/fs/bpf/weir`, the
//! [`ENDPOINTS_PIN_DIR`]). The CNI plugin inserts an entry on ADD and removes it on DEL when the
//! pin exists; the agent fills in the identity later. The plugin never creates the map.

pub const ENDPOINTS_MAP: &str = "weir_endpoints_v1";
pub const ENDPOINTS_PIN_DIR: &str = "/sys/fs/bpf/weir";
/// Capacity the agent creates the map with.
pub const ENDPOINTS_MAX: u32 = 65536;

/// A pod address: IPv4 in the first 4 bytes of `addr` (rest zero) with `family` 4, or IPv6
/// with `family` 6. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

impl EndpointKey {
    pub const fn v4(addr: [u8; 4]) -> Self {
        let mut full = [0u8; 16];
        full[0] = addr[0];
        full[1] = addr[1];
        full[2] = addr[2];
        full[3] = addr[3];
        Self { addr: full, family: 4, _pad: [0; 3] }
    }

    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { addr, family: 6, _pad: [0; 3] }
    }
}

/// Where an endpoint is: the host-side interface index, and its policy identity
/// ([`IDENTITY_UNKNOWN`] until the agent assigns one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ifindex: u32,
    pub identity: u32,
    /// Bit 0: [`FLAG_FROM_CNI`].
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// Identity placeholder written by the CNI plugin.
pub const IDENTITY_UNKNOWN: u32 = 0;
/// The entry was written by the CNI plugin (the agent has not reconciled it yet).
pub const FLAG_FROM_CNI: u32 = 1;

crate::impl_pod!(EndpointKey, EndpointInfo);
