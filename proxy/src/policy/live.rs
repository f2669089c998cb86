//! `weir policy trace --live`: the decision a node's policy maps give for a new connection,
//! computed in userspace with the same lookups `ebpf/src/policy.rs` makes (endpoint entry,
//! ipcache LPM, policy LPM for any peer, the peer's identity and its CIDR class), and compared
//! with the model's decision ([`weir_policy::Side`]) for the same side.
//!
//! Identities, classes and rule ids are numbered by the node's agent, so they are not compared
//! with a fresh compilation's numbers: what must agree is the decision (not isolated, own
//! node, allowed by a rule, denied) of each side. Conntrack is not consulted (a new
//! connection is traced).
use std::{net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use weir_common::policy::{
    Addr, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointPolicy,
    GLOBAL_DENY_UNKNOWN, IPCACHE_MAP, IpcacheValue, PEER_ANY, PEER_CIDR_CLASS, PEER_IDENTITY,
    POLICY_ENDPOINTS_MAP, POLICY_GLOBAL_MAP, POLICY_KEY_FULL_BITS, POLICY_MAP, PolicyGlobal,
    PolicyKey, PolicyValue,
};
use weir_policy::{
    Side,
    identity::{IDENTITY_HOST, IDENTITY_WORLD},
};

pub use weir_common::policy::{DIR_EGRESS as EGRESS, DIR_INGRESS as INGRESS};

use super::lower::{DatapathPolicy, HOST_BITS, addr};
use crate::maps::MapsError;

/// Read access to one node's policy maps, with the kernel's lookup semantics (LPM tries
/// answer the longest matching prefix).
pub trait PolicyMapsView {
    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointPolicy>, MapsError>;
    /// The ipcache entry of the longest prefix containing `ip`.
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, MapsError>;
    /// The policy entry of the longest prefix of `key` (a full key: protocol and port).
    fn rule(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, MapsError>;
    fn deny_unknown(&self) -> Result<bool, MapsError>;
}

/// What the maps decide for one side of a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveSide {
    /// No endpoint entry for the pod: it passes, or is dropped as not ready while the
    /// deny-unknown flag is set.
    NoEndpoint {
        dropped: bool,
    },
    NotIsolated,
    /// Ingress from the node's own address (host identity).
    OwnNode,
    Allowed {
        rule_id: u32,
        by: &'static str,
    },
    /// Isolated and no entry matches; counted against `policy_id`.
    Dropped {
        policy_id: u32,
        identity: u32,
        cidr_class: u32,
    },
}

impl LiveSide {
    pub fn allows(&self) -> bool {
        !matches!(self, LiveSide::Dropped { .. } | LiveSide::NoEndpoint { dropped: true })
    }
}

impl std::fmt::Display for LiveSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveSide::NoEndpoint { dropped: false } => f.write_str("no endpoint entry (passes)"),
            LiveSide::NoEndpoint { dropped: true } => {
                f.write_str("no endpoint entry (dropped as not ready)")
            }
            LiveSide::NotIsolated => f.write_str("not isolated"),
            LiveSide::OwnNode => f.write_str("the node itself (host identity)"),
            LiveSide::Allowed { rule_id, by } => {
                write!(f, "allowed by rule id {rule_id} (matched on {by})")
            }
            LiveSide::Dropped { policy_id, .. } => {
                write!(f, "dropped (counted against policy id {policy_id})")
            }
        }
    }
}

