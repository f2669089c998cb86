//! Socket-level load balancing: service translation at connect()/sendmsg() and its reverse at
//! getpeername()/recvmsg(), for sockets of processes in the cgroup the programs are attached
//! to. The backend choice is the same as the tc path's (`lb::select_with_affinity`); the mapping
//! from (socket, backend) back to the frontend lives in `weir_sock_rev4_v1`.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use weir_common::{
    lb::{RevNat, ServiceKey},
    metrics::Counter,
    proto,
    sock::SockRevKey4,
};

use crate::{
    lb::{AFFINITY_SCOPE_SOCKET, select_with_affinity},
    maps::{SERVICES, SOCK_REV4},
    metrics::count,
};

/// Verdicts of cgroup sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

/// connect4 and sendmsg4: a destination that is a service frontend becomes a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> Result<i32, Counter> {
    // SAFETY: the kernel passes a valid bpf_sock_addr to sock_addr programs.
    let addr = unsafe { &mut *ctx.sock_addr };
    let proto = match addr.protocol {
        p if p == proto::TCP as u32 => proto::TCP,
        p if p == proto::UDP as u32 => proto::UDP,
        _ => return Ok(ALLOW),
    };
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
    // SAFETY: sock_addr programs may call bpf_get_netns_cookie on their context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (_, backend) = select_with_affinity(&frontend, &service, netns, AFFINITY_SCOPE_SOCKET)
        .map_err(|_| Counter::SockRejectNoBackend)?;
    // SAFETY: sock_addr programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
pub fn reverse(ctx: &SockAddrContext) -> i32 {
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
