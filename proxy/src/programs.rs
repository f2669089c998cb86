//! The compiled eBPF object and its loader.
//!
//! The object is built by `build.rs` from `ebpf/` and embedded here, so every binary that uses
//! this crate carries the exact programs it was tested with.
//!
//! aya-log is wired in: programs emit debug records through aya-log-ebpf, and
//! [`LoadOptions::forward_logs`] makes them reach the `log` crate. It is off by default: the
//! loader sets the programs' `AYA_LOG_LEVEL` global to 0, so each log site costs one global
//! read and a compare instead of formatting a record into the ring buffer.
use std::os::fd::AsFd;

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier},
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

/// Every tc classifier in the object; [`load`] loads them all.
pub const CLASSIFIERS: [&str; 3] = [TC_LB4_FORWARD, TC_LB4_REVERSE, TC_NOOP];

/// cgroup programs of the socket-level load balancer (IPv4), attached together to a cgroup by
/// [`attach_socket_lb`].
pub const SOCK_CONNECT4: &str = "sock_connect4";
pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
pub const SOCKET_LB: [&str; 4] = [SOCK_CONNECT4, SOCK_SENDMSG4, SOCK_RECVMSG4, SOCK_GETPEERNAME4];

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
        "attaching `{name}` to the cgroup failed (is the file a cgroup v2 directory? another \
         program attached exclusively?)"
    )]
    Attach {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("starting the eBPF log forwarder failed")]
    Logger(#[source] aya_log::Error),
}

/// How to load the object.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Forward the programs' aya-log records to the `log` crate (costs cycles per packet).
    pub forward_logs: bool,
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
    let level: u8 = if options.forward_logs { u8::MAX } else { 0 };
    let mut ebpf = EbpfLoader::new()
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
    let logger = if options.forward_logs {
        Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(LoadError::Logger)?)
    } else {
        None
    };
    Ok(Loaded { ebpf, logger })
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

/// Attaches the socket-level load balancer to a cgroup v2 directory (opened as a file): every
/// socket of every process in it, and in its descendants, is load-balanced at the system call.
/// The attachments live as long as `ebpf` (or until detached).
pub fn attach_socket_lb(ebpf: &mut Ebpf, cgroup: impl AsFd + Copy) -> Result<(), LoadError> {
    for name in SOCKET_LB {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoSuchProgram { name })?;
        // With bpf links (kernel >= 5.7, what aya uses) cgroup attachments always coexist with
        // others; the kernel refuses any attach flag on link_create, so the mode is `Single`.
        program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|source| LoadError::Attach { name, source })?;
    }
    Ok(())
}
