//! Socket-level load balancing: service translation at connect()/sendmsg() and its reverse at
//! getpeername()/recvmsg(), for sockets of processes in the cgroup the programs are attached
//! to, for IPv4 (`*4`) and IPv6 (`*6`) sockets. The backend choice is the same as the tc path's
//! (`lb::select_with_affinity`); the mapping from (socket, backend) back to the frontend lives
//! in `weir_sock_rev4_v1` and `weir_sock_rev6_v1`.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use weir_common::{
    lb::{RevNat, RevNat6, ServiceKey, ServiceKey6, affinity_scope},
    metrics::Counter,
    proto,
    sock::{SockRevKey4, SockRevKey6},
};

use crate::{
    lb::{V4, V6, select_with_affinity},
    maps::{SERVICES, SERVICES6, SOCK_REV4, SOCK_REV6},
    metrics::count,
};

/// Verdicts of cgroup sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// The socket's protocol, if the load balancer serves it.
#[inline(always)]
fn served_protocol(protocol: u32) -> Option<u8> {
    match protocol {
        p if p == proto::TCP as u32 => Some(proto::TCP),
        p if p == proto::UDP as u32 => Some(proto::UDP),
        _ => None,
    }
}

/// The socket's network namespace and socket cookies.
#[inline(always)]
fn cookies(ctx: &SockAddrContext) -> (u64, u64) {
    // SAFETY: sock_addr programs may call bpf_get_netns_cookie and bpf_get_socket_cookie on
    // their context.
    unsafe { (bpf_get_netns_cookie(ctx.as_ptr()), bpf_get_socket_cookie(ctx.as_ptr())) }
}

/// The context's `user_ip6`, read word by word: the verifier allows only loads at a constant
/// offset from the context pointer itself, not a copy through a derived pointer.
#[inline(always)]
fn user_ip6(addr: &bpf_sock_addr) -> [u32; 4] {
    // SAFETY: reads of fields of a valid context.
    unsafe {
        [
            core::ptr::read_volatile(&addr.user_ip6[0]),
            core::ptr::read_volatile(&addr.user_ip6[1]),
            core::ptr::read_volatile(&addr.user_ip6[2]),
            core::ptr::read_volatile(&addr.user_ip6[3]),
        ]
    }
}

/// Writes the context's `user_ip6` word by word (see [`user_ip6`]).
#[inline(always)]
fn set_user_ip6(addr: &mut bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: writes of fields of a valid context; the kernel allows user_ip6 writes here.
    unsafe {
        core::ptr::write_volatile(&mut addr.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut addr.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut addr.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut addr.user_ip6[3], ip[3]);
    }
}

/// connect4 and sendmsg4: a destination that is a service frontend becomes a backend.
#[inline(always)]
pub fn translate4(ctx: &SockAddrContext) -> Result<i32, Counter> {
    // SAFETY: the kernel passes a valid bpf_sock_addr to sock_addr programs.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = served_protocol(addr.protocol) else { return Ok(ALLOW) };
    let frontend = ServiceKey {
        address: addr.user_ip4,
        // user_port holds the port in network byte order in its low 16 bits.
        port: addr.user_port as u16,
        backend_slot: 0,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(service) = (unsafe { SERVICES.get(&frontend) }).copied() else {
        return Ok(ALLOW);
    };
    let (netns, cookie) = cookies(ctx);
    let (_, backend) =
        select_with_affinity::<V4>(&frontend, &service, netns, affinity_scope::SOCKET)
            .map_err(|_| Counter::SockRejectNoBackend)?;
    let key = SockRevKey4 { cookie, address: backend.address, port: backend.port, _pad: 0 };
    let reverse = RevNat { address: frontend.address, port: frontend.port, _pad: 0 };
    // Without the entry, getpeername() would show the backend; the connection still works.
    let _ = SOCK_REV4.insert(&key, &reverse, 0);
    addr.user_ip4 = backend.address;
    addr.user_port = backend.port as u32;
    count(Counter::SockTranslated);
    Ok(ALLOW)
}

/// getpeername4 and recvmsg4: a backend address this socket was given becomes the frontend.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to sock_addr programs.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey4 { cookie, address: addr.user_ip4, port: addr.user_port as u16, _pad: 0 };
    // SAFETY: read-only lookup, value copied out.
    if let Some(frontend) = unsafe { SOCK_REV4.get(&key) }.copied() {
        addr.user_ip4 = frontend.address;
        addr.user_port = frontend.port as u32;
        count(Counter::SockReverseTranslated);
    }
    ALLOW
}

/// connect6 and sendmsg6: a destination that is an IPv6 service frontend becomes a backend.
/// (An IPv4 service reached through an IPv4-mapped address on an IPv6 socket is not
/// translated, as with Cilium.)
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext) -> Result<i32, Counter> {
    // SAFETY: the kernel passes a valid bpf_sock_addr to sock_addr programs.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = served_protocol(addr.protocol) else { return Ok(ALLOW) };
    let frontend = ServiceKey6 {
        address: user_ip6(addr),
        port: addr.user_port as u16,
        backend_slot: 0,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(service) = (unsafe { SERVICES6.get(&frontend) }).copied() else {
        return Ok(ALLOW);
    };
    let (netns, cookie) = cookies(ctx);
    let (_, backend) =
        select_with_affinity::<V6>(&frontend, &service, netns, affinity_scope::SOCKET6)
            .map_err(|_| Counter::SockRejectNoBackend)?;
    let key = SockRevKey6 { cookie, address: backend.address, port: backend.port, _pad: [0; 3] };
    let reverse = RevNat6 { address: frontend.address, port: frontend.port, _pad: 0 };
    let _ = SOCK_REV6.insert(&key, &reverse, 0);
    set_user_ip6(addr, backend.address);
    addr.user_port = backend.port as u32;
    count(Counter::SockTranslated);
    Ok(ALLOW)
}

/// getpeername6 and recvmsg6: a backend address this socket was given becomes the frontend.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr to sock_addr programs.
    let addr = unsafe { &mut *ctx.sock_addr };
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key =
        SockRevKey6 { cookie, address: user_ip6(addr), port: addr.user_port as u16, _pad: [0; 3] };
    // SAFETY: read-only lookup, value copied out.
    if let Some(frontend) = unsafe { SOCK_REV6.get(&key) }.copied() {
        set_user_ip6(addr, frontend.address);
        addr.user_port = frontend.port as u32;
        count(Counter::SockReverseTranslated);
    }
    ALLOW
}
