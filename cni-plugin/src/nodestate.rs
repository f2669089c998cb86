//! The node state file the weir agent writes (default `/run/weir/node-state.json`): the node's
//! pod CIDRs (from `Node.spec.podCIDRs`), whether the agent is ready, and optionally the pod MTU.
//!
//! Format (docs/cni.md):
//! `{"version": 1, "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"], "ready": true, "mtu": 1450}`
//!
//! Contract: a missing file, or `ready: false`, means the plugin cannot allocate from the node's
//! range: ADD and STATUS answer code 50. The parser is pure; [`read`] is the only I/O.
use std::path::Path;

use serde::Deserialize;

use crate::{
    error::CniError,
    ipam::{
        allocator::{Range, RangeSet},
        net::IpNet,
    },
};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub version: u32,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    #[serde(default = "ready_by_default")]
    pub ready: bool,
    pub mtu: Option<u32>,
}

fn ready_by_default() -> bool {
    true
}

impl NodeState {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let state: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if state.version != 1 {
            return Err(format!("version {} is unknown (weir-cni reads version 1)", state.version));
        }
        state.range_sets()?;
        Ok(state)
    }

    /// One range set per address family, in the order the CIDRs first appear.
    pub fn range_sets(&self) -> Result<Vec<RangeSet>, String> {
        let mut sets: Vec<RangeSet> = Vec::new();
        for cidr in &self.pod_cidrs {
            let net: IpNet = cidr.parse()?;
            let range = Range::new(net.network());
            match sets.iter_mut().find(|s| s[0].subnet.is_v4() == net.is_v4()) {
                Some(set) => set.push(range),
                None => sets.push(vec![range]),
            }
        }
        if sets.is_empty() {
            return Err("podCIDRs is empty".into());
        }
        Ok(sets)
    }
}

/// Reads the node state file; a missing or unreadable one is "not available" (code 50).
pub fn read(path: &Path) -> Result<NodeState, CniError> {
    let bytes = std::fs::read(path).map_err(|e| CniError::NotAvailable {
        msg: format!(
            "the node state file {} cannot be read ({e}): the weir agent has not written the node's \
             pod CIDRs yet; start the agent, or set ipam.ranges in the network config",
            path.display()
        ),
    })?;
    let state = NodeState::parse(&bytes).map_err(|e| CniError::NotAvailable {
        msg: format!("the node state file {} is invalid: {e}", path.display()),
    })?;
    if !state.ready {
        return Err(CniError::NotAvailable {
            msg: format!("the weir agent reports the node not ready ({})", path.display()),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_gives_one_range_set_per_family() {
        let state = NodeState::parse(
            br#"{"version":1,"podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64","10.245.0.0/24"],"mtu":1450}"#,
        )
        .unwrap();
        assert!(state.ready);
        let sets = state.range_sets().unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].len(), 2);
        assert_eq!(state.mtu, Some(1450));
        assert!(NodeState::parse(br#"{"version":2,"podCIDRs":["10.0.0.0/24"]}"#).is_err());
        assert!(NodeState::parse(br#"{"version":1,"podCIDRs":[]}"#).is_err());
        assert!(NodeState::parse(br#"{"version":1,"podCIDRs":["nope"]}"#).is_err());
    }

    #[test]
    fn a_missing_file_is_not_available() {
        let err = read(Path::new("/nonexistent/weir/node-state.json")).unwrap_err();
        assert_eq!(err.code(), 50);
    }
}
