//! The incremental compiler: the same result as [`Compiler::compile`] (identities included,
//! number for number), kept up to date one object change at a time, with a [`Delta`] saying
//! what changed so a datapath can write only that.
//!
//! The unit of work is what one policy gives the pods of one identity it selects (a
//! [`Contribution`]): an endpoint's policy is the concatenation of the contributions of the
//! policies selecting its identity, in policy order, so a changed contribution is spliced into
//! the endpoints of that identity without touching the rest. A contribution is recomputed when
//! - its policy changed (and the policy's selection is recomputed with it);
//! - an identity appeared or went that one of the policy's pod peers selects;
//! - for the rare policies whose egress named ports resolve against every pod or the pods of
//!   an ipBlock, when any pod's identity or addresses changed.
//!
//! Identities appear and go as pods and namespaces change; numbers are given back and taken in
//! the order [`IdAllocator::assign`] uses, so after every change the numbering is the one a
//! [`Compiler`] fed every intermediate state would give (the property test below checks the
//! whole state against it over random change sequences).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};

use crate::{
    compile::{
        Compiled, Compiler, Contribution, EndpointPolicy, LabelIndex, PeerIndex, PodEntry,
        contribute, identity_key, peer_selects, selects_key,
    },
    identity::{FIRST_POD_IDENTITY, IdAllocator, IdentityKey},
    input::{
        Cluster, Direction, PeerSpec, PodInfo, PodRef, Policy, PolicyRef, PortSpec, Problem,
        node_addresses,
    },
    selector::{Labels, Selector},
};

/// What changed in [`IncrementalCompiler::compiled`] since the delta was last taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Pods (of any node) whose entry (identity, addresses, node) changed, appeared or went.
    pub pods: BTreeSet<PodRef>,
    /// Endpoints (local pods) that appeared, went, or changed identity or addresses: take
    /// everything of them again.
    pub endpoints: BTreeSet<PodRef>,
    /// Of the other endpoints, the (endpoint, direction, policy) slices whose isolation or
    /// entries changed (see [`crate::DirectionPolicy::slice_of`]).
    pub slices: BTreeSet<(PodRef, Direction, PolicyRef)>,
    /// Identities that appeared or went.
    pub identities: BTreeSet<u32>,
    /// Node addresses changed.
    pub nodes: bool,
    /// The list of problems changed.
    pub problems: bool,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self == &Delta::default()
    }

    /// Everything of `old` and `new` (a datapath that must take a whole state again).
    pub fn everything(old: &Compiled, new: &Compiled) -> Self {
        let keys = |a: &BTreeMap<PodRef, _>, b: &BTreeMap<PodRef, _>| -> BTreeSet<PodRef> {
            a.keys().chain(b.keys()).cloned().collect()
        };
        Self {
            pods: keys(&old.pods, &new.pods),
            endpoints: old.endpoints.keys().chain(new.endpoints.keys()).cloned().collect(),
            slices: BTreeSet::new(),
            identities: old.identities.keys().chain(new.identities.keys()).copied().collect(),
            nodes: true,
            problems: true,
        }
    }

    /// Adds `other` (a later delta) to this one.
    pub fn merge(&mut self, other: Delta) {
        self.pods.extend(other.pods);
        self.endpoints.extend(other.endpoints);
        self.slices.extend(other.slices);
        self.slices.retain(|(pod, _, _)| !self.endpoints.contains(pod));
        self.identities.extend(other.identities);
        self.nodes |= other.nodes;
        self.problems |= other.problems;
    }
}

/// One object change, as [`IncrementalCompiler::apply`] takes it (`None`: deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Namespace(String, Option<Labels>),
    Pod(PodRef, Option<PodInfo>),
    /// A policy, parsed, with the problems found parsing it.
    Policy(PolicyRef, Option<Policy>, Vec<Problem>),
    /// A node's addresses.
    Node(String, Option<Vec<IpAddr>>),
}

