//! weir's eBPF programs. One object (`weir`), embedded into userspace by `proxy/build.rs`.
//!
//! Entry points are thin: each calls a `try_*` function that returns either the action to take
//! or a [`Counter`] naming why the packet is dropped; every drop is counted (`metrics.rs`).
//! One concern per file: `packet.rs` parses, `nat.rs` rewrites headers and checksums, `lb.rs`
//! chooses backends and tracks flows, `maps.rs` declares the maps whose layouts live in
//! `weir-common`.
#![no_std]
#![no_main]

mod fib;
mod hairpin;
mod host_route;
mod host_sctp;
mod lb;
mod maps;
mod metrics;
mod nat;
mod packet;
mod policy;
mod reject;
mod sock_lb;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use weir_common::{
    metrics::Counter,
    policy::{DIR_EGRESS, DIR_INGRESS},
};

/// tc program for the direction towards services (a pod veth's ingress from the pod, a node
/// uplink's ingress, or an egress in tests): a packet to a service frontend is translated to a
/// backend, and the flow is recorded for replies.
#[classifier]
pub fn tc_lb4_fwd(ctx: TcContext) -> i32 {
    verdict(lb::try_forward(&ctx))
}

/// tc ingress (first in the chain) of the device other nodes' pod traffic arrives on (the
/// VXLAN device, or the uplink with native routing): a packet from another node's pod to a
/// pod of this node goes straight into the pod (eBPF host routing); every other packet goes
/// on to the next program, or the kernel's path.
#[classifier]
pub fn tc_host_in(ctx: TcContext) -> i32 {
    host_route::to_local(&ctx)
}

/// tc program for the direction back to clients: a reply from a backend of a tracked flow gets
/// the service frontend as its source again.
#[classifier]
pub fn tc_lb4_rev(ctx: TcContext) -> i32 {
    verdict(lb::try_reverse(&ctx))
}

/// NetworkPolicy, the pod's egress: attached to the tc ingress of the pod's host-side veth.
/// SCTP to a service frontend is translated first (no socket hook sees SCTP), so the policy
/// judges the backend the packet goes to; SCTP a pod sends to itself through its service, and
/// its answers, go straight back into the pod (`hairpin`).
#[classifier]
pub fn tc_pol_egress(ctx: TcContext) -> i32 {
    // Only SCTP has a service part here (the socket hooks translate TCP and UDP): every other
    // packet pays one read of its protocol before the policy check.
    if let Some((v6, weir_common::proto::SCTP)) = packet::ip_protocol(&ctx) {
        let action = sctp_from_pod(&ctx, v6);
        if action != CHECK_EGRESS {
            return action;
        }
    }
    let action = policy_check(&ctx, DIR_EGRESS);
    if action != TC_ACT_OK {
        return action;
    }
    // To another node's pod: straight out of the node (eBPF host routing).
    host_route::to_remote(&ctx)
}

/// What [`sctp_from_pod`] returns when the packet goes on to the pod's egress policy check.
const CHECK_EGRESS: i32 = i32::MIN;

/// The service part of `tc_pol_egress` for an SCTP packet (`v6`: IPv6): one to a frontend is translated, a
/// hairpin (the pod reaching itself) and its answers go straight back into the pod. Any other
/// SCTP packet gets [`CHECK_EGRESS`]. In a frame of its own, as is [`policy_check`]: the program's own
/// frame stays small, so each chain of calls fits the verifier's 512 bytes of stack.
#[inline(never)]
fn sctp_from_pod(ctx: &TcContext, v6: bool) -> i32 {
    let answer = hairpin::reply(ctx);
    if answer != hairpin::NOT_HAIRPIN {
        return answer;
    }
    if host_sctp::is_reply(ctx, v6) {
        // The pod answers the node's own process: its egress policy judges the answer as sent
        // (a reply of the association the node opened), then the node sees the frontend.
        let action = policy_check(ctx, DIR_EGRESS);
        if action != TC_ACT_OK {
            return action;
        }
        return host_sctp::reverse_from_pod(ctx, v6);
    }
    let asked = hairpin::Asked::of(ctx);
    match verdict(lb::forward_sctp_from_pod(ctx)) {
        TC_ACT_OK => {}
        rejected_or_dropped => return rejected_or_dropped,
    }
    if !asked.is_hairpin(ctx) {
        return CHECK_EGRESS;
    }
    // The pod reaches itself: its egress to the backend and the backend's ingress from it.
    for direction in [DIR_EGRESS, DIR_INGRESS] {
        let action = policy_check(ctx, direction);
        if action != TC_ACT_OK {
            return action;
        }
    }
    verdict(asked.send_back(ctx))
}

/// [`policy::try_check`] as a tc action.
#[inline(never)]
pub(crate) fn policy_check(ctx: &TcContext, direction: u8) -> i32 {
    verdict(policy::try_check(ctx, direction))
}

/// NetworkPolicy, the pod's ingress: attached to the tc egress of the pod's host-side veth.
/// An allowed SCTP reply from a service's backend then gets the frontend as its source.
#[classifier]
pub fn tc_pol_ingress(ctx: TcContext) -> i32 {
    let action = verdict(policy::try_check(&ctx, DIR_INGRESS));
    if action != TC_ACT_OK {
        return action;
    }
    verdict(lb::reverse_sctp_to_pod(&ctx).map(|()| TC_ACT_OK))
}

/// tc egress of a node uplink: SCTP the node's own processes send to a service frontend goes
/// to a backend (no socket hook sees SCTP); every other packet goes on to the next program.
#[classifier]
pub fn tc_host_sctp_out(ctx: TcContext) -> i32 {
    host_sctp::out(&ctx)
}

/// tc ingress of a node uplink: a backend's answer to the node's own SCTP gets its frontend as
/// source again; every other packet goes on to the next program.
#[classifier]
pub fn tc_host_sctp_in(ctx: TcContext) -> i32 {
    host_sctp::into_node(&ctx)
}

/// Does nothing and passes the packet: the baseline that `cargo xtask bench tc-rewrite` measures
/// the load balancer against.
#[classifier]
pub fn tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// cgroup connect4: TCP and connected-UDP sockets to a service frontend get a backend.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock_lb::translate4(&ctx))
}

/// cgroup sendmsg4: datagrams of unconnected UDP sockets to a service frontend go to a backend.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock_lb::translate4(&ctx))
}

/// cgroup recvmsg4: datagrams from a backend appear to come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse4(&ctx)
}

/// cgroup getpeername4: a connected socket's peer is the frontend it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse4(&ctx)
}

/// cgroup connect6: IPv6 TCP and connected-UDP sockets to a service frontend get a backend.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock_lb::translate6(&ctx))
}

/// cgroup sendmsg6: datagrams of unconnected IPv6 UDP sockets to a frontend go to a backend.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock_lb::translate6(&ctx))
}

/// cgroup recvmsg6: IPv6 datagrams from a backend appear to come from the frontend.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse6(&ctx)
}

/// cgroup getpeername6: a connected IPv6 socket's peer is the frontend it connected to.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse6(&ctx)
}

#[inline(always)]
fn sock_verdict(result: Result<i32, Counter>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            metrics::count(reason);
            sock_lb::REJECT
        }
    }
}

#[inline(always)]
fn verdict(result: Result<i32, Counter>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            metrics::count(reason);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
