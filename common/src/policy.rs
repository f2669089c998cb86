//! NetworkPolicy enforcement maps (IPv4 and IPv6). Written by the agent from the compiled
//! policy (`weir-policy`), read by `ebpf/src/policy.rs`.
//!
//! Per packet the datapath does a bounded number of lookups whatever the number of rules:
//! the endpoint's entry, one conntrack lookup (replies), one ipcache LPM lookup for the peer
//! address (identity and CIDR class), and at most three policy LPM lookups (any peer, the
//! peer's identity, the peer's CIDR class), each matching protocol and port by prefix.
//!
//! Both families share every map: an address is 16 bytes ([`Addr`]), an IPv6 address as is and
//! an IPv4 address in its IPv4-mapped form `::ffff:a.b.c.d` ([`v4_mapped`]; an IPv4 prefix of
//! length n is the mapped prefix of length 96 + n). A pod's rules are keyed once by its rule
//! address ([`EndpointPolicy::rules_key`], the lowest of its addresses), which every address of
//! the pod (IPv4 and IPv6) names in its endpoint entry, so a dual-stack pod's rules are not
//! written twice.

/// An address in the policy maps: IPv6, or IPv4-mapped IPv6 for IPv4 (network order).
pub type Addr = [u8; 16];

/// The IPv4-mapped form (`::ffff:a.b.c.d`) of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// The length of the IPv4-mapped prefix `::ffff:0:0/96`: an IPv4 prefix of length n is the
/// mapped prefix of length `V4_MAPPED_BITS + n`.
pub const V4_MAPPED_BITS: u32 = 96;

/// Pod address ([`Addr`]) -> [`EndpointPolicy`]. An address without an entry is not a managed endpoint;
/// while [`GLOBAL_DENY_UNKNOWN`] is set, packets of such addresses are dropped.
pub const POLICY_ENDPOINTS_MAP: &str = "weir_pol_ep_v2";
/// LPM trie: [`Addr`] prefix -> [`IpcacheValue`].
pub const IPCACHE_MAP: &str = "weir_ipcache_v2";
/// LPM trie: [`PolicyKey`] with a prefix length -> [`PolicyValue`].
pub const POLICY_MAP: &str = "weir_policy_v2";
/// LRU hash: [`PolicyCtKey`] -> [`PolicyValue`] (the allowing rule): flows a policy allowed, so
/// replies pass.
pub const POLICY_CT_MAP: &str = "weir_pol_ct_v2";
/// Array of one [`PolicyGlobal`].
pub const POLICY_GLOBAL_MAP: &str = "weir_pol_global_v1";
/// Per-CPU hash: [`PolicyDropKey`] (policy id, direction) -> packets dropped while that policy
/// isolated the direction.
pub const POLICY_DROPS_MAP: &str = "weir_pol_drops_v2";
/// Pins of policy maps of earlier layouts (IPv4-only keys, 40-byte flow events, the first drop
/// counters). Nothing reads them any more; loading the object removes them from the pin
/// directory, so an upgraded node does not keep them for ever.
pub const RETIRED_MAPS: [&str; 6] = [
    "weir_pol_ep_v1",
    "weir_ipcache4_v1",
    "weir_policy_v1",
    "weir_pol_ct4_v1",
    "weir_flows_v1",
    "weir_pol_drops_v1",
];
/// Ring buffer of [`FlowEvent`]s.
pub const FLOWS_MAP: &str = "weir_flows_v2";

/// Where the agent pins the policy programs in its pin directory, for weir-cni to attach them
/// to a new pod's host veth at ADD (before the pod is reachable). Re-pinned by every agent
/// start (pin to a temporary name, then rename over the old pin).
pub const PROG_EGRESS_PIN: &str = "prog_tc_pol_egress";
pub const PROG_INGRESS_PIN: &str = "prog_tc_pol_ingress";
/// The kernel names of the policy programs (what BPF_OBJ_GET_INFO_BY_FD reports): a program
/// attached to a pod veth with one of these names is weir's, and may be replaced or detached.
pub const PROG_EGRESS_NAME: &str = "tc_pol_egress";
pub const PROG_INGRESS_NAME: &str = "tc_pol_ingress";
/// tcx attach types (`enum bpf_attach_type`): the pod's egress program runs on the host veth's
/// ingress, its ingress program on the host veth's egress.
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

