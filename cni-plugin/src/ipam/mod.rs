//! IP address management: the built-in allocator and store, or delegation to another IPAM
//! plugin.
//!
//! Contract of the built-in IPAM (one store per network, under `<dataDir>/<network name>/`):
//! - [`reserve`] refuses an attachment (container ID + ifname) that already holds addresses
//!   (code 101), answers 51 when a range set has no free address, and otherwise records the new
//!   addresses as uncommitted, on disk, before returning.
//! - [`commit`] marks them committed once the pod is wired; [`release`] (DEL) and [`gc`] free
//!   them whatever their state, so a crash between the steps never leaks an address.
pub mod allocator;
pub mod delegate;
pub mod net;
pub mod store;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use allocator::RangeSet;
use net::IpNet;
use store::{Owner, Store};

use crate::{config::Attachment, error::CniError};

/// The store of one network: `<dataDir>/<network>`, and how long to wait for its lock.
#[derive(Debug, Clone)]
pub struct StoreDir {
    pub path: PathBuf,
    pub lock_timeout: Duration,
}

impl StoreDir {
    pub fn new(data_dir: &Path, network: &str, lock_timeout: Duration) -> Self {
        Self { path: data_dir.join(network), lock_timeout }
    }

    fn lock(&self) -> Result<Store, CniError> {
        Store::lock(&self.path, self.lock_timeout)
    }
}

pub fn reserve(
    dir: &StoreDir,
    sets: &[RangeSet],
    container_id: &str,
    ifname: &str,
) -> Result<Vec<(IpAddr, IpNet)>, CniError> {
    let store = dir.lock()?;
    let mut state = store.load()?;
    let held = state.held_by(container_id, ifname);
    if !held.is_empty() {
        return Err(CniError::AlreadyExists {
            msg: format!(
                "container {container_id} already has an attachment {ifname} (addresses {}); DEL it \
                 before adding it again",
                held.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let picked = allocator::allocate(sets, &state.taken(), &state.last).map_err(|e| {
        CniError::Exhausted {
            msg: format!(
                "{e}: every address of the pod range is in use; free some pods or widen the range"
            ),
        }
    })?;
    for (index, (ip, _)) in picked.iter().enumerate() {
        let owner =
            Owner { container_id: container_id.into(), ifname: ifname.into(), committed: false };
        state.allocations.insert(*ip, owner);
        state.last.insert(index, *ip);
    }
    store.save(&state)?;
    Ok(picked)
}

/// Marks an attachment's addresses as committed. Losing this write in a crash is harmless: an
/// uncommitted reservation is still in use and still released by DEL/GC.
pub fn commit(dir: &StoreDir, container_id: &str, ifname: &str) -> Result<(), CniError> {
    let store = dir.lock()?;
    let mut state = store.load()?;
    for owner in state.allocations.values_mut().filter(|o| o.is(container_id, ifname)) {
        owner.committed = true;
    }
    store.save(&state)
}

/// The addresses an attachment holds (empty when the store does not exist).
pub fn held(dir: &StoreDir, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    if !dir.path.exists() {
        return Ok(Vec::new());
    }
    let store = dir.lock()?;
    Ok(store.load()?.held_by(container_id, ifname))
}

/// Releases an attachment's addresses; returns them. Succeeds when there is nothing to release.
pub fn release(dir: &StoreDir, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    if !dir.path.exists() {
        return Ok(Vec::new());
    }
    let store = dir.lock()?;
    let mut state = store.load()?;
    let released = state.release(container_id, ifname);
    if !released.is_empty() {
        store.save(&state)?;
    }
    Ok(released)
}

/// Releases every reservation whose attachment is not in `valid`, calling `cleanup` for each
/// released attachment (to remove its links) while the store is locked. Returns what was freed.
pub fn gc(
    dir: &StoreDir,
    valid: &[Attachment],
    mut cleanup: impl FnMut(&str, &str, &[IpAddr]),
) -> Result<Vec<(String, String)>, CniError> {
    if !dir.path.exists() {
        return Ok(Vec::new());
    }
    let store = dir.lock()?;
    let mut state = store.load()?;
    let mut stale: Vec<(String, String)> = state
        .allocations
        .values()
        .filter(|o| !valid.iter().any(|a| o.is(&a.container_id, &a.ifname)))
        .map(|o| (o.container_id.clone(), o.ifname.clone()))
        .collect();
    stale.sort();
    stale.dedup();
    for (container_id, ifname) in &stale {
        let ips = state.release(container_id, ifname);
        cleanup(container_id, ifname, &ips);
    }
    if !stale.is_empty() {
        store.save(&state)?;
    }
    Ok(stale)
}

/// STATUS of the built-in IPAM: 51 when some range set has no free address.
pub fn status(dir: &StoreDir, sets: &[RangeSet]) -> Result<(), CniError> {
    let state = if dir.path.exists() { dir.lock()?.load()? } else { store::State::default() };
    allocator::allocate(sets, &state.taken(), &state.last).map(|_| ()).map_err(|e| {
        CniError::Exhausted {
            msg: format!("{e}: new pods cannot get an address until some are deleted"),
        }
    })
}
