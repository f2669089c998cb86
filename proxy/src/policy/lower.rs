//! Compiled policy -> the contents of `weir_pol_ep_v2`, `weir_ipcache_v2` and
//! `weir_policy_v2` (IPv4 and IPv6: addresses in the maps' 16-byte form, see [`addr`]). Pure:
//! the agent keeps the previous [`DatapathPolicy`] and writes only the [`diff`]. Identities,
//! CIDR classes, rule ids and policy ids are stable across calls, so one more rule changes
//! only its own entries. A pod's rules are keyed once by its rule address ([`rules_key`]),
//! whatever the number of its addresses.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
};

use weir_common::policy::{
    Addr, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointPolicy,
    IpcacheValue, PEER_ANY, PEER_CIDR_CLASS, PEER_IDENTITY, POLICY_KEY_FIXED_BITS, PolicyKey,
    PolicyValue, V4_MAPPED_BITS, v4_mapped,
};
use weir_policy::{
    Allow, Cidr, CidrClasses, Compiled, Direction, DirectionPolicy, Origin, PeerMatch, PolicyRef,
    identity::{IDENTITY_HOST, IDENTITY_WORLD, IdAllocator},
};

/// The desired contents of the policy maps. LPM keys are (prefix length, data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathPolicy {
    pub endpoints: BTreeMap<Addr, EndpointPolicy>,
    pub ipcache: BTreeMap<(u32, Addr), IpcacheValue>,
    pub rules: BTreeMap<(u32, PolicyKey), PolicyValue>,
}

/// The prefix length of one address in the ipcache.
pub const HOST_BITS: u32 = 128;

/// An address in the maps' form: IPv6 as is, IPv4 mapped (`::ffff:a.b.c.d`).
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a map key stands for (an IPv4-mapped one as IPv4).
pub fn ip_of(addr: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The ipcache key of a prefix (an IPv4 prefix of length n is the mapped one of 96 + n).
pub fn prefix_key(cidr: &Cidr) -> (u32, Addr) {
    let extra = if cidr.is_ipv4() { V4_MAPPED_BITS } else { 0 };
    (extra + u32::from(cidr.prefix_len()), addr(cidr.addr()))
}

/// The prefix an ipcache key stands for; `None` for a key no lowering writes.
pub fn cidr_of((bits, data): (u32, Addr)) -> Option<Cidr> {
    let ip = ip_of(data);
    let bits = if ip.is_ipv4() { bits.checked_sub(V4_MAPPED_BITS)? } else { bits };
    Cidr::new(ip, u8::try_from(bits).ok()?)
}

/// The ipcache key of `::ffff:0:0/96`, every IPv4 address.
pub const V4_KEY: (u32, Addr) = (V4_MAPPED_BITS, v4_mapped([0; 4]));

/// The ipcache value of [`V4_KEY`]. IPv4 addresses sit inside the IPv6 space of the maps
/// (`::ffff:0:0/96`), so an IPv6 ipBlock around that range (`::/0`, `::/64`, ...) would be the
/// longest match of an IPv4 peer no IPv4 prefix contains: while such a prefix exists, this
/// entry (world, no class) stops IPv4 lookups at the IPv4 range. An IPv4 `0.0.0.0/0` block is
/// that very key, with its class.
pub fn v4_range_entry(classes: &CidrClasses) -> Option<IpcacheValue> {
    let v4_range = IpAddr::V6(Ipv6Addr::from(V4_KEY.1));
    let mut covering_v6 = false;
    for (prefix, class) in classes.prefixes() {
        if prefix.is_ipv4() && prefix.prefix_len() == 0 {
            return Some(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: *class });
        }
        covering_v6 |= !prefix.is_ipv4()
            && u32::from(prefix.prefix_len()) <= V4_MAPPED_BITS
            && prefix.contains_ip(v4_range);
    }
    covering_v6.then_some(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: 0 })
}

/// Whether a change of `prefix` may change [`v4_range_entry`].
pub fn touches_v4_range(prefix: &Cidr) -> bool {
    if prefix.is_ipv4() {
        return prefix.prefix_len() == 0;
    }
    u32::from(prefix.prefix_len()) <= V4_MAPPED_BITS
        && prefix.contains_ip(IpAddr::V6(Ipv6Addr::from(V4_KEY.1)))
}

