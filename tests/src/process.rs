//! Starting processes inside a test namespace (and optionally a test cgroup).
//!
//! The child enters the namespace and the cgroup between fork and exec, with file descriptors
//! opened beforehand: the hook only makes system calls (no allocation after fork, which could
//! deadlock in a multi-threaded test process).
use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cgroup::TestCgroup, netns::Netns};

/// A `Command` for `program` that runs inside `netns` and, when given, inside `cgroup`.
pub fn command_in(netns: &Netns, cgroup: Option<&TestCgroup>, program: &str) -> Result<Command> {
    command_at(&netns.path(), cgroup.map(TestCgroup::procs_file).as_deref(), program)
}

/// A `Command` for `program` that runs inside the namespace at `netns` (a /run/netns path) and,
/// when given, in the cgroup whose `cgroup.procs` file is `procs`.
pub fn command_at(netns: &Path, procs: Option<&Path>, program: &str) -> Result<Command> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let procs = match procs {
        Some(path) => Some(
            OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: the hook runs in the child between fork and exec and only calls setns(2) and
    // write(2) on descriptors opened above (kept alive by the closure), no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0" moves the writing process (this child) into the cgroup.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A finished command's exit code and its stdout followed by its stderr.
pub fn code_and_text(out: &std::process::Output) -> (Option<i32>, String) {
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}
