//! weir's node agent library (`weir agent`): the kube-proxy replacement.
//!
//! Concern: watch Services, EndpointSlices, NetworkPolicies, Pods, Namespaces and Nodes; compute
//! the desired dataplane state in a pure model; apply the difference to a backend (eBPF maps
//! pinned in bpffs, or the nftables table `inet weir`).
//!
//! What exists today: [`programs`], which embeds weir's compiled eBPF object and loads it, and
//! [`maps`], typed access to the service load-balancing maps whose layouts live in
//! `weir-common`. The watchers, the model and the appliers come with the load-balancing issue.
pub mod maps;
pub mod programs;