/// The address a pod's rules are keyed by in the policy LPM: the lowest of its addresses (an
/// IPv4 one if it has any). Every address of the pod names it in its endpoint entry.
pub fn rules_key(ips: &[IpAddr]) -> Option<Addr> {
    ips.iter().min().map(|ip| addr(*ip))
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
    pub fn lower(&mut self, compiled: &Compiled, host: &[IpAddr]) -> DatapathPolicy {
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
            out.ipcache.insert(
                prefix_key(prefix),
                IpcacheValue { identity: IDENTITY_WORLD, cidr_class: *class },
            );
        }
        if let Some(value) = v4_range_entry(&self.classes) {
            out.ipcache.insert(V4_KEY, value);
        }
        let mut cache_host = |ip: IpAddr, identity: u32| {
            let cidr_class = self.classes.class_of(ip);
            out.ipcache.insert((HOST_BITS, addr(ip)), IpcacheValue { identity, cidr_class });
        };
        for (ip, pod) in &compiled.pod_ips {
            if let Some(identity) = compiled.pods[pod].identity {
                cache_host(*ip, identity);
            }
        }
        for ip in host {
            cache_host(*ip, IDENTITY_HOST);
        }

        for (pod, policy) in &compiled.endpoints {
            let ips = &compiled.pods[pod].ips;
            let Some(endpoint) = rules_key(ips) else { continue };
            let entry = endpoint_entry(policy, endpoint, |p| policy_ids[p]);
            for ip in ips {
                out.endpoints.insert(addr(*ip), entry);
            }
            for direction in [Direction::Ingress, Direction::Egress] {
                for allow in &policy.direction(direction).allow {
                    let value = PolicyValue { rule_id: rule_ids[&allow.origin], _pad: 0 };
                    for key in allow_keys(endpoint, direction, allow, &self.classes) {
                        insert_rule(&mut out.rules, key, value);
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

/// The `weir_pol_ep_v2` value of an endpoint whose rules are keyed by `rules_key`;
/// `policy_id` numbers the first isolating policy of each direction (drops are counted
/// against it).
pub(crate) fn endpoint_entry(
    policy: &weir_policy::EndpointPolicy,
    rules_key: Addr,
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
        rules_key,
    }
}

/// The `weir_policy_v2` keys of one allow entry of `endpoint` (a rule address) in `direction`.
pub(crate) fn allow_keys(
    endpoint: Addr,
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
    fn addresses_and_prefixes_map_both_families() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(addr(v4), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(ip_of(addr(v4)), v4);
        assert_eq!(ip_of(addr(v6)), v6);
        for cidr in ["10.0.0.0/8", "0.0.0.0/0", "10.1.2.3/32", "fd00::/64", "::/0"] {
            let cidr: Cidr = cidr.parse().unwrap();
            assert_eq!(cidr_of(prefix_key(&cidr)), Some(cidr), "{cidr}");
        }
        assert_eq!(prefix_key(&"10.0.0.0/8".parse().unwrap()).0, 104);
        assert_eq!(rules_key(&[v6, v4]), Some(addr(v4)));
        assert_eq!(rules_key(&[v6]), Some(addr(v6)));
        assert_eq!(rules_key(&[]), None);
    }

    #[test]
    fn the_ipv4_range_stops_ipv6_blocks_around_it() {
        let classes = |prefixes: &[&str]| {
            let mut classes = CidrClasses::default();
            let blocks: Vec<weir_policy::IpBlock> = prefixes
                .iter()
                .map(|p| weir_policy::IpBlock { cidr: p.parse().unwrap(), except: Vec::new() })
                .collect();
            classes.update(blocks.iter());
            classes
        };
        let world = |class| Some(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: class });
        assert_eq!(v4_range_entry(&classes(&["fd00::/64", "10.0.0.0/8"])), None);
        assert_eq!(v4_range_entry(&classes(&["::/0"])), world(0));
        assert_eq!(v4_range_entry(&classes(&["::/80"])), world(0));
        let both = classes(&["::/0", "0.0.0.0/0"]);
        let v4_class = both.prefixes()[&"0.0.0.0/0".parse::<Cidr>().unwrap()];
        assert_eq!(v4_range_entry(&both), world(v4_class));
        assert!(touches_v4_range(&"::/0".parse().unwrap()));
        assert!(touches_v4_range(&"0.0.0.0/0".parse().unwrap()));
        assert!(!touches_v4_range(&"fd00::/8".parse().unwrap()));
        assert!(!touches_v4_range(&"10.0.0.0/8".parse().unwrap()));
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
