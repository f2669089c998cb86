//! Compiled policy -> the contents of `weir_pol_ep_v1`, `weir_ipcache4_v1` and
//! `weir_policy_v1` (IPv4). Pure: the agent keeps the previous [`DatapathPolicy`] and writes
//! only the [`diff`]. Identities, CIDR classes, rule ids and policy ids are stable across
//! calls, so one more rule changes only its own entries.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use weir_common::policy::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointPolicy, IpcacheValue,
    PEER_ANY, PEER_CIDR_CLASS, PEER_IDENTITY, POLICY_KEY_FIXED_BITS, PolicyKey, PolicyValue,
};
use weir_policy::{
    Allow, CidrClasses, Compiled, Direction, DirectionPolicy, Origin, PeerMatch, PolicyRef,
    identity::{IDENTITY_HOST, IDENTITY_WORLD, IdAllocator},
};

/// The desired contents of the policy maps. LPM keys are (prefix length, data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathPolicy {
    pub endpoints: BTreeMap<[u8; 4], EndpointPolicy>,
    pub ipcache: BTreeMap<(u32, [u8; 4]), IpcacheValue>,
    pub rules: BTreeMap<(u32, PolicyKey), PolicyValue>,
}

/// Keeps the numbering (CIDR classes, rule ids, policy ids) stable between lowerings.
#[derive(Clone, Debug)]
pub struct Lowering {
    classes: CidrClasses,
    rule_ids: IdAllocator<Origin>,
    policy_ids: IdAllocator<PolicyRef>,
    /// Rule id -> the rule it stands for (flow events and drops name rules by id).
    pub rules_by_id: BTreeMap<u32, Origin>,
    /// Policy id -> policy.
    pub policies_by_id: BTreeMap<u32, PolicyRef>,
}

impl Default for Lowering {
    fn default() -> Self {
        Self {
            classes: CidrClasses::default(),
            rule_ids: IdAllocator::new(1),
            policy_ids: IdAllocator::new(1),
            rules_by_id: BTreeMap::new(),
            policies_by_id: BTreeMap::new(),
        }
    }
}

