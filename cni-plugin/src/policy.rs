//! The agent's NetworkPolicy programs on a pod's host veth, attached with tcx and no bpf link:
//! the attachment belongs to the device, so it lives exactly as long as the veth (no pin file,
//! nothing to clean up at DEL).
//!
//! weir-cni attaches the programs the agent pinned (`<bpffsDir>/prog_tc_pol_egress`,
//! `prog_tc_pol_ingress`) at ADD, before the pod has its address and routes, so a pod is never
//! reachable before its policy applies (the datapath drops a pod without a policy entry while
//! policies exist). The agent uses [`ensure`] on every local pod veth too: for pods made before
//! it ran, and to replace the programs of a previous agent (attach the new one, then detach the
//! old; programs that are not weir's policy programs are never touched).
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use weir_common::policy::{
    BPF_TCX_EGRESS, BPF_TCX_INGRESS, PROG_EGRESS_NAME, PROG_EGRESS_PIN, PROG_INGRESS_NAME,
    PROG_INGRESS_PIN,
};

use crate::bpf;

/// One policy program and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// File name of its pin in the agent's pin directory.
    pub pin: &'static str,
    /// Its kernel name: an attached program with this name is weir's.
    pub name: &'static str,
    /// tcx attach type on the host veth.
    pub attach_type: u32,
    /// Attach before the programs already there (else after them).
    pub first: bool,
}

/// The pod's egress is the host veth's ingress, the pod's ingress its egress.
pub const SLOTS: [Slot; 2] = [
    Slot {
        pin: PROG_EGRESS_PIN,
        name: PROG_EGRESS_NAME,
        attach_type: BPF_TCX_INGRESS,
        first: false,
    },
    Slot {
        pin: PROG_INGRESS_PIN,
        name: PROG_INGRESS_NAME,
        attach_type: BPF_TCX_EGRESS,
        first: false,
    },
];

/// A loaded policy program, opened for attaching.
#[derive(Debug)]
pub struct Program {
    pub slot: Slot,
    pub fd: OwnedFd,
    pub id: u32,
}

impl Program {
    pub fn new(slot: Slot, fd: OwnedFd) -> io::Result<Self> {
        let id = bpf::prog_info(fd.as_fd())?.id;
        Ok(Self { slot, fd, id })
    }
}

/// The programs pinned in `dir` (none when the agent never ran there).
pub fn open_pinned(dir: &Path) -> io::Result<Vec<Program>> {
    let mut programs = Vec::new();
    for slot in SLOTS {
        match bpf::obj_get(&dir.join(slot.pin)) {
            Ok(fd) => programs.push(Program::new(slot, fd)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(programs)
}

/// What [`ensure`] changed on one hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ensured {
    pub attached: bool,
    /// Older copies of the same policy program detached.
    pub detached: usize,
}

/// Makes `program` the policy program at its hook of `ifindex` (in the calling thread's
/// network namespace): attaches it if missing, then detaches other programs with the same
/// kernel name that were attached without a link (a previous agent's).
pub fn ensure(ifindex: u32, program: &Program) -> io::Result<Ensured> {
    let attach_type = program.slot.attach_type;
    let present = bpf::tcx_query(ifindex, attach_type)?;
    let mut done = Ensured::default();
    if !present.iter().any(|a| a.prog_id == program.id) {
        let attached = if program.slot.first {
            bpf::tcx_attach_first(ifindex, program.fd.as_fd(), attach_type)
        } else {
            bpf::tcx_attach(ifindex, program.fd.as_fd(), attach_type)
        };
        match attached {
            Ok(()) => done.attached = true,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    done.detached = detach_copies(ifindex, program.slot, &present, Some(program.id))?;
    Ok(done)
}

/// Detaches from `slot`'s hook of `ifindex` every program named `slot.name` that was attached
/// without a link, except `keep`. `present` is what the hook holds. Returns how many.
pub fn detach_copies(
    ifindex: u32,
    slot: Slot,
    present: &[bpf::Attached],
    keep: Option<u32>,
) -> io::Result<usize> {
    let mut detached = 0;
    for old in present.iter().filter(|a| a.link_id == 0 && Some(a.prog_id) != keep) {
        // A program unloaded meanwhile is gone from the hook already.
        let Ok(fd) = bpf::prog_by_id(old.prog_id) else { continue };
        if bpf::prog_info(fd.as_fd())?.name != slot.name {
            continue;
        }
        match bpf::tcx_detach(ifindex, fd.as_fd(), slot.attach_type) {
            Ok(()) => detached += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(detached)
}

/// The ids of the programs attached at `slot`'s hook of `ifindex` whose kernel name is
/// `slot.name` (for checks and tests).
pub fn attached_ids(ifindex: u32, slot: Slot) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for attached in bpf::tcx_query(ifindex, slot.attach_type)? {
        let Ok(fd) = bpf::prog_by_id(attached.prog_id) else { continue };
        if bpf::prog_info(fd.as_fd())?.name == slot.name {
            ids.push(attached.prog_id);
        }
    }
    Ok(ids)
}

/// weir-cni at ADD: attaches every pinned policy program to the new host veth. Returns how
/// many programs are attached (0 when the agent has pinned none).
pub fn attach_pinned(dir: &Path, ifindex: u32) -> io::Result<usize> {
    let programs = open_pinned(dir)?;
    for program in &programs {
        ensure(ifindex, program)?;
    }
    Ok(programs.len())
}

/// Whether the agent's policy for `ips` is in the datapath: true when the agent does not deny
/// unknown pods (no policy exists, or no agent), or when every address (IPv4 and IPv6) has its
/// endpoint entry. A runtime waits for this before it starts a pod's containers, so their first packets
/// are not dropped as "policy not ready" (the datapath's no-window rule).
pub fn policy_written(dir: &Path, ips: &[std::net::IpAddr]) -> io::Result<bool> {
    use weir_common::policy::{
        EndpointPolicy, GLOBAL_DENY_UNKNOWN, POLICY_ENDPOINTS_MAP, POLICY_GLOBAL_MAP, PolicyGlobal,
        v4_mapped,
    };
    let open = |name: &str| match bpf::obj_get(&dir.join(name)) {
        Ok(fd) => Ok(Some(fd)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    };
    let Some(global) = open(POLICY_GLOBAL_MAP)? else { return Ok(true) };
    let flags = bpf::map_lookup(global.as_fd(), &0u32, PolicyGlobal { flags: 0, _pad: 0 })?
        .map_or(0, |g| g.flags);
    if flags & GLOBAL_DENY_UNKNOWN == 0 {
        return Ok(true);
    }
    let Some(endpoints) = open(POLICY_ENDPOINTS_MAP)? else { return Ok(true) };
    let empty = EndpointPolicy {
        flags: 0,
        identity: 0,
        ingress_policy: 0,
        egress_policy: 0,
        rules_key: [0; 16],
    };
    for ip in ips {
        let key = match ip {
            std::net::IpAddr::V4(v4) => v4_mapped(v4.octets()),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        if bpf::map_lookup(endpoints.as_fd(), &key, empty)?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}
