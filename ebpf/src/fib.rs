//! The kernel's forwarding decision for a packet (`bpf_fib_lookup`), for the programs that
//! forward packets themselves: eBPF host routing (`host_route.rs`) and the node's own SCTP to
//! services (`host_sctp.rs`).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the kernel sends a packet next: the device, and the Ethernet addresses to give it
/// (its own, and the next hop's unless the lookup was asked to skip the neighbour).
pub struct NextHop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// The route from `src` to `dst` (network order; IPv4 in the first word) of a packet of
/// protocol `l4` arriving on the program's device; `None` unless it is a plain forward the
/// kernel could answer at once (`flags`: `BPF_FIB_LOOKUP_*`). The MTU check is the kernel's,
/// on the packet itself (GSO aware).
#[inline(always)]
pub fn next_hop(
    ctx: &TcContext,
    v6: bool,
    src: &[u32; 4],
    dst: &[u32; 4],
    l4: u8,
    flags: u32,
) -> Option<NextHop> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // SAFETY: the context's skb pointer is valid for the program's run.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.l4_protocol = l4;
    if v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = *src;
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    }
    // SAFETY: `fib` is a valid, correctly sized parameter block for the call.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    (found == i64::from(BPF_FIB_LKUP_RET_SUCCESS)).then_some(NextHop {
        ifindex: fib.ifindex,
        smac: fib.smac,
        dmac: fib.dmac,
    })
}
