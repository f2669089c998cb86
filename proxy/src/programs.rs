//! The compiled eBPF object and its loader.
//!
//! The object is built by `build.rs` from `ebpf/` and embedded here, so every binary that uses
//! this crate carries the exact programs it was tested with.
//!
//! aya-log is wired in: programs emit debug records through aya-log-ebpf, and
//! [`LoadOptions::forward_logs`] makes them reach the `log` crate. It is off by default: the
//! loader sets the programs' `AYA_LOG_LEVEL` global to 0, so each log site costs one global
//! read and a compare instead of formatting a record into the ring buffer.
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, links::FdLink,
        tc::TcAttachOptions,
    },
};
use thiserror::Error;

/// weir's eBPF object, as built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

/// tc program: translates packets to service frontends into packets to backends.
pub const TC_LB4_FORWARD: &str = "tc_lb4_fwd";
/// tc program: translates replies from backends back to the service frontend.
pub const TC_LB4_REVERSE: &str = "tc_lb4_rev";
/// tc program that passes every packet untouched: the benchmark baseline.
pub const TC_NOOP: &str = "tc_noop";

/// tc program enforcing a pod's egress policy (tc ingress of its host-side veth).
pub const TC_POLICY_EGRESS: &str = "tc_pol_egress";
/// tc program enforcing a pod's ingress policy (tc egress of its host-side veth).
pub const TC_POLICY_INGRESS: &str = "tc_pol_ingress";

/// tc program: SCTP from the node's own processes to a frontend goes to a backend (tc egress
/// of an uplink).
pub const TC_HOST_SCTP_OUT: &str = "tc_host_sctp_out";
/// tc program: backends' answers to the node's own SCTP come from the frontend again (tc
/// ingress of an uplink).
pub const TC_HOST_SCTP_IN: &str = "tc_host_sctp_in";

/// tc program: another node's pod reaching a pod of this node goes straight into the pod
/// (eBPF host routing; tc ingress of the VXLAN device, see `routing::host`).
pub const TC_HOST_IN: &str = "tc_host_in";

/// Every tc classifier in the object; [`load`] loads them all.
pub const CLASSIFIERS: [&str; 8] = [
    TC_LB4_FORWARD,
    TC_LB4_REVERSE,
    TC_NOOP,
    TC_POLICY_EGRESS,
    TC_POLICY_INGRESS,
    TC_HOST_SCTP_OUT,
    TC_HOST_SCTP_IN,
    TC_HOST_IN,
];

/// cgroup programs of the socket-level load balancer (IPv4 and IPv6), attached together to a
/// cgroup by [`attach_socket_lb`].
pub const SOCK_CONNECT4: &str = "sock_connect4";
pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
pub const SOCK_CONNECT6: &str = "sock_connect6";
pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
pub const SOCKET_LB: [&str; 8] = [
    SOCK_CONNECT4,
    SOCK_SENDMSG4,
    SOCK_RECVMSG4,
    SOCK_GETPEERNAME4,
    SOCK_CONNECT6,
    SOCK_SENDMSG6,
    SOCK_RECVMSG6,
    SOCK_GETPEERNAME6,
];

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this binary was built with AYA_BUILD_SKIP=1 and carries no eBPF programs; rebuild \
         without it (after `cargo xtask setup`)"
    )]
    NoObject,
    #[error("loading weir's eBPF object failed (is this root, with bpffs and BTF available?)")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program `{name}` is missing from the object or has another type")]
    NoSuchProgram { name: &'static str },
    #[error("the kernel refused to load eBPF program `{name}`")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "attaching `{name}` failed (no such interface in this network namespace, or not a \
         cgroup v2 directory?)"
    )]
    Attach {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot use {path} as the pin directory (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the attachment of `{name}` is not a bpf link and cannot be pinned")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the link of `{name}` at {path} failed")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("starting the eBPF log forwarder failed")]
    Logger(#[source] aya_log::Error),
}

/// How to load the object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory where the maps are pinned by name (the agent uses /sys/fs/bpf/weir).
    /// Maps already pinned there are reused, with their contents: that is how a restarted agent
    /// adopts the datapath. There is deliberately no default, so that no caller (a test, a
    /// benchmark) can share a node agent's maps by accident.
    pub pin_dir: PathBuf,
    /// Forward the programs' aya-log records to the `log` crate (costs cycles per packet).
    pub forward_logs: bool,
    /// Capacities of the maps created by this load (maps already pinned keep theirs).
    pub sizes: MapSizes,
}

impl LoadOptions {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self { pin_dir: pin_dir.into(), forward_logs: false, sizes: MapSizes::default() }
    }
}

