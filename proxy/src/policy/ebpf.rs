//! [`EbpfPolicy`]: the eBPF policy datapath (the maps of `weir_common::policy`, enforced by
//! `tc_pol_egress`/`tc_pol_ingress` on each pod's host veth).
//!
//! Adoption: on start it reads back what the pinned maps hold and diffs the first compiled
//! policy against that, so a restarted agent writes only what changed while it was down (its
//! numbering of rules and CIDR classes may differ from the previous agent's: then those
//! entries are rewritten in place, never removed first). After a failed write it reads the
//! maps back again, so the next apply converges from whatever the error left.
//!
//! Order within one apply (no hole): entries are written first ([`PolicyMaps::apply`] keeps
//! its own order), and `GLOBAL_DENY_UNKNOWN` is changed last: switching it on after every
//! known pod has its entry never drops a pod the policy knows.
use std::net::IpAddr;

use weir_policy::Compiled;

use super::{
    datapath::{PolicyApplied, PolicyDatapath, PolicyDatapathError, PolicyNode},
    lower::{DatapathPolicy, Lowering},
    names::SharedPolicyNames,
    writer::PolicyMaps,
};
use crate::maps::MapsError;

pub struct EbpfPolicy {
    maps: PolicyMaps,
    lowering: Lowering,
    /// What the maps hold (as far as this process knows).
    applied: DatapathPolicy,
    deny_unknown: bool,
    names: SharedPolicyNames,
}

impl EbpfPolicy {
    /// Takes over the maps with whatever they hold.
    pub fn adopt(maps: PolicyMaps, names: SharedPolicyNames) -> Result<Self, MapsError> {
        let applied = maps.read()?;
        let deny_unknown = maps.deny_unknown()?;
        Ok(Self { maps, lowering: Lowering::default(), applied, deny_unknown, names })
    }

    /// What the maps hold, as last written or read back.
    pub fn applied(&self) -> &DatapathPolicy {
        &self.applied
    }

    pub fn deny_unknown(&self) -> bool {
        self.deny_unknown
    }

    fn reread(&mut self) {
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

impl PolicyDatapath for EbpfPolicy {
    fn apply(
        &mut self,
        compiled: &Compiled,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        let host: Vec<_> = node
            .host_addresses
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(ip) => Some(*ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        let desired = self.lowering.lower(compiled, &host);
        let mut ops = match self.maps.apply(&self.applied, &desired) {
            Ok(ops) => ops,
            Err(err) => {
                self.reread();
                return Err(err.into());
            }
        };
        self.applied = desired;
        if node.deny_unknown != self.deny_unknown {
            if let Err(err) = self.maps.set_deny_unknown(node.deny_unknown) {
                self.reread();
                return Err(err.into());
            }
            self.deny_unknown = node.deny_unknown;
            ops += 1;
        }
        self.names.publish(compiled, Some(&self.lowering));
        Ok(PolicyApplied { ops })
    }
}