/// Which object a [`Change`] is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Namespace(String),
    Pod(PodRef),
    Policy(PolicyRef),
    Node(String),
}

impl Change {
    /// A Namespace set (or deleted); `None` without a name.
    pub fn namespace(namespace: &Namespace, deleted: bool) -> Option<Self> {
        let name = namespace.metadata.name.clone()?;
        let labels = (!deleted).then(|| namespace.metadata.labels.clone().unwrap_or_default());
        Some(Change::Namespace(name, labels))
    }

    /// A Pod set (or deleted); `None` without a name.
    pub fn pod(pod: &Pod, deleted: bool) -> Option<Self> {
        let info = PodInfo::from_k8s(pod)?;
        Some(Change::Pod(info.id.clone(), (!deleted).then_some(info)))
    }

    /// A NetworkPolicy set (or deleted), parsed; `None` without a name.
    pub fn policy(policy: &NetworkPolicy, deleted: bool) -> Option<Self> {
        let id = PolicyRef::new(
            policy.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            policy.metadata.name.clone()?,
        );
        if deleted {
            return Some(Change::Policy(id, None, Vec::new()));
        }
        let mut problems = Vec::new();
        let parsed = Policy::from_k8s(policy, &mut problems);
        Some(Change::Policy(id, parsed, problems))
    }

    /// A Node's addresses set (or deleted); `None` without a name.
    pub fn node(node: &Node, deleted: bool) -> Option<Self> {
        let (name, addresses) =
            node_addresses(node).or_else(|| Some((node.metadata.name.clone()?, Vec::new())))?;
        Some(Change::Node(name, (!deleted).then_some(addresses)))
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Change::Namespace(name, _) => ObjectKey::Namespace(name.clone()),
            Change::Pod(id, _) => ObjectKey::Pod(id.clone()),
            Change::Policy(id, ..) => ObjectKey::Policy(id.clone()),
            Change::Node(name, _) => ObjectKey::Node(name.clone()),
        }
    }

    /// The deletion of an object.
    pub fn deletion(key: ObjectKey) -> Self {
        match key {
            ObjectKey::Namespace(name) => Change::Namespace(name, None),
            ObjectKey::Pod(id) => Change::Pod(id, None),
            ObjectKey::Policy(id) => Change::Policy(id, None, Vec::new()),
            ObjectKey::Node(name) => Change::Node(name, None),
        }
    }
}

/// Keeps [`Compiled`] for one node (or all) up to date as objects change.
#[derive(Clone, Debug)]
pub struct IncrementalCompiler {
    node: Option<String>,
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<PodRef, PodInfo>,
    policies: BTreeMap<PolicyRef, Policy>,
    problems: BTreeMap<PolicyRef, Vec<Problem>>,
    ids: IdAllocator<IdentityKey>,
    /// Enforced pod -> its identity key.
    keys: BTreeMap<PodRef, IdentityKey>,
    /// Identity key -> the enforced pods that have it.
    members: BTreeMap<IdentityKey, BTreeSet<PodRef>>,
    /// Address -> every enforced pod that has it (`Compiled::pod_ips` holds the greatest).
    ip_owners: BTreeMap<IpAddr, BTreeSet<PodRef>>,
    /// (policy, identity it selects) -> what it gives that identity.
    contributions: BTreeMap<(PolicyRef, u32), Contribution>,
    /// Identity -> the policies selecting it.
    selected_by: BTreeMap<u32, BTreeSet<PolicyRef>>,
    /// Policies whose egress named ports resolve against any pod or an ipBlock's pods.
    pod_dependent: BTreeSet<PolicyRef>,
    /// Identities by pod label (selector candidates).
    labels: LabelIndex,
    /// Policies by their podSelector (scope: the policy's namespace).
    by_selector: SelectorIndex,
    /// Policies by the pod selectors of their peers (one scope).
    by_peer: SelectorIndex,
    compiled: Compiled,
    delta: Delta,
}

