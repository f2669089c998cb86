//! Server-side printing: the `meta.k8s.io/v1` Table kubectl asks for (`Accept: ...;as=Table`)
//! when it prints `kubectl get` output. A few columns per kind, like kube-apiserver's printers
//! (a subset of them), and NAME/AGE for the rest.
use serde_json::{Value, json};

use crate::resources::{Resource, meta};

fn column(name: &str, ty: &str, format: &str, priority: u8) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": name, "priority": priority})
}

fn columns(kind: &str) -> Vec<Value> {
    let mut cols = vec![column("Name", "string", "name", 0)];
    let extra: &[&str] = match kind {
        "Namespace" => &["Status"],
        "Node" => &["Status"],
        "Pod" => &["Status", "IP", "Node"],
        "Service" => &["Type", "Cluster-IP", "Ports"],
        "Deployment" | "ReplicaSet" => &["Desired", "Ready"],
        "ConfigMap" => &["Data"],
        _ => &[],
    };
    cols.extend(extra.iter().map(|c| column(c, "string", "", 0)));
    cols.push(column("Age", "string", "", 0));
    cols
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "<none>".to_string(),
    }
}

fn cells(kind: &str, obj: &Value) -> Vec<Value> {
    let mut cells = vec![json!(meta::meta_str(obj, "name").unwrap_or(""))];
    let extra: Vec<String> = match kind {
        "Namespace" => vec![text(obj.pointer("/status/phase"))],
        "Node" => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c.get("type") == Some(&json!("Ready"))))
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str);
            vec![if ready == Some("True") { "Ready".into() } else { "NotReady".into() }]
        }
        "Pod" => vec![
            text(obj.pointer("/status/phase")),
            text(obj.pointer("/status/podIP")),
            text(obj.pointer("/spec/nodeName")),
        ],
        "Service" => {
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let port = text(p.get("port"));
                            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                            match p.get("nodePort").and_then(Value::as_i64) {
                                Some(np) => format!("{port}:{np}/{proto}"),
                                None => format!("{port}/{proto}"),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![text(obj.pointer("/spec/type")), text(obj.pointer("/spec/clusterIP")), ports]
        }
        "Deployment" | "ReplicaSet" => vec![
            text(obj.pointer("/spec/replicas")),
            obj.pointer("/status/readyReplicas").and_then(Value::as_i64).unwrap_or(0).to_string(),
        ],
        "ConfigMap" => {
            vec![obj.get("data").and_then(Value::as_object).map_or(0, |d| d.len()).to_string()]
        }
        _ => vec![],
    };
    cells.extend(extra.into_iter().map(Value::String));
    cells.push(json!(meta::age(meta::meta_str(obj, "creationTimestamp").unwrap_or(""))));
    cells
}

/// A Table of `objects`. `resource_version`/`continue_token` go into the list metadata.
pub fn table(
    resource: &Resource,
    objects: &[Value],
    resource_version: &str,
    continue_token: Option<&str>,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| json!({"cells": cells(resource.kind, obj), "object": obj}))
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns(resource.kind),
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

    #[test]
    fn tables_have_one_cell_per_column() {
        let svc = find("", "v1", "services").unwrap();
        let obj = json!({"metadata": {"name": "web", "creationTimestamp": meta::now_rfc3339()}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}});
        let t = table(svc, &[obj], "5", None);
        let row = &t["rows"][0]["cells"];
        assert_eq!(row.as_array().unwrap().len(), t["columnDefinitions"].as_array().unwrap().len());
        assert_eq!(row[3], json!("80:30080/TCP"));
        assert!(wants_table(Some("application/json;as=Table;v=v1;g=meta.k8s.io,application/json")));
        assert!(!wants_table(Some("application/json")));
    }
}
