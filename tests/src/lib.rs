//! weir's privileged test harness, shared by the end-to-end tests in `tests/tests/`, the
//! benchmarks (`cargo xtask bench`) and the smoke demo.
//!
//! Safety contract (../shared/DESIGN.md): everything a test creates lives in network namespaces
//! it created, has a unique name starting with [`names::PREFIX`], and is removed on drop, also
//! when the test panics. Leftovers of a test process that was killed are swept by the next
//! process that creates a namespace. Traffic goes only to addresses inside those namespaces.
//! A test that needs privileges and does not have them fails ([`privileged::require_root`]).
pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod cni;
pub mod dataplane;
pub mod dns;
pub mod echo;
pub mod kubelet;
pub mod lab;
pub mod names;
pub mod netns;
pub mod netpol_lab;
pub mod node;
pub mod overlay;
pub mod packet;
pub mod policy_cases;
pub mod policy_ebpf;
pub mod policy_net;
pub mod policy_oracle;
pub mod privileged;
pub mod probe;
pub mod process;
pub mod pty;
pub mod reachability;
pub mod relay;
pub mod routed;
pub mod scenarios;
pub mod sctp;
pub mod topology;
pub mod wait;
