//! Endpoints of one service port, gathered from its EndpointSlices, and kube-proxy's choice
//! among them.
use std::{collections::BTreeMap, net::SocketAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::Protocol;

/// The label that ties an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One endpoint address:port with its conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
}

/// The endpoints for service port `port_name`/`protocol` of `namespace/service`, deduplicated
/// by address (the first slice, in the order given, that names an address wins;
/// [`super::build`] gives them in name order).
pub fn collect(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    node_name: &str,
) -> Vec<Endpoint> {
    let mut by_address: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue; // FQDN slices carry no addresses a dataplane can use.
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::from_k8s(p.protocol.as_deref()) == Some(protocol)
        }) else {
            continue;
        };
        let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // Unset conditions: ready and serving default to true, terminating to false.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let local = endpoint.node_name.as_deref() == Some(node_name);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse() else { continue };
                let address = SocketAddr::new(ip, number);
                by_address.entry(address).or_insert(Endpoint {
                    address,
                    ready,
                    serving,
                    terminating,
                    local,
                });
            }
        }
    }
    by_address.into_values().collect()
}

/// kube-proxy's choice: the ready endpoints, or when none is ready the serving-and-terminating
/// ones. Restricted to local endpoints when `local_only`.
pub fn usable(endpoints: &[Endpoint], local_only: bool) -> Vec<SocketAddr> {
    let candidates: Vec<&Endpoint> = endpoints.iter().filter(|e| !local_only || e.local).collect();
    let ready: Vec<SocketAddr> = candidates.iter().filter(|e| e.ready).map(|e| e.address).collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates.iter().filter(|e| e.serving && e.terminating).map(|e| e.address).collect()
}
