//! `weir-cni`: the CNI plugin that kubelet/containerd (and the lab's node runtime) exec for every
//! pod.
//!
//! Concern: one synchronous invocation per CNI command (ADD, DEL, CHECK, VERSION, STATUS, GC)
//! for spec versions 0.3.0 to 1.1.0: parse the config and environment, wire the pod's routed
//! veth (peer created directly in the pod namespace), allocate addresses with the built-in,
//! crash-safe IPAM (or delegate to another IPAM plugin), and print a result or a spec error.
//!
//! Boundaries: no long-running state and no dependency on the agent being up. When the agent's
//! pinned maps exist, ADD registers the endpoint in them; otherwise pods still get addresses
//! and routes. Built by the CNI issue; until then this crate has no commands.
