//! The pure service model: from Services, EndpointSlices and this node's identity, the
//! frontends the dataplane must serve and the backends each one balances to. No I/O; the
//! appliers turn a [`ServiceState`] into map or nftables updates.
//!
//! Semantics follow kube-proxy's (pkg/proxy, `CategorizeEndpoints`):
//! - frontends: every ClusterIP (`spec.clusterIPs`, none for headless), every node address for
//!   each `nodePort`, `status.loadBalancer.ingress[].ip`, `spec.externalIPs`, per service port;
//!   ExternalName services have none;
//! - endpoints come from the EndpointSlices labelled `kubernetes.io/service-name` in the same
//!   namespace; the backend port is the slice port with the service port's name and protocol
//!   (named targetPorts are already resolved per slice); the same address:port in several
//!   slices counts once;
//! - a frontend uses the ready endpoints; when none is ready it falls back to endpoints that are
//!   serving and terminating; with none at all its traffic is rejected;
//! - `internalTrafficPolicy: Local` restricts ClusterIP frontends, and
//!   `externalTrafficPolicy: Local` restricts node-port, load-balancer and external-IP
//!   frontends, to endpoints on this node (same fallback rule); when the service has endpoints
//!   but none here, that traffic is dropped instead of rejected, as kube-proxy does;
//! - `sessionAffinity: ClientIP` pins a client to a backend for `timeoutSeconds` (default
//!   10800).
mod endpoints;
mod index;
mod keyset;
mod services;
mod tracker;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

pub use index::{ServiceIndex, build_service};
pub use services::build;
#[cfg(test)]
pub(crate) use tracker::testing as random;
pub use tracker::{Change, ServiceTracker, object_key};

/// Transport protocol of a frontend or backend (one type with the policy model's).
pub use weir_policy::Protocol;

/// What a frontend is, which decides the traffic policy that applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    /// Node ports, load-balancer IPs and external IPs take traffic from outside the cluster and
    /// follow `externalTrafficPolicy`; cluster IPs follow `internalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp)
    }
}

/// An address, port and protocol the dataplane answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What happens to traffic for a frontend with no usable backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenEmpty {
    /// The service has no endpoints at all: refuse at once (RST / ICMP / connect error).
    Reject,
    /// The service has endpoints, but none that this frontend's traffic policy allows here.
    Drop,
}

/// Where and how one frontend's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// `namespace/name` of the service.
    pub service: String,
    /// Name of the service port (may be empty).
    pub port_name: String,
    pub kind: FrontendKind,
    /// Backends, sorted; empty means [`Self::when_empty`] applies.
    pub backends: Vec<SocketAddr>,
    pub when_empty: WhenEmpty,
    /// ClientIP session affinity timeout, in seconds.
    pub affinity_timeout: Option<u32>,
    /// The frontend's traffic policy is `Local` (its backends are this node's endpoints): the
    /// client address must reach them, so external traffic is not masqueraded.
    pub local_traffic_policy: bool,
}

impl FrontendState {
    /// A ClusterIP frontend of `service` (`namespace/name`) balancing to `backends`, rejecting
    /// when it has none, without session affinity.
    pub fn cluster_ip(service: impl Into<String>, backends: Vec<SocketAddr>) -> Self {
        Self {
            service: service.into(),
            port_name: String::new(),
            kind: FrontendKind::ClusterIp,
            backends,
            when_empty: WhenEmpty::Reject,
            affinity_timeout: None,
            local_traffic_policy: false,
        }
    }
}

/// The whole desired service state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// Health-check node ports of `externalTrafficPolicy: Local` services, with the number of
    /// local endpoints that kube-proxy's /healthz reports for each.
    pub health_check_node_ports: BTreeMap<u16, HealthCheck>,
}

impl ServiceState {
    /// What a full diff looks at: every desired frontend, then those of `applied` that are no
    /// longer desired (to be removed).
    pub fn frontends_and_removed<'a>(
        &'a self,
        applied: impl Iterator<Item = &'a Frontend> + 'a,
    ) -> impl Iterator<Item = Frontend> + 'a {
        let removed: Vec<Frontend> =
            applied.filter(|f| !self.frontends.contains_key(f)).copied().collect();
        self.frontends.keys().copied().chain(removed)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: String,
    pub local_endpoints: usize,
}

/// This node, as the model needs it.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub name: String,
    /// Addresses that node ports are served on.
    pub addresses: Vec<IpAddr>,
}

/// Shorthands for the appliers' unit tests.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// TCP frontend `ip:port`.
    pub fn frontend(ip: &str, port: u16) -> Frontend {
        Frontend { address: ip.parse().unwrap(), port, protocol: Protocol::Tcp }
    }

    /// ClusterIP frontends `(ip, port, backends)` of service `default/web`.
    pub fn state(entries: &[(&str, u16, &[&str])]) -> ServiceState {
        let mut state = ServiceState::default();
        for (ip, port, backends) in entries {
            state.frontends.insert(
                frontend(ip, *port),
                FrontendState::cluster_ip(
                    "default/web",
                    backends.iter().map(|b| b.parse().unwrap()).collect(),
                ),
            );
        }
        state
    }
}
