//! The few bpf(2) commands weir-cni (and the agent, for the same attachments) needs, called
//! directly so that the plugin carries no eBPF library: open and pin objects in bpffs, look
//! up maps, and attach, query and detach tcx programs without a bpf link (such an attachment
//! belongs to the device and goes away with it).
//!
//! Every function takes or returns owned descriptors; errors are the kernel's errno.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

/// `union bpf_attr`, zero-padded (the kernel rejects non-zero bytes past what it knows).
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded union bpf_attr of 128 bytes that outlives the call; any
    // pointers stored in it point to buffers the caller keeps alive across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<Attr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Two u32 fields packed into one u64 of the attr (little-endian field order in memory).
fn pair(low: u32, high: u32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&low.to_ne_bytes());
    bytes[4..].copy_from_slice(&high.to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens the object (map, program) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = c_path(path)?;
    let mut attr = Attr::default();
    attr[0] = c_path.as_ptr() as u64; // pathname
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Pins the object `fd` at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    let mut attr = Attr::default();
    attr[0] = c_path.as_ptr() as u64; // pathname
    attr[1] = pair(fd.as_raw_fd() as u32, 0); // bpf_fd, file_flags
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `map[key]`, or `None` when the key is absent. `K` and `V` must be the map's `#[repr(C)]`
/// key and value.
pub fn map_lookup<K, V: Copy>(map: BorrowedFd<'_>, key: &K, init: V) -> io::Result<Option<V>> {
    let mut value = init;
    let mut attr = Attr::default();
    attr[0] = u64::from(map.as_raw_fd() as u32); // map_fd
    attr[1] = key as *const K as u64;
    attr[2] = &mut value as *mut V as u64;
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// `map[key] = value` (BPF_ANY). `K` and `V` must be the map's `#[repr(C)]` key and value.
pub fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = Attr::default();
    attr[0] = u64::from(map.as_raw_fd() as u32); // map_fd
    attr[1] = key as *const K as u64;
    attr[2] = value as *const V as u64;
    attr[3] = 0; // BPF_ANY
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Deletes `key` from the map.
pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = Attr::default();
    attr[0] = u64::from(map.as_raw_fd() as u32);
    attr[1] = key as *const K as u64;
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// Attaches `prog` to interface `ifindex` (of the calling thread's network namespace) with a
/// tcx `attach_type`, after the programs already there, without a link.
pub fn tcx_attach(ifindex: u32, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::default();
    attr[0] = pair(ifindex, prog.as_raw_fd() as u32); // target_ifindex, attach_bpf_fd
    attr[1] = pair(attach_type, 0); // attach_type, attach_flags
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// [`tcx_attach`], but before the programs already there (`BPF_F_BEFORE` with no relative
/// program: the front of the chain).
pub fn tcx_attach_first(ifindex: u32, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    const BPF_F_BEFORE: u32 = 1 << 3;
    let mut attr = Attr::default();
    attr[0] = pair(ifindex, prog.as_raw_fd() as u32); // target_ifindex, attach_bpf_fd
    attr[1] = pair(attach_type, BPF_F_BEFORE); // attach_type, attach_flags
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// Detaches `prog` (attached without a link) from `ifindex`.
pub fn tcx_detach(ifindex: u32, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = Attr::default();
    attr[0] = pair(ifindex, prog.as_raw_fd() as u32);
    attr[1] = pair(attach_type, 0);
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// One program attached at a tcx hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub prog_id: u32,
    /// The bpf link holding it, 0 when it was attached without a link.
    pub link_id: u32,
}

/// The programs attached to `ifindex` at `attach_type`, in run order.
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<Vec<Attached>> {
    const MAX: usize = 64;
    let mut prog_ids = [0u32; MAX];
    let mut link_ids = [0u32; MAX];
    let mut attr = Attr::default();
    attr[0] = pair(ifindex, attach_type); // target_ifindex, attach_type
    attr[1] = 0; // query_flags, attach_flags (out)
    attr[2] = prog_ids.as_mut_ptr() as u64;
    attr[3] = pair(MAX as u32, 0); // count (in: capacity, out: programs)
    attr[5] = link_ids.as_mut_ptr() as u64;
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr[3] as u32 as usize).min(MAX);
    Ok((0..count).map(|i| Attached { prog_id: prog_ids[i], link_id: link_ids[i] }).collect())
}

/// Opens the loaded program with id `id`.
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr[0] = pair(id, 0); // prog_id
    bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned)
}

/// What the kernel says of a loaded program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    /// The program's name (at most 15 bytes: the kernel truncates longer ones).
    pub name: String,
}

/// The id and name of the program `prog`.
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // struct bpf_prog_info up to and including `name[16]` (offset 64).
    let mut info = [0u8; 80];
    let mut attr = Attr::default();
    attr[0] = pair(prog.as_raw_fd() as u32, info.len() as u32); // bpf_fd, info_len
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let id = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
    let name = &info[64..80];
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(ProgInfo { id, name: String::from_utf8_lossy(&name[..len]).into_owned() })
}