pub const DEFAULT_POLICY_ENDPOINTS: u32 = 65536;
pub const DEFAULT_IPCACHE_ENTRIES: u32 = 262_144;
pub const DEFAULT_POLICY_ENTRIES: u32 = 1_048_576;
pub const DEFAULT_POLICY_CT_ENTRIES: u32 = 262_144;
pub const DEFAULT_POLICY_DROPS_ENTRIES: u32 = 16384;
pub const FLOWS_BYTES: u32 = 1 << 20;

/// Whether an ICMPv6 type is link control that always passes, whatever the policy: neighbour
/// discovery (router solicitation and advertisement, neighbour solicitation and
/// advertisement, redirect: 133-137), without which default deny would cut a pod off its
/// gateway, and multicast listener discovery (queries 130, reports 131 and 143, done 132),
/// which every interface sends from its link-local address as it comes up. Neither carries
/// application data nor leaves the link.
pub const fn icmpv6_link_control(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=137 | 143)
}

/// Directions, from the pod's point of view.
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// [`EndpointPolicy::flags`] bits.
pub const EP_INGRESS_ISOLATED: u32 = 1;
pub const EP_EGRESS_ISOLATED: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub flags: u32,
    pub identity: u32,
    /// Policy ids a drop in each direction is counted against (the first isolating policy).
    pub ingress_policy: u32,
    pub egress_policy: u32,
    /// The address the endpoint's rules are keyed by in the policy LPM
    /// ([`PolicyKey::endpoint`]): the lowest of the pod's addresses, the same for all of them.
    pub rules_key: Addr,
}
const _: () = assert!(core::mem::size_of::<EndpointPolicy>() == 32);

/// What the ipcache says of an address: its identity (a pod's, host, world) and the CIDR
/// class of the longest ipBlock prefix containing it (0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub cidr_class: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);

/// [`PolicyKey::peer_kind`] values.
pub const PEER_ANY: u8 = 0;
pub const PEER_IDENTITY: u8 = 1;
pub const PEER_CIDR_CLASS: u8 = 2;

/// The data of a policy LPM key. Endpoint, direction, peer kind and peer are always matched
/// in full ([`POLICY_KEY_FIXED_BITS`]); then the protocol (8 bits, absent for "every
/// protocol"), then 0-16 leading bits of the port (a port range is several prefixes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The endpoint's [`EndpointPolicy::rules_key`].
    pub endpoint: Addr,
    pub direction: u8,
    pub peer_kind: u8,
    pub _pad: [u8; 2],
    /// Identity or CIDR class, big-endian (0 for [`PEER_ANY`]).
    pub peer: [u8; 4],
    pub proto: u8,
    /// Destination port, big-endian.
    pub port: [u8; 2],
    pub _pad2: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 28);

pub const POLICY_KEY_FIXED_BITS: u32 = 192;
/// The prefix length of a key matching one protocol and one port exactly.
pub const POLICY_KEY_FULL_BITS: u32 = POLICY_KEY_FIXED_BITS + 8 + 16;

/// Which rule allowed it (for flow events and `weir policy trace --live`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// A flow a policy check allowed, seen from `endpoint` in `direction`: an ingress entry lets
/// the endpoint's replies out, an egress entry lets replies in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyCtKey>() == 40);

/// [`PolicyGlobal::flags`]: drop packets of addresses with no endpoint entry (set while the
/// agent knows policies exist, so a pod is never reachable before its policy is programmed).
pub const GLOBAL_DENY_UNKNOWN: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyGlobal {
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyGlobal>() == 8);

/// Key of [`POLICY_DROPS_MAP`]: the policy a drop is counted against, and the direction
/// ([`DIR_INGRESS`] or [`DIR_EGRESS`]) it isolated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyDropKey {
    pub policy: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyDropKey>() == 8);

/// [`FlowEvent::verdict`].
pub const VERDICT_ALLOWED: u8 = 0;
pub const VERDICT_DROPPED: u8 = 1;

/// One policy decision, streamed to userspace: every drop, and every new allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub time_ns: u64,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub verdict: u8,
    pub _pad: u8,
    /// The allowing rule id, or the policy id the drop is counted against.
    pub rule_id: u32,
    /// The metrics counter (reason).
    pub reason: u32,
    pub peer_identity: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);

crate::impl_pod!(
    EndpointPolicy,
    IpcacheValue,
    PolicyKey,
    PolicyValue,
    PolicyCtKey,
    PolicyGlobal,
    PolicyDropKey,
    FlowEvent
);
