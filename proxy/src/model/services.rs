//! Services + EndpointSlices -> [`ServiceState`].
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    Frontend, FrontendKind, FrontendState, HealthCheck, NodeContext, Protocol, ServiceState,
    WhenEmpty,
    endpoints::{self, Endpoint, SERVICE_NAME_LABEL},
};

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Computes the desired state. Services are visited in `namespace/name` order, so when two
/// services claim the same frontend the first one keeps it, deterministically.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeContext,
) -> ServiceState {
    let mut state = ServiceState::default();
    let mut ordered: Vec<&Service> = services.into_iter().collect();
    ordered.sort_by_key(|s| key(s));
    // Slices grouped by (namespace, service name), so each service reads only its own.
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some(owner) =
            slice.metadata.labels.as_ref().and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        by_service.entry((namespace, owner.as_str())).or_default().push(slice);
    }
    // Slice name order, whatever order the slices came in (a store's is arbitrary): an address
    // named by two slices takes the first one's conditions, deterministically.
    for own in by_service.values_mut() {
        own.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    for service in ordered {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let name = service.metadata.name.as_deref().unwrap_or("");
        let own = by_service.get(&(namespace, name)).map(Vec::as_slice).unwrap_or_default();
        add_service(&mut state, service, own, node);
    }
    state
}

fn key(service: &Service) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or("")
    )
}

