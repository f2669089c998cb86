//! A pod's sandbox: its network namespace (`/run/netns/<prefix><uid12>`, made like `ip netns
//! add`), its cgroup (`<cgroup>/<uid>`), its CNI attachment and its files under
//! `<state>/pods/<uid>/`. The record (`sandbox.json`) is written before anything is made and
//! updated after CNI ADD, so a restarted runtime finds everything a dead one left.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    /// The ADD result, once the network is set up.
    pub cni_result: Option<Value>,
}

/// Paths of one pod.
#[derive(Debug, Clone)]
pub struct PodPaths {
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
}

impl PodPaths {
    pub fn new(state_dir: &Path, cgroup_root: &Path, netns_name: &str, uid: &str) -> Self {
        Self {
            dir: state_dir.join("pods").join(uid),
            cgroup: cgroup_root.join(uid),
            netns: Path::new(NETNS_DIR).join(netns_name),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("sandbox.json")
    }
}

pub fn write_record(paths: &PodPaths, record: &Record) -> Result<()> {
    std::fs::create_dir_all(&paths.dir)?;
    let tmp = paths.dir.join("sandbox.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
    std::fs::rename(&tmp, paths.record())?;
    Ok(())
}

pub fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// All records in the state dir.
pub fn records(state_dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("pods")) else { return Vec::new() };
    entries.flatten().filter_map(|e| read_record(&e.path().join("sandbox.json"))).collect()
}

/// Creates the named network namespace (no-op when it exists) with `lo` up.
pub fn create_netns(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        ip(&["netns", "add", name])?;
    }
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Deletes the named network namespace (no-op when it is gone).
pub fn delete_netns(name: &str) -> Result<()> {
    if Path::new(NETNS_DIR).join(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Names of the namespaces under /run/netns starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn create_cgroup(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// Kills every process of the cgroup (cgroup.kill) and waits, bounded, until it is empty.
pub async fn kill_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    for _ in 0..100 {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills what is left in the cgroup and removes it.
pub async fn remove_cgroup(path: &Path) -> Result<()> {
    kill_cgroup(path).await;
    for _ in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    std::fs::remove_dir(path).with_context(|| format!("removing cgroup {}", path.display()))
}

/// Whether the cgroup has processes.
pub fn cgroup_busy(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
}
