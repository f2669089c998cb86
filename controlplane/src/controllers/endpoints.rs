//! EndpointSlices and Endpoints from Services and Pods (pure): what kube-controller-manager's
//! endpointslice and endpoints controllers would write, simplified to one slice per Service
//! and address family.
//!
//! A Pod backs a Service when it is in the Service's namespace, matches its selector, has an
//! IP, and is not Succeeded or Failed. `ready` and `serving` follow the Pod's Ready condition;
//! a Pod with a deletionTimestamp is `terminating` (and not ready). Ports: the Service's ports
//! with `targetPort` resolved (numbers as they are, names through each Pod's container ports;
//! the first Pod that names it decides). Services without a selector are left alone (their
//! slices are the user's).
use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resources::{meta, selector::LabelSelector};

pub const MANAGED_BY: &str = "endpointslice-controller.weir.dev";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c.get("type") == Some(&json!("Ready"))))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

fn pod_ips(pod: &Value) -> Vec<String> {
    let mut ips: Vec<String> = pod
        .pointer("/status/podIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter().filter_map(|i| i.get("ip").and_then(Value::as_str).map(String::from)).collect()
        })
        .unwrap_or_default();
    if let Some(ip) = pod.pointer("/status/podIP").and_then(Value::as_str)
        && !ips.iter().any(|i| i == ip)
    {
        ips.insert(0, ip.to_string());
    }
    ips
}

fn resolve_port(port: &Value, pods: &[&Value]) -> Option<i64> {
    match port.get("targetPort").or_else(|| port.get("port"))? {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => pods.iter().find_map(|pod| {
            pod.pointer("/spec/containers")?.as_array()?.iter().find_map(|c| {
                c.get("ports")?.as_array()?.iter().find_map(|p| {
                    (p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                        .then(|| p.get("containerPort").and_then(Value::as_i64))
                        .flatten()
                })
            })
        }),
        _ => None,
    }
}

/// The desired EndpointSlices (by name) and Endpoints object of one Service, or `None` when
/// the Service has no selector.
pub fn desired<'a>(
    service: &Value,
    pods: impl IntoIterator<Item = &'a Value>,
) -> Option<(BTreeMap<String, Value>, Value)> {
    let selector = service
        .pointer("/spec/selector")
        .filter(|s| s.as_object().is_some_and(|m| !m.is_empty()))?;
    let selector = LabelSelector::from_object(selector).ok()?;
    let name = meta::meta_str(service, "name")?;
    let ns = meta::meta_str(service, "namespace")?;
    let uid = meta::meta_str(service, "uid").unwrap_or("");
    let backing: Vec<&Value> = pods
        .into_iter()
        .filter(|p| meta::meta_str(p, "namespace") == Some(ns))
        .filter(|p| selector.matches(p))
        .filter(|p| {
            !matches!(
                p.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| !pod_ips(p).is_empty())
        .collect();
    let ports: Vec<Value> = service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let port = resolve_port(p, &backing)?;
                    // Always named ("" for an unnamed port) as the real controller does;
                    // `kubectl describe service` dereferences the name.
                    let port_name = p.get("name").and_then(Value::as_str).unwrap_or("");
                    Some(json!({"name": port_name, "port": port, "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))}))
                })
                .collect()
        })
        .unwrap_or_default();
    let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
    let mut slices = BTreeMap::new();
    let mut ready_addresses = Vec::new();
    let mut not_ready_addresses = Vec::new();
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let mut endpoints = Vec::new();
        for pod in &backing {
            let Some(ip) = pod_ips(pod).into_iter().find(|ip| ip.contains(':') == v6) else {
                continue;
            };
            let terminating = meta::meta_str(pod, "deletionTimestamp").is_some();
            let ready = pod_ready(pod) && !terminating;
            let mut endpoint = json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": pod_ready(pod), "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": meta::meta_str(pod, "name"), "uid": meta::meta_str(pod, "uid")},
            });
            if let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
                endpoint["nodeName"] = json!(node);
            }
            let address = json!({"ip": ip, "nodeName": pod.pointer("/spec/nodeName"), "targetRef": endpoint["targetRef"].clone()});
            if ready {
                ready_addresses.push(address)
            } else if !terminating {
                not_ready_addresses.push(address)
            }
            endpoints.push(endpoint);
        }
        // An IPv4 slice always exists (possibly empty), like the real controller's placeholder.
        if endpoints.is_empty() && v6 {
            continue;
        }
        let slice_name = format!("{name}-{}", family.to_ascii_lowercase());
        slices.insert(
            slice_name.clone(),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "namespace": ns,
                    "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                    "ownerReferences": owner,
                },
                "addressType": family,
                "endpoints": endpoints,
                "ports": ports,
            }),
        );
    }
    let endpoint_ports: Vec<Value> = ports.clone();
    let mut subset = json!({"ports": endpoint_ports});
    if !ready_addresses.is_empty() {
        subset["addresses"] = json!(ready_addresses);
    }
    if !not_ready_addresses.is_empty() {
        subset["notReadyAddresses"] = json!(not_ready_addresses);
    }
    let subsets = if ready_addresses.is_empty() && not_ready_addresses.is_empty() {
        json!([])
    } else {
        json!([subset])
    };
    let endpoints = json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: name}, "ownerReferences": owner},
        "subsets": subsets,
    });
    Some((slices, endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: Value, ip: Option<&str>, ready: bool) -> Value {
        let mut p = json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        });
        if let Some(ip) = ip {
            p["status"]["podIP"] = json!(ip);
        }
        p
    }

    fn service() -> Value {
        json!({"metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"}, "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
    }

    #[test]
    fn matching_pods_with_ips_become_endpoints_with_conditions() {
        let mut terminating = pod("c", json!({"app": "web"}), Some("10.0.0.3"), true);
        terminating["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        let pods = vec![
            pod("a", json!({"app": "web"}), Some("10.0.0.1"), true),
            pod("b", json!({"app": "web"}), Some("10.0.0.2"), false),
            terminating,
            pod("d", json!({"app": "web"}), None, true),
            pod("e", json!({"app": "db"}), Some("10.0.0.5"), true),
            pod("v6", json!({"app": "web"}), Some("fd00::1"), true),
        ];
        let (slices, endpoints) = desired(&service(), &pods).unwrap();
        let v4 = &slices["web-ipv4"];
        assert_eq!(v4["ports"], json!([{"name": "http", "port": 8080, "protocol": "TCP"}]));
        let eps = v4["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(
            eps[0]["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
        assert_eq!(
            eps[1]["conditions"],
            json!({"ready": false, "serving": false, "terminating": false})
        );
        assert_eq!(
            eps[2]["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        assert_eq!(slices["web-ipv6"]["endpoints"][0]["addresses"], json!(["fd00::1"]));
        assert_eq!(v4["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(v4["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
        assert_eq!(endpoints["subsets"][0]["addresses"].as_array().unwrap().len(), 2);
        assert_eq!(endpoints["subsets"][0]["notReadyAddresses"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn services_without_selectors_are_left_alone_and_empty_ones_get_an_empty_slice() {
        let mut svc = service();
        svc["spec"]["selector"] = json!({});
        assert!(desired(&svc, &[]).is_none());
        let (slices, endpoints) = desired(&service(), &[]).unwrap();
        assert_eq!(slices.len(), 1);
        assert_eq!(slices["web-ipv4"]["endpoints"], json!([]));
        assert_eq!(endpoints["subsets"], json!([]));
    }
}
