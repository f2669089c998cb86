//! Per-CPU datapath counters, indexed by [`Counter`].
//!
//! `weir_metrics_v1` is a per-CPU array of `u64`; index `n` counts events of `Counter` `n`.
//! Every drop has its own reason here (Cilium's habit): a packet the datapath drops is always
//! counted under exactly one reason. Userspace sums the per-CPU values.

pub const METRICS_MAP: &str = "weir_metrics_v1";

/// What the datapath counts. The discriminant is the index in `weir_metrics_v1`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A packet to a service frontend was translated to a backend.
    Translated = 0,
    /// A reply from a backend was translated back to the service frontend.
    ReverseTranslated = 1,
    /// A packet was not parsed far enough to be matched (truncated, fragment, unsupported
    /// header); it passed untouched.
    PassedUnparsed = 2,
    /// Drop: the service exists but has no backend (or its slot points at a missing backend).
    /// On the per-packet path the packet is answered with an ICMP port unreachable unless a
    /// traffic policy emptied the frontend.
    DropNoBackend = 3,
    /// Drop: a rewrite of packet bytes or checksums failed in the kernel helper.
    DropRewriteFailed = 4,
    /// A socket's connect()/sendmsg() to a service frontend was given a backend.
    SockTranslated = 5,
    /// A socket's getpeername()/recvmsg() had a backend address turned back into the frontend.
    SockReverseTranslated = 6,
    /// Reject: connect()/sendmsg() to a service frontend that has no backend (the application
    /// gets an immediate error instead of a timeout).
    SockRejectNoBackend = 7,
    /// A NetworkPolicy check allowed a new flow or a packet of one (replies not counted).
    PolicyAllowed = 8,
    /// A reply of a flow a policy allowed passed through conntrack.
    PolicyReply = 9,
    /// Drop: the pod's ingress is isolated and no rule allows the packet.
    DropPolicyIngress = 10,
    /// Drop: the pod's egress is isolated and no rule allows the packet.
    DropPolicyEgress = 11,
    /// Drop: the address has no policy endpoint entry yet while policies exist (the pod's
    /// policy is not programmed yet).
    DropPolicyNotReady = 12,
}

/// Number of counters: the size of `weir_metrics_v1`.
pub const COUNTER_COUNT: u32 = 13;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Translated,
        Counter::ReverseTranslated,
        Counter::PassedUnparsed,
        Counter::DropNoBackend,
        Counter::DropRewriteFailed,
        Counter::SockTranslated,
        Counter::SockReverseTranslated,
        Counter::SockRejectNoBackend,
        Counter::PolicyAllowed,
        Counter::PolicyReply,
        Counter::DropPolicyIngress,
        Counter::DropPolicyEgress,
        Counter::DropPolicyNotReady,
    ];

    /// Stable name used in metrics output (`weir_datapath_events_total{reason="..."}`).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::PassedUnparsed => "passed_unparsed",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropRewriteFailed => "drop_rewrite_failed",
            Counter::SockTranslated => "sock_translated",
            Counter::SockReverseTranslated => "sock_reverse_translated",
            Counter::SockRejectNoBackend => "sock_reject_no_backend",
            Counter::PolicyAllowed => "policy_allowed",
            Counter::PolicyReply => "policy_reply",
            Counter::DropPolicyIngress => "drop_policy_ingress",
            Counter::DropPolicyEgress => "drop_policy_egress",
            Counter::DropPolicyNotReady => "drop_policy_not_ready",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::DropNoBackend
                | Counter::DropRewriteFailed
                | Counter::SockRejectNoBackend
                | Counter::DropPolicyIngress
                | Counter::DropPolicyEgress
                | Counter::DropPolicyNotReady
        )
    }
}
