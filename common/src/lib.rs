//! The map ABI shared by weir's eBPF programs (`ebpf/`) and its userspace (`proxy/`, `cni-plugin/`,
//! `tests/`).
//!
//! Contract:
//! - Every type here is `#[repr(C)]`, has explicit padding fields and a compile-time size check,
//!   so the eBPF side and userspace agree byte for byte.
//! - Addresses and ports are stored exactly as they appear on the wire (network byte order), so
//!   the eBPF side compares and copies them without swapping. Use the `from_*`/`*_octets`
//!   helpers on the userspace side instead of hand-rolled conversions.
//! - Map names carry an ABI version (`weir_svc_v1`). A layout change bumps the version, so an
//!   agent never reads a pinned map written with another layout.
//! - This crate is `#![no_std]` and has no dependencies unless the `user` feature adds
//!   `aya::Pod` impls for userspace.
#![no_std]

pub mod conntrack;
pub mod endpoint;
pub mod host_route;
pub mod lb;
pub mod metrics;
pub mod policy;
pub mod sctp;
pub mod sock;

/// IP protocol numbers as they appear in the IPv4 `protocol` field.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
    pub const ICMP: u8 = 1;
    pub const ICMPV6: u8 = 58;
}

/// Implements `aya::Pod` for map ABI types when the `user` feature is on.
macro_rules! impl_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers with explicit
            // padding fields, so every bit pattern is valid and it has no implicit padding.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use impl_pod;
