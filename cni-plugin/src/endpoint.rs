//! Registering pods in the agent's pinned endpoint map (`weir_common::endpoint`), through the
//! bpf(2) syscall directly: the plugin only opens an existing pin, so it needs no eBPF library.
//!
//! Contract: when the pin does not exist (agent not installed or not started), nothing happens.
//! When it exists, ADD must succeed in writing the entry (else ADD fails and is rolled back);
//! DEL and GC remove entries best-effort.
use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use weir_common::endpoint::{
    ENDPOINTS_MAP, EndpointInfo, EndpointKey, FLAG_FROM_CNI, IDENTITY_UNKNOWN,
};

use crate::{bpf, error::CniError};

fn open_map(dir: &Path) -> Result<Option<OwnedFd>, CniError> {
    let path = dir.join(ENDPOINTS_MAP);
    if !path.exists() {
        return Ok(None);
    }
    bpf::obj_get(&path)
        .map(Some)
        .map_err(|e| CniError::io(format!("opening the endpoint map {}", path.display()), e))
}

fn key(ip: IpAddr) -> EndpointKey {
    match ip {
        IpAddr::V4(a) => EndpointKey::v4(a.octets()),
        IpAddr::V6(a) => EndpointKey::v6(a.octets()),
    }
}

/// Writes `ip -> ifindex` for each address. Returns whether the map exists.
pub fn register(dir: &Path, ips: &[IpAddr], ifindex: u32) -> Result<bool, CniError> {
    let Some(map) = open_map(dir)? else { return Ok(false) };
    for ip in ips {
        let value =
            EndpointInfo { ifindex, identity: IDENTITY_UNKNOWN, flags: FLAG_FROM_CNI, _pad: 0 };
        bpf::map_update(map.as_fd(), &key(*ip), &value)
            .map_err(|e| CniError::io(format!("registering {ip} in the endpoint map"), e))?;
    }
    Ok(true)
}

/// Removes the entries of `ips`, ignoring entries that are already gone.
pub fn unregister(dir: &Path, ips: &[IpAddr]) {
    let Ok(Some(map)) = open_map(dir) else { return };
    for ip in ips {
        let _ = bpf::map_delete(map.as_fd(), &key(*ip));
    }
}
