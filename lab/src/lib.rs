//! `weir lab`: a multi-node Kubernetes cluster made of network namespaces on one machine.
//!
//! `up` creates an underlay namespace with a bridge and one namespace per node, starts the
//! embedded API server (on 127.0.0.1 for kubectl and on the underlay for the nodes), and on
//! each node the real `weir agent` and the node runtime `weir node` (which plays kubelet and
//! execs `weir-cni`), then installs cluster DNS. `down` removes all of it, also after a crash.
//! The shape of everything is computed by [`plan`] without I/O.
pub mod cluster;
pub mod down;
pub mod host;
pub mod plan;
pub mod state;
pub mod status;
pub mod up;

pub use plan::{Dataplane, IpFamily, LabSpec, Overlay};

/// Where a lab keeps its files when no state directory is given.
pub fn default_state_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/lib/weir/lab").join(name)
}
