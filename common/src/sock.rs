//! Socket-level load balancing (cgroup connect4/sendmsg4/recvmsg4/getpeername4).
//!
//! A socket that connects (or sends) to a service frontend is given a backend address at the
//! system call, so its packets carry the backend address from the start and need no per-packet
//! NAT. `weir_sock_rev4_v1` remembers, per socket, which frontend a backend address stands for,
//! so that `getpeername()` and `recvfrom()` report the frontend the application asked for.
//! `weir_sock_rev6_v1` does the same for IPv6 sockets (connect6/sendmsg6/recvmsg6/
//! getpeername6), with [`crate::lb::RevNat6`] values.

use crate::impl_pod;

pub const SOCK_REV4_MAP: &str = "weir_sock_rev4_v1";
pub const SOCK_REV6_MAP: &str = "weir_sock_rev6_v1";

/// Default capacity: one entry per socket (or per UDP peer of an unconnected socket) that
/// talks to a service; an LRU, so old sockets' entries are evicted first.
pub const DEFAULT_SOCK_REV4_ENTRIES: u32 = 262_144;

/// Key of `weir_sock_rev4_v1`: a socket and the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey4 {
    /// The kernel's socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address, network byte order.
    pub address: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey4>() == 16);

/// Key of `weir_sock_rev6_v1`: an IPv6 socket and the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub address: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockRevKey6>() == 32);

impl_pod!(SockRevKey4, SockRevKey6);
