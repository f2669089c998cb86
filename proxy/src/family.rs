//! The address families of the service load-balancing maps. IPv4 and IPv6 frontends live in
//! separate maps of the same shape (`weir_svc_v1` / `weir_svc6_v1` and their backend and
//! reverse-NAT maps, `weir-common::lb`), with separate backend-ID and reverse-NAT index spaces,
//! as Cilium's lb4/lb6 maps do. [`Family`] is what the planner, the map writer and
//! `weir inspect` need to treat both the same way.
use std::{
    fmt::Debug,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use weir_common::lb::{
    BACKEND_MAP, BACKEND6_MAP, Backend, Backend6, REV_NAT_MAP, REV_NAT6_MAP, RevNat, RevNat6,
    SERVICE_MAP, SERVICE6_MAP, ServiceKey, ServiceKey6,
};

/// One address family's map types and conversions.
pub trait Family: Copy + Debug + Default + PartialEq + Eq + Send + Sync + 'static {
    type Addr: Copy + Ord + Hash + Debug + Send + Sync + Into<IpAddr>;
    type Key: aya::Pod + Copy + Eq + Hash + Debug + Send + Sync;
    type Backend: aya::Pod + Copy + Eq + Debug + Send + Sync;
    type RevNat: aya::Pod + Copy + Eq + Debug + Send + Sync;

    const NAME: &'static str;
    const SERVICE_MAP: &'static str;
    const BACKEND_MAP: &'static str;
    const REV_NAT_MAP: &'static str;

    /// `ip` if it is of this family.
    fn addr(ip: IpAddr) -> Option<Self::Addr>;

    /// The key of `address:port/proto`'s entry `slot` (0: the master entry).
    fn key(address: Self::Addr, port: u16, proto: u8, slot: u16) -> Self::Key;
    fn with_slot(key: Self::Key, slot: u16) -> Self::Key;
    /// (address, port in host order, protocol number, slot) of a key.
    fn key_parts(key: &Self::Key) -> (Self::Addr, u16, u8, u16);

    fn backend(address: Self::Addr, port: u16, proto: u8) -> Self::Backend;
    /// (address, port in host order) of a backend.
    fn backend_parts(backend: &Self::Backend) -> (Self::Addr, u16);

    fn rev_nat(address: Self::Addr, port: u16) -> Self::RevNat;
    /// (address, port in host order) of a reverse-NAT entry.
    fn rev_nat_parts(rev_nat: &Self::RevNat) -> (Self::Addr, u16);

    /// `socket` if it is of this family, as (address, port).
    fn socket(socket: &SocketAddr) -> Option<(Self::Addr, u16)> {
        Some((Self::addr(socket.ip())?, socket.port()))
    }
}

/// IPv4: `weir_svc_v1`, `weir_backend_v1`, `weir_rev_nat_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4;

/// IPv6: `weir_svc6_v1`, `weir_backend6_v1`, `weir_rev_nat6_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Key = ServiceKey;
    type Backend = Backend;
    type RevNat = RevNat;

    const NAME: &'static str = "IPv4";
    const SERVICE_MAP: &'static str = SERVICE_MAP;
    const BACKEND_MAP: &'static str = BACKEND_MAP;
    const REV_NAT_MAP: &'static str = REV_NAT_MAP;

    fn addr(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    fn key(address: Ipv4Addr, port: u16, proto: u8, slot: u16) -> ServiceKey {
        ServiceKey::new(address.octets(), port, proto, slot)
    }

    fn with_slot(key: ServiceKey, slot: u16) -> ServiceKey {
        key.with_slot(slot)
    }

    fn key_parts(key: &ServiceKey) -> (Ipv4Addr, u16, u8, u16) {
        (
            Ipv4Addr::from(key.address.to_ne_bytes()),
            u16::from_be(key.port),
            key.proto,
            key.backend_slot,
        )
    }

    fn backend(address: Ipv4Addr, port: u16, proto: u8) -> Backend {
        Backend::new(address.octets(), port, proto)
    }

    fn backend_parts(backend: &Backend) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(backend.address_octets()), backend.port_host())
    }

    fn rev_nat(address: Ipv4Addr, port: u16) -> RevNat {
        RevNat::new(address.octets(), port)
    }

    fn rev_nat_parts(rev_nat: &RevNat) -> (Ipv4Addr, u16) {
        (Ipv4Addr::from(rev_nat.address.to_ne_bytes()), u16::from_be(rev_nat.port))
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Key = ServiceKey6;
    type Backend = Backend6;
    type RevNat = RevNat6;

    const NAME: &'static str = "IPv6";
    const SERVICE_MAP: &'static str = SERVICE6_MAP;
    const BACKEND_MAP: &'static str = BACKEND6_MAP;
    const REV_NAT_MAP: &'static str = REV_NAT6_MAP;

    fn addr(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }
    }

    fn key(address: Ipv6Addr, port: u16, proto: u8, slot: u16) -> ServiceKey6 {
        ServiceKey6::new(address.octets(), port, proto, slot)
    }

    fn with_slot(key: ServiceKey6, slot: u16) -> ServiceKey6 {
        key.with_slot(slot)
    }

    fn key_parts(key: &ServiceKey6) -> (Ipv6Addr, u16, u8, u16) {
        (Ipv6Addr::from(key.address_octets()), u16::from_be(key.port), key.proto, key.backend_slot)
    }

    fn backend(address: Ipv6Addr, port: u16, proto: u8) -> Backend6 {
        Backend6::new(address.octets(), port, proto)
    }

    fn backend_parts(backend: &Backend6) -> (Ipv6Addr, u16) {
        (Ipv6Addr::from(backend.address_octets()), backend.port_host())
    }

    fn rev_nat(address: Ipv6Addr, port: u16) -> RevNat6 {
        RevNat6::new(address.octets(), port)
    }

    fn rev_nat_parts(rev_nat: &RevNat6) -> (Ipv6Addr, u16) {
        (Ipv6Addr::from(rev_nat.address_octets()), u16::from_be(rev_nat.port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_backends_and_rev_nat_round_trip_in_both_families() {
        let v6: Ipv6Addr = "fd00:96::a".parse().unwrap();
        let key = V6::key(v6, 8080, 6, 3);
        assert_eq!(V6::key_parts(&key), (v6, 8080, 6, 3));
        assert_eq!(V6::key_parts(&V6::with_slot(key, 0)).3, 0);
        assert_eq!(V6::backend_parts(&V6::backend(v6, 53, 17)), (v6, 53));
        assert_eq!(V6::rev_nat_parts(&V6::rev_nat(v6, 443)), (v6, 443));
        // Wire order: the first octet of the address is the first byte in memory.
        let words = key.address;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, v6.octets());
        let v4 = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(V4::key_parts(&V4::key(v4, 80, 17, 1)), (v4, 80, 17, 1));
        assert_eq!(V4::addr("fd00::1".parse().unwrap()), None);
        assert_eq!(V6::addr("10.0.0.1".parse().unwrap()), None);
    }
}
