//! Typed access to the service load-balancing maps (`weir-common::lb`), for the agent's applier,
//! `weir inspect`, and tests.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
};
use thiserror::Error;
use weir_common::{
    conntrack::{CT4_MAP, CT6_MAP, CtKey4, CtKey6, CtValue4},
    lb::{self, Backend, RevNat, RevNat6, ServiceKey, ServiceValue},
    metrics::{Counter, METRICS_MAP},
    sock::{SOCK_REV4_MAP, SOCK_REV6_MAP, SockRevKey4, SockRevKey6},
};

use crate::{
    apply::plan::StaleUdpBackend,
    family::{Family, V4, V6},
    programs::MapSizes,
};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map `{name}` is missing from the loaded object")]
    Missing { name: &'static str },
    #[error("cannot open the pinned map {path}")]
    OpenPinned {
        path: std::path::PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map `{name}` has an unexpected type or layout")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing map `{name}` failed (full? the map holds at most its max_entries)")]
    Write {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map `{name}` failed")]
    Read {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("deleting from map `{name}` failed")]
    Delete {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("service {address}:{port} has {count} backends; a service holds at most {max}")]
    TooManyBackends { address: Ipv4Addr, port: u16, count: usize, max: usize },
}

impl MapsError {
    /// The map a write failed on because it had no room for another entry, if that is why it
    /// failed: the kernel refuses a new key in a full hash map with E2BIG (ENOSPC and ENOMEM
    /// are the same refusal from other map kinds and from a map that cannot grow).
    pub fn full_map(&self) -> Option<&'static str> {
        match self {
            MapsError::Write {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError { io_error, .. }),
            } if matches!(
                io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
            ) =>
            {
                Some(name)
            }
            _ => None,
        }
    }
}

/// An IPv4 service frontend with its backends, in host terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// Reverse-NAT index; must be unique per frontend and non-zero.
    pub rev_nat_index: u32,
    /// Backend IDs and their backends; IDs must be unique across services sharing a backend.
    pub backends: Vec<(u32, Backend)>,
}

/// One address family's three service maps (`weir_svc_v1`, `weir_backend_v1`,
/// `weir_rev_nat_v1`, or their IPv6 twins), opened for writing.
pub struct FamilyMaps<F: Family> {
    services: HashMap<MapData, F::Key, ServiceValue>,
    backends: HashMap<MapData, u32, F::Backend>,
    rev_nat: HashMap<MapData, u32, F::RevNat>,
}

/// The service maps of both families, the tc path's conntrack maps and the socket load
/// balancer's reverse entries (socket cookie and backend -> frontend).
pub struct ServiceMaps {
    pub v4: FamilyMaps<V4>,
    pub v6: FamilyMaps<V6>,
    conntrack: HashMap<MapData, CtKey4, CtValue4>,
    conntrack6: HashMap<MapData, CtKey6, CtValue4>,
    sock_rev4: HashMap<MapData, SockRevKey4, RevNat>,
    sock_rev6: HashMap<MapData, SockRevKey6, RevNat6>,
}

impl ServiceMaps {
    /// Opens the service maps pinned in `pin_dir` (for inspection; nothing is loaded).
    pub fn open_pinned(pin_dir: &std::path::Path) -> Result<Self, MapsError> {
        Ok(Self {
            v4: FamilyMaps::open_pinned(pin_dir)?,
            v6: FamilyMaps::open_pinned(pin_dir)?,
            conntrack: open_pinned_hash(pin_dir, CT4_MAP)?,
            conntrack6: open_pinned_hash(pin_dir, CT6_MAP)?,
            sock_rev4: open_pinned_hash(pin_dir, SOCK_REV4_MAP)?,
            sock_rev6: open_pinned_hash(pin_dir, SOCK_REV6_MAP)?,
        })
    }

