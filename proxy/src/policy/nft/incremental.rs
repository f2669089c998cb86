//! [`IncrementalDesired`]: the nftables [`Desired`] state kept up to date from a [`Delta`] of
//! the incremental compiler, with the ops of each change computed from the elements it touched
//! only.
//!
//! Per endpoint direction the allow set must hold disjoint boxes ([`plan::disjoint`] of all
//! the direction's boxes, canonical). Each (endpoint, direction, policy) slice's boxes are
//! counted into the direction's multiset of raw boxes; when every box that appeared or went
//! overlaps no other raw box, the disjoint form changes by exactly those boxes (a box that
//! overlaps nothing is its own group), which takes one scan of the direction's boxes and no
//! sort. Otherwise the direction's disjoint form is computed again. Slices naming a pod
//! identity are lowered again when that identity's addresses change. The result equals
//! [`Desired::new`] after every change (checked over random change sequences in the tests).
//!
//! The table's verdicts carry no rule ids, so the state also answers which rule admitted a
//! packet the table logged ([`IncrementalDesired::admitted`], for `weir flows`): each slice
//! keeps, per box, the numbers of the allow entry it comes from.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use weir_policy::{Allow, Compiled, Delta, Direction, Origin, PeerMatch, PodRef, PolicyRef};

use super::plan::{
    self, Box3, Desired, allow_boxes, disjoint, endpoint_verdict, host_boxes, line, overlap,
    tuples, unknown_pods,
};
use crate::{
    apply::nft::ops::{PolicyTuple, Verdict},
    policy::{
        PolicyNode,
        incremental::{self as refs, EndpointAddresses},
        names::{Admissions, Admitted, AdmittedPacket},
    },
};

type SliceKey = (PodRef, Direction, PolicyRef);
type SideKey = (PodRef, Direction);

/// What one policy gives one endpoint direction.
#[derive(Clone, Debug, Default)]
struct Slice {
    boxes: Vec<Box3>,
    /// Per box, the [`Origin`] numbers (rule, peer, port) of the entry it comes from.
    rules: Vec<(usize, Option<usize>, Option<usize>)>,
    /// The identities whose addresses the boxes hold.
    identities: BTreeSet<u32>,
}

impl Slice {
    fn new(allow: &[Allow], addresses: &dyn Fn(u32) -> Vec<u128>) -> Self {
        let mut slice = Self::default();
        for entry in allow {
            let boxes = allow_boxes(std::slice::from_ref(entry), addresses);
            let origin = &entry.origin;
            let numbers = (origin.rule, origin.peer, origin.port);
            slice.rules.resize(slice.rules.len() + boxes.len(), numbers);
            slice.boxes.extend(boxes);
            if let PeerMatch::Identity(id) = entry.peer {
                slice.identities.insert(id);
            }
        }
        slice
    }
}

/// One endpoint direction as lowered.
#[derive(Clone, Debug, Default)]
struct SideState {
    /// Raw boxes of all slices (and the node's, while isolated) with their counts.
    raw: BTreeMap<Box3, usize>,
    /// Their disjoint form.
    boxes: BTreeSet<Box3>,
    isolated: bool,
}

#[derive(Clone, Debug, Default)]
pub struct IncrementalDesired {
    desired: Desired,
    node: PolicyNode,
    slices: BTreeMap<SliceKey, Slice>,
    sides: BTreeMap<SideKey, SideState>,
    /// Identity -> the slices naming it.
    slices_by_identity: BTreeMap<u32, BTreeSet<SliceKey>>,
    /// Identity -> address (on the line of [`line`]) -> how many pods of it have the address.
    addresses: BTreeMap<u32, BTreeMap<u128, usize>>,
    /// Pod -> (identity, addresses on the line) as counted in `addresses`.
    pods: BTreeMap<PodRef, (u32, Vec<u128>)>,
    endpoints: EndpointAddresses<IpAddr>,
    /// Allow tuple -> how many endpoint directions give it, per set (ingress, egress).
    tuple_refs: [BTreeMap<PolicyTuple, usize>; 2],
    /// Drop chain -> how many endpoint directions go to it.
    chain_refs: BTreeMap<String, usize>,
    /// Endpoint -> the drop chains of its directions.
    chain_owners: BTreeMap<PodRef, Vec<String>>,
}

/// Raw boxes that appeared or went in one side beyond which its disjoint form is computed
/// again rather than checked box by box (each check scans the side's boxes).
const SIMPLE_LIMIT: usize = 32;

/// Counts a box in; whether it appeared.
fn count(raw: &mut BTreeMap<Box3, usize>, b: &Box3) -> bool {
    refs::count(raw, b, true)
}

/// Counts a box out; whether it went.
fn uncount(raw: &mut BTreeMap<Box3, usize>, b: &Box3) -> bool {
    refs::count(raw, b, false)
}

