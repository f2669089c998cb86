//! Pin directories on bpffs for tests: `/sys/fs/bpf/weirt-<pid>-<seq>-<role>`, removed with
//! everything pinned inside (maps, links) on drop; those of dead test processes are swept.
//! weir's loader has no default pin directory, so a test can never pin into (or reuse) the
//! maps of a node agent running on the same machine.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Once,
};

use anyhow::{Context, Result, bail};

use crate::names;

const BPFFS: &str = "/sys/fs/bpf";

pub struct TestPinDir {
    path: PathBuf,
}

impl TestPinDir {
    pub fn new(role: &str) -> Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
        if !mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
        }) {
            bail!("bpffs is not mounted at {BPFFS}; `cargo xtask setup` mounts it");
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_dead_owners);
        let path = Path::new(BPFFS).join(names::unique(role));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the hash (or LRU hash) map pinned here as `name`, e.g. to check a program's side
    /// effects on a map that userspace code took out of the `Ebpf` object.
    pub fn open_hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
    ) -> Result<aya::maps::HashMap<aya::maps::MapData, K, V>> {
        let data = aya::maps::MapData::from_pin(self.path.join(name))
            .with_context(|| format!("opening pinned map {name}"))?;
        let map = aya::maps::Map::from_map_data(data)?;
        Ok(aya::maps::HashMap::try_from(map)?)
    }
}

impl Drop for TestPinDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove pin directory {}: {err}", self.path.display());
        }
    }
}

fn sweep_dead_owners() {
    let Ok(entries) = fs::read_dir(BPFFS) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = names::owner_pid(&name) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