    /// Takes the service maps out of `ebpf` (the programs keep using them).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            v4: FamilyMaps::take(ebpf)?,
            v6: FamilyMaps::take(ebpf)?,
            conntrack: take_hash(ebpf, CT4_MAP)?,
            conntrack6: take_hash(ebpf, CT6_MAP)?,
            sock_rev4: take_hash(ebpf, SOCK_REV4_MAP)?,
            sock_rev6: take_hash(ebpf, SOCK_REV6_MAP)?,
        })
    }

    /// Writes one IPv4 service: backends first, then slots, then the master entry, so a
    /// program never follows a slot to a backend that is not there yet.
    pub fn upsert(&mut self, service: &ServiceEntry) -> Result<(), MapsError> {
        let count =
            u16::try_from(service.backends.len()).map_err(|_| MapsError::TooManyBackends {
                address: service.address,
                port: service.port,
                count: service.backends.len(),
                max: usize::from(u16::MAX),
            })?;
        let key = ServiceKey::new(service.address.octets(), service.port, service.proto, 0);
        let maps = &mut self.v4;
        for (id, backend) in &service.backends {
            maps.put_backend(*id, *backend)?;
        }
        for (slot, (id, _)) in (1..=count).zip(&service.backends) {
            maps.put_slot(key.with_slot(slot), *id)?;
        }
        maps.put_rev_nat(
            service.rev_nat_index,
            RevNat::new(service.address.octets(), service.port),
        )?;
        maps.put_master(key, count, service.rev_nat_index, 0, 0)
    }

    /// Deletes the conntrack entries (both directions) of UDP flows that a service
    /// (`rev_nat_index`) sent to a backend it no longer has, so those flows pick a live backend
    /// with their next datagram, as kube-proxy's conntrack flush does. Other flows are left
    /// alone. `v4` and `v6` are each family's (rev-NAT index, backend ID) pairs. Returns how
    /// many entries were deleted.
    pub fn flush_udp_flows(
        &mut self,
        v4: &[StaleUdpBackend],
        v6: &[StaleUdpBackend],
    ) -> Result<usize, MapsError> {
        Ok(flush_udp(&mut self.conntrack, CT4_MAP, v4, |k| k.proto)?
            + flush_udp(&mut self.conntrack6, CT6_MAP, v6, |k| k.proto)?)
    }

    /// The frontend the socket load balancer translated socket `cookie`'s destination from,
    /// when it gave that socket `backend`; `None` for a socket it never balanced there (or
    /// whose entry the LRU map evicted).
    pub fn balanced_from(&self, cookie: u64, backend: SocketAddr) -> Option<SocketAddr> {
        let port = backend.port().to_be();
        match backend.ip() {
            IpAddr::V4(address) => {
                let address = u32::from_ne_bytes(address.octets());
                let key = SockRevKey4 { cookie, address, port, _pad: 0 };
                let frontend = self.sock_rev4.get(&key, 0).ok()?;
                let (address, port) = V4::rev_nat_parts(&frontend);
                Some(SocketAddr::new(IpAddr::V4(address), port))
            }
            IpAddr::V6(address) => {
                let address = lb::words(address.octets());
                let key = SockRevKey6 { cookie, address, port, _pad: [0; 3] };
                let frontend = self.sock_rev6.get(&key, 0).ok()?;
                let (address, port): (Ipv6Addr, u16) = V6::rev_nat_parts(&frontend);
                Some(SocketAddr::new(IpAddr::V6(address), port))
            }
        }
    }

    /// Number of entries in the six service maps (for tests and benchmarks).
    pub fn entry_count(&self) -> usize {
        self.v4.entry_count() + self.v6.entry_count()
    }
}

impl<F: Family> FamilyMaps<F> {
    fn open_pinned(pin_dir: &std::path::Path) -> Result<Self, MapsError> {
        Ok(Self {
            services: open_pinned_hash(pin_dir, F::SERVICE_MAP)?,
            backends: open_pinned_hash(pin_dir, F::BACKEND_MAP)?,
            rev_nat: open_pinned_hash(pin_dir, F::REV_NAT_MAP)?,
        })
    }

    fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            services: take_hash(ebpf, F::SERVICE_MAP)?,
            backends: take_hash(ebpf, F::BACKEND_MAP)?,
            rev_nat: take_hash(ebpf, F::REV_NAT_MAP)?,
        })
    }

    pub fn put_backend(&mut self, id: u32, backend: F::Backend) -> Result<(), MapsError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|source| MapsError::Write { name: F::BACKEND_MAP, source })
    }

    pub fn put_slot(&mut self, key: F::Key, backend_id: u32) -> Result<(), MapsError> {
        self.services
            .insert(key, ServiceValue::slot(backend_id), 0)
            .map_err(|source| MapsError::Write { name: F::SERVICE_MAP, source })
    }

    pub fn put_master(
        &mut self,
        key: F::Key,
        count: u16,
        rev_nat_index: u32,
        flags: u8,
        affinity_timeout: u32,
    ) -> Result<(), MapsError> {
        let value = ServiceValue {
            backend_id: affinity_timeout,
            ..ServiceValue::master(count, rev_nat_index, flags)
        };
        self.services
            .insert(F::with_slot(key, 0), value, 0)
            .map_err(|source| MapsError::Write { name: F::SERVICE_MAP, source })
    }

    pub fn put_rev_nat(&mut self, index: u32, frontend: F::RevNat) -> Result<(), MapsError> {
        self.rev_nat
            .insert(index, frontend, 0)
            .map_err(|source| MapsError::Write { name: F::REV_NAT_MAP, source })
    }

    pub fn delete_service_entry(&mut self, key: F::Key) -> Result<(), MapsError> {
        self.services
            .remove(&key)
            .map_err(|source| MapsError::Delete { name: F::SERVICE_MAP, source })
    }

    pub fn delete_rev_nat(&mut self, index: u32) -> Result<(), MapsError> {
        self.rev_nat
            .remove(&index)
            .map_err(|source| MapsError::Delete { name: F::REV_NAT_MAP, source })
    }

    pub fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.backends
            .remove(&id)
            .map_err(|source| MapsError::Delete { name: F::BACKEND_MAP, source })
    }

    /// The entry of `key` (a master or a slot), if the map holds one.
    pub fn service_entry(&self, key: F::Key) -> Option<ServiceValue> {
        self.services.get(&key, 0).ok()
    }

    /// Every entry of the service map (for inspection and tests).
    pub fn service_entries(&self) -> Vec<(F::Key, ServiceValue)> {
        self.services.iter().filter_map(Result::ok).collect()
    }

    /// Every entry of the backend map.
    pub fn backend_entries(&self) -> Vec<(u32, F::Backend)> {
        self.backends.iter().filter_map(Result::ok).collect()
    }

    /// Every entry of the reverse-NAT map.
    pub fn rev_nat_entries(&self) -> Vec<(u32, F::RevNat)> {
        self.rev_nat.iter().filter_map(Result::ok).collect()
    }

    /// Number of entries in the three maps.
    pub fn entry_count(&self) -> usize {
        self.services.keys().count() + self.backends.keys().count() + self.rev_nat.keys().count()
    }
}

/// [`ServiceMaps::flush_udp_flows`] on one conntrack map.
fn flush_udp<K: aya::Pod>(
    conntrack: &mut HashMap<MapData, K, CtValue4>,
    name: &'static str,
    flows: &[StaleUdpBackend],
    proto_of: impl Fn(&K) -> u8,
) -> Result<usize, MapsError> {
    if flows.is_empty() {
        return Ok(0);
    }
    let stale: std::collections::HashSet<(u32, u32)> =
        flows.iter().map(|flow| (flow.rev_nat_index, flow.backend_id)).collect();
    let doomed: Vec<K> = conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, value)| {
            proto_of(key) == weir_common::proto::UDP
                && stale.contains(&(value.rev_nat_index, value.backend_id))
        })
        .map(|(key, _)| key)
        .collect();
    let mut deleted = 0;
    for key in &doomed {
        match conntrack.remove(key) {
            Ok(()) => deleted += 1,
            // Evicted by the LRU meanwhile: already gone.
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(MapsError::Delete { name, source }),
        }
    }
    Ok(deleted)
}

fn open_pinned_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &std::path::Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, MapsError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPinned { path, source })?;
    HashMap::try_from(aya::maps::Map::HashMap(data))
        .map_err(|source| MapsError::Layout { name, source })
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing { name })?;
    HashMap::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

/// How full one map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOccupancy {
    /// The map's pinned name.
    pub map: &'static str,
    /// `max_entries` of the map as loaded (a map pinned by an earlier agent keeps its own).
    pub capacity: u32,
    /// Entries present when counted.
    pub entries: u32,
}