/// The drop chains an endpoint's isolated directions go to.
fn endpoint_chains(endpoint: &weir_policy::EndpointPolicy) -> Vec<String> {
    plan::DIRECTIONS
        .iter()
        .filter_map(|d| match endpoint_verdict(endpoint.direction(*d), *d) {
            Verdict::Goto(chain) => Some(chain),
            _ => None,
        })
        .collect()
}

fn side_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// The old and new content of everything one update touched: [`plan::diff`] of the two gives
/// the update's ops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredChange {
    pub old: Desired,
    pub new: Desired,
}

impl DesiredChange {
    pub fn ops(&self) -> Vec<crate::apply::nft::ops::Op> {
        plan::diff(&self.old, &self.new)
    }
}

impl IncrementalDesired {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Takes a whole compiled state: an update naming every endpoint and pod, old and new.
    pub fn rebuild(&mut self, compiled: &Compiled, node: &PolicyNode) -> DesiredChange {
        let delta = self.everything(compiled);
        self.update(compiled, &delta, node)
    }

    /// A delta naming every endpoint and pod known before and in `compiled`.
    fn everything(&self, compiled: &Compiled) -> Delta {
        Delta {
            pods: self.pods.keys().chain(compiled.pods.keys()).cloned().collect(),
            endpoints: self.endpoints.pods().chain(compiled.endpoints.keys()).cloned().collect(),
            ..Delta::default()
        }
    }

