//! Server-side field validation (the `fieldValidation` query parameter of create, update and
//! patch): which fields of a request body its kind does not have, and which keys a JSON body
//! repeats within one object.
//!
//! The kinds' fields come from the protobuf field tables ([`super::protobuf_schema`], generated
//! from k8s-pb and k8s-openapi), so one table knows the field names for both purposes. Paths
//! are written as kube-apiserver writes them: `spec.template.spec.containers[0].imagePullPolcy`.
//! Values are not looked at: a known field holding `null`, `{}` or `[]` is a known field, and a
//! value of the wrong type is left to the per-kind validation.
use std::{collections::HashSet, fmt};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{
    protobuf::{Field, Message, Shape, Ty},
    protobuf_schema::{KINDS, MESSAGES},
};

/// What the server does with unknown and duplicate fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and answer with one warning each (the default).
    Warn,
    /// Refuse the request.
    Strict,
}

impl FieldValidation {
    /// The value of the `fieldValidation` query parameter; absent or empty means Warn.
    pub fn parse(value: Option<&str>) -> Result<FieldValidation, String> {
        match value {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )),
        }
    }
}

fn message_of(api_version: &str, kind: &str) -> Option<&'static Message> {
    KINDS.iter().find(|(v, k, _)| *v == api_version && *k == kind).map(|(_, _, i)| &MESSAGES[*i])
}

