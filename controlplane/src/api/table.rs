//! Server-side printing: the `meta.k8s.io/v1` Table kubectl asks for (`Accept: ...;as=Table`)
//! when it prints `kubectl get` output.
//!
//! Columns, their order, types and priorities follow kube-apiserver's printers
//! (pkg/printers/internalversion/printers.go) for the kinds weir serves; as there, every row
//! carries the priority-1 cells too and kubectl shows them with `-o wide`. Other kinds get
//! NAME and AGE. Cells are computed from the object alone (and the current time for ages).
use serde_json::{Value, json};

use crate::resources::{Resource, meta, selector::LabelSelector};

/// A column: name, type, priority (1 = only with `-o wide`), description.
type Column = (&'static str, &'static str, u8, &'static str);

const NAME: Column = ("Name", "string", 0, "Name of the object.");
const AGE: Column = ("Age", "string", 0, "Time since the object was created.");
const CONTAINERS: Column = ("Containers", "string", 1, "Names of each container in the template.");
const IMAGES: Column =
    ("Images", "string", 1, "Images referenced by each container in the template.");

fn columns(kind: &str) -> Vec<Column> {
    match kind {
        "Pod" => vec![
            NAME,
            (
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            ("Status", "string", 0, "The aggregate status of the containers in this pod."),
            (
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            ("IP", "string", 1, "The pod's IP address."),
            ("Node", "string", 1, "The node the pod is bound to."),
            ("Nominated Node", "string", 1, "The node the scheduler nominated for preemption."),
            ("Readiness Gates", "string", 1, "Readiness gates that are true, of those listed."),
        ],
        "Node" => vec![
            NAME,
            ("Status", "string", 0, "The status of the node"),
            ("Roles", "string", 0, "The roles of the node"),
            AGE,
            ("Version", "string", 0, "Kubelet version reported by the node."),
            ("Internal-IP", "string", 1, "The node's InternalIP address."),
            ("External-IP", "string", 1, "The node's ExternalIP address."),
            ("OS-Image", "string", 1, "OS image reported by the node."),
            ("Kernel-Version", "string", 1, "Kernel version reported by the node."),
            ("Container-Runtime", "string", 1, "Container runtime version reported by the node."),
        ],
        "Service" => vec![
            NAME,
            ("Type", "string", 0, "How the service is exposed."),
            ("Cluster-IP", "string", 0, "The service's cluster IP."),
            ("External-IP", "string", 0, "External IPs or load balancer ingress of the service."),
            ("Port(s)", "string", 0, "The service's ports."),
            AGE,
            ("Selector", "string", 1, "The pods the service routes to."),
        ],
        "Endpoints" => vec![NAME, ("Endpoints", "string", 0, "The endpoints' addresses."), AGE],
        "EndpointSlice" => vec![
            NAME,
            ("AddressType", "string", 0, "The type of the addresses."),
            ("Ports", "string", 0, "The slice's ports."),
            ("Endpoints", "string", 0, "The slice's endpoint addresses."),
            AGE,
        ],
        "NetworkPolicy" => {
            vec![NAME, ("Pod-Selector", "string", 0, "The pods the policy applies to."), AGE]
        }
        "Deployment" => vec![
            NAME,
            ("Ready", "string", 0, "Number of the pod with ready state"),
            ("Up-to-date", "string", 0, "Pods updated to the current template."),
            ("Available", "string", 0, "Pods available to serve."),
            AGE,
            CONTAINERS,
            IMAGES,
            ("Selector", "string", 1, "The pods the deployment manages."),
        ],
        "ReplicaSet" => vec![
            NAME,
            ("Desired", "integer", 0, "Desired number of replicas."),
            ("Current", "integer", 0, "Number of replicas."),
            ("Ready", "integer", 0, "Number of ready replicas."),
            AGE,
            CONTAINERS,
            IMAGES,
            ("Selector", "string", 1, "The pods the replica set manages."),
        ],
        "Namespace" => vec![NAME, ("Status", "string", 0, "The status of the namespace"), AGE],
        "ConfigMap" => vec![NAME, ("Data", "string", 0, "Number of data entries."), AGE],
        _ => vec![NAME, AGE],
    }
}

fn column_definition(&(name, ty, priority, description): &Column) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": description,
           "priority": priority})
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn int_at(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn array_at<'a>(obj: &'a Value, pointer: &str) -> &'a [Value] {
    obj.pointer(pointer).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn or_none(s: impl Into<String>) -> String {
    let s = s.into();
    if s.is_empty() { "<none>".into() } else { s }
}

/// "a,b,c" or "a,b,c + N more..." (at most three shown), "<unset>" when empty.
fn list_with_more(items: impl Iterator<Item = String>) -> String {
    let all: Vec<String> = items.collect();
    match all.len() {
        0 => "<unset>".into(),
        n if n > 3 => format!("{} + {} more...", all[..3].join(","), n - 3),
        _ => all.join(","),
    }
}

fn selector_string(selector: Option<&Value>) -> String {
    selector
        .and_then(|s| LabelSelector::from_object(s).ok())
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The cells of one row; `now` is seconds since the epoch.
fn cells(kind: &str, obj: &Value, now: i64) -> Vec<Value> {
    let name = json!(meta::meta_str(obj, "name").unwrap_or(""));
    let age = json!(meta::age_at(meta::meta_str(obj, "creationTimestamp").unwrap_or(""), now));
    match kind {
        "Pod" => pod_cells(obj, name, age, now),
        "Node" => node_cells(obj, name, age),
        "Service" => service_cells(obj, name, age),
        "Endpoints" => vec![name, json!(endpoints(obj)), age],
        "EndpointSlice" => {
            let ports = array_at(obj, "/ports").iter().map(|p| match p.get("port") {
                Some(Value::Number(n)) => n.to_string(),
                _ => p.get("name").and_then(Value::as_str).unwrap_or("*").to_string(),
            });
            let addresses = array_at(obj, "/endpoints")
                .iter()
                .flat_map(|e| array_at(e, "/addresses").iter())
                .map(|a| a.as_str().unwrap_or("").to_string());
            vec![
                name,
                json!(str_at(obj, "/addressType")),
                json!(list_with_more(ports)),
                json!(list_with_more(addresses)),
                age,
            ]
        }
        "NetworkPolicy" => {
            vec![name, json!(or_none(selector_string(obj.pointer("/spec/podSelector")))), age]
        }
        "Deployment" => {
            let mut row = vec![
                name,
                json!(format!(
                    "{}/{}",
                    int_at(obj, "/status/readyReplicas"),
                    int_at(obj, "/spec/replicas")
                )),
                json!(int_at(obj, "/status/updatedReplicas")),
                json!(int_at(obj, "/status/availableReplicas")),
                age,
            ];
            row.extend(template_cells(obj));
            row
        }
        "ReplicaSet" => {
            let mut row = vec![
                name,
                json!(int_at(obj, "/spec/replicas")),
                json!(int_at(obj, "/status/replicas")),
                json!(int_at(obj, "/status/readyReplicas")),
                age,
            ];
            row.extend(template_cells(obj));
            row
        }
        "Namespace" => vec![name, json!(str_at(obj, "/status/phase")), age],
        "ConfigMap" => {
            let entries = ["data", "binaryData"]
                .iter()
                .filter_map(|k| obj.get(*k).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            vec![name, json!(entries), age]
        }
        _ => vec![name, age],
    }
}

/// Containers, images and selector of a workload's pod template.
fn template_cells(obj: &Value) -> [Value; 3] {
    let containers = array_at(obj, "/spec/template/spec/containers");
    let join = |field: &str| {
        containers
            .iter()
            .map(|c| c.get(field).and_then(Value::as_str).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(",")
    };
    [
        json!(join("name")),
        json!(join("image")),
        json!(selector_string(obj.pointer("/spec/selector"))),
    ]
}

/// Pod READY, STATUS and RESTARTS as kube-apiserver computes them (printPod).
fn pod_cells(pod: &Value, name: Value, age: Value, now: i64) -> Vec<Value> {
    let init_specs = array_at(pod, "/spec/initContainers");
    // Init containers with `restartPolicy: Always` (sidecars) count as containers.
    let is_sidecar =
        |name: &str| init_specs.iter().any(|c| c["name"] == name && c["restartPolicy"] == "Always");
    let total = array_at(pod, "/spec/containers").len()
        + init_specs.iter().filter(|c| c["restartPolicy"] == "Always").count();
    let mut reason = match str_at(pod, "/status/reason") {
        "" => str_at(pod, "/status/phase").to_string(),
        r => r.to_string(),
    };
    let mut ready = 0;
    let mut restarts = 0;
    let mut last_restart: Option<i64> = None;
    let mut sidecar_restarts = 0;
    let mut sidecar_last_restart: Option<i64> = None;
    let latest = |at: Option<i64>, c: &Value| match meta::parse_rfc3339(str_at(
        c,
        "/lastState/terminated/finishedAt",
    )) {
        Some(finished) => Some(at.map_or(finished, |l: i64| l.max(finished))),
        None => at,
    };
    // The first init container that has not completed (nor, for a sidecar, started) decides
    // STATUS while the pod initializes, as in kube-apiserver's printPod.
    let mut initializing = false;
    let init_statuses = array_at(pod, "/status/initContainerStatuses");
    for (i, c) in init_statuses.iter().enumerate() {
        restarts += int_at(c, "/restartCount");
        last_restart = latest(last_restart, c);
        let sidecar = is_sidecar(str_at(c, "/name"));
        if sidecar {
            sidecar_restarts += int_at(c, "/restartCount");
            sidecar_last_restart = latest(sidecar_last_restart, c);
        }
        let terminated = c.pointer("/state/terminated");
        let waiting = str_at(c, "/state/waiting/reason");
        if terminated.is_some_and(|t| int_at(t, "/exitCode") == 0) {
            continue;
        }
        if sidecar && c.get("started") == Some(&json!(true)) {
            if c.get("ready") == Some(&json!(true)) {
                ready += 1;
            }
            continue;
        }
        reason = if let Some(t) = terminated {
            match (str_at(t, "/reason"), int_at(t, "/signal")) {
                ("", 0) => format!("Init:ExitCode:{}", int_at(t, "/exitCode")),
                ("", signal) => format!("Init:Signal:{signal}"),
                (r, _) => format!("Init:{r}"),
            }
        } else if !waiting.is_empty() && waiting != "PodInitializing" {
            format!("Init:{waiting}")
        } else {
            format!("Init:{i}/{}", init_specs.len())
        };
        initializing = true;
        break;
    }
    let initialized = array_at(pod, "/status/conditions")
        .iter()
        .any(|c| c["type"] == "Initialized" && c["status"] == "True");
    let mut has_running = false;
    if !initializing || initialized {
        restarts = sidecar_restarts;
        last_restart = sidecar_last_restart;
        // Walked from the last container to the first, as kube-apiserver does: the first
        // container with a waiting or terminated reason decides STATUS.
        for c in array_at(pod, "/status/containerStatuses").iter().rev() {
            restarts += int_at(c, "/restartCount");
            last_restart = latest(last_restart, c);
            let waiting = str_at(c, "/state/waiting/reason");
            let terminated = c.pointer("/state/terminated");
            if !waiting.is_empty() {
                reason = waiting.to_string();
            } else if let Some(t) = terminated {
                reason = match (str_at(t, "/reason"), int_at(t, "/signal")) {
                    ("", 0) => format!("ExitCode:{}", int_at(t, "/exitCode")),
                    ("", signal) => format!("Signal:{signal}"),
                    (r, _) => r.to_string(),
                };
            } else if c.get("ready") == Some(&json!(true)) && c.pointer("/state/running").is_some()
            {
                has_running = true;
                ready += 1;
            }
        }
    }
    if reason == "Completed" && has_running {
        let pod_ready = array_at(pod, "/status/conditions")
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        reason = if pod_ready { "Running" } else { "NotReady" }.into();
    }
    let phase = str_at(pod, "/status/phase");
    if pod.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()) {
        if str_at(pod, "/status/reason") == "NodeLost" {
            reason = "Unknown".into();
        } else if phase != "Succeeded" && phase != "Failed" {
            reason = "Terminating".into();
        }
    }
    let restarts = match last_restart {
        Some(at) if restarts != 0 => format!("{restarts} ({} ago)", meta::human_duration(now - at)),
        _ => restarts.to_string(),
    };
    let ip = array_at(pod, "/status/podIPs")
        .first()
        .and_then(|ip| ip.get("ip"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| str_at(pod, "/status/podIP"));
    let gates = array_at(pod, "/spec/readinessGates");
    let readiness_gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = array_at(pod, "/status/conditions");
        let true_gates = gates
            .iter()
            .filter(|g| {
                conditions
                    .iter()
                    .any(|c| c.get("type") == g.get("conditionType") && c["status"] == "True")
            })
            .count();
        format!("{true_gates}/{}", gates.len())
    };
    vec![
        name,
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        age,
        json!(or_none(ip)),
        json!(or_none(str_at(pod, "/spec/nodeName"))),
        json!(or_none(str_at(pod, "/status/nominatedNodeName"))),
        json!(readiness_gates),
    ]
}

/// Node STATUS (Ready / NotReady / Unknown, plus SchedulingDisabled), ROLES from the
/// `node-role.kubernetes.io/<role>` and `kubernetes.io/role` labels.
fn node_cells(node: &Value, name: Value, age: Value) -> Vec<Value> {
    let mut status: Vec<&str> = Vec::new();
    match array_at(node, "/status/conditions").iter().find(|c| c["type"] == "Ready") {
        Some(c) if c["status"] == "True" => status.push("Ready"),
        Some(_) => status.push("NotReady"),
        None => status.push("Unknown"),
    }
    if node.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push("SchedulingDisabled");
    }
    let mut roles: Vec<String> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                (!role.is_empty()).then(|| role.to_string())
            } else if k == "kubernetes.io/role" {
                v.as_str().filter(|r| !r.is_empty()).map(String::from)
            } else {
                None
            }
        })
        .collect();
    roles.sort();
    roles.dedup();
    let address = |ty: &str| {
        array_at(node, "/status/addresses")
            .iter()
            .find(|a| a["type"] == ty)
            .and_then(|a| a.get("address").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_string()
    };
    let info = |field: &str| match str_at(node, &format!("/status/nodeInfo/{field}")) {
        "" => "<unknown>".to_string(),
        v => v.to_string(),
    };
    vec![
        name,
        json!(status.join(",")),
        json!(or_none(roles.join(","))),
        age,
        json!(str_at(node, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(info("osImage")),
        json!(info("kernelVersion")),
        json!(info("containerRuntimeVersion")),
    ]
}

fn service_cells(svc: &Value, name: Value, age: Value) -> Vec<Value> {
    let ty = str_at(svc, "/spec/type");
    let cluster_ip = array_at(svc, "/spec/clusterIPs")
        .first()
        .and_then(Value::as_str)
        .unwrap_or_else(|| str_at(svc, "/spec/clusterIP"));
    let external_ips: Vec<&str> =
        array_at(svc, "/spec/externalIPs").iter().filter_map(Value::as_str).collect();
    let external = match ty {
        "ClusterIP" | "NodePort" | "" => or_none(external_ips.join(",")),
        "LoadBalancer" => {
            let mut all: Vec<&str> = array_at(svc, "/status/loadBalancer/ingress")
                .iter()
                .filter_map(|i| i.get("ip").or_else(|| i.get("hostname")).and_then(Value::as_str))
                .collect();
            all.extend(&external_ips);
            if all.is_empty() { "<pending>".into() } else { all.join(",") }
        }
        "ExternalName" => str_at(svc, "/spec/externalName").to_string(),
        _ => "<unknown>".into(),
    };
    let ports: Vec<String> = array_at(svc, "/spec/ports")
        .iter()
        .map(|p| {
            let port = int_at(p, "/port");
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match int_at(p, "/nodePort") {
                0 => format!("{port}/{proto}"),
                node_port => format!("{port}:{node_port}/{proto}"),
            }
        })
        .collect();
    vec![
        name,
        json!(ty),
        json!(or_none(cluster_ip)),
        json!(external),
        json!(or_none(ports.join(","))),
        age,
        json!(or_none(selector_string(svc.pointer("/spec/selector")))),
    ]
}

/// Endpoints ENDPOINTS: `ip:port` pairs, at most three, "<none>" when empty.
fn endpoints(obj: &Value) -> String {
    let pairs: Vec<String> = array_at(obj, "/subsets")
        .iter()
        .flat_map(|subset| {
            let addresses = array_at(subset, "/addresses");
            array_at(subset, "/ports").iter().flat_map(move |port| {
                addresses.iter().map(move |a| {
                    let ip = str_at(a, "/ip");
                    let port = int_at(port, "/port");
                    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
                })
            })
        })
        .collect();
    match pairs.len() {
        0 => "<none>".into(),
        n if n > 3 => format!("{} + {} more...", pairs[..3].join(","), n - 3),
        _ => pairs.join(","),
    }
}

/// A Table of `objects`. `resource_version`/`continue_token` go into the list metadata.
pub fn table(
    resource: &Resource,
    objects: &[Value],
    resource_version: &str,
    continue_token: Option<&str>,
) -> Value {
    let now = meta::now_secs();
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| json!({"cells": cells(resource.kind, obj, now), "object": obj}))
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns(resource.kind).iter().map(column_definition).collect::<Vec<_>>(),
        "rows": rows,
    })
}

