//! The policy programs on pod veths, from the agent's side.
//!
//! At start the agent pins its two policy programs in its pin directory
//! (`prog_tc_pol_egress`, `prog_tc_pol_ingress`; pinned under a temporary name (`..._new`), then renamed
//! over the previous agent's pin, so weir-cni always finds a complete pin). weir-cni attaches
//! them to every new pod's host veth at ADD, before the pod is reachable. [`PolicyPrograms::
//! reconcile`] covers the rest: every host veth named in the endpoint map (`weir_endpoints_v1`,
//! written by weir-cni) or routed to a local pod's address gets both programs when they are
//! missing (pods made before the agent ran), and a previous agent's copies are replaced (attach the new one first, then detach the
//! old one). Programs that are not weir's policy programs are never touched, nor are
//! interfaces whose name is not a weir host veth's.
use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use thiserror::Error;
use weir_cni_plugin::{
    bpf,
    netlink::Socket,
    policy::{Program, SLOTS, ensure},
    wiring::is_host_ifname,
};
use weir_common::endpoint::{ENDPOINTS_MAP, EndpointInfo, EndpointKey};

use crate::programs::{self, TC_POLICY_EGRESS, TC_POLICY_INGRESS};

#[derive(Debug, Error)]
pub enum AttachError {
    #[error(transparent)]
    Program(#[from] programs::LoadError),
    #[error("eBPF program `{name}` is not loaded")]
    NotLoaded {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the policy program at {path} failed (is {dir} on bpffs?)", dir = path.parent().unwrap_or(path).display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the endpoint map {path}")]
    Endpoints {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// What one [`PolicyPrograms::reconcile`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Host veths found in the endpoint map (and present).
    pub veths: usize,
    /// Programs attached.
    pub attached: usize,
    /// Older copies detached.
    pub detached: usize,
    /// Veths where attaching failed (logged; retried at the next reconcile).
    pub failed: usize,
}

/// The agent's pinned policy programs.
pub struct PolicyPrograms {
    programs: Vec<Program>,
    pin_dir: PathBuf,
}

impl PolicyPrograms {
    /// Pins the loaded policy programs of `ebpf` in `pin_dir`, replacing older pins.
    pub fn pin(ebpf: &Ebpf, pin_dir: &Path) -> Result<Self, AttachError> {
        let mut programs = Vec::new();
        for (slot, name) in SLOTS.into_iter().zip([TC_POLICY_EGRESS, TC_POLICY_INGRESS]) {
            debug_assert_eq!(slot.name, name, "the kernel name is the program's name");
            let classifier = programs::classifier_ref(ebpf, name)?;
            let path = pin_dir.join(slot.pin);
            let pin_error = |source| AttachError::Pin { path: path.clone(), source };
            let fd = classifier.fd().map_err(|source| AttachError::NotLoaded { name, source })?;
            let fd = fd.as_fd().try_clone_to_owned().map_err(pin_error)?;
            // bpffs refuses names with a dot (EPERM), so the temporary name has none.
            let temporary = pin_dir.join(format!("{}_new", slot.pin));
            match std::fs::remove_file(&temporary) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(pin_error(e)),
                _ => {}
            }
            bpf::obj_pin(fd.as_fd(), &temporary).map_err(pin_error)?;
            std::fs::rename(&temporary, &path).map_err(pin_error)?;
            programs.push(Program::new(slot, fd).map_err(pin_error)?);
        }
        Ok(Self { programs, pin_dir: pin_dir.to_path_buf() })
    }

    /// The kernel ids of the pinned programs (egress, ingress).
    pub fn ids(&self) -> Vec<u32> {
        self.programs.iter().map(|p| p.id).collect()
    }

    /// Makes sure every local pod's host veth carries both programs (see the module doc). The
    /// veths are those the endpoint map names, and those the node routes `pod_ips` (this
    /// node's pods) to: a pod wired before the agent ever ran is not in the endpoint map.
    pub fn reconcile(&self, pod_ips: &[IpAddr]) -> Result<Reconciled, AttachError> {
        let mut done = Reconciled::default();
        let mut interfaces = self.endpoint_interfaces()?;
        interfaces.extend(route_interfaces(pod_ips));
        for ifindex in interfaces {
            let Some(name) = interface_name(ifindex) else { continue };
            if !is_host_ifname(&name) {
                continue;
            }
            done.veths += 1;
            for program in &self.programs {
                match ensure(ifindex, program) {
                    Ok(ensured) => {
                        done.attached += usize::from(ensured.attached);
                        done.detached += ensured.detached;
                    }
                    // Deleted meanwhile (the pod went away).
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                    Err(e) => {
                        log::warn!(
                            "attaching {} to {name} (ifindex {ifindex}) failed: {e}",
                            program.slot.name
                        );
                        done.failed += 1;
                    }
                }
            }
        }
        Ok(done)
    }

    /// The interface indexes the endpoint map names.
    fn endpoint_interfaces(&self) -> Result<BTreeSet<u32>, AttachError> {
        let path = self.pin_dir.join(ENDPOINTS_MAP);
        if !path.exists() {
            // Nothing pinned it (yet): the routes to local pods name their veths.
            return Ok(BTreeSet::new());
        }
        let error = |source| AttachError::Endpoints { path: path.clone(), source };
        let data = MapData::from_pin(&path).map_err(error)?;
        let map: HashMap<MapData, EndpointKey, EndpointInfo> =
            HashMap::try_from(Map::HashMap(data)).map_err(error)?;
        let mut interfaces = BTreeSet::new();
        for entry in map.iter() {
            let (_, info) = entry.map_err(error)?;
            interfaces.insert(info.ifindex);
        }
        Ok(interfaces)
    }
}

/// The interfaces this namespace routes `pod_ips` (as /32 and /128 host routes) to.
fn route_interfaces(pod_ips: &[IpAddr]) -> BTreeSet<u32> {
    let mut interfaces = BTreeSet::new();
    let Ok(mut socket) = Socket::open() else { return interfaces };
    for family in [libc::AF_INET, libc::AF_INET6] {
        let Ok(routes) = socket.routes(family as u8) else { continue };
        for route in routes {
            let host = if route.dst.is_ipv4() { 32 } else { 128 };
            if route.prefix == host && pod_ips.contains(&route.dst) {
                interfaces.extend(route.oif);
            }
        }
    }
    interfaces
}

/// The name of interface `ifindex` in the calling thread's namespace (`None`: no such one).
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname(3) requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}
