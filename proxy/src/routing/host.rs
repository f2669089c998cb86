//! eBPF host routing, the agent's side (the programs: ebpf/src/host_route.rs).
//!
//! After each routing pass the agent writes `weir_host_route_v1` from the desired state: this
//! node's pod CIDRs as local, every other node's routed pod CIDR as remote. It also keeps
//! `tc_host_in` first on the ingress of the device other nodes' pod traffic arrives on
//! (`weir.vxlan` with the VXLAN overlay, the uplink with native routing), so packets for local
//! pods go straight into them. That attachment has no link: it lives as long as the device, a
//! later agent replaces it with its own copy, and `weir agent --cleanup` removes it.
//!
//! Pod-to-pod traffic between nodes then skips the node's IP stack on both nodes; every other
//! packet (services before translation, the node's own traffic, traffic leaving the cluster)
//! takes the kernel's path as before. An empty map turns the whole path off: that is what
//! `--bpf-host-routing false` leaves behind.
use std::{collections::BTreeMap, ffi::CString, io, os::fd::AsFd};

use aya::{
    Ebpf,
    maps::{LpmTrie, MapData, lpm_trie::Key},
};
use weir_cni_plugin::{
    bpf,
    netlink::Socket,
    policy::{Program, Slot, detach_copies, ensure},
};
use weir_common::{
    host_route::{HOST_ROUTES_MAP, ROUTE_LOCAL_PODS, ROUTE_REMOTE_PODS, trie_prefix},
    policy::{Addr, BPF_TCX_INGRESS, v4_mapped},
};

use super::model::{Desired, IpCidr};
use crate::programs::{self, TC_HOST_IN};

/// Where `tc_host_in` goes: first on the ingress of the device other nodes' pod traffic
/// arrives on (never pinned; `pin` is unused).
const HOST_IN_SLOT: Slot =
    Slot { pin: "", name: TC_HOST_IN, attach_type: BPF_TCX_INGRESS, first: true };

/// A trie entry: the network (IPv4-mapped for IPv4) and its prefix over 128 bits.
type Entry = (Addr, u32);

/// The host routing map and the VXLAN device's program.
pub struct HostRouting {
    routes: LpmTrie<MapData, Addr, u32>,
    host_in: Program,
}

/// What one [`HostRouting::sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub written: usize,
    pub removed: usize,
    /// `tc_host_in` was attached now (to the device [`HostRouting::sync`] was given).
    pub attached: bool,
}

impl HostRouting {
    /// Takes the host routing map and `tc_host_in` from the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, String> {
        let map = ebpf
            .take_map(HOST_ROUTES_MAP)
            .ok_or_else(|| format!("the eBPF object has no map {HOST_ROUTES_MAP}"))?;
        let routes: LpmTrie<MapData, Addr, u32> =
            LpmTrie::try_from(map).map_err(|e| format!("map {HOST_ROUTES_MAP}: {e}"))?;
        let classifier = programs::classifier_ref(ebpf, TC_HOST_IN).map_err(|e| e.to_string())?;
        let fd = classifier.fd().map_err(|e| format!("program {TC_HOST_IN}: {e}"))?;
        let fd =
            fd.as_fd().try_clone_to_owned().map_err(|e| format!("program {TC_HOST_IN}: {e}"))?;
        let host_in =
            Program::new(HOST_IN_SLOT, fd).map_err(|e| format!("program {TC_HOST_IN}: {e}"))?;
        Ok(Self { routes, host_in })
    }

    /// Makes the map hold exactly `desired`'s pod CIDRs (none when `enabled` is false) and
    /// `tc_host_in` first on the ingress of `arrival`, the device other nodes' pod traffic
    /// arrives on. The map is read every time, so entries a previous agent left, or someone
    /// deleted, are repaired like routes.
    pub fn sync(&mut self, desired: &Desired, arrival: &str, enabled: bool) -> io::Result<Synced> {
        let want = if enabled { entries(desired) } else { BTreeMap::new() };
        let mut present = BTreeMap::new();
        for key in self.routes.keys() {
            let key = key.map_err(io::Error::other)?;
            if let Ok(kind) = self.routes.get(&key, 0) {
                present.insert((key.data(), key.prefix_len()), kind);
            }
        }
        let mut done = Synced::default();
        for entry in present.keys().filter(|entry| !want.contains_key(entry)) {
            match self.routes.remove(&Key::new(entry.1, entry.0)) {
                Ok(()) => done.removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        for (entry, kind) in want {
            if present.get(&entry) != Some(&kind) {
                self.routes
                    .insert(&Key::new(entry.1, entry.0), kind, 0)
                    .map_err(io::Error::other)?;
                done.written += 1;
            }
        }
        if enabled {
            let name = CString::new(arrival).map_err(io::Error::other)?;
            // SAFETY: a NUL-terminated name; 0 when there is no such device.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::other(format!("no interface {arrival}")));
            }
            done.attached = ensure(ifindex, &self.host_in)?.attached;
        }
        Ok(done)
    }
}

/// Detaches every `tc_host_in` attached without a link in this network namespace (`weir agent
/// --cleanup`). Returns how many were detached.
pub fn detach_all(sock: &mut Socket) -> io::Result<usize> {
    let mut detached = 0;
    for link in sock.links()? {
        let Ok(present) = bpf::tcx_query(link.index, HOST_IN_SLOT.attach_type) else { continue };
        detached += detach_copies(link.index, HOST_IN_SLOT, &present, None)?;
    }
    Ok(detached)
}

/// The trie's entries for `desired`: local pod CIDRs, then remote ones (a remote CIDR that
/// overlaps a local one never replaces it).
fn entries(desired: &Desired) -> BTreeMap<Entry, u32> {
    let mut want = BTreeMap::new();
    for route in &desired.routes {
        want.insert(entry(&route.dst), ROUTE_REMOTE_PODS);
    }
    for cidr in &desired.local_pod_cidrs {
        want.insert(entry(cidr), ROUTE_LOCAL_PODS);
    }
    want
}

fn entry(cidr: &IpCidr) -> Entry {
    match cidr.network {
        std::net::IpAddr::V4(v4) => (v4_mapped(v4.octets()), trie_prefix(false, cidr.prefix)),
        std::net::IpAddr::V6(v6) => (v6.octets(), trie_prefix(true, cidr.prefix)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::routing::model::{Device, Route};

    #[test]
    fn local_and_remote_pod_cidrs_become_trie_entries() {
        let cidr = |s: &str| s.parse::<IpCidr>().unwrap();
        let desired = Desired {
            local_pod_cidrs: vec![cidr("10.244.0.0/24"), cidr("fd00:10:244::/64")],
            routes: BTreeSet::from([Route {
                dst: cidr("10.244.1.0/24"),
                gateway: "172.30.0.3".parse().unwrap(),
                device: Device::Uplink,
            }]),
            ..Default::default()
        };
        let want = entries(&desired);
        assert_eq!(want.len(), 3);
        assert_eq!(want[&(v4_mapped([10, 244, 0, 0]), 120)], ROUTE_LOCAL_PODS);
        assert_eq!(want[&(v4_mapped([10, 244, 1, 0]), 120)], ROUTE_REMOTE_PODS);
        let v6: std::net::Ipv6Addr = "fd00:10:244::".parse().unwrap();
        assert_eq!(want[&(v6.octets(), 64)], ROUTE_LOCAL_PODS);
    }
}