/// The maps' decision for a new packet checked at `endpoint` in `direction` ([`DIR_INGRESS`]:
/// `endpoint` is the destination, [`DIR_EGRESS`]: the source), exactly as the program decides.
pub fn evaluate(
    maps: &dyn PolicyMapsView,
    direction: u8,
    endpoint: IpAddr,
    peer: IpAddr,
    proto: u8,
    dport: u16,
) -> Result<LiveSide, MapsError> {
    let Some(ep) = maps.endpoint(endpoint)? else {
        return Ok(LiveSide::NoEndpoint { dropped: maps.deny_unknown()? });
    };
    let (isolated_bit, policy_id) = if direction == DIR_EGRESS {
        (EP_EGRESS_ISOLATED, ep.egress_policy)
    } else {
        (EP_INGRESS_ISOLATED, ep.ingress_policy)
    };
    if ep.flags & isolated_bit == 0 {
        return Ok(LiveSide::NotIsolated);
    }
    let cache =
        maps.ipcache(peer)?.unwrap_or(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: 0 });
    if direction == DIR_INGRESS && cache.identity == IDENTITY_HOST {
        return Ok(LiveSide::OwnNode);
    }
    let mut key = PolicyKey {
        endpoint: ep.rules_key,
        direction,
        peer_kind: PEER_ANY,
        _pad: [0; 2],
        peer: [0; 4],
        proto,
        port: dport.to_be_bytes(),
        _pad2: 0,
    };
    if let Some(value) = maps.rule(&key)? {
        return Ok(LiveSide::Allowed { rule_id: value.rule_id, by: "any peer" });
    }
    key.peer_kind = PEER_IDENTITY;
    key.peer = cache.identity.to_be_bytes();
    if let Some(value) = maps.rule(&key)? {
        return Ok(LiveSide::Allowed { rule_id: value.rule_id, by: "the peer's identity" });
    }
    if cache.cidr_class != 0 {
        key.peer_kind = PEER_CIDR_CLASS;
        key.peer = cache.cidr_class.to_be_bytes();
        if let Some(value) = maps.rule(&key)? {
            return Ok(LiveSide::Allowed { rule_id: value.rule_id, by: "the peer's CIDR class" });
        }
    }
    Ok(LiveSide::Dropped { policy_id, identity: cache.identity, cidr_class: cache.cidr_class })
}

/// `None` when the model's decision and the maps' agree; otherwise what differs.
pub fn disagreement(
    model: &Side,
    live: &LiveSide,
    endpoint: IpAddr,
    peer: IpAddr,
    direction: u8,
) -> Option<String> {
    let dir = if direction == DIR_EGRESS { "egress" } else { "ingress" };
    let maps = match live {
        LiveSide::NoEndpoint { dropped: false } => {
            format!("the maps have no entry for endpoint {endpoint} (it passes unchecked)")
        }
        LiveSide::NoEndpoint { dropped: true } => format!(
            "the maps have no entry for endpoint {endpoint} and unknown pods are denied (dropped \
             as not ready)"
        ),
        LiveSide::NotIsolated => format!("the maps say {endpoint}'s {dir} is not isolated"),
        LiveSide::OwnNode => format!("the maps' ipcache says {peer} is this node (host identity)"),
        LiveSide::Allowed { rule_id, by } => {
            format!("the maps allow it by rule id {rule_id} (matched on {by})")
        }
        LiveSide::Dropped { identity, cidr_class, .. } => format!(
            "the maps drop it: {endpoint}'s {dir} is isolated and no policy entry matches {peer} \
             (identity {identity}{})",
            if *cidr_class == 0 { String::new() } else { format!(", CIDR class {cidr_class}") }
        ),
    };
    let agrees = match (model, live) {
        (Side::NotIsolated, LiveSide::NotIsolated)
        | (Side::OwnNode, LiveSide::OwnNode)
        | (Side::Allowed(_), LiveSide::Allowed { .. })
        | (Side::Denied { .. }, LiveSide::Dropped { .. }) => true,
        // A side the model does not enforce (not a pod with policy) has no entry.
        (Side::NotEnforced, LiveSide::NoEndpoint { dropped: false }) => true,
        _ => false,
    };
    (!agrees).then(|| {
        let model = match model {
            Side::NotEnforced => "the model enforces nothing here".to_string(),
            Side::NotIsolated => "the model says no NetworkPolicy isolates it".into(),
            Side::OwnNode => "the model allows it as the pod's own node".into(),
            Side::Allowed(origin) => format!("the model allows it by {origin}"),
            Side::Denied { .. } => format!("the model denies it ({model})"),
        };
        format!("{model}, but {maps}")
    })
}

/// The policy maps pinned in a node's pin directory (opened read-only in effect: nothing is
/// written).
pub struct PinnedPolicyMaps {
    endpoints: HashMap<MapData, Addr, EndpointPolicy>,
    ipcache: LpmTrie<MapData, Addr, IpcacheValue>,
    rules: LpmTrie<MapData, PolicyKey, PolicyValue>,
    global: Array<MapData, PolicyGlobal>,
}