    /// Brings the state up to `compiled`, which differs from the previous update's by `delta`.
    pub fn update(
        &mut self,
        compiled: &Compiled,
        delta: &Delta,
        node: &PolicyNode,
    ) -> DesiredChange {
        // The node's boxes are in every isolated ingress: a node change takes everything.
        let node_changed = node.host_addresses != self.node.host_addresses
            || node.pod_cidrs != self.node.pod_cidrs;
        let everything;
        let delta = if node_changed {
            everything = self.everything(compiled);
            &everything
        } else {
            delta
        };
        let unknown_changed = node_changed || node.deny_unknown != self.node.deny_unknown;
        self.node = node.clone();
        let mut change = DesiredChange::default();

        // Identity addresses of changed pods; slices naming an identity whose addresses
        // changed are lowered again.
        let mut slices: BTreeSet<SliceKey> = delta.slices.clone();
        for pod in &delta.pods {
            let old = self.pods.remove(pod);
            let new = compiled.pods.get(pod).and_then(|e| {
                Some((e.identity?, e.ips.iter().map(|a| line(*a)).collect::<Vec<u128>>()))
            });
            if old == new {
                if let Some(old) = old {
                    self.pods.insert(pod.clone(), old);
                }
                continue;
            }
            for (identity, addresses, up) in
                old.iter().map(|(i, a)| (i, a, false)).chain(new.iter().map(|(i, a)| (i, a, true)))
            {
                let counts = self.addresses.entry(*identity).or_default();
                for address in addresses {
                    if up {
                        *counts.entry(*address).or_default() += 1;
                    } else if let Some(n) = counts.get_mut(address) {
                        *n -= 1;
                        if *n == 0 {
                            counts.remove(address);
                        }
                    }
                }
                if counts.is_empty() {
                    self.addresses.remove(identity);
                }
                slices.extend(self.slices_by_identity.get(identity).into_iter().flatten().cloned());
            }
            if let Some(new) = new {
                self.pods.insert(pod.clone(), new);
            }
        }

        // Endpoints taken whole: their addresses and every slice, old and new.
        let mut sides: BTreeSet<SideKey> = BTreeSet::new();
        let mut verdict_ips: BTreeSet<IpAddr> = BTreeSet::new();
        let mut addresses_changed = false;
        for pod in &delta.endpoints {
            let new_ips: Vec<IpAddr> = match (compiled.endpoints.get(pod), compiled.pods.get(pod)) {
                (Some(_), Some(entry)) => entry.ips.clone(),
                _ => Vec::new(),
            };
            let old_ips = self.endpoints.of(pod).cloned().unwrap_or_default();
            // The endpoint's tuples go with its old addresses: empty its sides first.
            for direction in plan::DIRECTIONS {
                let key = (pod.clone(), direction);
                if let Some(side) = self.sides.remove(&key) {
                    self.set_tuples(
                        direction,
                        &old_ips,
                        &side.boxes,
                        &BTreeSet::new(),
                        &mut change,
                    );
                }
                let start = (pod.clone(), direction, PolicyRef::new("", ""));
                let old: Vec<SliceKey> = self
                    .slices
                    .range(start..)
                    .take_while(|(k, _)| k.0 == *pod && k.1 == direction)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in old {
                    self.forget_slice(&key);
                }
                if let Some(endpoint) = compiled.endpoints.get(pod) {
                    for policy in &endpoint.direction(direction).isolated_by {
                        slices.insert((pod.clone(), direction, policy.clone()));
                    }
                }
                sides.insert(key);
            }
            addresses_changed |= old_ips != new_ips;
            verdict_ips.extend(old_ips.iter().chain(&new_ips));
            self.endpoints.set(pod, compiled.endpoints.contains_key(pod).then_some(new_ips));
        }

        // Slices: their boxes into their side's raw multiset.
        let mut appeared: BTreeMap<SideKey, Vec<Box3>> = BTreeMap::new();
        let mut went: BTreeMap<SideKey, Vec<Box3>> = BTreeMap::new();
        for key in &slices {
            let side_key = (key.0.clone(), key.1);
            if let Some(slice) = self.slices.get(key) {
                let side = self.sides.entry(side_key.clone()).or_default();
                for b in &slice.boxes {
                    if uncount(&mut side.raw, b) {
                        went.entry(side_key.clone()).or_default().push(*b);
                    }
                }
                self.forget_slice(key);
            }
            let Some(endpoint) = compiled.endpoints.get(&key.0) else { continue };
            let direction = endpoint.direction(key.1);
            if direction.isolated_by.binary_search(&key.2).is_err() {
                sides.insert(side_key);
                continue;
            }
            let allow = &direction.allow[direction.slice_of(&key.2)];
            let addresses = |id: u32| -> Vec<u128> {
                self.addresses.get(&id).map(|a| a.keys().copied().collect()).unwrap_or_default()
            };
            let slice = Slice::new(allow, &addresses);
            let side = self.sides.entry(side_key.clone()).or_default();
            for b in &slice.boxes {
                if count(&mut side.raw, b) {
                    appeared.entry(side_key.clone()).or_default().push(*b);
                }
            }
            for id in &slice.identities {
                self.slices_by_identity.entry(*id).or_default().insert(key.clone());
            }
            self.slices.insert(key.clone(), slice);
            sides.insert(side_key);
        }

        // Each touched side: isolation (and with it the node's boxes), then its disjoint form.
        let hosts = host_boxes(&self.node);
        for side_key in &sides {
            let (pod, direction) = side_key;
            let endpoint = compiled.endpoints.get(pod);
            let isolated = endpoint.is_some_and(|e| e.direction(*direction).is_isolated());
            let side = self.sides.entry(side_key.clone()).or_default();
            if isolated != side.isolated && *direction == Direction::Ingress {
                for b in &hosts {
                    let changed =
                        if isolated { count(&mut side.raw, b) } else { uncount(&mut side.raw, b) };
                    if changed {
                        let list = if isolated { &mut appeared } else { &mut went };
                        list.entry(side_key.clone()).or_default().push(*b);
                    }
                }
            }
            side.isolated = isolated;
            let came = appeared.remove(side_key).unwrap_or_default();
            let gone = went.remove(side_key).unwrap_or_default();
            let old = side.boxes.clone();
            let alone = |b: &Box3| side.raw.keys().all(|other| other == b || !overlap(b, other));
            let simple = came.len() + gone.len() <= SIMPLE_LIMIT
                && came.iter().all(alone)
                && gone.iter().all(|b| side.boxes.contains(b) && alone(b));
            if simple {
                for b in &gone {
                    side.boxes.remove(b);
                }
                side.boxes.extend(came.iter().copied());
            } else {
                let raw: Vec<Box3> = side.raw.keys().copied().collect();
                side.boxes = disjoint(&raw).into_iter().collect();
            }
            let new = side.boxes.clone();
            let empty = side.raw.is_empty() && !side.isolated;
            if empty {
                self.sides.remove(side_key);
            }
            let ips = self.endpoints.of(pod).cloned().unwrap_or_default();
            self.set_tuples(*direction, &ips, &old, &new, &mut change);
            verdict_ips.extend(ips);
        }

        // Drop chains and verdicts of the touched endpoints.
        let touched_pods: BTreeSet<PodRef> = sides
            .iter()
            .map(|(pod, _)| pod.clone())
            .chain(delta.endpoints.iter().cloned())
            .collect();
        for pod in &touched_pods {
            let new = compiled.endpoints.get(pod).map(endpoint_chains).unwrap_or_default();
            let old = self.chain_owners.remove(pod).unwrap_or_default();
            if old == new {
                if !new.is_empty() {
                    self.chain_owners.insert(pod.clone(), new);
                }
                continue;
            }
            for chain in old {
                if refs::count(&mut self.chain_refs, &chain, false) {
                    self.desired.drop_chains.remove(&chain);
                    change.old.drop_chains.insert(chain);
                }
            }
            for chain in &new {
                let n = self.chain_refs.entry(chain.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    self.desired.drop_chains.insert(chain.clone());
                    change.new.drop_chains.insert(chain.clone());
                }
            }
            if !new.is_empty() {
                self.chain_owners.insert(pod.clone(), new);
            }
        }
        for ip in verdict_ips {
            for direction in plan::DIRECTIONS {
                let verdict = self.endpoints.holder(&ip).map(|pod| {
                    endpoint_verdict(compiled.endpoints[pod].direction(direction), direction)
                });
                let endpoints = &mut self.desired.side_mut(direction).endpoints;
                let old = match &verdict {
                    Some(v) => endpoints.insert(ip, v.clone()),
                    None => endpoints.remove(&ip),
                };
                if old != verdict {
                    if let Some(old) = old {
                        change.old.side_mut(direction).endpoints.insert(ip, old);
                    }
                    if let Some(new) = verdict {
                        change.new.side_mut(direction).endpoints.insert(ip, new);
                    }
                }
            }
        }

        // Unknown pods: the pod ranges minus the endpoints' addresses.
        if addresses_changed || unknown_changed {
            let known: Vec<IpAddr> = self.endpoints.addresses().copied().collect();
            let unknown = unknown_pods(&self.node, &known);
            if unknown != self.desired.unknown_pods {
                change.old.unknown_pods =
                    std::mem::replace(&mut self.desired.unknown_pods, unknown);
                change.new.unknown_pods = self.desired.unknown_pods.clone();
            }
        }
        change
    }

