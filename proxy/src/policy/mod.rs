//! NetworkPolicy datapaths behind one interface ([`datapath`]): in eBPF, [`lower`] turns the
//! compiled policy (`weir-policy`) into the desired contents of the policy maps (pure,
//! diffable), [`writer`] applies the difference, [`attach`] keeps the programs on pod veths;
//! [`nft`] renders the same policy as an nftables table. Visibility: [`flows`] (the flow
//! ring buffer served to `weir flows`), [`drops`] (per-policy counters), [`live`] (the maps
//! read back for `weir policy trace --live`), [`names`] (what the datapath's numbers mean).
pub mod attach;
pub mod datapath;
pub mod drops;
pub mod ebpf;
pub mod flows;
pub mod incremental;
pub mod live;
pub mod lower;
pub mod names;
pub mod nft;
pub mod source;
pub mod writer;

pub use attach::PolicyPrograms;
pub use datapath::{PolicyApplied, PolicyDatapath, PolicyDatapathError, PolicyNode};
pub use ebpf::EbpfPolicy;
pub use incremental::{DatapathDelta, IncrementalLowering};
pub use lower::{DatapathPolicy, Lowering, MapDiff, diff};
pub use names::{FlowNames, PolicyNames, SharedPolicyNames};
pub use writer::PolicyMaps;