impl PinnedPolicyMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).map_err(|source| MapsError::OpenPinned { path, source })
        };
        let layout = |name: &'static str| move |source| MapsError::Layout { name, source };
        Ok(Self {
            endpoints: HashMap::try_from(Map::HashMap(open(POLICY_ENDPOINTS_MAP)?))
                .map_err(layout(POLICY_ENDPOINTS_MAP))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(open(IPCACHE_MAP)?))
                .map_err(layout(IPCACHE_MAP))?,
            rules: LpmTrie::try_from(Map::LpmTrie(open(POLICY_MAP)?))
                .map_err(layout(POLICY_MAP))?,
            global: Array::try_from(Map::Array(open(POLICY_GLOBAL_MAP)?))
                .map_err(layout(POLICY_GLOBAL_MAP))?,
        })
    }
}

/// A lookup that found nothing is `None`; any other failure is an error.
fn found<V>(
    result: Result<V, aya::maps::MapError>,
    name: &'static str,
) -> Result<Option<V>, MapsError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(MapsError::Layout { name, source }),
    }
}

impl PolicyMapsView for PinnedPolicyMaps {
    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointPolicy>, MapsError> {
        found(self.endpoints.get(&addr(ip), 0), POLICY_ENDPOINTS_MAP)
    }
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, MapsError> {
        found(self.ipcache.get(&Key::new(HOST_BITS, addr(ip)), 0), IPCACHE_MAP)
    }
    fn rule(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, MapsError> {
        found(self.rules.get(&Key::new(POLICY_KEY_FULL_BITS, *key), 0), POLICY_MAP)
    }
    fn deny_unknown(&self) -> Result<bool, MapsError> {
        Ok(found(self.global.get(&0, 0), POLICY_GLOBAL_MAP)?
            .is_some_and(|g| g.flags & GLOBAL_DENY_UNKNOWN != 0))
    }
}

/// The bytes of a policy key as the LPM trie compares them.
fn policy_key_bytes(key: &PolicyKey) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..16].copy_from_slice(&key.endpoint);
    out[16] = key.direction;
    out[17] = key.peer_kind;
    out[18..20].copy_from_slice(&key._pad);
    out[20..24].copy_from_slice(&key.peer);
    out[24] = key.proto;
    out[25..27].copy_from_slice(&key.port);
    out[27] = key._pad2;
    out
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// The desired map contents read the kernel's way: what the maps hold once written.
impl PolicyMapsView for DatapathPolicy {
    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointPolicy>, MapsError> {
        Ok(self.endpoints.get(&addr(ip)).copied())
    }
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, MapsError> {
        Ok(self
            .ipcache
            .iter()
            .filter(|((bits, prefix), _)| prefix_matches(prefix, &addr(ip), *bits))
            .max_by_key(|((bits, _), _)| *bits)
            .map(|(_, value)| *value))
    }
    fn rule(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, MapsError> {
        let wanted = policy_key_bytes(key);
        Ok(self
            .rules
            .iter()
            .filter(|((bits, entry), _)| prefix_matches(&policy_key_bytes(entry), &wanted, *bits))
            .max_by_key(|((bits, _), _)| *bits)
            .map(|(_, value)| *value))
    }
    fn deny_unknown(&self) -> Result<bool, MapsError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use weir_policy::ObjectRef;

    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use crate::policy::lower::prefix_key;
    use weir_common::policy::POLICY_KEY_FIXED_BITS;

    const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 2, 7));
    /// The pod's and the peer's IPv6 addresses (dual-stack).
    const POD6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 5));
    const PEER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 7));

    fn isolated_pod() -> DatapathPolicy {
        let mut maps = DatapathPolicy::default();
        let entry = EndpointPolicy {
            flags: EP_INGRESS_ISOLATED,
            identity: 300,
            ingress_policy: 4,
            egress_policy: 0,
            rules_key: addr(POD),
        };
        maps.endpoints.insert(addr(POD), entry);
        maps.endpoints.insert(addr(POD6), entry);
        let peer = IpcacheValue { identity: 301, cidr_class: 0 };
        maps.ipcache.insert((HOST_BITS, addr(PEER)), peer);
        maps.ipcache.insert((HOST_BITS, addr(PEER6)), peer);
        maps.ipcache.insert(
            prefix_key(&"10.244.0.0/16".parse().unwrap()),
            IpcacheValue { identity: 2, cidr_class: 9 },
        );
        // Identity 301 may reach TCP 80-81 (one /15 port prefix).
        let key = PolicyKey {
            endpoint: addr(POD),
            direction: DIR_INGRESS,
            peer_kind: PEER_IDENTITY,
            _pad: [0; 2],
            peer: 301u32.to_be_bytes(),
            proto: 6,
            port: 80u16.to_be_bytes(),
            _pad2: 0,
        };
        maps.rules
            .insert((POLICY_KEY_FIXED_BITS + 8 + 15, key), PolicyValue { rule_id: 12, _pad: 0 });
        maps
    }

    #[test]
    fn the_maps_are_read_as_the_program_reads_them() {
        let maps = isolated_pod();
        let eval = |peer, port| evaluate(&maps, DIR_INGRESS, POD, peer, 6, port).unwrap();
        assert_eq!(eval(PEER, 81), LiveSide::Allowed { rule_id: 12, by: "the peer's identity" });
        assert_eq!(
            eval(PEER, 82),
            LiveSide::Dropped { policy_id: 4, identity: 301, cidr_class: 0 }
        );
        // The pod's IPv6 address finds the same rules, from the peer's IPv6 address.
        let eval6 = |peer, port| evaluate(&maps, DIR_INGRESS, POD6, peer, 6, port).unwrap();
        assert_eq!(eval6(PEER6, 80), LiveSide::Allowed { rule_id: 12, by: "the peer's identity" });
        assert_eq!(
            eval6("fd00::9".parse().unwrap(), 80),
            LiveSide::Dropped { policy_id: 4, identity: 2, cidr_class: 0 }
        );
        // Another address of 10.244/16 takes the /16's class.
        assert_eq!(
            eval("10.244.9.9".parse().unwrap(), 80),
            LiveSide::Dropped { policy_id: 4, identity: 2, cidr_class: 9 }
        );
        assert_eq!(evaluate(&maps, DIR_EGRESS, POD, PEER, 6, 80).unwrap(), LiveSide::NotIsolated);
        assert_eq!(
            evaluate(&maps, DIR_INGRESS, PEER, POD, 6, 80).unwrap(),
            LiveSide::NoEndpoint { dropped: false }
        );
    }

    #[test]
    fn disagreements_say_what_each_side_thinks() {
        let denied = Side::Denied { isolated_by: vec![ObjectRef::new("x", "deny-all")] };
        let dropped = LiveSide::Dropped { policy_id: 4, identity: 301, cidr_class: 0 };
        assert_eq!(disagreement(&denied, &dropped, POD, PEER, DIR_INGRESS), None);
        let why = disagreement(
            &Side::NotIsolated,
            &LiveSide::NoEndpoint { dropped: false },
            POD,
            PEER,
            DIR_INGRESS,
        )
        .unwrap();
        assert!(why.contains("no entry for endpoint 10.244.1.5"), "{why}");
        let why = disagreement(&denied, &LiveSide::NotIsolated, POD, PEER, DIR_EGRESS).unwrap();
        assert!(
            why.starts_with(
                "the model denies it (denied: no rule allows it (isolated by x/deny-all))"
            ),
            "{why}"
        );
        assert!(why.ends_with("10.244.1.5's egress is not isolated"), "{why}");
        let why = disagreement(&Side::NotIsolated, &dropped, POD, PEER, DIR_INGRESS).unwrap();
        assert!(why.contains("no policy entry matches 10.244.2.7 (identity 301)"), "{why}");
    }

    #[test]
    fn prefixes_compare_leading_bits() {
        assert!(prefix_matches(&[0b1010_0000], &[0b1011_1111], 3));
        assert!(!prefix_matches(&[0b1010_0000], &[0b1011_1111], 4));
        assert!(prefix_matches(&[1, 2, 3], &[1, 2, 4], 16));
        assert!(prefix_matches(&[1, 2], &[9, 9], 0));
    }
}
