//! Registering pods in the agent's pinned endpoint map (`weir_common::endpoint`), through the
//! bpf(2) syscall directly: the plugin only opens an existing pin, so it needs no eBPF library.
//!
//! Contract: when the pin does not exist (agent not installed or not started), nothing happens.
//! When it exists, ADD must succeed in writing the entry (else ADD fails and is rolled back);
//! DEL and GC remove entries best-effort.
use std::{
    ffi::CString,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use weir_common::endpoint::{
    ENDPOINTS_MAP, EndpointInfo, EndpointKey, FLAG_FROM_CNI, IDENTITY_UNKNOWN,
};

use crate::error::CniError;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded union bpf_attr of 128 bytes that outlives the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; 16]>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn open_map(dir: &Path) -> Result<Option<OwnedFd>, CniError> {
    let path = dir.join(ENDPOINTS_MAP);
    if !path.exists() {
        return Ok(None);
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("paths have no NUL");
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64; // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)
        .map_err(|e| CniError::io(format!("opening the endpoint map {}", path.display()), e))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
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
        let key = key(*ip);
        let value =
            EndpointInfo { ifindex, identity: IDENTITY_UNKNOWN, flags: FLAG_FROM_CNI, _pad: 0 };
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64; // map_fd (u32) + pad
        attr[1] = &key as *const EndpointKey as u64;
        attr[2] = &value as *const EndpointInfo as u64;
        attr[3] = 0; // BPF_ANY
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
            .map_err(|e| CniError::io(format!("registering {ip} in the endpoint map"), e))?;
    }
    Ok(true)
}

/// Removes the entries of `ips`, ignoring entries that are already gone.
pub fn unregister(dir: &Path, ips: &[IpAddr]) {
    let Ok(Some(map)) = open_map(dir) else { return };
    for ip in ips {
        let key = key(*ip);
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = &key as *const EndpointKey as u64;
        let _ = bpf(BPF_MAP_DELETE_ELEM, &mut attr);
    }
}
