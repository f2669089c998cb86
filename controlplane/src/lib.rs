//! weir's embedded control plane, run as `weir apiserver` and by `weir lab up`.
//!
//! Concern: a Kubernetes-compatible HTTPS API that real kubectl and kube-rs accept (discovery,
//! list/watch with resourceVersion, optimistic concurrency, patch, Status errors) for the
//! resources the network needs; a revisioned key-value store with watch in etcd's model (an
//! embedded on-disk implementation and an etcd one behind one interface); and the controllers
//! the network needs (EndpointSlices, node pod CIDRs, scheduling, ReplicaSets/Deployments,
//! namespace lifecycle).
//!
//! Modules: `store` (the key-value interface, the embedded store, the conformance suite),
//! `resources` (kinds, validation, selectors, patches: pure), `auth` (TLS material, tokens,
//! kubeconfig), `api` (the HTTP server and verbs), `netns` (listening sockets in other network
//! namespaces).
//!
//! Boundaries: it knows nothing of the dataplane; the agent talks to it exactly as it talks to
//! a real kube-apiserver. What is supported and what is not: docs/controlplane.md.
pub mod api;
pub mod auth;
pub mod controllers;
pub mod netns;
pub mod resources;
pub mod store;
