//! What the numbers in the policy datapath stand for, as of the latest sync: rule and policy
//! ids (flow events, per-policy drop counters) and the compiled pods and identities (addresses
//! and identities of flow events). Written by the agent's policy loop after every successful
//! apply; read by the flow viewer and metrics through [`FlowNames`] (so they work, and are
//! tested, without the loop). Readers take a snapshot ([`SharedPolicyNames`] is cheap to clone
//! and never blocks the loop for long).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use super::lower::Lowering;
use std::collections::BTreeSet;
use weir_policy::{
    Compiled, Delta, Direction, Origin, PodRef, PolicyRef, compile::PodEntry, identity::IdentityKey,
};

/// A datapath's numbering of rules and policies (what its rule and policy ids stand for).
#[derive(Clone, Copy, Debug)]
pub struct Numbering<'a> {
    pub rules_by_id: &'a BTreeMap<u32, Origin>,
    pub policies_by_id: &'a BTreeMap<u32, PolicyRef>,
}

#[derive(Clone, Debug, Default)]
pub struct PolicyNames {
    /// Rule id (`FlowEvent::rule_id` of an allowed flow) -> the rule.
    pub rules_by_id: BTreeMap<u32, Origin>,
    /// Policy id (`weir_pol_drops_v1` key, `FlowEvent::rule_id` of a drop) -> the policy.
    pub policies_by_id: BTreeMap<u32, PolicyRef>,
    /// Every pod the compiler knew of (all nodes), with identity and addresses.
    pub pods: BTreeMap<PodRef, PodEntry>,
    /// Pod address -> pod.
    pub pod_ips: BTreeMap<IpAddr, PodRef>,
    /// Identity number -> what it stands for.
    pub identities: BTreeMap<u32, IdentityKey>,
    /// Syncs applied so far (0: nothing published yet).
    pub generation: u64,
    /// For a datapath whose verdicts carry no rule id (nftables): finds what admitted a packet
    /// in the state it applied.
    pub admissions: Option<Arc<dyn Admissions>>,
}

/// What admitted a packet into an isolated direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    Rule(Origin),
    /// The pod's own node (ingress).
    OwnNode,
}

/// A packet of an allowed flow, as a datapath without rule ids logged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmittedPacket {
    pub direction: Direction,
    /// The local pod whose direction admitted it (ingress: the destination).
    pub endpoint: IpAddr,
    pub peer: IpAddr,
    pub protocol: u8,
    /// The destination port (`None`: the protocol has no ports).
    pub port: Option<u16>,
}

/// Answers, from the state a datapath applied, which rule admitted a packet it logged.
pub trait Admissions: std::fmt::Debug + Send + Sync {
    fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted>;
}

impl PolicyNames {
    /// The names of `lowering`'s last [`Lowering::lower`] of `compiled`.
    pub fn new(compiled: &Compiled, lowering: &Lowering) -> Self {
        Self {
            rules_by_id: lowering.rules_by_id.clone(),
            policies_by_id: lowering.policies_by_id.clone(),
            pods: compiled.pods.clone(),
            pod_ips: compiled.pod_ips.clone(),
            identities: compiled.identities.clone(),
            generation: 0,
            admissions: None,
        }
    }
}

/// Looks up what a number of the datapath stands for.
pub trait FlowNames {
    /// The pod holding `ip` (any node's pod).
    fn pod(&self, ip: IpAddr) -> Option<PodRef>;
    /// The rule a rule id (allowed flows) stands for.
    fn rule(&self, id: u32) -> Option<Origin>;
    /// The policy a policy id (drops) stands for.
    fn policy(&self, id: u32) -> Option<PolicyRef>;
    /// What admitted an allowed packet, for a datapath without rule ids ([`Admissions`]).
    fn admitted(&self, _packet: &AdmittedPacket) -> Option<Admitted> {
        None
    }
}

impl FlowNames for PolicyNames {
    fn pod(&self, ip: IpAddr) -> Option<PodRef> {
        self.pod_ips.get(&ip).cloned()
    }
    fn rule(&self, id: u32) -> Option<Origin> {
        self.rules_by_id.get(&id).cloned()
    }
    fn policy(&self, id: u32) -> Option<PolicyRef> {
        self.policies_by_id.get(&id).cloned()
    }
    fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted> {
        self.admissions.as_ref()?.admitted(packet)
    }
}

