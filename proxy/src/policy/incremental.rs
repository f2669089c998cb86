//! [`IncrementalLowering`]: the eBPF map contents of [`Lowering`](super::Lowering), kept up
//! to date from a [`Delta`] of the incremental compiler, so a change costs what it touches
//! (one more policy selecting one pod: its own slice), not the size of the node's policy.
//!
//! The rules map is the union of what each (endpoint, direction, policy) slice gives; a key
//! given by several slices keeps the lowest rule id (as the full lowering does). Rule ids,
//! policy ids and CIDR classes are reference counted and numbered as the full lowering numbers
//! them, so after every update the contents are exactly those [`Lowering::lower`] gives for
//! the same sequence of compiled states (checked over random change sequences in the tests).
//! When the set of ipBlock prefixes changes, the classes of addresses inside a changed prefix
//! and the slices with a block around it are lowered again (found by prefix, not by scanning).
//!
//! [`Lowering::lower`]: super::Lowering::lower
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use weir_common::policy::{Addr, EndpointPolicy, IpcacheValue, PolicyKey, PolicyValue};
use weir_policy::{
    Allow, Cidr, CidrClasses, Compiled, Delta, Direction, IpBlock, Origin, PeerMatch, PodRef,
    PolicyRef,
    identity::{IDENTITY_HOST, IDENTITY_WORLD, IdAllocator},
};

use super::{
    lower::{
        DatapathPolicy, HOST_BITS, MapDiff, V4_KEY, addr, allow_keys, cidr_of, endpoint_entry,
        ip_of, prefix_key, rules_key, touches_v4_range, v4_range_entry,
    },
    names::Numbering,
};

type SliceKey = (PodRef, Direction, PolicyRef);
type RuleKey = (u32, PolicyKey);

/// What one slice put in the maps.
#[derive(Clone, Debug, Default)]
struct Slice {
    origins: Vec<Origin>,
    blocks: Vec<IpBlock>,
    /// Rule keys and the rule id each was given.
    keys: Vec<(RuleKey, u32)>,
}

/// The changes of one update, per map, as the entries to write and the keys to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathDelta {
    pub endpoints: MapDiff<Addr, EndpointPolicy>,
    pub ipcache: MapDiff<(u32, Addr), IpcacheValue>,
    pub rules: MapDiff<RuleKey, PolicyValue>,
    /// Rule ids and policy ids whose meaning changed (given, or given back).
    pub rule_ids: BTreeSet<u32>,
    pub policy_ids: BTreeSet<u32>,
}