/// Counts the entries of each sized map of the service datapath pinned in `pin_dir` (those of
/// [`MapSizes::per_map`], in that order), with the map's own capacity. A map that cannot be
/// opened or read is its error; the others are still counted.
///
/// Cost: one system call per entry (the kernel's get-next-key walk), so a full 512k-entry
/// conntrack map takes a fraction of a second: call it off any latency-sensitive path. The
/// walk stops after `capacity` keys: when the datapath deletes or evicts the key the walk
/// stands on, the kernel restarts it from the first key, so a map with heavy churn can be
/// over-counted, never beyond its capacity.
pub fn occupancy_pinned(pin_dir: &std::path::Path) -> Vec<Result<MapOccupancy, MapsError>> {
    MapSizes::default()
        .per_map()
        .into_iter()
        .map(|(name, _)| match name {
            lb::SERVICE_MAP => count_pinned::<ServiceKey, ServiceValue>(pin_dir, name),
            lb::SERVICE6_MAP => count_pinned::<lb::ServiceKey6, ServiceValue>(pin_dir, name),
            lb::BACKEND_MAP => count_pinned::<u32, Backend>(pin_dir, name),
            lb::BACKEND6_MAP => count_pinned::<u32, lb::Backend6>(pin_dir, name),
            lb::REV_NAT_MAP => count_pinned::<u32, RevNat>(pin_dir, name),
            lb::REV_NAT6_MAP => count_pinned::<u32, RevNat6>(pin_dir, name),
            CT4_MAP => count_pinned::<CtKey4, CtValue4>(pin_dir, name),
            CT6_MAP => count_pinned::<CtKey6, CtValue4>(pin_dir, name),
            SOCK_REV4_MAP => count_pinned::<SockRevKey4, RevNat>(pin_dir, name),
            SOCK_REV6_MAP => count_pinned::<SockRevKey6, RevNat6>(pin_dir, name),
            _ => Err(MapsError::Missing { name }),
        })
        .collect()
}

/// [`occupancy_pinned`] of one map.
fn count_pinned<K: aya::Pod, V: aya::Pod>(
    pin_dir: &std::path::Path,
    name: &'static str,
) -> Result<MapOccupancy, MapsError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPinned { path, source })?;
    let capacity = data.info().map_err(|source| MapsError::Read { name, source })?.max_entries();
    let map: HashMap<MapData, K, V> = HashMap::try_from(aya::maps::Map::HashMap(data))
        .map_err(|source| MapsError::Layout { name, source })?;
    let mut entries = 0;
    for key in map.keys().take(capacity as usize) {
        key.map_err(|source| MapsError::Read { name, source })?;
        entries += 1;
    }
    Ok(MapOccupancy { map: name, capacity, entries })
}

/// Sums the per-CPU datapath counters from the map pinned in `pin_dir` (what `weir agent`'s
/// /metrics and `weir inspect` read, without loading anything).
pub fn read_counters_pinned(pin_dir: &std::path::Path) -> Result<Vec<(Counter, u64)>, MapsError> {
    let path = pin_dir.join(METRICS_MAP);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPinned { path, source })?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(|source| MapsError::Layout { name: METRICS_MAP, source })?;
    sum_counters(&counters)
}

/// Sums the per-CPU datapath counters of a loaded object.
pub fn read_counters(ebpf: &Ebpf) -> Result<Vec<(Counter, u64)>, MapsError> {
    let map = ebpf.map(METRICS_MAP).ok_or(MapsError::Missing { name: METRICS_MAP })?;
    let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)
        .map_err(|source| MapsError::Layout { name: METRICS_MAP, source })?;
    sum_counters(&counters)
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, u64)>, MapsError> {
    Counter::ALL
        .iter()
        .map(|&counter| {
            let per_cpu = counters
                .get(&(counter as u32), 0)
                .map_err(|source| MapsError::Layout { name: METRICS_MAP, source })?;
            Ok((counter, per_cpu.iter().sum()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_error(errno: i32) -> MapsError {
        let io_error = std::io::Error::from_raw_os_error(errno);
        let source = aya::sys::SyscallError { call: "bpf_map_update_elem", io_error };
        MapsError::Write { name: lb::SERVICE_MAP, source: source.into() }
    }

    #[test]
    fn a_write_refused_for_want_of_room_names_the_full_map() {
        for errno in [libc::E2BIG, libc::ENOSPC, libc::ENOMEM] {
            assert_eq!(write_error(errno).full_map(), Some(lb::SERVICE_MAP), "errno {errno}");
        }
        assert_eq!(write_error(libc::EPERM).full_map(), None);
        let delete = MapsError::Delete { name: lb::SERVICE_MAP, source: MapError::KeyNotFound };
        assert_eq!(delete.full_map(), None);
    }

    #[test]
    fn occupancy_counts_every_sized_map() {
        // Without pins every map is an error, but each sized map is there, in order.
        let dir = std::path::Path::new("/nonexistent/weir-occupancy");
        let counted = occupancy_pinned(dir);
        assert_eq!(counted.len(), MapSizes::default().per_map().len());
        for (result, (name, _)) in counted.iter().zip(MapSizes::default().per_map()) {
            match result {
                Err(MapsError::OpenPinned { path, .. }) => assert_eq!(path, &dir.join(name)),
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
