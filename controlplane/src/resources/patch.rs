//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and the subset of Kubernetes
//! strategic merge patch that kubectl produces for the built-in types.
//!
//! Strategic merge, as implemented: objects merge recursively and `null` deletes (as in a merge
//! patch); lists whose field name is in [`MERGE_KEYS`] merge element-wise by that key (an element
//! with `"$patch": "delete"` removes the match); other lists are replaced. The directives
//! `$setElementOrder/<field>`, `$retainKeys` and `$deleteFromPrimitiveList/<field>` are honoured
//! in their simple forms (order is applied, retainKeys drops unlisted fields, primitive deletion).
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("the patch is not valid: {0}")]
    Invalid(String),
    #[error("JSON patch operation {index} ({op}) failed: {detail}")]
    OperationFailed { index: usize, op: String, detail: String },
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_map = target.as_object_mut().expect("made an object");
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else {
            merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest =
        pointer.strip_prefix('/').ok_or_else(|| format!("path {pointer:?} must start with '/'"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for token in tokens {
        cur = match cur {
            Value::Object(map) => {
                map.get_mut(token).ok_or_else(|| format!("{token:?} does not exist"))?
            }
            Value::Array(list) => {
                let i: usize =
                    token.parse().map_err(|_| format!("{token:?} is not an array index"))?;
                list.get_mut(i).ok_or_else(|| format!("index {i} is out of range"))?
            }
            _ => return Err(format!("{token:?} is inside a scalar")),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(list) => {
            let i = if last == "-" {
                list.len()
            } else {
                last.parse().map_err(|_| format!("{last:?} is not an array index"))?
            };
            if i > list.len() {
                return Err(format!("index {i} is out of range"));
            }
            list.insert(i, value);
            Ok(())
        }
        _ => Err("cannot add inside a scalar".into()),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let (last, parents) = tokens.split_last().ok_or("cannot remove the whole document")?;
    match parent_mut(doc, parents)? {
        Value::Object(map) => map.remove(last).ok_or_else(|| format!("{last:?} does not exist")),
        Value::Array(list) => {
            let i: usize = last.parse().map_err(|_| format!("{last:?} is not an array index"))?;
            if i >= list.len() {
                return Err(format!("index {i} is out of range"));
            }
            Ok(list.remove(i))
        }
        _ => Err("cannot remove inside a scalar".into()),
    }
}

/// RFC 6902, applied atomically (on a copy).
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Invalid("a JSON patch is an array of operations".into()))?;
    let mut doc = target.clone();
    for (index, op) in ops.iter().enumerate() {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("").to_string();
        let failed =
            |detail: String| PatchError::OperationFailed { index, op: name.clone(), detail };
        let path =
            op.get("path").and_then(Value::as_str).ok_or_else(|| failed("missing path".into()))?;
        let tokens = split_pointer(path).map_err(failed)?;
        let value = || op.get("value").cloned().ok_or_else(|| failed("missing value".into()));
        let from = || -> Result<Vec<String>, PatchError> {
            split_pointer(
                op.get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| failed("missing from".into()))?,
            )
            .map_err(failed)
        };
        match name.as_str() {
            "add" => add(&mut doc, &tokens, value()?).map_err(failed)?,
            "remove" => {
                remove(&mut doc, &tokens).map_err(failed)?;
            }
            "replace" => {
                remove(&mut doc, &tokens).map_err(failed)?;
                add(&mut doc, &tokens, value()?).map_err(failed)?;
            }
            "move" => {
                let moved = remove(&mut doc, &from()?).map_err(failed)?;
                add(&mut doc, &tokens, moved).map_err(failed)?;
            }
            "copy" => {
                let copied = parent_mut(&mut doc, &from()?).map_err(failed)?.clone();
                add(&mut doc, &tokens, copied).map_err(failed)?;
            }
            "test" => {
                let actual = parent_mut(&mut doc, &tokens).map_err(failed)?;
                if *actual != value()? {
                    return Err(failed(format!("value at {path} differs")));
                }
            }
            other => return Err(failed(format!("unknown operation {other:?}"))),
        }
    }
    *target = doc;
    Ok(())
}

/// List fields merged by key in strategic merge patches, and their merge key.
pub const MERGE_KEYS: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("ephemeralContainers", "name"),
    ("env", "name"),
    ("volumes", "name"),
    ("volumeMounts", "mountPath"),
    ("volumeDevices", "devicePath"),
    ("imagePullSecrets", "name"),
    ("hostAliases", "ip"),
    ("tolerations", "key"),
    ("conditions", "type"),
    ("ownerReferences", "uid"),
    ("addresses", "type"),
    // ports: containerPort in containers, port in services; resolved in merge_key().
    ("ports", ""),
];

