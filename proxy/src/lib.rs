//! weir's node agent library (`weir agent`): the kube-proxy replacement.
//!
//! Concern: watch Services, EndpointSlices, NetworkPolicies, Pods, Namespaces and Nodes; compute
//! the desired dataplane state in a pure model; apply the difference to a backend (eBPF maps
//! pinned in bpffs, or the nftables table `inet weir`).
//!
//! What exists today: [`programs`], which embeds weir's compiled eBPF object and loads and
//! attaches it; [`maps`], typed access to the service load-balancing maps whose layouts live in
//! `weir-common` (one set per address family, [`family`]); and [`model`], the pure Services + EndpointSlices -> frontends/backends
//! computation with kube-proxy's semantics; and [`apply`], the incremental applier of that state
//! to the eBPF maps; and [`routing`], node-to-node pod routes (VXLAN or native), masquerade and
//! the pod MTU (docs/networking.md).
pub mod agent;
pub mod apply;
pub mod family;
pub mod inspect;
pub mod maps;
pub mod model;
pub mod policy;
pub mod programs;
pub mod routing;
pub mod sockdiag;
pub mod system;