fn add_service(
    state: &mut ServiceState,
    service: &Service,
    own_slices: &[&EndpointSlice],
    node: &NodeContext,
) {
    let Some(spec) = &service.spec else { return };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return;
    }
    let name = key(service);

    let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        _ => spec.cluster_ip.iter().filter_map(|ip| ip.parse().ok()).collect(),
    };
    let ingress_ips: Vec<IpAddr> = if service_type == "LoadBalancer" {
        service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
            .collect()
    } else {
        Vec::new()
    };
    let external_ips: Vec<IpAddr> =
        spec.external_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
    let node_ports_served = service_type == "NodePort" || service_type == "LoadBalancer";
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    let mut local_endpoint_ips = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let Some(protocol) = Protocol::from_k8s(port.protocol.as_deref()) else { continue };
        let Ok(port_number) = u16::try_from(port.port) else { continue };
        let port_name = port.name.clone().unwrap_or_default();
        let endpoints = endpoints::collect(own_slices, &port_name, protocol, &node.name);
        // kube-proxy runs one proxier per family, each seeing only its family's endpoints: a
        // frontend balances over its own family's, and with none it rejects when its family
        // has no endpoint at all and drops when a traffic policy excluded them.
        let [v4, v6] = [true, false].map(|ipv4| {
            let family: Vec<Endpoint> =
                endpoints.iter().filter(|e| e.address.is_ipv4() == ipv4).copied().collect();
            (endpoints::usable(&family, false), endpoints::usable(&family, true))
        });
        local_endpoint_ips.extend(v4.1.iter().chain(&v6.1).map(SocketAddr::ip));

        let mut add = |address: IpAddr, port: u16, kind: FrontendKind| {
            let local_only = if kind.is_external() { external_local } else { internal_local };
            let (cluster, local) = if address.is_ipv4() { &v4 } else { &v6 };
            let when_empty = if cluster.is_empty() { WhenEmpty::Reject } else { WhenEmpty::Drop };
            let backends = if local_only { local.clone() } else { cluster.clone() };
            state.frontends.entry(Frontend { address, port, protocol }).or_insert_with(|| {
                FrontendState {
                    service: name.clone(),
                    port_name: port_name.clone(),
                    kind,
                    backends,
                    when_empty,
                    affinity_timeout,
                    local_traffic_policy: local_only,
                }
            });
        };
        for &ip in &cluster_ips {
            add(ip, port_number, FrontendKind::ClusterIp);
        }
        if node_ports_served
            && let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok())
        {
            for &ip in &node.addresses {
                add(ip, node_port, FrontendKind::NodePort);
            }
        }
        for &ip in &ingress_ips {
            add(ip, port_number, FrontendKind::LoadBalancer);
        }
        for &ip in &external_ips {
            add(ip, port_number, FrontendKind::ExternalIp);
        }
    }
    if external_local
        && let Some(hc_port) = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok())
    {
        state.health_check_node_ports.insert(
            hc_port,
            HealthCheck { service: name, local_endpoints: local_endpoint_ips.len() },
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const NODE: &str = "node-a";

    fn node() -> NodeContext {
        NodeContext { name: NODE.into(), addresses: vec!["192.168.0.10".parse().unwrap()] }
    }

    fn service(spec: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    /// A slice for service `web` with port `http`/8080 and the given endpoints
    /// `(ip, node, ready, serving, terminating)`.
    fn slice(name: &str, endpoints: &[(&str, &str, bool, bool, bool)]) -> EndpointSlice {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(ip, node, ready, serving, terminating)| {
                json!({
                    "addresses": [ip],
                    "nodeName": node,
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                })
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn cluster_ip_spec() -> Value {
        json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
               "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]})
    }

    fn frontend(ip: &str, port: u16) -> Frontend {
        Frontend { address: ip.parse().unwrap(), port, protocol: Protocol::Tcp }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn cluster_ip_balances_to_ready_endpoints_across_slices_without_duplicates() {
        let slices = [
            slice(
                "a",
                &[("10.0.1.1", NODE, true, true, false), ("10.0.2.1", "b", true, true, false)],
            ),
            slice(
                "b",
                &[("10.0.2.1", "b", true, true, false), ("10.0.3.1", "c", false, false, false)],
            ),
        ];
        let state = build(&[service(cluster_ip_spec())], &slices, &node());
        let f = &state.frontends[&frontend("10.96.0.10", 80)];
        assert_eq!(f.kind, FrontendKind::ClusterIp);
        assert_eq!(f.backends, addrs(&["10.0.1.1:8080", "10.0.2.1:8080"]));
        assert_eq!(f.service, "default/web");
        assert_eq!(f.affinity_timeout, None);
        assert_eq!(state.frontends.len(), 1);
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_no_endpoint_is_ready() {
        let serving_terminating = ("10.0.1.1", NODE, false, true, true);
        let ready = ("10.0.2.1", "b", true, true, false);
        let not_serving = ("10.0.3.1", "b", false, false, true);
        let state = build(
            &[service(cluster_ip_spec())],
            &[slice("a", &[serving_terminating, ready, not_serving])],
            &node(),
        );
        assert_eq!(
            state.frontends[&frontend("10.96.0.10", 80)].backends,
            addrs(&["10.0.2.1:8080"])
        );

        let state = build(
            &[service(cluster_ip_spec())],
            &[slice("a", &[serving_terminating, not_serving])],
            &node(),
        );
        assert_eq!(
            state.frontends[&frontend("10.96.0.10", 80)].backends,
            addrs(&["10.0.1.1:8080"])
        );
    }

    #[test]
    fn a_service_without_endpoints_rejects() {
        let state = build(&[service(cluster_ip_spec())], &[], &node());
        let f = &state.frontends[&frontend("10.96.0.10", 80)];
        assert!(f.backends.is_empty());
        assert_eq!(f.when_empty, WhenEmpty::Reject);
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        let headless = service(json!({"clusterIP": "None", "clusterIPs": ["None"],
                                      "ports": [{"name": "http", "port": 80}]}));
        let external_name = service(json!({"type": "ExternalName", "externalName": "example.org"}));
        let state = build(
            &[headless, external_name],
            &[slice("a", &[("10.0.1.1", NODE, true, true, false)])],
            &node(),
        );
        assert!(state.frontends.is_empty());
    }

    #[test]
    fn node_port_load_balancer_and_external_ips_follow_external_traffic_policy_local() {
        let mut svc = service(json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.10",
            "externalIPs": ["203.0.113.7"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
        }));
        svc.status =
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}))
                .unwrap();
        let slices = [slice(
            "a",
            &[("10.0.1.1", NODE, true, true, false), ("10.0.2.1", "b", true, true, false)],
        )];
        let state = build(&[svc], &slices, &node());

        let cluster = &state.frontends[&frontend("10.96.0.10", 80)];
        assert_eq!(cluster.backends.len(), 2, "cluster IP ignores externalTrafficPolicy");
        for (ip, port, kind) in [
            ("192.168.0.10", 30080, FrontendKind::NodePort),
            ("198.51.100.1", 80, FrontendKind::LoadBalancer),
            ("203.0.113.7", 80, FrontendKind::ExternalIp),
        ] {
            let f = &state.frontends[&frontend(ip, port)];
            assert_eq!(f.kind, kind);
            assert_eq!(f.backends, addrs(&["10.0.1.1:8080"]), "{kind:?}: local endpoints only");
        }
        assert_eq!(state.health_check_node_ports[&32000].local_endpoints, 1);
    }

    #[test]
    fn local_policy_without_local_endpoints_drops_instead_of_rejecting() {
        let svc = service(json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                                 "ports": [{"name": "http", "port": 80}]}));
        let state = build(&[svc], &[slice("a", &[("10.0.2.1", "b", true, true, false)])], &node());
        let f = &state.frontends[&frontend("10.96.0.10", 80)];
        assert!(f.backends.is_empty());
        assert_eq!(f.when_empty, WhenEmpty::Drop);
    }

    /// Each family is its own proxier, as in kube-proxy: the IPv6 frontend of a dual-stack
    /// service falls back to IPv6 terminating endpoints although IPv4 ones are ready, and
    /// rejects (not drops) when the service has no IPv6 endpoint at all.
    #[test]
    fn each_family_chooses_among_its_own_endpoints() {
        let spec = json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                          "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                          "internalTrafficPolicy": "Local",
                          "ports": [{"name": "http", "port": 80}]});
        let mut v6 = slice("b", &[("fd00::1:1", NODE, false, true, true)]);
        v6.address_type = "IPv6".into();
        let v4 = slice("a", &[("10.0.1.1", NODE, true, true, false)]);
        let state = build(&[service(spec.clone())], &[v4.clone(), v6], &node());
        assert_eq!(
            state.frontends[&frontend("10.96.0.10", 80)].backends,
            addrs(&["10.0.1.1:8080"])
        );
        assert_eq!(
            state.frontends[&frontend("fd00::10", 80)].backends,
            addrs(&["[fd00::1:1]:8080"])
        );

        // IPv4 endpoints only, on another node: IPv4 is emptied by the policy (drop), IPv6
        // has nothing at all (reject).
        let elsewhere = slice("a", &[("10.0.2.1", "b", true, true, false)]);
        let state = build(&[service(spec)], &[elsewhere], &node());
        assert_eq!(state.frontends[&frontend("10.96.0.10", 80)].when_empty, WhenEmpty::Drop);
        let f = &state.frontends[&frontend("fd00::10", 80)];
        assert!(f.backends.is_empty());
        assert_eq!(f.when_empty, WhenEmpty::Reject);
    }

    #[test]
    fn session_affinity_defaults_to_three_hours() {
        let mut spec = cluster_ip_spec();
        spec["sessionAffinity"] = json!("ClientIP");
        let state = build(&[service(spec.clone())], &[], &node());
        assert_eq!(state.frontends[&frontend("10.96.0.10", 80)].affinity_timeout, Some(10_800));
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
        let state = build(&[service(spec)], &[], &node());
        assert_eq!(state.frontends[&frontend("10.96.0.10", 80)].affinity_timeout, Some(60));
    }

    #[test]
    fn ports_match_slices_by_name_and_protocol() {
        let svc = service(json!({"clusterIP": "10.96.0.10", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]}));
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.1.1"]}],
        }))
        .unwrap();
        let state = build(&[svc], &[slice], &node());
        let udp =
            Frontend { address: "10.96.0.10".parse().unwrap(), port: 53, protocol: Protocol::Udp };
        assert_eq!(state.frontends[&udp].backends, addrs(&["10.0.1.1:5353"]));
        assert_eq!(
            state.frontends[&frontend("10.96.0.10", 53)].backends,
            addrs(&["10.0.1.1:5354"])
        );
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_ignored() {
        let mut other_ns = slice("x", &[("10.0.9.9", NODE, true, true, false)]);
        other_ns.metadata.namespace = Some("other".into());
        let mut other_svc = slice("y", &[("10.0.8.8", NODE, true, true, false)]);
        other_svc.metadata.labels.as_mut().unwrap().insert(SERVICE_NAME_LABEL.into(), "api".into());
        let state = build(&[service(cluster_ip_spec())], &[other_ns, other_svc], &node());
        assert!(state.frontends[&frontend("10.96.0.10", 80)].backends.is_empty());
    }
}
