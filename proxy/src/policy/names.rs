//! What the numbers in the policy datapath stand for, as of the latest sync: rule and policy
//! ids (flow events, per-policy drop counters) and the compiled pods and identities (addresses
//! and identities of flow events). Written by the agent's policy loop after every successful
//! apply; read by the flow viewer and metrics. Readers take a snapshot ([`SharedPolicyNames`]
//! is cheap to clone and never blocks the loop for long).
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use super::lower::Lowering;
use weir_policy::{Compiled, Origin, PodRef, PolicyRef, compile::PodEntry, identity::IdentityKey};

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

    /// Publishes what a sync applied. `lowering` numbers the datapath's rules and policies
    /// (`None` for a datapath without numeric ids).
    pub fn publish(&self, compiled: &Compiled, lowering: Option<&Lowering>) {
        let mut names = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        names.pods = compiled.pods.clone();
        names.pod_ips = compiled.pod_ips.clone();
        names.identities = compiled.identities.clone();
        let (rules, policies) = lowering
            .map_or_else(Default::default, |l| (l.rules_by_id.clone(), l.policies_by_id.clone()));
        names.rules_by_id = rules;
        names.policies_by_id = policies;
        names.generation += 1;
    }
}
