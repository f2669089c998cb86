//! The built-in IPAM's persistent store: one JSON file per network, replaced atomically
//! (write to a temporary file, rename over the old one) while an exclusive `flock` on a lock file
//! is held.
//!
//! Contract:
//! - Every read-modify-write happens under [`Store::lock`], so parallel plugin invocations (on
//!   one node, any number of processes) never hand out the same address.
//! - A reservation is keyed by container ID + interface name and written *before*
//!   anything is wired; ADD marks it committed after wiring. A crash at any point therefore
//!   leaves either nothing or a reservation that DEL (same key) or GC (key not valid) releases.
//! - Writes are atomic against a crash of the plugin (rename), but not fsynced: a power loss
//!   also ends every pod on the node, so a lost write can only concern attachments that no
//!   longer exist, and the runtime's DEL/GC after the reboot reconciles them. (fsync cost 0.5-3
//!   ms per ADD and DEL, a large share of ADD.)
//! - A missing state file is an empty store; a corrupt one is an I/O error (code 5) naming the
//!   file, never silently reset (that could hand out addresses in use).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Write,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::error::CniError;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// How long an invocation waits for the lock by default before answering "try again later"
/// (code 11); `ipam.lockTimeoutSeconds` changes it.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// False between reservation and the end of wiring (or forever after a crash in between).
    pub committed: bool,
}

impl Owner {
    pub fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    pub version: u32,
    pub allocations: BTreeMap<IpAddr, Owner>,
    /// The last address handed out per range set (by index), for round robin.
    #[serde(default)]
    pub last: BTreeMap<usize, IpAddr>,
}

impl State {
    pub fn taken(&self) -> BTreeSet<IpAddr> {
        self.allocations.keys().copied().collect()
    }

    /// The addresses held by one attachment.
    pub fn held_by(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        self.allocations
            .iter()
            .filter(|(_, o)| o.is(container_id, ifname))
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Releases what one attachment holds; returns the addresses released.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let held = self.held_by(container_id, ifname);
        for ip in &held {
            self.allocations.remove(ip);
        }
        held
    }
}

/// The store of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Creates `dir` if needed and takes its lock (waiting up to `timeout`; then code 11).
    pub fn lock(dir: &Path, timeout: Duration) -> Result<Self, CniError> {
        fs::create_dir_all(dir).map_err(|e| {
            CniError::io(format!("creating the IPAM directory {}", dir.display()), e)
        })?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| CniError::io(format!("opening the IPAM lock {}", path.display()), e))?;
        let lock_err = |e| CniError::io(format!("locking {}", path.display()), e);
        if try_flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(lock_err)? {
            return Ok(Self { dir: dir.to_path_buf(), _lock: file });
        }
        // Contended: wait in a blocking flock (woken in order, no polling delay) on a helper
        // thread, so that the wait can time out. The lock belongs to the open file description,
        // which `file` keeps; the helper's duplicate descriptor may close at any time.
        let waiter = file.try_clone().map_err(lock_err)?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(try_flock(&waiter, libc::LOCK_EX));
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(lock_err(e)),
            Err(_) => {
                return Err(CniError::TryAgain {
                    msg: format!(
                        "the IPAM store {} stayed locked for {:.1} s; try again later",
                        dir.display(),
                        timeout.as_secs_f64()
                    ),
                });
            }
        }
        Ok(Self { dir: dir.to_path_buf(), _lock: file })
    }

    pub fn load(&self) -> Result<State, CniError> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CniError::io(
                    format!("the IPAM store {} is corrupt; repair or remove it", path.display()),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(State { version: 1, ..State::default() })
            }
            Err(e) => Err(CniError::io(format!("reading the IPAM store {}", path.display()), e)),
        }
    }

    /// Replaces the state file atomically (see the module docs on why without fsync).
    pub fn save(&self, state: &State) -> Result<(), CniError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| CniError::io(format!("writing the IPAM store {}", path.display()), e))
    }
}

/// flock(2), retried on EINTR. `Ok(false)`: LOCK_NB and someone else holds the lock.
fn try_flock(file: &File, operation: libc::c_int) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on an open descriptor owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_releases_by_attachment() {
        let dir = std::env::temp_dir().join(format!("weirt-store-unit-{}", std::process::id()));
        let store = Store::lock(&dir, DEFAULT_LOCK_TIMEOUT).unwrap();
        let mut state = store.load().unwrap();
        assert!(state.allocations.is_empty());
        let owner =
            |id: &str| Owner { container_id: id.into(), ifname: "eth0".into(), committed: true };
        state.allocations.insert("10.0.0.1".parse().unwrap(), owner("a"));
        state.allocations.insert("fd00::1".parse().unwrap(), owner("a"));
        state.allocations.insert("10.0.0.2".parse().unwrap(), owner("b"));
        store.save(&state).unwrap();
        let mut loaded = store.load().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.release("a", "eth0").len(), 2);
        assert_eq!(loaded.release("a", "eth0").len(), 0);
        assert_eq!(loaded.taken().len(), 1);
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        assert_eq!(store.load().unwrap_err().code(), 5);
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_locker_waits_until_the_first_is_done() {
        let dir = std::env::temp_dir().join(format!("weirt-store-lock-{}", std::process::id()));
        let first = Store::lock(&dir, DEFAULT_LOCK_TIMEOUT).unwrap();
        let started = std::time::Instant::now();
        let second = std::thread::spawn({
            let dir = dir.clone();
            move || {
                let store = Store::lock(&dir, DEFAULT_LOCK_TIMEOUT).unwrap();
                drop(store);
                started.elapsed()
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(first);
        let waited = second.join().unwrap();
        assert!(waited >= Duration::from_millis(100), "got the lock while it was held");
        fs::remove_dir_all(&dir).unwrap();
    }
}