impl Lowering {
    /// The map contents for `compiled` (compiled for this node) on a node with `host` addresses.
    pub fn lower(&mut self, compiled: &Compiled, host: &[Ipv4Addr]) -> DatapathPolicy {
        let directions = |e: &weir_policy::EndpointPolicy| [e.ingress.clone(), e.egress.clone()];
        self.classes.update(
            compiled
                .endpoints
                .values()
                .flat_map(directions)
                .flat_map(|d| d.allow)
                .filter_map(|a| match a.peer {
                    PeerMatch::Block(block) => Some(block),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .iter(),
        );
        let origins = compiled
            .endpoints
            .values()
            .flat_map(directions)
            .flat_map(|d| d.allow.into_iter().map(|a| a.origin));
        let rule_ids = self.rule_ids.assign(origins);
        let policies = compiled.endpoints.values().flat_map(directions).flat_map(|d| d.isolated_by);
        let policy_ids = self.policy_ids.assign(policies);
        self.rules_by_id = rule_ids.iter().map(|(o, id)| (*id, o.clone())).collect();
        self.policies_by_id = policy_ids.iter().map(|(p, id)| (*id, p.clone())).collect();

        let mut out = DatapathPolicy::default();
        for (prefix, class) in self.classes.prefixes() {
            if let IpAddr::V4(addr) = prefix.addr() {
                out.ipcache.insert(
                    (u32::from(prefix.prefix_len()), addr.octets()),
                    IpcacheValue { identity: IDENTITY_WORLD, cidr_class: *class },
                );
            }
        }
        let mut cache_host = |ip: Ipv4Addr, identity: u32| {
            let cidr_class = self.classes.class_of(IpAddr::V4(ip));
            out.ipcache.insert((32, ip.octets()), IpcacheValue { identity, cidr_class });
        };
        for (ip, pod) in &compiled.pod_ips {
            if let (IpAddr::V4(ip), Some(identity)) = (ip, compiled.pods[pod].identity) {
                cache_host(*ip, identity);
            }
        }
        for ip in host {
            cache_host(*ip, IDENTITY_HOST);
        }

        for (pod, policy) in &compiled.endpoints {
            let entry = endpoint_entry(policy, |p| policy_ids[p]);
            for ip in &compiled.pods[pod].ips {
                let IpAddr::V4(ip) = ip else { continue };
                let endpoint = ip.octets();
                out.endpoints.insert(endpoint, entry);
                for direction in [Direction::Ingress, Direction::Egress] {
                    for allow in &policy.direction(direction).allow {
                        let value = PolicyValue { rule_id: rule_ids[&allow.origin], _pad: 0 };
                        for key in allow_keys(endpoint, direction, allow, &self.classes) {
                            insert_rule(&mut out.rules, key, value);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Adds a rule entry; when several allow entries give the same key, the lowest rule id wins
/// (so the result does not depend on the order entries are added in).
fn insert_rule(
    rules: &mut BTreeMap<(u32, PolicyKey), PolicyValue>,
    key: (u32, PolicyKey),
    value: PolicyValue,
) {
    rules
        .entry(key)
        .and_modify(|v| {
            if value.rule_id < v.rule_id {
                *v = value;
            }
        })
        .or_insert(value);
}

/// The `weir_pol_ep_v1` value of an endpoint; `policy_id` numbers the first isolating policy
/// of each direction (drops are counted against it).
pub(crate) fn endpoint_entry(
    policy: &weir_policy::EndpointPolicy,
    policy_id: impl Fn(&PolicyRef) -> u32,
) -> EndpointPolicy {
    let first_policy = |d: &DirectionPolicy| d.isolated_by.first().map_or(0, &policy_id);
    let mut flags = 0;
    if policy.ingress.is_isolated() {
        flags |= EP_INGRESS_ISOLATED;
    }
    if policy.egress.is_isolated() {
        flags |= EP_EGRESS_ISOLATED;
    }
    EndpointPolicy {
        flags,
        identity: policy.identity,
        ingress_policy: first_policy(&policy.ingress),
        egress_policy: first_policy(&policy.egress),
    }
}

/// The `weir_policy_v1` keys of one allow entry of `endpoint` in `direction`.
pub(crate) fn allow_keys(
    endpoint: [u8; 4],
    direction: Direction,
    allow: &Allow,
    classes: &CidrClasses,
) -> Vec<(u32, PolicyKey)> {
    let dir = match direction {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    };
    let peers: Vec<(u8, u32)> = match &allow.peer {
        PeerMatch::Any => vec![(PEER_ANY, 0)],
        PeerMatch::Identity(id) => vec![(PEER_IDENTITY, *id)],
        PeerMatch::Block(block) => {
            classes.classes_in(block).into_iter().map(|c| (PEER_CIDR_CLASS, c)).collect()
        }
    };
    let mut out = Vec::new();
    for (peer_kind, peer) in peers {
        let base = PolicyKey {
            endpoint,
            direction: dir,
            peer_kind,
            _pad: [0; 2],
            peer: peer.to_be_bytes(),
            proto: 0,
            port: [0; 2],
            _pad2: 0,
        };
        out.extend(keys_for(base, allow.protocol.map(|p| p.number()), allow.ports));
    }
    out
}

/// The LPM keys of one (protocol, port range): the fixed part alone for every protocol, plus
/// the protocol for every port, plus one prefix of the port per aligned block of the range.
fn keys_for(
    base: PolicyKey,
    protocol: Option<u8>,
    ports: Option<(u16, u16)>,
) -> Vec<(u32, PolicyKey)> {
    let Some(proto) = protocol else { return vec![(POLICY_KEY_FIXED_BITS, base)] };
    let with_proto = PolicyKey { proto, ..base };
    let Some((lo, hi)) = ports else { return vec![(POLICY_KEY_FIXED_BITS + 8, with_proto)] };
    port_prefixes(lo, hi)
        .into_iter()
        .map(|(port, bits)| {
            (
                POLICY_KEY_FIXED_BITS + 8 + u32::from(bits),
                PolicyKey { port: port.to_be_bytes(), ..with_proto },
            )
        })
        .collect()
}

/// The smallest list of (base, prefix bits) whose port blocks cover exactly `lo..=hi`.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(lo), u32::from(hi));
    while start <= end {
        let mut size = start.trailing_zeros().min(16);
        while size > 0 && start + (1 << size) - 1 > end {
            size -= 1;
        }
        out.push((start as u16, 16 - size as u8));
        start += 1 << size;
    }
    out
}

/// Entries to write and keys to delete to go from one map content to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upserts: new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: old.keys().filter(|k| !new.contains_key(*k)).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_exact_prefix_blocks() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
        assert_eq!(port_prefixes(81, 90), vec![(81, 16), (82, 15), (84, 14), (88, 15), (90, 16)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        for (lo, hi) in [(1u16, 65535u16), (79, 80), (1000, 2000), (65535, 65535), (32768, 40000)] {
            let mut covered = Vec::new();
            for (base, bits) in port_prefixes(lo, hi) {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(base) % size, 0, "aligned");
                covered.extend((0..size).map(|i| u32::from(base) + i));
            }
            assert_eq!(covered, (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn diff_lists_only_changes() {
        let old = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let new = BTreeMap::from([(1, "a"), (2, "B"), (4, "d")]);
        let d = diff(&old, &new);
        assert_eq!(d.upserts, vec![(2, "B"), (4, "d")]);
        assert_eq!(d.deletes, vec![3]);
    }
}
