//! cgroup v2 directories for tests, removed on drop (their processes killed first).
//!
//! The cgroup2 mount is found in /proc/self/mountinfo (it is /sys/fs/cgroup on most machines,
//! /sys/fs/cgroup/unified on hybrid ones). Test cgroups live directly below it, named like
//! every test resource (`weirt-<pid>-<seq>-<role>`); those of dead test processes are swept.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    sync::Once,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::names;

const KILL_WAIT_POLLS: u32 = 100;
const KILL_WAIT_INTERVAL: Duration = Duration::from_millis(20);

/// The cgroup2 mount point (the agent's own lookup, from /proc/self/mountinfo).
pub fn cgroup2_mount() -> Result<PathBuf> {
    weir_proxy::system::cgroup2_mount()
        .context("reading mountinfo")?
        .context("no cgroup2 file system is mounted (needed for socket-level load balancing)")
}

/// A cgroup v2 directory owned by the test.
pub struct TestCgroup {
    path: PathBuf,
    dir: File,
}

impl TestCgroup {
    pub fn new(role: &str) -> Result<Self> {
        let mount = cgroup2_mount()?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep_dead_owners(&mount));
        let path = mount.join(names::unique(role));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let dir = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory, opened: what cgroup BPF attachments take.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// `cgroup.procs`, where a process writes "0" to move itself in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove(&self.path) {
            eprintln!("warning: could not remove test cgroup {}: {err:#}", self.path.display());
        }
    }
}

/// Kills what is left in the cgroup (cgroup.kill) and removes it, with a bounded wait.
fn remove(path: &Path) -> Result<()> {
    let procs = path.join("cgroup.procs");
    if fs::read_to_string(&procs).map(|p| !p.trim().is_empty()).unwrap_or(false) {
        let _ = fs::write(path.join("cgroup.kill"), "1");
    }
    for _ in 0..KILL_WAIT_POLLS {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => std::thread::sleep(KILL_WAIT_INTERVAL),
        }
    }
    fs::remove_dir(path).with_context(|| format!("removing {}", path.display()))
}

fn sweep_dead_owners(mount: &Path) {
    let Ok(entries) = fs::read_dir(mount) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = names::owner_pid(&name) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove(&entry.path());
        }
    }
}