/// Map capacities. The defaults are at least Cilium's (64k service entries and backends,
/// 512k conntrack entries). `services` counts entries, and a frontend takes one entry plus one
/// per backend slot: 100k services with 4 backends each need 500k. The IPv6 maps get the same
/// capacities as their IPv4 twins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub conntrack: u32,
    pub socket_rev_nat: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use weir_common::{conntrack, lb, sock};
        Self {
            services: lb::DEFAULT_SERVICE_ENTRIES,
            backends: lb::DEFAULT_BACKEND_ENTRIES,
            rev_nat: lb::DEFAULT_REV_NAT_ENTRIES,
            conntrack: conntrack::DEFAULT_CT4_ENTRIES,
            socket_rev_nat: sock::DEFAULT_SOCK_REV4_ENTRIES,
        }
    }
}

impl MapSizes {
    /// Each sized map and the capacity these sizes give it.
    pub fn per_map(&self) -> [(&'static str, u32); 10] {
        use weir_common::{conntrack, lb, sock};
        [
            (lb::SERVICE_MAP, self.services),
            (lb::SERVICE6_MAP, self.services),
            (lb::BACKEND_MAP, self.backends),
            (lb::BACKEND6_MAP, self.backends),
            (lb::REV_NAT_MAP, self.rev_nat),
            (lb::REV_NAT6_MAP, self.rev_nat),
            (conntrack::CT4_MAP, self.conntrack),
            (conntrack::CT6_MAP, self.conntrack),
            (sock::SOCK_REV4_MAP, self.socket_rev_nat),
            (sock::SOCK_REV6_MAP, self.socket_rev_nat),
        ]
    }
}

/// A pinned map whose capacity is not the one asked for: an earlier agent created it with
/// other sizes, and a load reuses it as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityMismatch {
    pub map: &'static str,
    pub pinned: u32,
    pub wanted: u32,
}

/// The maps pinned in `pin_dir` whose capacity differs from `sizes` (maps not pinned, or
/// unreadable, are left out: a load creates them with `sizes`).
pub fn capacity_mismatches(pin_dir: &Path, sizes: &MapSizes) -> Vec<CapacityMismatch> {
    sizes
        .per_map()
        .into_iter()
        .filter_map(|(map, wanted)| {
            let pinned = MapData::from_pin(pin_dir.join(map)).ok()?.info().ok()?.max_entries();
            (pinned != wanted).then_some(CapacityMismatch { map, pinned, wanted })
        })
        .collect()
}

/// A loaded eBPF object and, when asked for, its log forwarder.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Present when [`LoadOptions::forward_logs`] was set. The caller drives it: call
    /// `flush()` when its file descriptor is readable (e.g. with tokio's `AsyncFd`).
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Loads weir's object into the kernel: maps created and every program loaded (verified), not
/// yet attached. Programs are loaded here, before any caller takes maps out of the object, so
/// the kernel holds a reference to every map a program uses: dropping a map handle taken with
/// `Ebpf::take_map` can never leave a program pointing at a closed map.
pub fn load(options: &LoadOptions) -> Result<Loaded, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    std::fs::create_dir_all(&options.pin_dir)
        .map_err(|source| LoadError::PinDir { path: options.pin_dir.clone(), source })?;
    let level: u8 = if options.forward_logs { u8::MAX } else { 0 };
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&options.pin_dir);
    for (map, entries) in options.sizes.per_map() {
        loader.map_max_entries(map, entries);
    }
    let mut ebpf = loader
        .override_global(aya_log::LEVEL, &level, true)
        .load(OBJECT)
        .map_err(LoadError::Load)?;
    for name in CLASSIFIERS {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoSuchProgram { name })?;
        program.load().map_err(|source| LoadError::Program { name, source })?;
    }
    for name in SOCKET_LB {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoSuchProgram { name })?;
        program.load().map_err(|source| LoadError::Program { name, source })?;
    }
    remove_retired_pins(&options.pin_dir);
    let logger = if options.forward_logs {
        Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(LoadError::Logger)?)
    } else {
        None
    };
    Ok(Loaded { ebpf, logger })
}

/// Removes the pins of maps an earlier version used and this one does not
/// ([`weir_common::policy::RETIRED_MAPS`]). A failure is logged: it leaves a stale file, not a
/// broken datapath.
fn remove_retired_pins(pin_dir: &Path) {
    for name in weir_common::policy::RETIRED_MAPS {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed {} (a map of an earlier version)", path.display()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => log::warn!("cannot remove {} (an earlier map): {err}", path.display()),
        }
    }
}

/// The loaded tc classifier `name`, for attaching.
pub fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    ebpf.program_mut(name).and_then(|p| p.try_into().ok()).ok_or(LoadError::NoSuchProgram { name })
}

/// The loaded tc classifier `name`, borrowed shared (for test runs).
pub fn classifier_ref<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<&'a SchedClassifier, LoadError> {
    ebpf.program(name).and_then(|p| p.try_into().ok()).ok_or(LoadError::NoSuchProgram { name })
}

/// What [`attach_socket_lb`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// Programs attached now.
    pub attached: usize,
    /// Programs found already attached through a pinned link, and left as they are.
    pub adopted: usize,
}