/// Lists of scalars that Kubernetes treats as sets (`listType=set`): server-side apply merges
/// them by value.
pub const SET_LISTS: &[&str] = &["finalizers"];

/// How server-side apply merges a list field and how managedFields name its items
/// (structured-merge-diff's list types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Merged by these key fields (`k:{...}`): the lists of [`MERGE_KEYS`]; ports are keyed by
    /// their port and protocol, as in Kubernetes' schema.
    Map(&'static [&'static str]),
    /// A set of scalars (`v:...`).
    Set,
    /// Replaced whole, owned as one field.
    Atomic,
}

/// The list type of the list field `field` holding `items`. Whether every item carries its
/// key is for the caller to check ([`list_item_key`]).
pub fn list_type(field: &str, items: &[Value]) -> ListType {
    if SET_LISTS.contains(&field) {
        return ListType::Set;
    }
    match merge_key(field, items) {
        Some("containerPort") => ListType::Map(&["containerPort", "protocol"]),
        Some("port") => ListType::Map(&["port", "protocol"]),
        Some(key) => ListType::Map(std::slice::from_ref(
            &MERGE_KEYS.iter().find(|(_, k)| *k == key).expect("a merge key of the table").1,
        )),
        None => ListType::Atomic,
    }
}

/// The key of a list item under `keys` (key name to value, sorted), with the defaults
/// Kubernetes' schema gives key fields (`protocol: TCP`); None when the item lacks a key.
pub fn list_item_key(keys: &[&str], item: &Value) -> Option<Map<String, Value>> {
    let mut key = Map::new();
    for name in keys {
        let value = match (item.get(*name), *name) {
            (Some(v), _) if !v.is_null() => v.clone(),
            (_, "protocol") => Value::String("TCP".into()),
            _ => return None,
        };
        key.insert((*name).to_string(), value);
    }
    Some(key)
}

fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let key = MERGE_KEYS.iter().find(|(f, _)| *f == field)?.1;
    if field == "ports" {
        let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
        return if has("containerPort") {
            Some("containerPort")
        } else if has("port") {
            Some("port")
        } else {
            None
        };
    }
    Some(key)
}

