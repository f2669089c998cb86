//! Names for the numbers the policy datapath reports: pod addresses, rule ids and policy ids
//! (numbered by [`Lowering`]). The flow viewer and the per-policy drop metrics look numbers up
//! through [`FlowNames`], so they work (and are tested) without the agent's policy loop; the
//! loop publishes a fresh [`PolicyNameTable`] into a [`SharedNames`] after each lowering.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use weir_policy::{Compiled, Origin, PodRef, PolicyRef};

use super::lower::Lowering;

/// Looks up what a number of the datapath stands for.
pub trait FlowNames {
    /// The pod holding `ip` (any node's pod).
    fn pod(&self, ip: IpAddr) -> Option<PodRef>;
    /// The rule a rule id (allowed flows) stands for.
    fn rule(&self, id: u32) -> Option<Origin>;
    /// The policy a policy id (drops) stands for.
    fn policy(&self, id: u32) -> Option<PolicyRef>;
}

/// A snapshot of the names of one lowering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyNameTable {
    pub pods: BTreeMap<IpAddr, PodRef>,
    pub rules: BTreeMap<u32, Origin>,
    pub policies: BTreeMap<u32, PolicyRef>,
}

impl PolicyNameTable {
    /// The names of `lowering`'s last [`Lowering::lower`] of `compiled`.
    pub fn new(compiled: &Compiled, lowering: &Lowering) -> Self {
        Self {
            pods: compiled.pod_ips.clone(),
            rules: lowering.rules_by_id.clone(),
            policies: lowering.policies_by_id.clone(),
        }
    }
}

impl FlowNames for PolicyNameTable {
    fn pod(&self, ip: IpAddr) -> Option<PodRef> {
        self.pods.get(&ip).cloned()
    }
    fn rule(&self, id: u32) -> Option<Origin> {
        self.rules.get(&id).cloned()
    }
    fn policy(&self, id: u32) -> Option<PolicyRef> {
        self.policies.get(&id).cloned()
    }
}

/// The names the agent's policy loop keeps current; readers clone what they need.
#[derive(Clone, Debug, Default)]
pub struct SharedNames(Arc<RwLock<PolicyNameTable>>);

impl SharedNames {
    /// Replaces the names (after a lowering).
    pub fn publish(&self, table: PolicyNameTable) {
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = table;
    }

    fn read<T>(&self, f: impl FnOnce(&PolicyNameTable) -> T) -> T {
        f(&self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl FlowNames for SharedNames {
    fn pod(&self, ip: IpAddr) -> Option<PodRef> {
        self.read(|t| t.pod(ip))
    }
    fn rule(&self, id: u32) -> Option<Origin> {
        self.read(|t| t.rule(id))
    }
    fn policy(&self, id: u32) -> Option<PolicyRef> {
        self.read(|t| t.policy(id))
    }
}