/// Attaches the socket-level load balancer to a cgroup v2 directory (opened as a file): every
/// socket of every process in it, and in its descendants, is load-balanced at the system call.
///
/// With `links_dir`, each attachment is pinned there as a bpf link (`<links_dir>/<program>`),
/// so it outlives this process: sockets keep being balanced while the agent restarts. A link
/// already pinned there is adopted instead of attaching a second copy. Without `links_dir` the
/// attachments live as long as `ebpf`. Either way they coexist with other programs on the
/// cgroup (bpf links are always multi-attach).
pub fn attach_socket_lb(
    ebpf: &mut Ebpf,
    cgroup: impl AsFd + Copy,
    links_dir: Option<&Path>,
) -> Result<Attached, LoadError> {
    let mut done = Attached::default();
    for name in SOCKET_LB {
        let pin = links_dir.map(|dir| dir.join(name));
        if pin.as_ref().is_some_and(|pin| pin.exists()) {
            done.adopted += 1;
            continue;
        }
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoSuchProgram { name })?;
        // The kernel refuses attach flags on cgroup bpf links, so the mode is `Single`.
        let link_id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| LoadError::Attach { name, source })?;
        if let Some(path) = pin {
            let link =
                program.take_link(link_id).map_err(|source| LoadError::Attach { name, source })?;
            pin_link(name, link, path)?;
        }
        done.attached += 1;
    }
    Ok(done)
}

/// Attaches the per-packet load balancer to a node uplink: `tc_lb4_fwd` on ingress (traffic
/// from outside the node to node ports, load-balancer IPs and external IPs is translated to a
/// backend) and `tc_lb4_rev` on egress (replies get the frontend back as their source). The
/// interface is looked up in the calling thread's network namespace.
///
/// With `links_dir`, the tcx links are pinned as `<links_dir>/<program>@<interface>` and
/// adopted when present, as in [`attach_socket_lb`].
pub fn attach_tc_lb(
    ebpf: &mut Ebpf,
    interface: &str,
    links_dir: Option<&Path>,
) -> Result<Attached, LoadError> {
    let programs =
        [(TC_LB4_FORWARD, TcAttachType::Ingress), (TC_LB4_REVERSE, TcAttachType::Egress)];
    attach_tcx(ebpf, interface, links_dir, programs, false)
}

/// Attaches the translation of the node's own SCTP to a node uplink: `tc_host_sctp_out` on
/// egress (SCTP a node process sends to a frontend goes to a backend; no socket hook sees
/// SCTP) and `tc_host_sctp_in` on ingress (the answers of remote backends come from the
/// frontend again). Both go first in their tcx chain: they pass every packet they do not
/// translate on to the next program (the uplink's `tc_lb4_fwd` / `tc_lb4_rev` among them),
/// while those end the chain with their verdict. Pinning and adoption as in [`attach_tc_lb`].
pub fn attach_host_sctp(
    ebpf: &mut Ebpf,
    interface: &str,
    links_dir: Option<&Path>,
) -> Result<Attached, LoadError> {
    let programs =
        [(TC_HOST_SCTP_OUT, TcAttachType::Egress), (TC_HOST_SCTP_IN, TcAttachType::Ingress)];
    attach_tcx(ebpf, interface, links_dir, programs, true)
}

/// Attaches tc `programs` to `interface` with tcx, `first` or last in each chain, pinning the
/// links as `<links_dir>/<program>@<interface>` and adopting those already pinned.
fn attach_tcx(
    ebpf: &mut Ebpf,
    interface: &str,
    links_dir: Option<&Path>,
    programs: [(&'static str, TcAttachType); 2],
    first: bool,
) -> Result<Attached, LoadError> {
    let mut done = Attached::default();
    for (name, direction) in programs {
        let pin = links_dir.map(|dir| dir.join(format!("{name}@{interface}")));
        if pin.as_ref().is_some_and(|pin| pin.exists()) {
            done.adopted += 1;
            continue;
        }
        let program = classifier(ebpf, name)?;
        let order = if first { LinkOrder::first() } else { LinkOrder::last() };
        let link_id = program
            .attach_with_options(interface, direction, TcAttachOptions::TcxOrder(order))
            .map_err(|source| LoadError::Attach { name, source })?;
        if let Some(path) = pin {
            let link =
                program.take_link(link_id).map_err(|source| LoadError::Attach { name, source })?;
            pin_link(name, link, path)?;
        }
        done.attached += 1;
    }
    Ok(done)
}

/// Pins an attachment as a bpf link at `path`, so it outlives this process.
fn pin_link<L>(name: &'static str, link: L, path: PathBuf) -> Result<(), LoadError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let link = FdLink::try_from(link).map_err(|source| LoadError::Link { name, source })?;
    link.pin(&path).map_err(|source| LoadError::PinLink { name, path, source })?;
    Ok(())
}
