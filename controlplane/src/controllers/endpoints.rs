//! EndpointSlices and Endpoints from Services and Pods (pure): what kube-controller-manager's
//! endpointslice and endpoints controllers would write, simplified to one slice per Service
//! and address family.
//!
//! Families: a slice (possibly empty, as the real controller's placeholder) for each of the
//! Service's `ipFamilies`, holding each Pod's address of that family from `status.podIPs`.
//! A Service stored without `ipFamilies` gets its clusterIP's family, or both when headless.
//! The Endpoints object holds one address per Pod, of the Service's primary family.
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

/// The Service's `ipFamilies`, primary first.
fn listed_families(service: &Value) -> Vec<&'static str> {
    service
        .pointer("/spec/ipFamilies")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .filter_map(|f| match f.as_str() {
                    Some("IPv4") => Some("IPv4"),
                    Some("IPv6") => Some("IPv6"),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The families of a Service stored without `ipFamilies` (kube's getAddressTypesForService):
/// its clusterIP's, or both when it has none.
fn legacy_families(service: &Value) -> Vec<&'static str> {
    match service.pointer("/spec/clusterIP").and_then(Value::as_str) {
        Some(ip) if !ip.is_empty() && ip != "None" => {
            vec![if ip.contains(':') { "IPv6" } else { "IPv4" }]
        }
        _ => vec!["IPv4", "IPv6"],
    }
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
    let listed = listed_families(service);
    let legacy = listed.is_empty();
    let families = if legacy { legacy_families(service) } else { listed };
    // A Service without families and without a clusterIP: each Pod's Endpoints address is of
    // the family of its `podIP` (kube's endpoints controller).
    let headless_legacy = legacy && families.len() == 2;
    for (i, family) in families.iter().enumerate() {
        let v6 = *family == "IPv6";
        let mut endpoints = Vec::new();
        for pod in &backing {
            let ips = pod_ips(pod);
            let Some(ip) = ips.iter().find(|ip| ip.contains(':') == v6).cloned() else {
                continue;
            };
            let in_endpoints = if headless_legacy { ips[0] == ip } else { i == 0 };
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
            if in_endpoints && ready {
                ready_addresses.push(address)
            } else if in_endpoints && !terminating {
                not_ready_addresses.push(address)
            }
            endpoints.push(endpoint);
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
        json!({"metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"}, "spec": {"selector": {"app": "web"}, "ipFamilies": ["IPv4", "IPv6"], "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
    }

    fn dual_stack_pod(name: &str, ips: &[&str]) -> Value {
        let mut p = pod(name, json!({"app": "web"}), Some(ips[0]), true);
        p["status"]["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        p
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
        // The Endpoints object is of the primary family only.
        assert_eq!(endpoints["subsets"][0]["addresses"].as_array().unwrap().len(), 1);
        assert_eq!(endpoints["subsets"][0]["notReadyAddresses"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn services_without_selectors_are_left_alone_and_empty_ones_get_an_empty_slice() {
        let mut svc = service();
        svc["spec"]["selector"] = json!({});
        assert!(desired(&svc, &[]).is_none());
        let (slices, endpoints) = desired(&service(), &[]).unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices["web-ipv4"]["endpoints"], json!([]));
        assert_eq!(slices["web-ipv6"]["endpoints"], json!([]));
        assert_eq!(endpoints["subsets"], json!([]));
    }

    #[test]
    fn slices_follow_the_service_families_and_endpoints_its_primary_one() {
        let pods = [
            dual_stack_pod("a", &["10.0.0.1", "fd00::1"]),
            dual_stack_pod("b", &["10.0.0.2"]),
            dual_stack_pod("c", &["fd00::3"]),
        ];
        let addresses = |slice: &Value| -> Vec<String> {
            let endpoints = slice["endpoints"].as_array().unwrap();
            endpoints.iter().map(|e| e["addresses"][0].as_str().unwrap().to_string()).collect()
        };
        let endpoint_ips = |endpoints: &Value| -> Vec<String> {
            let subset = endpoints["subsets"][0]["addresses"].as_array().unwrap();
            subset.iter().map(|a| a["ip"].as_str().unwrap().to_string()).collect()
        };
        let with = |spec: Value| {
            let mut svc = service();
            svc["spec"].as_object_mut().unwrap().remove("ipFamilies");
            for (k, v) in spec.as_object().unwrap() {
                svc["spec"][k] = v.clone();
            }
            desired(&svc, &pods).unwrap()
        };
        let (slices, endpoints) = with(json!({"ipFamilies": ["IPv4"]}));
        assert_eq!(slices.keys().collect::<Vec<_>>(), ["web-ipv4"]);
        assert_eq!(addresses(&slices["web-ipv4"]), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(endpoint_ips(&endpoints), ["10.0.0.1", "10.0.0.2"]);
        let (slices, endpoints) = with(json!({"ipFamilies": ["IPv6"]}));
        assert_eq!(slices.keys().collect::<Vec<_>>(), ["web-ipv6"]);
        assert_eq!(slices["web-ipv6"]["addressType"], "IPv6");
        assert_eq!(addresses(&slices["web-ipv6"]), ["fd00::1", "fd00::3"]);
        assert_eq!(endpoint_ips(&endpoints), ["fd00::1", "fd00::3"]);
        let (slices, endpoints) = with(json!({"ipFamilies": ["IPv6", "IPv4"]}));
        assert_eq!(addresses(&slices["web-ipv4"]), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(addresses(&slices["web-ipv6"]), ["fd00::1", "fd00::3"]);
        assert_eq!(endpoint_ips(&endpoints), ["fd00::1", "fd00::3"]);
        // Stored without families: the clusterIP's family, or both for headless (Endpoints
        // then by each Pod's podIP).
        let (slices, _) = with(json!({"clusterIP": "10.96.0.9"}));
        assert_eq!(slices.keys().collect::<Vec<_>>(), ["web-ipv4"]);
        let (slices, endpoints) = with(json!({"clusterIP": "None"}));
        assert_eq!(slices.len(), 2);
        assert_eq!(endpoint_ips(&endpoints), ["10.0.0.1", "10.0.0.2", "fd00::3"]);
    }
}
