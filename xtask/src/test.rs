//! `cargo xtask test`: the whole pipeline CI runs. Privileged tests run as part of it; a
//! privileged test that cannot run fails instead of skipping. After the tests it checks that
//! nothing they create is left on the machine.
use std::{fs, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{cmd, setup};

/// Prefix of every network namespace, bpffs pin and nft table the tests create
/// (tests/src/names.rs uses the same one).
const TEST_PREFIX: &str = "weirt";

pub fn run(root: &Path, filter: &[String]) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo(root).args(["fmt", "--all", "--check"]))?;
    cmd::run(cmd::cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    cmd::run(cmd::cargo(root).args(["test", "--no-fail-fast", "--"]).args(filter))?;
    leftovers()
}

/// Fails when the tests left namespaces, cgroups, pins or nft tables behind.
fn leftovers() -> Result<()> {
    let mut left = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                left.push(format!("network namespace {name}"));
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                left.push(format!("bpffs pin /sys/fs/bpf/{name}"));
            }
        }
    }
    if let Some(mount) = cgroup2_mount()
        && let Ok(entries) = fs::read_dir(&mount)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                left.push(format!("cgroup {}/{name}", mount.display()));
            }
        }
    }
    if let Some(tables) = cmd::output(Command::new("nft").args(["list", "tables"])) {
        for line in tables.lines().filter(|l| l.contains(TEST_PREFIX)) {
            left.push(format!("nft {line}"));
        }
    }
    if !left.is_empty() {
        bail!("the tests left resources behind:\n  {}", left.join("\n  "));
    }
    println!("xtask test: nothing left behind (netns, cgroups, bpffs pins, nft tables)");
    Ok(())
}

/// The cgroup2 mount point (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid machines).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(Into::into))?
    })
}