/// Whether the Accept header asks for a Table.
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').next().is_some_and(|first| first.contains("as=Table")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    const NOW: i64 = 1_000_000;

    fn ts(secs_ago: i64) -> String {
        meta::rfc3339(NOW - secs_ago)
    }

    fn row(kind: &str, obj: Value) -> Vec<String> {
        let cells = cells(kind, &obj, NOW);
        assert_eq!(cells.len(), columns(kind).len(), "{kind}: one cell per column");
        cells
            .iter()
            .map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect()
    }

    fn names(kind: &str) -> Vec<&'static str> {
        columns(kind).iter().map(|c| c.0).collect()
    }

    #[test]
    fn every_kind_has_one_cell_per_column_and_a_table_envelope() {
        for resource in crate::resources::RESOURCES {
            let t = table(resource, &[json!({"metadata": {"name": "x"}})], "5", Some("c"));
            let defs = t["columnDefinitions"].as_array().unwrap();
            assert_eq!(
                t["rows"][0]["cells"].as_array().unwrap().len(),
                defs.len(),
                "{}",
                resource.kind
            );
            assert_eq!(defs[0]["format"], "name");
            assert_eq!(t["metadata"]["continue"], "c");
        }
        assert!(wants_table(Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")));
        assert!(!wants_table(Some("application/json")));
    }

    fn container(name: &str, ready: bool, state: Value, restarts: i64, last: Value) -> Value {
        json!({"name": name, "ready": ready, "state": state, "restartCount": restarts,
               "lastState": last})
    }

    fn pod(statuses: Vec<Value>) -> Value {
        json!({"metadata": {"name": "web", "creationTimestamp": ts(300)},
               "spec": {"nodeName": "node-a", "containers": [{"name": "a"}, {"name": "b"}]},
               "status": {"phase": "Running", "podIP": "10.244.1.5",
                          "podIPs": [{"ip": "10.244.1.5"}],
                          "conditions": [{"type": "Ready", "status": "False"}],
                          "containerStatuses": statuses}})
    }

    #[test]
    fn pods_show_ready_reason_aware_status_and_restarts() {
        assert_eq!(
            names("Pod"),
            [
                "Name",
                "Ready",
                "Status",
                "Restarts",
                "Age",
                "IP",
                "Node",
                "Nominated Node",
                "Readiness Gates"
            ]
        );
        let running = json!({"running": {"startedAt": ts(100)}});
        let both = pod(vec![
            container("a", true, running.clone(), 0, json!({})),
            container("b", true, running.clone(), 0, json!({})),
        ]);
        assert_eq!(
            row("Pod", both),
            ["web", "2/2", "Running", "0", "5m", "10.244.1.5", "node-a", "<none>", "<none>"]
        );
        let crash = pod(vec![
            container("a", true, running.clone(), 0, json!({})),
            container(
                "b",
                false,
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                4,
                json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": ts(90)}}),
            ),
        ]);
        let r = row("Pod", crash);
        assert_eq!(r[1..4], ["1/2", "CrashLoopBackOff", "4 (90s ago)"]);
        let pull = pod(vec![container(
            "a",
            false,
            json!({"waiting": {"reason": "ErrImagePull"}}),
            0,
            json!({}),
        )]);
        assert_eq!(row("Pod", pull)[2], "ErrImagePull");
        let mut done = pod(vec![
            container(
                "a",
                false,
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                0,
                json!({}),
            ),
            container(
                "b",
                false,
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                0,
                json!({}),
            ),
        ]);
        done["status"]["phase"] = json!("Succeeded");
        assert_eq!(row("Pod", done.clone())[1..3], ["0/2", "Completed"]);
        // A completed sidecar next to a running container: Running when the pod is Ready.
        let mut mixed = pod(vec![
            container("a", true, running.clone(), 0, json!({})),
            container(
                "b",
                false,
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                0,
                json!({}),
            ),
        ]);
        assert_eq!(row("Pod", mixed.clone())[2], "NotReady");
        mixed["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        assert_eq!(row("Pod", mixed)[2], "Running");
        let killed = pod(vec![container(
            "a",
            false,
            json!({"terminated": {"exitCode": 137, "signal": 9}}),
            0,
            json!({}),
        )]);
        assert_eq!(row("Pod", killed)[2], "Signal:9");
        let mut deleting = pod(vec![container("a", true, running.clone(), 0, json!({}))]);
        deleting["metadata"]["deletionTimestamp"] = json!(ts(1));
        assert_eq!(row("Pod", deleting)[2], "Terminating");
        // A finished pod being deleted keeps its terminal status.
        done["metadata"]["deletionTimestamp"] = json!(ts(1));
        assert_eq!(row("Pod", done)[2], "Completed");
        let pending = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
                             "status": {"phase": "Pending"}});
        assert_eq!(
            row("Pod", pending)[1..7],
            ["0/1", "Pending", "0", "<unknown>", "<none>", "<none>"]
        );
        let mut gated = pod(vec![]);
        gated["spec"]["readinessGates"] = json!([{"conditionType": "x"}, {"conditionType": "y"}]);
        gated["status"]["conditions"] = json!([{"type": "x", "status": "True"}]);
        assert_eq!(row("Pod", gated)[8], "1/2");
    }

    #[test]
    fn pods_with_init_containers_show_init_progress_as_kube_apiserver() {
        let running = json!({"running": {"startedAt": ts(100)}});
        let waiting = |reason: &str| json!({"waiting": {"reason": reason}});
        let completed = json!({"terminated": {"exitCode": 0, "reason": "Completed"}});
        let init_pod = |inits: Vec<Value>, apps: Vec<Value>, initialized: bool| {
            let mut p = pod(apps);
            p["spec"]["initContainers"] = json!([{"name": "i1"}, {"name": "i2"}]);
            p["status"]["phase"] = json!("Pending");
            p["status"]["initContainerStatuses"] = json!(inits);
            p["status"]["conditions"] = json!([{"type": "Initialized",
                "status": if initialized { "True" } else { "False" }}]);
            p
        };
        let apps = || {
            vec![
                container("a", false, waiting("PodInitializing"), 0, json!({})),
                container("b", false, waiting("PodInitializing"), 0, json!({})),
            ]
        };
        let first = init_pod(
            vec![
                container("i1", false, running.clone(), 0, json!({})),
                container("i2", false, waiting("PodInitializing"), 0, json!({})),
            ],
            apps(),
            false,
        );
        assert_eq!(row("Pod", first)[1..4], ["0/2", "Init:0/2", "0"]);
        let second = init_pod(
            vec![
                container("i1", true, completed.clone(), 0, json!({})),
                container("i2", false, running.clone(), 0, json!({})),
            ],
            apps(),
            false,
        );
        assert_eq!(row("Pod", second)[2], "Init:1/2");
        let looping = init_pod(
            vec![
                container(
                    "i1",
                    false,
                    waiting("CrashLoopBackOff"),
                    3,
                    json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": ts(30)}}),
                ),
                container("i2", false, waiting("PodInitializing"), 0, json!({})),
            ],
            apps(),
            false,
        );
        assert_eq!(row("Pod", looping)[2..4], ["Init:CrashLoopBackOff", "3 (30s ago)"]);
        let failed = init_pod(
            vec![
                container(
                    "i1",
                    false,
                    json!({"terminated": {"exitCode": 3, "reason": "Error"}}),
                    0,
                    json!({}),
                ),
                container("i2", false, waiting("PodInitializing"), 0, json!({})),
            ],
            apps(),
            false,
        );
        assert_eq!(row("Pod", failed)[2], "Init:Error");
        let done = || {
            vec![
                container("i1", true, completed.clone(), 2, json!({})),
                container("i2", true, completed.clone(), 0, json!({})),
            ]
        };
        // Initialized, app containers not started yet; init restarts no longer count.
        assert_eq!(row("Pod", init_pod(done(), apps(), true))[2..4], ["PodInitializing", "0"]);
        let mut up = init_pod(
            done(),
            vec![
                container("a", true, running.clone(), 0, json!({})),
                container("b", true, running.clone(), 0, json!({})),
            ],
            true,
        );
        up["status"]["phase"] = json!("Running");
        assert_eq!(row("Pod", up)[1..4], ["2/2", "Running", "0"]);
        // A started sidecar counts as a container, and the next init container runs.
        let mut sidecar = init_pod(
            vec![
                container("i1", true, running.clone(), 1, json!({})),
                container("i2", false, running.clone(), 0, json!({})),
            ],
            apps(),
            false,
        );
        sidecar["spec"]["initContainers"][0]["restartPolicy"] = json!("Always");
        sidecar["status"]["initContainerStatuses"][0]["started"] = json!(true);
        assert_eq!(row("Pod", sidecar)[1..4], ["1/3", "Init:1/2", "1"]);
    }

    #[test]
    fn nodes_show_status_roles_version_and_addresses() {
        assert_eq!(
            names("Node"),
            [
                "Name",
                "Status",
                "Roles",
                "Age",
                "Version",
                "Internal-IP",
                "External-IP",
                "OS-Image",
                "Kernel-Version",
                "Container-Runtime"
            ]
        );
        let node = json!({"metadata": {"name": "n1", "creationTimestamp": ts(7200),
                                       "labels": {"node-role.kubernetes.io/control-plane": "",
                                                  "kubernetes.io/role": "worker", "x": "y"}},
                          "spec": {"unschedulable": true},
                          "status": {"conditions": [{"type": "Ready", "status": "True"}],
                                     "addresses": [{"type": "Hostname", "address": "n1"},
                                                   {"type": "InternalIP", "address": "10.0.0.2"}],
                                     "nodeInfo": {"kubeletVersion": "v1.33.0-weir", "osImage": "weir lab"}}});
        assert_eq!(
            row("Node", node),
            [
                "n1",
                "Ready,SchedulingDisabled",
                "control-plane,worker",
                "120m",
                "v1.33.0-weir",
                "10.0.0.2",
                "<none>",
                "weir lab",
                "<unknown>",
                "<unknown>"
            ]
        );
        let bare = json!({"metadata": {"name": "n2"}, "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}});
        assert_eq!(row("Node", bare)[1..3], ["NotReady", "<none>"]);
        assert_eq!(row("Node", json!({"metadata": {"name": "n3"}}))[1], "Unknown");
    }

    #[test]
    fn services_show_type_ips_ports_and_selector() {
        assert_eq!(
            names("Service"),
            ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
        );
        let np = json!({"metadata": {"name": "web", "creationTimestamp": ts(30)},
                        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                 "selector": {"app": "web"},
                                 "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                                           {"port": 53, "protocol": "UDP"}]}});
        assert_eq!(
            row("Service", np),
            ["web", "NodePort", "10.96.0.10", "<none>", "80:30080/TCP,53/UDP", "30s", "app=web"]
        );
        let lb = json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11"}});
        assert_eq!(row("Service", lb)[3..5], ["<pending>", "<none>"]);
        let ext = json!({"metadata": {"name": "e"}, "spec": {"type": "ExternalName", "externalName": "example.com"}});
        assert_eq!(row("Service", ext)[2..4], ["<none>", "example.com"]);
        let headless = json!({"metadata": {"name": "h"}, "spec": {"type": "ClusterIP", "clusterIP": "None",
                                                                  "externalIPs": ["192.0.2.1"]}});
        assert_eq!(row("Service", headless)[2..4], ["None", "192.0.2.1"]);
    }

    #[test]
    fn workloads_slices_and_policies_match_kube_apiserver() {
        assert_eq!(
            names("Deployment"),
            ["Name", "Ready", "Up-to-date", "Available", "Age", "Containers", "Images", "Selector"]
        );
        let template = json!({"spec": {"containers": [{"name": "web", "image": "nginx"}, {"name": "side", "image": "busybox"}]}});
        let deploy = json!({"metadata": {"name": "web"},
                            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": template},
                            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        assert_eq!(
            row("Deployment", deploy),
            ["web", "2/3", "3", "2", "<unknown>", "web,side", "nginx,busybox", "app=web"]
        );
        assert_eq!(
            names("ReplicaSet"),
            ["Name", "Desired", "Current", "Ready", "Age", "Containers", "Images", "Selector"]
        );
        let rs = json!({"metadata": {"name": "web-1"}, "spec": {"replicas": 2, "template": template},
                        "status": {"replicas": 2, "readyReplicas": 1}});
        assert_eq!(row("ReplicaSet", rs)[1..4], ["2", "2", "1"]);
        assert_eq!(names("EndpointSlice"), ["Name", "AddressType", "Ports", "Endpoints", "Age"]);
        let slice = json!({"metadata": {"name": "web-abc"}, "addressType": "IPv4",
                           "ports": [{"name": "http", "port": 80}, {"name": "named"}],
                           "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]},
                                         {"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.4"]}]});
        assert_eq!(
            row("EndpointSlice", slice)[1..4],
            ["IPv4", "80,named", "10.0.0.1,10.0.0.2,10.0.0.3 + 1 more..."]
        );
        let empty = json!({"metadata": {"name": "e"}, "addressType": "IPv4"});
        assert_eq!(row("EndpointSlice", empty)[2..4], ["<unset>", "<unset>"]);
        assert_eq!(names("NetworkPolicy"), ["Name", "Pod-Selector", "Age"]);
        let all = json!({"metadata": {"name": "deny"}, "spec": {"podSelector": {}}});
        assert_eq!(row("NetworkPolicy", all)[1], "<none>");
        let some = json!({"metadata": {"name": "p"}, "spec": {"podSelector": {"matchLabels": {"role": "db"}}}});
        assert_eq!(row("NetworkPolicy", some)[1], "role=db");
        let eps = json!({"metadata": {"name": "web"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}]}]});
        assert_eq!(row("Endpoints", eps)[1], "10.0.0.1:80,10.0.0.2:80");
        assert_eq!(row("Endpoints", json!({"metadata": {"name": "x"}}))[1], "<none>");
        let svc = find("", "v1", "configmaps").unwrap();
        let cm = json!({"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}});
        assert_eq!(table(svc, &[cm], "1", None)["rows"][0]["cells"][1], 2);
    }
}