impl DatapathDelta {
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.ipcache.len() + self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Old values of the keys an update touched (`None`: absent before).
#[derive(Debug, Default)]
struct Touched {
    endpoints: BTreeMap<Addr, Option<EndpointPolicy>>,
    ipcache: BTreeMap<(u32, Addr), Option<IpcacheValue>>,
    rules: BTreeMap<RuleKey, Option<PolicyValue>>,
}

fn set<K: Ord + Clone, V: Clone>(
    map: &mut BTreeMap<K, V>,
    touched: &mut BTreeMap<K, Option<V>>,
    key: K,
    value: Option<V>,
) {
    let old = match value {
        Some(value) => map.insert(key.clone(), value),
        None => map.remove(&key),
    };
    touched.entry(key).or_insert(old);
}

fn changes<K: Ord + Clone, V: PartialEq + Clone>(
    map: &BTreeMap<K, V>,
    touched: BTreeMap<K, Option<V>>,
) -> MapDiff<K, V> {
    let mut out = MapDiff { upserts: Vec::new(), deletes: Vec::new() };
    for (key, old) in touched {
        match (old, map.get(&key)) {
            (old, Some(new)) if old.as_ref() != Some(new) => out.upserts.push((key, new.clone())),
            (Some(_), None) => out.deletes.push(key),
            _ => {}
        }
    }
    out
}

/// Drops what is both in `gone` and `new` (it went and came back in one update: it keeps
/// its number).
fn settle<T: Ord + Clone>(gone: &mut BTreeSet<T>, new: &mut BTreeSet<T>) {
    let both: Vec<T> = gone.intersection(new).cloned().collect();
    for item in both {
        gone.remove(&item);
        new.remove(&item);
    }
}

/// Counts references; returns whether the count left or reached zero.
pub(crate) fn count<K: Ord + Clone>(refs: &mut BTreeMap<K, usize>, key: &K, up: bool) -> bool {
    if up {
        let n = refs.entry(key.clone()).or_default();
        *n += 1;
        *n == 1
    } else {
        let Some(n) = refs.get_mut(key) else { return false };
        *n -= 1;
        if *n == 0 {
            refs.remove(key);
            true
        } else {
            false
        }
    }
}

/// Local endpoints' addresses and, per address, the endpoints that have it (the greatest
/// decides the address's endpoint entry, as in the full lowering).
#[derive(Clone, Debug)]
pub(crate) struct EndpointAddresses<A = IpAddr> {
    by_pod: BTreeMap<PodRef, Vec<A>>,
    by_ip: BTreeMap<A, BTreeSet<PodRef>>,
}

impl<A> Default for EndpointAddresses<A> {
    fn default() -> Self {
        Self { by_pod: BTreeMap::new(), by_ip: BTreeMap::new() }
    }
}

impl<A: Ord + Clone> EndpointAddresses<A> {
    /// Sets (`None`: removes) an endpoint's addresses; returns the old ones.
    pub(crate) fn set(&mut self, pod: &PodRef, ips: Option<Vec<A>>) -> Vec<A> {
        let old = self.by_pod.remove(pod).unwrap_or_default();
        for ip in &old {
            if let Some(set) = self.by_ip.get_mut(ip) {
                set.remove(pod);
                if set.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(ips) = ips {
            for ip in &ips {
                self.by_ip.entry(ip.clone()).or_default().insert(pod.clone());
            }
            self.by_pod.insert(pod.clone(), ips);
        }
        old
    }

    pub(crate) fn of(&self, pod: &PodRef) -> Option<&Vec<A>> {
        self.by_pod.get(pod)
    }

    /// The endpoint whose entry an address gets.
    pub(crate) fn holder(&self, ip: &A) -> Option<&PodRef> {
        self.by_ip.get(ip).and_then(|pods| pods.last())
    }

    pub(crate) fn pods(&self) -> impl Iterator<Item = &PodRef> {
        self.by_pod.keys()
    }

    pub(crate) fn addresses(&self) -> impl Iterator<Item = &A> {
        self.by_ip.keys()
    }
}

#[derive(Clone, Debug)]
pub struct IncrementalLowering {
    desired: DatapathPolicy,
    classes: CidrClasses,
    rule_ids: IdAllocator<Origin>,
    policy_ids: IdAllocator<PolicyRef>,
    /// Rule id -> the rule it stands for.
    pub rules_by_id: BTreeMap<u32, Origin>,
    /// Policy id -> policy.
    pub policies_by_id: BTreeMap<u32, PolicyRef>,
    host: Vec<IpAddr>,
    slices: BTreeMap<SliceKey, Slice>,
    endpoints: EndpointAddresses,
    /// Every pod's addresses as lowered into the ipcache.
    pod_ips: BTreeMap<PodRef, Vec<IpAddr>>,
    origin_refs: BTreeMap<Origin, usize>,
    policy_refs: BTreeMap<PolicyRef, usize>,
    prefix_refs: BTreeMap<Cidr, usize>,
    /// Rule key -> rule id -> how many slice entries give it.
    rule_refs: BTreeMap<RuleKey, BTreeMap<u32, usize>>,
    /// Block cidr -> the slices with a block of that cidr.
    slices_by_cidr: BTreeMap<Cidr, BTreeSet<SliceKey>>,
}

impl Default for IncrementalLowering {
    fn default() -> Self {
        Self {
            desired: DatapathPolicy::default(),
            classes: CidrClasses::default(),
            rule_ids: IdAllocator::new(1),
            policy_ids: IdAllocator::new(1),
            rules_by_id: BTreeMap::new(),
            policies_by_id: BTreeMap::new(),
            host: Vec::new(),
            slices: BTreeMap::new(),
            endpoints: EndpointAddresses::default(),
            pod_ips: BTreeMap::new(),
            origin_refs: BTreeMap::new(),
            policy_refs: BTreeMap::new(),
            prefix_refs: BTreeMap::new(),
            rule_refs: BTreeMap::new(),
            slices_by_cidr: BTreeMap::new(),
        }
    }
}

fn blocks(allow: &[Allow]) -> Vec<IpBlock> {
    allow
        .iter()
        .filter_map(|a| match &a.peer {
            PeerMatch::Block(block) => Some(block.clone()),
            _ => None,
        })
        .collect()
}

impl IncrementalLowering {
    /// What the rule and policy ids stand for.
    pub fn numbering(&self) -> Numbering<'_> {
        Numbering { rules_by_id: &self.rules_by_id, policies_by_id: &self.policies_by_id }
    }

    /// The map contents as of the last update.
    pub fn desired(&self) -> &DatapathPolicy {
        &self.desired
    }

    /// Takes a whole compiled state (after adoption, a failed write, or the periodic
    /// resync): an update naming every endpoint and pod, old and new. Numbers of what stays
    /// are kept.
    pub fn rebuild(&mut self, compiled: &Compiled, host: &[IpAddr]) -> DatapathDelta {
        let delta = Delta {
            pods: self.pod_ips.keys().chain(compiled.pods.keys()).cloned().collect(),
            endpoints: self.endpoints.pods().chain(compiled.endpoints.keys()).cloned().collect(),
            ..Delta::default()
        };
        self.update(compiled, &delta, host)
    }

    /// Brings the contents up to `compiled`, which differs from the previous update's state
    /// by `delta`; returns what changed in the maps.
    pub fn update(&mut self, compiled: &Compiled, delta: &Delta, host: &[IpAddr]) -> DatapathDelta {
        let mut touched = Touched::default();
        let mut refresh_ips: BTreeSet<IpAddr> = BTreeSet::new();
        if host != self.host {
            refresh_ips.extend(self.host.iter().chain(host));
            self.host = host.to_vec();
        }

        // Which slices go and come: every slice of a changed endpoint, and the named ones.
        let mut remove: BTreeSet<SliceKey> = BTreeSet::new();
        let mut add: BTreeSet<SliceKey> = BTreeSet::new();
        let mut endpoints_touched: BTreeSet<PodRef> = BTreeSet::new();
        let mut endpoint_ips: BTreeSet<IpAddr> = BTreeSet::new();
        for pod in &delta.endpoints {
            let start = (pod.clone(), Direction::Ingress, PolicyRef::new("", ""));
            remove.extend(
                self.slices.range(start..).take_while(|(k, _)| &k.0 == pod).map(|(k, _)| k.clone()),
            );
            if let Some(endpoint) = compiled.endpoints.get(pod) {
                for direction in [Direction::Ingress, Direction::Egress] {
                    for policy in &endpoint.direction(direction).isolated_by {
                        add.insert((pod.clone(), direction, policy.clone()));
                    }
                }
            }
            endpoints_touched.insert(pod.clone());
            // The endpoint's addresses.
            let new_ips = if compiled.endpoints.contains_key(pod) {
                compiled.pods.get(pod).map(|e| e.ips.clone()).unwrap_or_default()
            } else {
                Vec::new()
            };
            let new_ips = compiled.endpoints.contains_key(pod).then_some(new_ips);
            endpoint_ips.extend(self.endpoints.set(pod, new_ips));
        }
        for key in &delta.slices {
            if self.slices.contains_key(key) {
                remove.insert(key.clone());
            }
            let (pod, direction, policy) = key;
            let isolated = compiled
                .endpoints
                .get(pod)
                .is_some_and(|e| e.direction(*direction).isolated_by.binary_search(policy).is_ok());
            if isolated {
                add.insert(key.clone());
            }
            endpoints_touched.insert(pod.clone());
        }

        // Slices going: their references and rule entries.
        let mut gone_origins = BTreeSet::new();
        let mut gone_policies = BTreeSet::new();
        let mut gone_prefixes = BTreeSet::new();
        let mut rule_keys: BTreeSet<RuleKey> = BTreeSet::new();
        for key in &remove {
            let slice = self.slices.remove(key).expect("listed from the slices");
            for origin in &slice.origins {
                if count(&mut self.origin_refs, origin, false) {
                    gone_origins.insert(origin.clone());
                }
            }
            if count(&mut self.policy_refs, &key.2, false) {
                gone_policies.insert(key.2.clone());
            }
            for block in &slice.blocks {
                self.unindex_block(block, key);
                for prefix in prefixes(block) {
                    if count(&mut self.prefix_refs, &prefix, false) {
                        gone_prefixes.insert(prefix);
                    }
                }
            }
            self.drop_keys(&slice.keys, &mut rule_keys);
        }
        // Slices coming: their references (keys come once every number is known).
        let mut new_origins = BTreeSet::new();
        let mut new_policies = BTreeSet::new();
        let mut new_prefixes = BTreeSet::new();
        for key in &add {
            let allow = slice_allow(compiled, key);
            let slice = Slice {
                origins: allow.iter().map(|a| a.origin.clone()).collect(),
                blocks: blocks(allow),
                keys: Vec::new(),
            };
            for origin in &slice.origins {
                if count(&mut self.origin_refs, origin, true) {
                    new_origins.insert(origin.clone());
                }
            }
            if count(&mut self.policy_refs, &key.2, true) {
                new_policies.insert(key.2.clone());
            }
            for block in &slice.blocks {
                self.slices_by_cidr.entry(block.cidr).or_default().insert(key.clone());
                for prefix in prefixes(block) {
                    if count(&mut self.prefix_refs, &prefix, true) {
                        new_prefixes.insert(prefix);
                    }
                }
            }
            self.slices.insert(key.clone(), slice);
        }

        // Numbering: what went gives its number back, then what came takes one.
        settle(&mut gone_origins, &mut new_origins);
        settle(&mut gone_policies, &mut new_policies);
        settle(&mut gone_prefixes, &mut new_prefixes);
        let mut rule_ids_changed = BTreeSet::new();
        for origin in &gone_origins {
            if let Some(id) = self.rule_ids.get(origin) {
                self.rules_by_id.remove(&id);
                rule_ids_changed.insert(id);
            }
        }
        self.rule_ids.change(gone_origins, new_origins.iter().cloned());
        for origin in new_origins {
            let id = self.rule_ids.get(&origin).expect("just numbered");
            self.rules_by_id.insert(id, origin);
            rule_ids_changed.insert(id);
        }
        let mut policy_ids_changed = BTreeSet::new();
        for policy in &gone_policies {
            if let Some(id) = self.policy_ids.get(policy) {
                self.policies_by_id.remove(&id);
                policy_ids_changed.insert(id);
            }
        }
        self.policy_ids.change(gone_policies, new_policies.iter().cloned());
        for policy in new_policies {
            let id = self.policy_ids.get(&policy).expect("just numbered");
            self.policies_by_id.insert(id, policy);
            policy_ids_changed.insert(id);
        }

        // CIDR classes: prefix entries, addresses inside changed prefixes, slices with a block
        // around one.
        let changed_prefixes: Vec<Cidr> =
            gone_prefixes.iter().chain(&new_prefixes).copied().collect();
        self.classes.change(gone_prefixes.iter().copied(), new_prefixes.iter().copied());
        let mut rekey: BTreeSet<SliceKey> = BTreeSet::new();
        let mut ipcache_keys: BTreeSet<(u32, Addr)> = BTreeSet::new();
        for prefix in &changed_prefixes {
            ipcache_keys.insert(prefix_key(prefix));
            if touches_v4_range(prefix) {
                ipcache_keys.insert(V4_KEY);
            }
            let range = prefix.addr()..=prefix.last();
            refresh_ips.extend(compiled.pod_ips.range(range.clone()).map(|(ip, _)| *ip));
            refresh_ips.extend(self.host.iter().filter(|h| prefix.contains_ip(**h)));
            for len in 0..=prefix.prefix_len() {
                let Some(around) = Cidr::new(prefix.addr(), len) else { continue };
                if let Some(slices) = self.slices_by_cidr.get(&around) {
                    rekey.extend(slices.iter().filter(|k| !add.contains(*k)).cloned());
                }
            }
        }

        // Rule entries of the new slices and of those whose blocks' classes changed.
        for key in &rekey {
            let old = std::mem::take(&mut self.slices.get_mut(key).expect("indexed").keys);
            self.drop_keys(&old, &mut rule_keys);
        }
        for key in add.iter().chain(&rekey) {
            let endpoint = self.endpoints.of(&key.0).and_then(|ips| rules_key(ips));
            let allow = slice_allow(compiled, key);
            let mut keys = Vec::new();
            if let Some(endpoint) = endpoint {
                for allow in allow {
                    let rule_id = self.rule_ids.get(&allow.origin).expect("numbered");
                    for rule_key in allow_keys(endpoint, key.1, allow, &self.classes) {
                        keys.push((rule_key, rule_id));
                    }
                }
            }
            for (rule_key, rule_id) in &keys {
                *self.rule_refs.entry(*rule_key).or_default().entry(*rule_id).or_default() += 1;
                rule_keys.insert(*rule_key);
            }
            self.slices.get_mut(key).expect("added").keys = keys;
        }
        for rule_key in rule_keys {
            let value = self
                .rule_refs
                .get(&rule_key)
                .and_then(|ids| ids.keys().next())
                .map(|rule_id| PolicyValue { rule_id: *rule_id, _pad: 0 });
            set(&mut self.desired.rules, &mut touched.rules, rule_key, value);
        }

        // Endpoint entries of the touched endpoints' addresses (new and old).
        for pod in &endpoints_touched {
            endpoint_ips.extend(self.endpoints.of(pod).into_iter().flatten());
        }
        for ip in endpoint_ips {
            let entry = self.endpoints.holder(&ip).map(|pod| {
                let key = self.endpoints.of(pod).and_then(|ips| rules_key(ips));
                endpoint_entry(&compiled.endpoints[pod], key.expect("an address has a key"), |p| {
                    self.policy_ids.get(p).expect("an isolating policy is numbered")
                })
            });
            set(&mut self.desired.endpoints, &mut touched.endpoints, addr(ip), entry);
        }

        // The ipcache: every pod's addresses (of any node) and the node's.
        for pod in &delta.pods {
            let old = self.pod_ips.remove(pod).unwrap_or_default();
            refresh_ips.extend(old);
            if let Some(entry) = compiled.pods.get(pod)
                && entry.identity.is_some()
            {
                let ips = entry.ips.clone();
                refresh_ips.extend(&ips);
                self.pod_ips.insert(pod.clone(), ips);
            }
        }
        ipcache_keys.extend(refresh_ips.iter().map(|ip| (HOST_BITS, addr(*ip))));
        for key in ipcache_keys {
            let value = self.ipcache_value(compiled, key);
            set(&mut self.desired.ipcache, &mut touched.ipcache, key, value);
        }

        DatapathDelta {
            endpoints: changes(&self.desired.endpoints, touched.endpoints),
            ipcache: changes(&self.desired.ipcache, touched.ipcache),
            rules: changes(&self.desired.rules, touched.rules),
            rule_ids: rule_ids_changed,
            policy_ids: policy_ids_changed,
        }
    }

    /// The value of an ipcache key as the full lowering gives it: the node's and pods'
    /// addresses (with their class) over the prefix entries.
    fn ipcache_value(&self, compiled: &Compiled, key: (u32, Addr)) -> Option<IpcacheValue> {
        let (bits, data) = key;
        if bits == HOST_BITS {
            let ip = ip_of(data);
            let identity = if self.host.contains(&ip) {
                Some(IDENTITY_HOST)
            } else {
                compiled
                    .pod_ips
                    .get(&ip)
                    .and_then(|pod| compiled.pods.get(pod))
                    .and_then(|entry| entry.identity)
            };
            if let Some(identity) = identity {
                let cidr_class = self.classes.class_of(ip);
                return Some(IpcacheValue { identity, cidr_class });
            }
        }
        if key == V4_KEY {
            return v4_range_entry(&self.classes);
        }
        let prefix = cidr_of(key)?;
        let class = self.classes.prefixes().get(&prefix)?;
        Some(IpcacheValue { identity: IDENTITY_WORLD, cidr_class: *class })
    }

    fn drop_keys(&mut self, keys: &[(RuleKey, u32)], rule_keys: &mut BTreeSet<RuleKey>) {
        for (rule_key, rule_id) in keys {
            if let Some(ids) = self.rule_refs.get_mut(rule_key) {
                if let Some(n) = ids.get_mut(rule_id) {
                    *n -= 1;
                    if *n == 0 {
                        ids.remove(rule_id);
                    }
                }
                if ids.is_empty() {
                    self.rule_refs.remove(rule_key);
                }
            }
            rule_keys.insert(*rule_key);
        }
    }

    fn unindex_block(&mut self, block: &IpBlock, key: &SliceKey) {
        if let Some(set) = self.slices_by_cidr.get_mut(&block.cidr) {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_cidr.remove(&block.cidr);
            }
        }
    }
}

/// A slice's allow entries in `compiled`.
fn slice_allow<'a>(compiled: &'a Compiled, (pod, direction, policy): &SliceKey) -> &'a [Allow] {
    let Some(endpoint) = compiled.endpoints.get(pod) else { return &[] };
    let side = endpoint.direction(*direction);
    &side.allow[side.slice_of(policy)]
}

/// The prefixes a block adds to the CIDR classes.
fn prefixes(block: &IpBlock) -> impl Iterator<Item = Cidr> + '_ {
    std::iter::once(block.cidr).chain(block.except.iter().copied())
}

#[cfg(test)]
mod tests;