impl IncrementalCompiler {
    /// An empty cluster, compiled for `node` (every pod when `None`).
    pub fn new(node: Option<&str>) -> Self {
        Self {
            node: node.map(str::to_string),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            problems: BTreeMap::new(),
            ids: IdAllocator::new(FIRST_POD_IDENTITY),
            keys: BTreeMap::new(),
            members: BTreeMap::new(),
            ip_owners: BTreeMap::new(),
            contributions: BTreeMap::new(),
            selected_by: BTreeMap::new(),
            pod_dependent: BTreeSet::new(),
            labels: LabelIndex::default(),
            by_selector: SelectorIndex::default(),
            by_peer: SelectorIndex::default(),
            compiled: Compiled::default(),
            delta: Delta::default(),
        }
    }

    /// The compiled state (what [`Compiler::compile`] gives for [`Self::cluster`]).
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// What changed since the last call.
    pub fn take_delta(&mut self) -> Delta {
        std::mem::take(&mut self.delta)
    }

    /// The inputs as a [`Cluster`] (lists in name order), for a full compile.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            namespaces: self.namespaces.clone(),
            pods: self.pods.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            nodes: self.compiled.nodes.clone(),
            problems: self.problems.values().flatten().cloned().collect(),
        }
    }

    /// A full compiler that continues this one's numbering: compiling [`Self::cluster`] with
    /// it must give exactly [`Self::compiled`] (the agent's periodic check).
    pub fn reference(&self) -> Compiler {
        Compiler::with_identities(self.ids.clone())
    }

    /// Every object known (for a re-list: those not listed again are deleted).
    pub fn keys(&self) -> BTreeSet<ObjectKey> {
        let namespaces = self.namespaces.keys().cloned().map(ObjectKey::Namespace);
        let pods = self.pods.keys().cloned().map(ObjectKey::Pod);
        let policies =
            self.policies.keys().chain(self.problems.keys()).cloned().map(ObjectKey::Policy);
        let nodes = self.compiled.nodes.keys().cloned().map(ObjectKey::Node);
        namespaces.chain(pods).chain(policies).chain(nodes).collect()
    }

    /// How many NetworkPolicies there are (those left out whole for a problem included).
    pub fn policy_count(&self) -> usize {
        self.policies.len()
            + self.problems.keys().filter(|p| !self.policies.contains_key(*p)).count()
    }

    /// A compiler with the same inputs and fresh state (a repair after a disagreement with
    /// the full compile; identities are numbered afresh).
    pub fn rebuilt(&self) -> Self {
        let mut fresh = Self::new(self.node.as_deref());
        for (name, labels) in &self.namespaces {
            fresh.set_namespace(name, Some(labels.clone()));
        }
        for (id, pod) in &self.pods {
            fresh.set_pod(id, Some(pod.clone()));
        }
        let policies: BTreeSet<&PolicyRef> =
            self.policies.keys().chain(self.problems.keys()).collect();
        for id in policies {
            let problems = self.problems.get(id).cloned().unwrap_or_default();
            fresh.set_policy(id, self.policies.get(id).cloned(), problems);
        }
        for (name, addresses) in &self.compiled.nodes {
            fresh.set_node(name, Some(addresses.clone()));
        }
        fresh.delta = Delta::default();
        fresh
    }

    /// Applies one change.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Namespace(name, labels) => self.set_namespace(&name, labels),
            Change::Pod(id, pod) => self.set_pod(&id, pod),
            Change::Policy(id, policy, problems) => self.set_policy(&id, policy, problems),
            Change::Node(name, addresses) => self.set_node(&name, addresses),
        }
    }

    /// Sets (`Some`) or deletes (`None`) a namespace's labels.
    pub fn set_namespace(&mut self, name: &str, labels: Option<Labels>) {
        if self.namespaces.get(name) == labels.as_ref() {
            return;
        }
        match labels {
            Some(labels) => self.namespaces.insert(name.to_string(), labels),
            None => self.namespaces.remove(name),
        };
        let pods: BTreeSet<PodRef> = self
            .pods
            .range(PodRef::new(name, "")..)
            .take_while(|(id, _)| id.namespace == name)
            .map(|(id, _)| id.clone())
            .collect();
        self.settle(pods, BTreeSet::new());
    }

    /// Sets or deletes a pod.
    pub fn set_pod(&mut self, id: &PodRef, pod: Option<PodInfo>) {
        if self.pods.get(id) == pod.as_ref() {
            return;
        }
        match pod {
            Some(pod) => self.pods.insert(id.clone(), pod),
            None => self.pods.remove(id),
        };
        self.settle(BTreeSet::from([id.clone()]), BTreeSet::new());
    }

    /// Sets or deletes a policy, with the problems found parsing it.
    pub fn set_policy(&mut self, id: &PolicyRef, policy: Option<Policy>, problems: Vec<Problem>) {
        if self.problems.get(id).map_or(&[][..], Vec::as_slice) != problems.as_slice() {
            if problems.is_empty() {
                self.problems.remove(id);
            } else {
                self.problems.insert(id.clone(), problems);
            }
            self.compiled.problems = self.problems.values().flatten().cloned().collect();
            self.delta.problems = true;
        }
        if self.policies.get(id) == policy.as_ref() {
            return;
        }
        if let Some(old) = self.policies.get(id) {
            self.by_selector.remove(&old.id.namespace, &old.pod_selector, id);
            for peer in policy_peers(old) {
                if let PeerSpec::Pods { pods, .. } = peer {
                    self.by_peer.remove("", pods, id);
                }
            }
        }
        if let Some(new) = &policy {
            self.by_selector.insert(&new.id.namespace, &new.pod_selector, id);
            for peer in policy_peers(new) {
                if let PeerSpec::Pods { pods, .. } = peer {
                    self.by_peer.insert("", pods, id);
                }
            }
        }
        match policy {
            Some(policy) => {
                if depends_on_pods(&policy) {
                    self.pod_dependent.insert(id.clone());
                } else {
                    self.pod_dependent.remove(id);
                }
                self.policies.insert(id.clone(), policy);
            }
            None => {
                self.pod_dependent.remove(id);
                self.policies.remove(id);
            }
        }
        self.settle(BTreeSet::new(), BTreeSet::from([id.clone()]));
    }

    /// Sets or deletes a node's addresses.
    pub fn set_node(&mut self, name: &str, addresses: Option<Vec<IpAddr>>) {
        if self.compiled.nodes.get(name) == addresses.as_ref() {
            return;
        }
        match addresses {
            Some(addresses) => self.compiled.nodes.insert(name.to_string(), addresses),
            None => self.compiled.nodes.remove(name),
        };
        self.delta.nodes = true;
    }

    fn key_of(&self, pod: &PodInfo) -> IdentityKey {
        identity_key(self.namespaces.get(&pod.id.namespace).cloned().unwrap_or_default(), pod)
    }

    fn is_local(&self, pod: &PodInfo) -> bool {
        !pod.host_network && self.node.as_ref().is_none_or(|n| pod.node.as_ref() == Some(n))
    }

    /// Brings everything up to date after `pods` (their inputs) and `changed` (policies) changed.
    fn settle(&mut self, pods: BTreeSet<PodRef>, changed: BTreeSet<PolicyRef>) {
        // 1. Identities: keys of the changed pods; numbers given back and taken as assign does.
        let mut left = BTreeSet::new();
        let mut new_keys = BTreeSet::new();
        for id in &pods {
            let old = self.keys.remove(id);
            let new = self.pods.get(id).filter(|p| !p.host_network).map(|pod| self.key_of(pod));
            if let Some(old) = &old {
                if let Some(members) = self.members.get_mut(old) {
                    members.remove(id);
                }
                left.insert(old.clone());
            }
            if let Some(new) = new {
                self.members.entry(new.clone()).or_default().insert(id.clone());
                if self.ids.get(&new).is_none() {
                    new_keys.insert(new.clone());
                }
                self.keys.insert(id.clone(), new);
            }
        }
        let gone_keys: Vec<IdentityKey> = left
            .into_iter()
            .filter(|key| self.members.get(key).is_none_or(BTreeSet::is_empty))
            .collect();
        let gone: Vec<(u32, IdentityKey)> = gone_keys
            .into_iter()
            .map(|key| {
                self.members.remove(&key);
                (self.ids.get(&key).expect("numbered"), key)
            })
            .collect();
        self.ids.change(gone.iter().map(|(_, key)| key.clone()), new_keys.iter().cloned());
        let added: Vec<(u32, IdentityKey)> = new_keys
            .into_iter()
            .map(|key| (self.ids.get(&key).expect("just numbered"), key))
            .collect();
        for (number, key) in &gone {
            self.compiled.identities.remove(number);
            self.labels.remove(*number, key);
            self.delta.identities.insert(*number);
        }
        for (number, key) in &added {
            self.compiled.identities.insert(*number, key.clone());
            self.labels.insert(*number, key);
            self.delta.identities.insert(*number);
        }

        // 2. Pod entries and addresses.
        let mut entries_changed = false;
        for id in &pods {
            let entry = self.pods.get(id).map(|pod| PodEntry {
                identity: self.keys.get(id).map(|key| self.ids.get(key).expect("numbered")),
                ips: pod.ips.clone(),
                node: pod.node.clone(),
            });
            let old = match &entry {
                Some(entry) => self.compiled.pods.insert(id.clone(), entry.clone()),
                None => self.compiled.pods.remove(id),
            };
            if old == entry {
                continue;
            }
            self.delta.pods.insert(id.clone());
            entries_changed = true;
            let owned = |e: &Option<PodEntry>| -> Vec<IpAddr> {
                e.as_ref()
                    .filter(|e| e.identity.is_some())
                    .map(|e| e.ips.clone())
                    .unwrap_or_default()
            };
            let (before, after) = (owned(&old), owned(&entry));
            for ip in before {
                self.ip_owners.entry(ip).or_default().remove(id);
                self.refresh_ip(ip);
            }
            for ip in after {
                self.ip_owners.entry(ip).or_default().insert(id.clone());
                self.refresh_ip(ip);
            }
        }

        // 3. Which contributions to recompute.
        let mut recompute: BTreeSet<PolicyRef> = changed.clone();
        for (_, key) in gone.iter().chain(&added) {
            for id in self.by_peer.candidates("", &key.pod_labels) {
                if policy_peers(&self.policies[&id]).any(|p| peer_selects(p, key)) {
                    recompute.insert(id);
                }
            }
        }
        // (A number given back and taken again in one change stands for another key.)
        if entries_changed || !gone.is_empty() || !added.is_empty() {
            recompute.extend(self.pod_dependent.iter().cloned());
        }

        // 4. Selections: identities that went lose their contributions, new identities gain
        // those of the policies selecting them, changed policies select again.
        let mut touched: BTreeSet<(PolicyRef, u32)> = BTreeSet::new();
        for (number, _) in &gone {
            for policy in self.selected_by.remove(number).unwrap_or_default() {
                self.contributions.remove(&(policy, *number));
            }
        }
        for (number, key) in &added {
            for id in self.by_selector.candidates(&key.namespace, &key.pod_labels) {
                if selects_key(&self.policies[&id], key) {
                    touched.insert((id, *number));
                }
            }
        }
        for id in &changed {
            let old: Vec<u32> = self
                .contributions
                .range((id.clone(), 0)..=(id.clone(), u32::MAX))
                .map(|((_, number), _)| *number)
                .collect();
            let new: BTreeSet<u32> = match self.policies.get(id) {
                None => BTreeSet::new(),
                Some(policy) => {
                    let identities = &self.compiled.identities;
                    self.labels
                        .candidates(&policy.pod_selector, identities)
                        .into_iter()
                        .filter(|number| selects_key(policy, &identities[number]))
                        .collect()
                }
            };
            for number in old.iter().filter(|n| !new.contains(n)) {
                self.contributions.remove(&(id.clone(), *number));
                if let Some(set) = self.selected_by.get_mut(number) {
                    set.remove(id);
                }
                self.endpoints_changed(*number, id, Direction::Ingress);
                self.endpoints_changed(*number, id, Direction::Egress);
            }
            touched.extend(new.into_iter().map(|n| (id.clone(), n)));
        }
        for id in recompute.difference(&changed) {
            let selected = self
                .contributions
                .range((id.clone(), 0)..=(id.clone(), u32::MAX))
                .map(|((_, number), _)| (id.clone(), *number));
            touched.extend(selected.collect::<Vec<_>>());
        }

        // 5. Recompute them and splice the changes into the endpoints of each identity.
        let mut fresh = Vec::new();
        {
            let peers = PeerIndex::new(&self.compiled, &self.labels);
            for (id, number) in &touched {
                let policy = &self.policies[id];
                fresh.push(((id.clone(), *number), contribute(policy, *number, &peers)));
            }
        }
        for ((id, number), contribution) in fresh {
            self.selected_by.entry(number).or_default().insert(id.clone());
            let old = self.contributions.insert((id.clone(), number), contribution.clone());
            for direction in [Direction::Ingress, Direction::Egress] {
                let before = old.as_ref().and_then(|c| c.direction(direction));
                if before != contribution.direction(direction) {
                    self.endpoints_changed(number, &id, direction);
                }
            }
        }

        // 6. Endpoints of changed pods are rebuilt whole.
        for id in &pods {
            let pod = self.pods.get(id).filter(|pod| self.is_local(pod));
            let endpoint = pod.map(|_| {
                let number = self.ids.get(&self.keys[id]).expect("numbered");
                self.build_endpoint(number)
            });
            let old = match endpoint {
                Some(endpoint) => self.compiled.endpoints.insert(id.clone(), endpoint),
                None => self.compiled.endpoints.remove(id),
            };
            let ips_changed = self.delta.pods.contains(id);
            if ips_changed || old.as_ref() != self.compiled.endpoints.get(id) {
                self.delta.endpoints.insert(id.clone());
            }
        }
        let endpoints = &self.delta.endpoints;
        self.delta.slices.retain(|(pod, _, _)| !endpoints.contains(pod));
    }

    /// The endpoint policy of pods of identity `number`, from its contributions.
    fn build_endpoint(&self, number: u32) -> EndpointPolicy {
        let mut endpoint = EndpointPolicy::new(number);
        for policy in self.selected_by.get(&number).into_iter().flatten() {
            let contribution = &self.contributions[&(policy.clone(), number)];
            for direction in [Direction::Ingress, Direction::Egress] {
                if let Some(allow) = contribution.direction(direction) {
                    let out = endpoint.direction_mut(direction);
                    out.isolated_by.push(policy.clone());
                    out.allow.extend(allow.iter().cloned());
                }
            }
        }
        endpoint
    }

    /// Splices the current contribution of `policy` to `number` into that identity's
    /// endpoints, recording the slices that changed.
    fn endpoints_changed(&mut self, number: u32, policy: &PolicyRef, direction: Direction) {
        let allow = self
            .contributions
            .get(&(policy.clone(), number))
            .and_then(|c| c.direction(direction))
            .map(Vec::as_slice);
        let key = &self.compiled.identities[&number];
        for pod in self.members.get(key).into_iter().flatten() {
            let Some(endpoint) = self.compiled.endpoints.get_mut(pod) else { continue };
            if endpoint.direction_mut(direction).set_slice(policy, allow) {
                self.delta.slices.insert((pod.clone(), direction, policy.clone()));
            }
        }
    }

    /// `Compiled::pod_ips[ip]` after the owners of `ip` changed.
    fn refresh_ip(&mut self, ip: IpAddr) {
        match self.ip_owners.get(&ip).and_then(|owners| owners.last()) {
            Some(pod) => self.compiled.pod_ips.insert(ip, pod.clone()),
            None => {
                self.ip_owners.remove(&ip);
                self.compiled.pod_ips.remove(&ip)
            }
        };
    }
}

