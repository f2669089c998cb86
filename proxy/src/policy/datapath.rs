//! The interface between the agent's policy loop and a policy datapath (the eBPF maps or an
//! nftables table). The loop watches Namespaces, Pods, NetworkPolicies and Nodes, compiles the
//! policy of this node's pods (`weir_policy::Compiler::compile(cluster, Some(node))`) and hands
//! the result to the datapath, which makes itself match it, writing only what changed.
//!
//! Two calls: [`PolicyDatapath::apply`] takes a whole compiled state and diffs it against what
//! the datapath holds (start, resync, after an error); [`PolicyDatapath::apply_delta`] takes
//! the state after the changes a [`Delta`] of `weir_policy::IncrementalCompiler` names, and
//! costs what those changes touch.
use std::net::IpAddr;

use weir_policy::{Cidr, Compiled, Delta};

/// What a policy datapath needs to know of the node besides the compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyNode {
    /// This node's addresses: they may always connect to the node's pods (kubelet probes).
    pub host_addresses: Vec<IpAddr>,
    /// The node's pod ranges (`spec.podCIDRs`): an address in them without an endpoint entry
    /// is a pod the policy does not know yet.
    pub pod_cidrs: Vec<Cidr>,
    /// Drop packets of local pods the policy does not know yet. The loop sets it while at
    /// least one NetworkPolicy exists, so a new pod is never reachable before its policy is
    /// written (the "no window" rule).
    pub deny_unknown: bool,
}

/// What one [`PolicyDatapath::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyApplied {
    /// Datapath operations written (map entries, set elements, rules).
    pub ops: usize,
}

pub type PolicyDatapathError = Box<dyn std::error::Error + Send + Sync>;

/// A datapath enforcing NetworkPolicy on this node's pods.
pub trait PolicyDatapath: Send {
    /// Makes the datapath enforce `compiled` (compiled for this node), writing only the
    /// difference from what it enforces now. After an error the next call must converge
    /// from whatever state the error left.
    fn apply(
        &mut self,
        compiled: &Compiled,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError>;

    /// Makes the datapath enforce `compiled`, which differs from the state of the previous
    /// successful call by `delta` (and only by it). A datapath that cannot go by the delta
    /// (the default, or after an error) applies the whole state.
    fn apply_delta(
        &mut self,
        compiled: &Compiled,
        delta: &Delta,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        let _ = delta;
        self.apply(compiled, node)
    }
}
