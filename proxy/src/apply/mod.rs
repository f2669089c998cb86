//! Applying the desired service state ([`crate::model::ServiceState`]) to the eBPF maps,
//! incrementally.
//!
//! [`plan::Planner`] is pure: for one address family ([`crate::family`]), it remembers what it
//! has applied, diffs the next desired state against it and emits the map operations that get from one to the other, in an order that
//! never lets a program follow a reference to an entry that is not there yet (backends, then
//! slots, then the master entry; removals the other way round). An unchanged frontend costs no
//! operation. [`plan::ServicePlanner`] runs one per family; [`ebpf::MapWriter`] executes their
//! operations on the real maps.
//!
//! [`nft::NftDataplane`] renders the same state into an nftables table instead (the
//! `--dataplane nftables` fallback), with its own pure planner ([`nft::plan`]).
//!
//! Each frontend balances over the backends of its own family; backends of the other family
//! are left out.
pub mod ebpf;
pub mod nft;
pub mod plan;