/// Kubernetes strategic merge patch (the subset described in the module doc).
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(patch_map) = patch else {
        return Err(PatchError::Invalid("a strategic merge patch is a JSON object".into()));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_map = target.as_object_mut().expect("made an object");
    if let Some(Value::Array(keep)) = patch_map.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target_map.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, value) in patch_map {
        if key == "$retainKeys" || key == "$patch" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            if let (Some(Value::Array(list)), Value::Array(order)) =
                (target_map.get_mut(field), value)
            {
                reorder(field, list, order);
            }
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) =
                (target_map.get_mut(field), value)
            {
                list.retain(|item| !gone.contains(item));
            }
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(obj) if obj.get("$patch").and_then(Value::as_str) == Some("delete") => {
                target_map.remove(key);
            }
            Value::Object(obj) if obj.get("$patch").and_then(Value::as_str) == Some("replace") => {
                let mut replacement = value.clone();
                replacement.as_object_mut().expect("object").remove("$patch");
                target_map.insert(key.clone(), replacement);
            }
            Value::Object(_) => {
                strategic_merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value)?;
            }
            Value::Array(items) => {
                let existing = target_map.get_mut(key);
                match (existing, merge_key(key, items)) {
                    (Some(Value::Array(current)), Some(mkey)) => merge_list(current, items, mkey)?,
                    _ => {
                        let cleaned: Vec<Value> =
                            items.iter().filter(|i| i.get("$patch").is_none()).cloned().collect();
                        target_map.insert(key.clone(), Value::Array(cleaned));
                    }
                }
            }
            other => {
                target_map.insert(key.clone(), other.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(current: &mut Vec<Value>, items: &[Value], mkey: &str) -> Result<(), PatchError> {
    for item in items {
        if item.get("$patch").and_then(Value::as_str) == Some("replace") {
            *current = items.iter().filter(|i| i.get("$patch").is_none()).cloned().collect();
            return Ok(());
        }
        let Some(id) = item.get(mkey) else {
            return Err(PatchError::Invalid(format!(
                "list element {item} has no merge key {mkey:?}"
            )));
        };
        let position = current.iter().position(|c| c.get(mkey) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                current.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge_patch(&mut current[i], item)?,
            (None, false) => current.push(item.clone()),
        }
    }
    Ok(())
}

fn reorder(field: &str, list: &mut [Value], order: &[Value]) {
    let Some(mkey) = merge_key(field, list) else {
        return;
    };
    let rank = |item: &Value| {
        order
            .iter()
            .position(|o| o.get(mkey).is_some() && o.get(mkey) == item.get(mkey))
            .unwrap_or(usize::MAX)
    };
    list.sort_by_key(rank);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
    }

    #[test]
    fn json_patch_follows_rfc_6902_and_is_atomic() {
        let mut doc = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2, 3]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/list/0", "value": 9},
                {"op": "remove", "path": "/list/1"},
                {"op": "add", "path": "/list/-", "value": 4},
                {"op": "copy", "from": "/list/0", "path": "/copied"},
                {"op": "move", "from": "/copied", "path": "/moved"},
                {"op": "test", "path": "/moved", "value": 9}
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"a": "1", "b/c": "2"}}, "list": [9, 3, 4], "moved": 9})
        );
        let before = doc.clone();
        let failed = json_patch(
            &mut doc,
            &json!([{"op": "remove", "path": "/list/0"}, {"op": "test", "path": "/moved", "value": 1}]),
        );
        assert!(matches!(failed, Err(PatchError::OperationFailed { index: 1, .. })));
        assert_eq!(doc, before);
        assert!(json_patch(&mut doc, &json!({"op": "add"})).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "b:1"}
        ]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"spec": {
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                "containers": [
                    {"name": "a", "image": "a:2", "ports": [{"containerPort": 81}]},
                    {"name": "b", "$patch": "delete"},
                    {"name": "c", "image": "c:1"}
                ]
            }}),
        )
        .unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "ports": [{"containerPort": 80}, {"containerPort": 81}]},
                {"name": "c", "image": "c:1"}
            ]}})
        );
    }

    #[test]
    fn strategic_merge_replaces_plain_lists_and_deletes_nulls() {
        let mut obj = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]}, "spec": {"replicas": 1}});
        strategic_merge_patch(
            &mut obj,
            &json!({"metadata": {"labels": {"a": null}, "finalizers": ["y"]}, "spec": {"replicas": 3}}),
        )
        .unwrap();
        assert_eq!(
            obj,
            json!({"metadata": {"labels": {"b": "2"}, "finalizers": ["y"]}, "spec": {"replicas": 3}})
        );
        assert!(strategic_merge_patch(&mut obj, &json!([1])).is_err());
    }
}
