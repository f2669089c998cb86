//! Applying the desired service state ([`crate::model::ServiceState`]) to the eBPF maps,
//! incrementally.
//!
//! [`plan::Planner`] is pure: it remembers what it has applied, diffs the next desired state
//! against it and emits the map operations that get from one to the other, in an order that
//! never lets a program follow a reference to an entry that is not there yet (backends, then
//! slots, then the master entry; removals the other way round). An unchanged frontend costs no
//! operation. [`ebpf::MapWriter`] executes the operations on the real maps.
//!
//! [`nft::NftDataplane`] renders the same state into an nftables table instead (the
//! `--dataplane nftables` fallback), with its own pure planner ([`nft::plan`]).
//!
//! The eBPF datapath serves IPv4 frontends with IPv4 backends today; other frontends of the
//! desired state are counted in [`plan::Plan::skipped`] and not written.
pub mod ebpf;
pub mod nft;
pub mod plan;