    /// What admitted `packet` in the state last updated to: the first rule, in policy order,
    /// of the endpoint direction whose box holds it, or (ingress) the pod's own node, checked
    /// first as on the eBPF datapath; `None` when nothing here admits it (the endpoint is not
    /// isolated, or the state changed since the packet was logged).
    pub fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted> {
        let direction = packet.direction;
        if direction == Direction::Ingress && self.node.host_addresses.contains(&packet.peer) {
            return Some(Admitted::OwnNode);
        }
        let pod = self.endpoints.holder(&packet.endpoint)?;
        let peer = line(packet.peer);
        let protocol = u128::from(packet.protocol);
        let holds = |b: &Box3| {
            let within = |(lo, hi): (u128, u128), x: u128| lo <= x && x <= hi;
            within(b[0], protocol)
                && packet.port.is_none_or(|port| within(b[1], u128::from(port)))
                && within(b[2], peer)
        };
        let start = (pod.clone(), direction, PolicyRef::new("", ""));
        let mut slices =
            self.slices.range(start..).take_while(|(k, _)| k.0 == *pod && k.1 == direction);
        slices.find_map(|(key, slice)| {
            let at = slice.boxes.iter().position(holds)?;
            let (rule, peer, port) = slice.rules[at];
            Some(Admitted::Rule(Origin { policy: key.2.clone(), direction, rule, peer, port }))
        })
    }

    /// Forgets a slice (its boxes are handled by the caller).
    fn forget_slice(&mut self, key: &SliceKey) {
        let Some(Slice { identities, .. }) = self.slices.remove(key) else { return };
        for id in identities {
            if let Some(set) = self.slices_by_identity.get_mut(&id) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_by_identity.remove(&id);
                }
            }
        }
    }

    /// Replaces the tuples of `ips` from `old` boxes to `new` ones, counting tuples shared by
    /// several endpoints with one address.
    fn set_tuples(
        &mut self,
        direction: Direction,
        ips: &[IpAddr],
        old: &BTreeSet<Box3>,
        new: &BTreeSet<Box3>,
        change: &mut DesiredChange,
    ) {
        let refs = &mut self.tuple_refs[side_index(direction)];
        let allow = &mut self.desired.side_mut(direction).allow;
        for ip in ips {
            for t in old.difference(new).flat_map(|b| tuples(*ip, b)) {
                if let Some(n) = refs.get_mut(&t) {
                    *n -= 1;
                    if *n == 0 {
                        refs.remove(&t);
                        allow.remove(&t);
                        change.old.side_mut(direction).allow.insert(t);
                    }
                }
            }
            for t in new.difference(old).flat_map(|b| tuples(*ip, b)) {
                let n = refs.entry(t).or_default();
                *n += 1;
                if *n == 1 {
                    allow.insert(t);
                    change.new.side_mut(direction).allow.insert(t);
                }
            }
        }
    }
}

/// The state of a table shared with the flow reader (`NftPolicy` updates it under the lock).
impl Admissions for std::sync::RwLock<IncrementalDesired> {
    fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted> {
        self.read().unwrap_or_else(|poisoned| poisoned.into_inner()).admitted(packet)
    }
}

#[cfg(test)]
mod tests;