/// Policies by a label their selector requires, per scope (a namespace, or "" for any), so
/// the policies that may select a label set are looked up, not scanned. A selector requiring
/// no label is listed under its scope as wide.
#[derive(Clone, Debug, Default)]
struct SelectorIndex {
    /// (scope, key, value) -> policy -> how many of its selectors require it.
    by_label: BTreeMap<(String, String, String), BTreeMap<PolicyRef, usize>>,
    wide: BTreeMap<String, BTreeMap<PolicyRef, usize>>,
}

impl SelectorIndex {
    fn entries(scope: &str, selector: &Selector) -> Vec<Option<(String, String, String)>> {
        match selector.required_label() {
            None => vec![None],
            Some((key, values)) => values
                .iter()
                .map(|v| Some((scope.to_string(), key.to_string(), v.clone())))
                .collect(),
        }
    }

    fn insert(&mut self, scope: &str, selector: &Selector, policy: &PolicyRef) {
        for entry in Self::entries(scope, selector) {
            let policies = match entry {
                Some(label) => self.by_label.entry(label).or_default(),
                None => self.wide.entry(scope.to_string()).or_default(),
            };
            *policies.entry(policy.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, scope: &str, selector: &Selector, policy: &PolicyRef) {
        fn uncount<K: Ord + Clone>(
            map: &mut BTreeMap<K, BTreeMap<PolicyRef, usize>>,
            key: K,
            policy: &PolicyRef,
        ) {
            let Some(policies) = map.get_mut(&key) else { return };
            if let Some(n) = policies.get_mut(policy) {
                *n -= 1;
                if *n == 0 {
                    policies.remove(policy);
                }
            }
            if policies.is_empty() {
                map.remove(&key);
            }
        }
        for entry in Self::entries(scope, selector) {
            match entry {
                Some(label) => uncount(&mut self.by_label, label, policy),
                None => uncount(&mut self.wide, scope.to_string(), policy),
            }
        }
    }

    /// The policies of `scope` whose selectors may match `labels` (a superset).
    fn candidates(&self, scope: &str, labels: &Labels) -> BTreeSet<PolicyRef> {
        let mut out: BTreeSet<PolicyRef> =
            self.wide.get(scope).into_iter().flat_map(|p| p.keys().cloned()).collect();
        for (key, value) in labels {
            let label = (scope.to_string(), key.clone(), value.clone());
            out.extend(self.by_label.get(&label).into_iter().flat_map(|p| p.keys().cloned()));
        }
        out
    }
}

/// The pod peers of every rule of a policy.
fn policy_peers(policy: &Policy) -> impl Iterator<Item = &PeerSpec> {
    let rules = policy.ingress.iter().flatten().chain(policy.egress.iter().flatten());
    rules.flat_map(|rule| rule.peers.iter().flatten().map(|(_, peer)| peer))
}

/// Whether an egress named port of `policy` resolves against every pod (no peers) or the
/// pods in an ipBlock: its contributions then change with any pod.
fn depends_on_pods(policy: &Policy) -> bool {
    policy.egress.iter().flatten().any(|rule| {
        let named = rule.ports.iter().flatten().any(|(_, p)| matches!(p.port, PortSpec::Named(_)));
        let wide = match &rule.peers {
            None => true,
            Some(peers) => peers.iter().any(|(_, p)| matches!(p, PeerSpec::Block(_))),
        };
        named && wide
    })
}

#[cfg(test)]
mod tests;
