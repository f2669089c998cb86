//! [`EbpfPolicy`]: the eBPF policy datapath (the maps of `weir_common::policy`, enforced by
//! `tc_pol_egress`/`tc_pol_ingress` on each pod's host veth).
//!
//! Adoption: on start it reads back what the pinned maps hold and diffs the first compiled
//! policy against that, so a restarted agent writes only what changed while it was down (its
//! numbering of rules and CIDR classes may differ from the previous agent's: then those
//! entries are rewritten in place, never removed first). After a failed write it reads the
//! maps back again, so the next apply converges from whatever the error left.
//!
//! [`PolicyDatapath::apply_delta`] lowers only what the delta names
//! ([`IncrementalLowering::update`]) and writes the entries that changed, without diffing
//! the whole content; [`PolicyDatapath::apply`] lowers everything again (keeping the numbering)
//! and diffs it against what the maps hold.
//!
//! Order within one apply (no hole): entries are written first ([`PolicyMaps::apply`] keeps
//! its own order), and `GLOBAL_DENY_UNKNOWN` is changed last: switching it on after every
//! known pod has its entry never drops a pod the policy knows.
use weir_policy::{Compiled, Delta};

use super::{
    datapath::{PolicyApplied, PolicyDatapath, PolicyDatapathError, PolicyNode},
    incremental::IncrementalLowering,
    lower::{DatapathPolicy, MapDiff},
    names::SharedPolicyNames,
    writer::PolicyMaps,
};
use crate::maps::MapsError;

pub struct EbpfPolicy {
    maps: PolicyMaps,
    lowering: IncrementalLowering,
    /// What the maps hold (as far as this process knows).
    applied: DatapathPolicy,
    deny_unknown: bool,
    names: SharedPolicyNames,
    /// The maps hold what the lowering last gave (false at start and after an error: the
    /// next apply goes through the whole state).
    in_sync: bool,
}

fn patch<K: Ord + Clone, V: Clone>(
    map: &mut std::collections::BTreeMap<K, V>,
    diff: &MapDiff<K, V>,
) {
    for key in &diff.deletes {
        map.remove(key);
    }
    for (key, value) in &diff.upserts {
        map.insert(key.clone(), value.clone());
    }
}

impl EbpfPolicy {
    /// Takes over the maps with whatever they hold.
    pub fn adopt(maps: PolicyMaps, names: SharedPolicyNames) -> Result<Self, MapsError> {
        let applied = maps.read()?;
        let deny_unknown = maps.deny_unknown()?;
        Ok(Self {
            maps,
            lowering: IncrementalLowering::default(),
            applied,
            deny_unknown,
            names,
            in_sync: false,
        })
    }

    /// What the maps hold, as last written or read back.
    pub fn applied(&self) -> &DatapathPolicy {
        &self.applied
    }

    pub fn deny_unknown(&self) -> bool {
        self.deny_unknown
    }

    fn reread(&mut self) {
        self.in_sync = false;
        match (self.maps.read(), self.maps.deny_unknown()) {
            (Ok(applied), Ok(deny)) => {
                self.applied = applied;
                self.deny_unknown = deny;
            }
            (Err(err), _) | (_, Err(err)) => {
                log::error!("reading the policy maps back failed: {err}");
            }
        }
    }
}

impl EbpfPolicy {
    /// Switches dropping of unknown pods last (see the module doc).
    fn set_deny_unknown(&mut self, node: &PolicyNode) -> Result<usize, PolicyDatapathError> {
        if node.deny_unknown == self.deny_unknown {
            return Ok(0);
        }
        if let Err(err) = self.maps.set_deny_unknown(node.deny_unknown) {
            self.reread();
            return Err(err.into());
        }
        self.deny_unknown = node.deny_unknown;
        Ok(1)
    }
}

impl PolicyDatapath for EbpfPolicy {
    fn apply(
        &mut self,
        compiled: &Compiled,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        self.lowering.rebuild(compiled, &node.host_addresses);
        let desired = self.lowering.desired();
        let mut ops = match self.maps.apply(&self.applied, desired) {
            Ok(ops) => ops,
            Err(err) => {
                self.reread();
                return Err(err.into());
            }
        };
        self.applied = desired.clone();
        self.in_sync = true;
        ops += self.set_deny_unknown(node)?;
        self.names.publish(compiled, Some(self.lowering.numbering()));
        Ok(PolicyApplied { ops })
    }

    fn apply_delta(
        &mut self,
        compiled: &Compiled,
        delta: &Delta,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        if !self.in_sync {
            return self.apply(compiled, node);
        }
        let changes = self.lowering.update(compiled, delta, &node.host_addresses);
        let mut ops = match self.maps.apply_delta(&changes) {
            Ok(ops) => ops,
            Err(err) => {
                self.reread();
                return Err(err.into());
            }
        };
        patch(&mut self.applied.endpoints, &changes.endpoints);
        patch(&mut self.applied.ipcache, &changes.ipcache);
        patch(&mut self.applied.rules, &changes.rules);
        ops += self.set_deny_unknown(node)?;
        self.names.publish_delta(
            compiled,
            delta,
            self.lowering.numbering(),
            &changes.rule_ids,
            &changes.policy_ids,
        );
        Ok(PolicyApplied { ops })
    }
}
