//! NetworkPolicy in the eBPF datapath: [`lower`] turns the compiled policy (`weir-policy`) into
//! the desired contents of the policy maps (pure, diffable), and [`writer`] applies the
//! difference between two such states to the maps.
pub mod attach;
pub mod datapath;
pub mod ebpf;
pub mod lower;
pub mod names;
pub mod nft;
pub mod source;
pub mod writer;

pub use attach::PolicyPrograms;
pub use datapath::{PolicyApplied, PolicyDatapath, PolicyDatapathError, PolicyNode};
pub use ebpf::EbpfPolicy;
pub use lower::{DatapathPolicy, Lowering, MapDiff, diff};
pub use names::{PolicyNames, SharedPolicyNames};
pub use writer::PolicyMaps;
