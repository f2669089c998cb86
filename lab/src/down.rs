//! `weir lab down`: removes everything a lab made, found from its plan (names derive from the
//! lab name) and its state file, so it also works after `up` crashed or was killed.
use std::fs;

use anyhow::{Context, Result};

use crate::{host, plan::LabPlan, state};

/// What was removed, for the summary line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
}

pub fn down(plan: &LabPlan) -> Result<Removed> {
    let mut removed = Removed::default();
    let recorded = state::load(&plan.state_dir).ok().flatten();
    let cgroup = host::cgroup_root()?.join(&plan.cgroup);
    // Processes: everything in the lab's cgroup (daemons and pods), anything recorded, and
    // anything still running inside one of the lab's namespaces.
    if cgroup.exists() {
        removed.processes += count_procs(&cgroup);
        host::kill_cgroup(&cgroup)?;
    }
    for daemon in recorded.iter().flat_map(|s| &s.daemons) {
        if host::alive(daemon.pid) && is_weir(daemon.pid) {
            host::kill(daemon.pid);
            removed.processes += 1;
        }
    }
    let namespaces = host::netns_with_prefix(&plan.netns_prefix());
    for pid in host::processes_in(&namespaces) {
        host::kill(pid);
        removed.processes += 1;
    }
    // Namespaces: pods first, then nodes, then the underlay (links inside go with them).
    let mut ordered = namespaces;
    ordered.sort_by_key(|n| std::cmp::Reverse(n.matches('.').count()));
    for name in &ordered {
        host::delete_netns(name)?;
        removed.namespaces += 1;
    }
    if plan.pin_root.exists() {
        fs::remove_dir_all(&plan.pin_root)
            .with_context(|| format!("removing pins under {}", plan.pin_root.display()))?;
    }
    host::remove_cgroup_tree(&cgroup)?;
    if plan.state_dir.exists() {
        fs::remove_dir_all(&plan.state_dir)
            .with_context(|| format!("removing {}", plan.state_dir.display()))?;
    }
    Ok(removed)
}

fn count_procs(cgroup: &std::path::Path) -> usize {
    let mut count =
        fs::read_to_string(cgroup.join("cgroup.procs")).map(|p| p.lines().count()).unwrap_or(0);
    if let Ok(entries) = fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                count += count_procs(&entry.path());
            }
        }
    }
    count
}

/// Guards against killing an unrelated process that reused a recorded pid.
fn is_weir(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            cmdline.split(|b| *b == 0).next().is_some_and(|argv0| argv0.ends_with(b"weir"))
        })
        .unwrap_or(false)
}