/// The field named `key` in `message`, looking into embedded (inline) structs.
fn field_of(message: &'static Message, key: &str) -> Option<&'static Field> {
    message.fields.iter().find_map(|f| match (f.shape, f.ty) {
        (Shape::Inline, Ty::Msg(i)) => field_of(&MESSAGES[i], key),
        _ => (f.json == key).then_some(f),
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Removes from `obj` the fields its kind does not have and returns their paths (sorted by
/// path within each object). Paths in `kept` are neither removed nor reported: a patch uses
/// them for unknown fields the stored object already had, which are not the request's doing.
/// Kinds without a table are left alone.
pub fn take_unknown_fields(
    api_version: &str,
    kind: &str,
    obj: &mut Value,
    kept: &HashSet<String>,
) -> Vec<String> {
    let mut found = Vec::new();
    if let (Some(message), Some(map)) = (message_of(api_version, kind), obj.as_object_mut()) {
        walk(message, map, "", true, kept, &mut found);
    }
    found
}

fn walk(
    message: &'static Message,
    map: &mut Map<String, Value>,
    path: &str,
    root: bool,
    kept: &HashSet<String>,
    found: &mut Vec<String>,
) {
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if root && (key == "apiVersion" || key == "kind") {
            continue;
        }
        let key_path = join(path, &key);
        let Some(field) = field_of(message, &key) else {
            if !kept.contains(&key_path) {
                map.remove(&key);
                found.push(key_path);
            }
            continue;
        };
        let Ty::Msg(i) = field.ty else { continue };
        let inner = &MESSAGES[i];
        match (field.shape, map.get_mut(&key)) {
            (Shape::One, Some(Value::Object(m))) => walk(inner, m, &key_path, false, kept, found),
            (Shape::List, Some(Value::Array(items))) => {
                for (n, item) in items.iter_mut().enumerate() {
                    if let Value::Object(m) = item {
                        walk(inner, m, &format!("{key_path}[{n}]"), false, kept, found);
                    }
                }
            }
            (Shape::Map, Some(Value::Object(entries))) => {
                for (k, v) in entries.iter_mut() {
                    if let Value::Object(m) = v {
                        walk(inner, m, &join(&key_path, k), false, kept, found);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The paths of the keys a JSON document repeats within one object, in document order
/// (`metadata.name` for a second `name` in `metadata`). Empty when `body` is not JSON.
pub fn duplicate_fields(body: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = Duplicates { path: String::new(), found: &mut found }.deserialize(&mut de);
    if walked.is_err() {
        return Vec::new();
    }
    found
}

/// Walks a JSON value as it is parsed, remembering the keys of each object.
struct Duplicates<'a> {
    path: String,
    found: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Duplicates<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Duplicates<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Duplicates { path, found } = self;
        for n in 0.. {
            let item = Duplicates { path: format!("{path}[{n}]"), found: &mut *found };
            if seq.next_element_seed(item)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Duplicates { path, found } = self;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let key_path = join(&path, &key);
            if !seen.insert(key) {
                found.push(key_path.clone());
            }
            map.next_value_seed(Duplicates { path: key_path, found: &mut *found })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn unknown(api_version: &str, kind: &str, mut obj: Value) -> (Vec<String>, Value) {
        let found = take_unknown_fields(api_version, kind, &mut obj, &HashSet::new());
        (found, obj)
    }

    #[test]
    fn unknown_fields_are_found_at_any_depth_and_removed() {
        let (found, obj) = unknown(
            "apps/v1",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labelz": {}},
                "spec": {
                    "replica": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {"spec": {"containers": [
                        {"name": "a", "image": "i"},
                        {"name": "b", "image": "i", "imagePullPolcy": "Always",
                         "ports": [{"containerPort": 80, "prot": 1}]},
                    ]}},
                },
                "extra": null,
            }),
        );
        assert_eq!(
            found,
            [
                "extra",
                "metadata.labelz",
                "spec.replica",
                "spec.template.spec.containers[1].imagePullPolcy",
                "spec.template.spec.containers[1].ports[0].prot",
            ]
        );
        assert!(obj.pointer("/spec/replica").is_none());
        assert_eq!(
            obj.pointer("/spec/template/spec/containers/1/ports/0/containerPort"),
            Some(&json!(80))
        );
        assert_eq!(obj["kind"], "Deployment");
    }

    #[test]
    fn empty_and_null_known_fields_and_inline_structs_are_known() {
        let (found, _) = unknown(
            "v1",
            "Pod",
            json!({
                "metadata": {"name": "p", "labels": {}, "annotations": null, "finalizers": [],
                    "managedFields": [{"manager": "kubectl", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {"f:anything": {}}}}]},
                "spec": {
                    "containers": [{"name": "c", "image": "i", "env": [], "resources": {},
                        "readinessProbe": {"httpGet": {"port": "http"}, "periodSeconds": 1},
                        "volumeMounts": null}],
                    "volumes": [{"name": "v", "emptyDir": {}}, {"name": "w", "configMap": {"name": "x"}}],
                    "nodeSelector": {}, "tolerations": [], "securityContext": {},
                },
                "status": {"conditions": [], "phase": "Pending"},
            }),
        );
        assert_eq!(found, Vec::<String>::new());
    }

    /// Kubernetes spells this one field with a capital (`DaemonEndpoint.Port`); the node
    /// runtime's Node status carries it, and losing it breaks logs and exec through the API
    /// server.
    #[test]
    fn the_kubelet_endpoint_port_is_known() {
        let node = json!({"metadata": {"name": "n"},
            "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        let (found, obj) = unknown("v1", "Node", node);
        assert_eq!(found, Vec::<String>::new());
        assert_eq!(
            obj.pointer("/status/daemonEndpoints/kubeletEndpoint/Port"),
            Some(&json!(10250))
        );
    }

    #[test]
    fn kept_paths_stay_and_unknown_kinds_are_left_alone() {
        let mut obj = json!({"spec": {"old": 1, "new": 2}});
        let kept = HashSet::from(["spec.old".to_string()]);
        assert_eq!(take_unknown_fields("v1", "Service", &mut obj, &kept), ["spec.new"]);
        assert_eq!(obj, json!({"spec": {"old": 1}}));
        let mut other = json!({"anything": 1});
        assert!(take_unknown_fields("v1", "Secret", &mut other, &HashSet::new()).is_empty());
    }

    #[test]
    fn duplicate_keys_are_found_with_their_paths() {
        let body = br#"{"metadata": {"name": "a", "name": "b"},
            "spec": {"ports": [{"port": 1}, {"port": 2, "port": 3}]}, "spec": {}}"#;
        assert_eq!(duplicate_fields(body), ["metadata.name", "spec.ports[1].port", "spec"]);
        assert!(duplicate_fields(b"{\"a\": [1, {\"b\": 2}]}").is_empty());
        assert!(duplicate_fields(b"not json").is_empty());
    }

    #[test]
    fn the_parameter_defaults_to_warn_and_names_the_allowed_values() {
        assert_eq!(FieldValidation::parse(None), Ok(FieldValidation::Warn));
        assert_eq!(FieldValidation::parse(Some("Strict")), Ok(FieldValidation::Strict));
        assert_eq!(FieldValidation::parse(Some("Ignore")), Ok(FieldValidation::Ignore));
        let err = FieldValidation::parse(Some("strict")).unwrap_err();
        assert!(err.contains("\"Ignore\", \"Strict\", \"Warn\""), "{err}");
    }
}