impl FlowNames for SharedPolicyNames {
    fn pod(&self, ip: IpAddr) -> Option<PodRef> {
        self.with(|n| n.pod(ip))
    }
    fn rule(&self, id: u32) -> Option<Origin> {
        self.with(|n| n.rule(id))
    }
    fn policy(&self, id: u32) -> Option<PolicyRef> {
        self.with(|n| n.policy(id))
    }
    fn admitted(&self, packet: &AdmittedPacket) -> Option<Admitted> {
        // Asked outside this lock: the datapath takes its own.
        self.with(|n| n.admissions.clone())?.admitted(packet)
    }
}

/// The agent's shared, latest [`PolicyNames`].
#[derive(Clone, Debug, Default)]
pub struct SharedPolicyNames(Arc<RwLock<PolicyNames>>);

impl SharedPolicyNames {
    /// A copy of the latest names.
    pub fn snapshot(&self) -> PolicyNames {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Reads the latest names in place (no copy).
    pub fn with<R>(&self, f: impl FnOnce(&PolicyNames) -> R) -> R {
        f(&self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Sets where [`FlowNames::admitted`] asks (kept by later publishes).
    pub fn set_admissions(&self, admissions: Arc<dyn Admissions>) {
        self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()).admissions =
            Some(admissions);
    }

    /// Publishes what a sync applied. `numbering` is the datapath's rule and policy ids
    /// (`None` for a datapath without numeric ids).
    pub fn publish(&self, compiled: &Compiled, numbering: Option<Numbering>) {
        let mut names = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        names.pods = compiled.pods.clone();
        names.pod_ips = compiled.pod_ips.clone();
        names.identities = compiled.identities.clone();
        let (rules, policies) = numbering
            .map_or_else(Default::default, |n| (n.rules_by_id.clone(), n.policies_by_id.clone()));
        names.rules_by_id = rules;
        names.policies_by_id = policies;
        names.generation += 1;
    }

    /// Publishes what an incremental sync applied: the pods and identities `delta` names, and
    /// the rule and policy ids whose meaning changed (`rule_ids`, `policy_ids`).
    pub fn publish_delta(
        &self,
        compiled: &Compiled,
        delta: &Delta,
        numbering: Numbering,
        rule_ids: &BTreeSet<u32>,
        policy_ids: &BTreeSet<u32>,
    ) {
        let mut names = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        names.copy_pods(compiled, delta);
        for id in rule_ids {
            copy(&mut names.rules_by_id, numbering.rules_by_id, id);
        }
        for id in policy_ids {
            copy(&mut names.policies_by_id, numbering.policies_by_id, id);
        }
    }

    /// Publishes the pods and identities `delta` names (a datapath without numeric ids).
    pub fn publish_pods(&self, compiled: &Compiled, delta: &Delta) {
        self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()).copy_pods(compiled, delta);
    }
}

impl PolicyNames {
    /// Copies the pods and identities `delta` names from `compiled`; a new generation.
    fn copy_pods(&mut self, compiled: &Compiled, delta: &Delta) {
        for pod in &delta.pods {
            let old = self.pods.get(pod).map(|e| e.ips.clone()).unwrap_or_default();
            let new = compiled.pods.get(pod).map(|e| e.ips.clone()).unwrap_or_default();
            for ip in old.iter().chain(&new) {
                copy(&mut self.pod_ips, &compiled.pod_ips, ip);
            }
            copy(&mut self.pods, &compiled.pods, pod);
        }
        for identity in &delta.identities {
            copy(&mut self.identities, &compiled.identities, identity);
        }
        self.generation += 1;
    }
}

/// Makes `to[key]` what `from[key]` is (present or absent).
fn copy<K: Ord + Clone, V: Clone>(to: &mut BTreeMap<K, V>, from: &BTreeMap<K, V>, key: &K) {
    match from.get(key) {
        Some(value) => to.insert(key.clone(), value.clone()),
        None => to.remove(key),
    };
}
