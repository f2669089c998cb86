//! Scheduling (pure): which Node a Pod without `spec.nodeName` goes to.
//!
//! Candidates are Nodes whose Ready condition is True, that are not `spec.unschedulable`, whose
//! labels satisfy the Pod's `nodeSelector`, and whose NoSchedule/NoExecute taints the Pod
//! tolerates. Among them the one running the fewest Pods wins (ties: by name), which spreads
//! Pods evenly.
use std::collections::HashMap;

use serde_json::Value;

use crate::resources::meta;

fn node_ready(node: &Value) -> bool {
    node.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c.get("type").and_then(Value::as_str) == Some("Ready")))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    tolerations.iter().any(|t| {
        let key_ok = s(t, "key").is_empty() && s(t, "operator") == "Exists"
            || s(t, "key") == s(taint, "key");
        let value_ok = s(t, "operator") == "Exists" || s(t, "value") == s(taint, "value");
        let effect_ok = s(t, "effect").is_empty() || s(t, "effect") == s(taint, "effect");
        key_ok && value_ok && effect_ok
    })
}

/// Whether `pod` may run on `node`.
pub fn fits(pod: &Value, node: &Value) -> bool {
    if !node_ready(node)
        || node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true)
    {
        return false;
    }
    let labels = node.pointer("/metadata/labels");
    let selector_ok = pod
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)));
    let tolerations =
        pod.pointer("/spec/tolerations").and_then(Value::as_array).cloned().unwrap_or_default();
    let taints_ok = node.pointer("/spec/taints").and_then(Value::as_array).is_none_or(|taints| {
        taints
            .iter()
            .filter(|t| {
                matches!(t.get("effect").and_then(Value::as_str), Some("NoSchedule" | "NoExecute"))
            })
            .all(|t| tolerates(&tolerations, t))
    });
    selector_ok && taints_ok
}

/// The Node for `pod`, given the Pods already on each Node.
pub fn choose<'a>(
    pod: &Value,
    nodes: impl IntoIterator<Item = &'a Value>,
    pods_per_node: &HashMap<String, usize>,
) -> Option<&'a str> {
    nodes
        .into_iter()
        .filter(|n| fits(pod, n))
        .filter_map(|n| meta::meta_str(n, "name"))
        .min_by_key(|name| (pods_per_node.get(*name).copied().unwrap_or(0), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ready: bool, labels: Value, taints: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints},
               "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn picks_the_least_loaded_fitting_node() {
        let nodes = vec![
            node("a", true, json!({"zone": "x"}), json!([])),
            node("b", true, json!({"zone": "y"}), json!([])),
            node("c", false, json!({"zone": "x"}), json!([])),
            node(
                "d",
                true,
                json!({"zone": "x"}),
                json!([{"key": "gpu", "value": "1", "effect": "NoSchedule"}]),
            ),
        ];
        let counts = HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        let plain = json!({"spec": {}});
        assert_eq!(choose(&plain, &nodes, &counts), Some("b"));
        let zone_x = json!({"spec": {"nodeSelector": {"zone": "x"}}});
        assert_eq!(choose(&zone_x, &nodes, &counts), Some("a"));
        let tolerant = json!({"spec": {"nodeSelector": {"zone": "x"}, "tolerations": [{"key": "gpu", "operator": "Equal", "value": "1", "effect": "NoSchedule"}]}});
        assert_eq!(choose(&tolerant, &nodes, &counts), Some("d"));
        let nowhere = json!({"spec": {"nodeSelector": {"zone": "z"}}});
        assert_eq!(choose(&nowhere, &nodes, &counts), None);
    }
}
