//! Field ownership (`metadata.managedFields`) and server-side apply, as kube-apiserver's field
//! manager (structured-merge-diff) keeps them, on objects held as JSON.
//!
//! Contract:
//! - A [`FieldSet`] is a set of field paths in the FieldsV1 trie shape: `f:<field>`,
//!   `k:{<key fields>}` for an item of a keyed list, `v:<value>` for an item of a set, `.` for
//!   a path that is itself a member. An object's own set ([`to_set`]) holds its leaves (scalars,
//!   nulls, empty objects, atomic lists) and the items of keyed lists and sets.
//! - Lists merge as [`patch::list_type`] says (the strategic-merge knowledge of merge keys); a
//!   keyed list whose items lack their key or repeat one is treated as atomic.
//! - Every write other than apply is an `Update` by its manager ([`record_update`]): the
//!   manager gains the fields it added or changed, every other manager loses them, and fields
//!   that disappeared leave every set. A write that changes nothing leaves the entries alone.
//! - [`apply`] merges an applied configuration into the live object: the applier owns exactly
//!   the fields of its configuration; fields it applied before and no longer lists are removed
//!   unless another manager owns them (or something under them); changing a field another
//!   manager owns is a conflict unless forced, which moves the ownership.
//! - Identity and server-set metadata (name, namespace, uid, resourceVersion, generation,
//!   creationTimestamp, managedFields, …) are owned by no one; neither is `status` for writes
//!   of the main resource of a kind with a status subresource, and only `status` is for writes
//!   of that subresource ([`Scope`]).
use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::patch::{self, ListType};

/// A set of field paths (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Parses a `fieldsV1` value (None when it is not a FieldsV1 trie).
    pub fn from_fields_v1(value: &Value) -> Option<FieldSet> {
        let map = value.as_object()?;
        let mut set = FieldSet { member: map.is_empty(), children: BTreeMap::new() };
        for (key, child) in map {
            if key == "." {
                set.member = true;
                continue;
            }
            let child = FieldSet::from_fields_v1(child)?;
            if !child.is_empty() {
                set.children.insert(key.clone(), child);
            }
        }
        Some(set)
    }

    /// The `fieldsV1` value.
    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    fn child(&mut self, element: String) -> &mut FieldSet {
        self.children.entry(element).or_default()
    }

    fn insert_child(&mut self, element: String, child: FieldSet) {
        if !child.is_empty() {
            self.children.insert(element, child);
        }
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.member |= other.member;
        for (key, child) in &other.children {
            let merged = match out.children.get(key) {
                Some(mine) => mine.union(child),
                None => child.clone(),
            };
            out.children.insert(key.clone(), merged);
        }
        out
    }

    /// The members of `self` that are not members of `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet { member: self.member && !other.member, children: BTreeMap::new() };
        for (key, child) in &self.children {
            let rest = match other.children.get(key) {
                Some(theirs) => child.difference(theirs),
                None => child.clone(),
            };
            out.insert_child(key.clone(), rest);
        }
        out
    }

    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet { member: self.member && other.member, children: BTreeMap::new() };
        for (key, child) in &self.children {
            if let Some(theirs) = other.children.get(key) {
                out.insert_child(key.clone(), child.intersection(theirs));
            }
        }
        out
    }

    /// The members as kube prints paths: `.data.a`, `.spec.containers[name="web"].image`.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths(String::new(), &mut out);
        out
    }

    fn collect_paths(&self, prefix: String, out: &mut Vec<String>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (key, child) in &self.children {
            child.collect_paths(format!("{prefix}{}", print_element(key)), out);
        }
    }
}

fn field_element(name: &str) -> String {
    format!("f:{name}")
}

fn key_element(key: &Map<String, Value>) -> String {
    format!("k:{}", Value::Object(key.clone()))
}

fn value_element(value: &Value) -> String {
    format!("v:{value}")
}

/// One path element as structured-merge-diff prints it.
fn print_element(element: &str) -> String {
    if let Some(name) = element.strip_prefix("f:") {
        return format!(".{name}");
    }
    if let Some(value) = element.strip_prefix("v:") {
        return format!("[={value}]");
    }
    if let Some(index) = element.strip_prefix("i:") {
        return format!("[{index}]");
    }
    if let Some(Ok(Value::Object(key))) =
        element.strip_prefix("k:").map(serde_json::from_str::<Value>)
    {
        let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return format!("[{}]", parts.join(","));
    }
    format!("[{element}]")
}

/// How a list is merged and tracked, given its field name and its items (both sides').
fn list_kind(field: &str, lists: &[&[Value]]) -> ListType {
    let all: Vec<Value> = lists.iter().flat_map(|l| l.iter().cloned()).collect();
    match patch::list_type(field, &all) {
        ListType::Map(keys) if lists.iter().all(|l| keys_unique(keys, l)) => ListType::Map(keys),
        ListType::Set if all.iter().all(|v| !v.is_object() && !v.is_array()) => ListType::Set,
        _ => ListType::Atomic,
    }
}

fn keys_unique(keys: &[&str], items: &[Value]) -> bool {
    let mut seen = Vec::with_capacity(items.len());
    for item in items {
        match patch::list_item_key(keys, item) {
            Some(key) if item.is_object() && !seen.contains(&key) => seen.push(key),
            _ => return false,
        }
    }
    true
}

fn find_keyed(keys: &[&str], items: &[Value], key: &Map<String, Value>) -> Option<usize> {
    items.iter().position(|i| patch::list_item_key(keys, i).as_ref() == Some(key))
}

/// The fields of an object: its leaves and the items of its keyed lists and sets.
pub fn to_set(obj: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    if let Value::Object(map) = obj {
        object_set(map, &mut set);
    }
    set
}

fn object_set(map: &Map<String, Value>, set: &mut FieldSet) {
    for (name, value) in map {
        let mut child = FieldSet::default();
        value_set(name, value, &mut child);
        set.insert_child(field_element(name), child);
    }
}

fn value_set(field: &str, value: &Value, node: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => object_set(map, node),
        Value::Array(items) => match list_kind(field, &[items]) {
            ListType::Map(keys) => {
                for item in items {
                    let key = patch::list_item_key(keys, item).expect("checked by list_kind");
                    let child = node.child(key_element(&key));
                    child.member = true;
                    if let Value::Object(map) = item {
                        object_set(map, child);
                    }
                }
            }
            ListType::Set => {
                for item in items {
                    node.child(value_element(item)).member = true;
                }
            }
            ListType::Atomic => node.member = true,
        },
        _ => node.member = true,
    }
}

/// The fields `new` adds or changes relative to `old` (structured-merge-diff's Added and
/// Modified, at the granularity of [`to_set`]).
pub fn changed(old: &Value, new: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    if let Value::Object(map) = new {
        changed_object(old.as_object(), map, &mut set);
    }
    set
}

fn changed_object(old: Option<&Map<String, Value>>, new: &Map<String, Value>, set: &mut FieldSet) {
    for (name, value) in new {
        let mut child = FieldSet::default();
        changed_value(name, old.and_then(|o| o.get(name)), value, &mut child);
        set.insert_child(field_element(name), child);
    }
}

fn changed_value(field: &str, old: Option<&Value>, new: &Value, node: &mut FieldSet) {
    if old == Some(new) {
        return;
    }
    match (old, new) {
        (_, Value::Object(map)) if !map.is_empty() => {
            let old_map = old.and_then(Value::as_object).filter(|m| !m.is_empty());
            changed_object(old_map, map, node);
        }
        (old, Value::Array(items)) => {
            let old_items: &[Value] = old.and_then(Value::as_array).map_or(&[], Vec::as_slice);
            match list_kind(field, &[old_items, items]) {
                ListType::Map(keys) => {
                    for item in items {
                        let key = patch::list_item_key(keys, item).expect("checked by list_kind");
                        let element = key_element(&key);
                        match find_keyed(keys, old_items, &key) {
                            Some(i) => {
                                let mut child = FieldSet::default();
                                if let (Some(before), Some(after)) =
                                    (old_items[i].as_object(), item.as_object())
                                {
                                    changed_object(Some(before), after, &mut child);
                                }
                                node.insert_child(element, child);
                            }
                            None => {
                                let child = node.child(element);
                                child.member = true;
                                if let Value::Object(map) = item {
                                    object_set(map, child);
                                }
                            }
                        }
                    }
                }
                ListType::Set => {
                    for item in items.iter().filter(|i| !old_items.contains(i)) {
                        node.child(value_element(item)).member = true;
                    }
                }
                ListType::Atomic => node.member = true,
            }
        }
        _ => node.member = true,
    }
}

/// Which part of an object a write owns fields in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `status` is left out when the kind has a status subresource.
    Object { status_subresource: bool },
    /// The status subresource: only `status`.
    Status,
}

/// Metadata that the server sets and nobody owns.
const UNOWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
];

impl Scope {
    /// `set` without the fields no manager owns in this scope.
    pub fn owned(self, set: &FieldSet) -> FieldSet {
        let mut out = set.clone();
        match self {
            Scope::Status => {
                out.children.retain(|k, _| k == "f:status");
            }
            Scope::Object { status_subresource } => {
                out.children.remove("f:apiVersion");
                out.children.remove("f:kind");
                if status_subresource {
                    out.children.remove("f:status");
                }
                if let Some(meta) = out.children.get_mut("f:metadata") {
                    meta.member = false;
                    for field in UNOWNED_METADATA {
                        meta.children.remove(&field_element(field));
                    }
                    if meta.is_empty() {
                        out.children.remove("f:metadata");
                    }
                }
            }
        }
        out.member = false;
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    pub time: Option<String>,
    /// "" for the main resource.
    pub subresource: String,
    pub fields: FieldSet,
}

impl Entry {
    fn decode(value: &Value) -> Option<Entry> {
        let text = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let operation = match value.get("operation").and_then(Value::as_str)? {
            "Apply" => Operation::Apply,
            "Update" => Operation::Update,
            _ => return None,
        };
        if value.get("fieldsType").and_then(Value::as_str).is_some_and(|t| t != "FieldsV1") {
            return None;
        }
        let fields = match value.get("fieldsV1") {
            None | Some(Value::Null) => FieldSet::default(),
            Some(v) => FieldSet::from_fields_v1(v)?,
        };
        Some(Entry {
            manager: text("manager"),
            operation,
            api_version: text("apiVersion"),
            time: value.get("time").and_then(Value::as_str).map(String::from),
            subresource: text("subresource"),
            fields,
        })
    }

    fn encode(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation.as_str(),
            "apiVersion": self.api_version,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_fields_v1(),
        });
        if let Some(time) = &self.time {
            entry["time"] = json!(time);
        }
        if !self.subresource.is_empty() {
            entry["subresource"] = json!(self.subresource);
        }
        entry
    }

    /// Whether this entry is the one `writer` records its `operation` in (appliers are one
    /// entry whatever API version they apply).
    fn is(&self, writer: &Writer, operation: Operation) -> bool {
        self.manager == writer.manager
            && self.operation == operation
            && self.subresource == writer.subresource
            && (operation == Operation::Apply || self.api_version == writer.api_version)
    }

    /// The manager as kube names it in conflicts.
    fn describe(&self) -> String {
        let mut text = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            text = format!("{text} with subresource {:?}", self.subresource);
        }
        match (self.operation, &self.time) {
            (Operation::Apply, _) => text,
            (Operation::Update, Some(time)) => {
                format!("{text} using {} at {time}", self.api_version)
            }
            (Operation::Update, None) => format!("{text} using {}", self.api_version),
        }
    }
}

/// The `managedFields` of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Managers(pub Vec<Entry>);

/// What a write other than apply says about `managedFields` (as kube-apiserver reads it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Absent, null or `[]`: the stored entries stay the base.
    Keep,
    /// `[{}]`: every entry is dropped, and this write records none.
    Reset,
    /// The client's entries replace the stored ones.
    Replace(Managers),
}

impl Managers {
    /// The entries of `obj` (entries that cannot be read are dropped).
    pub fn of(obj: &Value) -> Managers {
        let entries = obj.pointer("/metadata/managedFields").and_then(Value::as_array);
        Managers(entries.into_iter().flatten().filter_map(Entry::decode).collect())
    }

    /// How a written object's `metadata.managedFields` is to be taken.
    pub fn incoming(obj: &Value) -> Incoming {
        match obj.pointer("/metadata/managedFields") {
            Some(Value::Array(list)) if list.len() == 1 && list[0] == json!({}) => Incoming::Reset,
            Some(Value::Array(list)) if !list.is_empty() => Incoming::Replace(Managers::of(obj)),
            _ => Incoming::Keep,
        }
    }

    /// Writes the entries into `obj` (sorted as kube-apiserver sorts them: Apply first, then
    /// by time, manager, API version and subresource); none removes the field.
    pub fn store(&self, obj: &mut Value) {
        let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
            return;
        };
        if self.0.is_empty() {
            meta.remove("managedFields");
            return;
        }
        let mut entries: Vec<&Entry> = self.0.iter().collect();
        entries.sort_by(|a, b| {
            (a.operation.as_str(), &a.time, &a.manager, &a.api_version, &a.subresource).cmp(&(
                b.operation.as_str(),
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
        });
        meta.insert("managedFields".into(), entries.iter().map(|e| e.encode()).collect());
    }

    fn drop_empty(&mut self) {
        self.0.retain(|e| !e.fields.is_empty());
    }
}

/// Who writes, for which part of the object.
#[derive(Clone, Debug)]
pub struct Writer {
    pub manager: String,
    /// The resource's API version (`v1`, `apps/v1`).
    pub api_version: String,
    /// "" for the main resource, else `status` or `scale`.
    pub subresource: String,
    pub scope: Scope,
}

/// Records a write other than apply that turned `old` into `new` (see the module docs).
pub fn record_update(
    managers: &mut Managers,
    old: &Value,
    new: &Value,
    writer: &Writer,
    now: &str,
) {
    let changed = writer.scope.owned(&changed(old, new));
    let removed = writer.scope.owned(&to_set(old).difference(&to_set(new)));
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    for entry in &mut managers.0 {
        entry.fields = entry.fields.difference(&changed).difference(&removed);
    }
    if !changed.is_empty() {
        match managers.0.iter_mut().find(|e| e.is(writer, Operation::Update)) {
            Some(entry) => {
                entry.fields = entry.fields.union(&changed);
                entry.time = Some(now.to_string());
            }
            None => managers.0.push(Entry {
                manager: writer.manager.clone(),
                operation: Operation::Update,
                api_version: writer.api_version.clone(),
                time: Some(now.to_string()),
                subresource: writer.subresource.clone(),
                fields: changed,
            }),
        }
    }
    managers.drop_empty();
}

/// One field another manager owns that an apply would change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The manager as kube names it (`"other"`, `"kubectl-edit" using v1 at …`).
    pub manager: String,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{}", conflict_message(.0))]
    Conflicts(Vec<Conflict>),
    #[error("{0}")]
    Invalid(String),
}

/// kube-apiserver's message for apply conflicts, which kubectl prints.
fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [one] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.manager, one.path
        );
    }
    let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by_manager.entry(&c.manager).or_default().push(&c.path);
    }
    let mut lines = Vec::new();
    for (manager, paths) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(paths.iter().map(|p| format!("- {p}")));
    }
    format!("Apply failed with {} conflicts: {}", conflicts.len(), lines.join("\n"))
}

/// Server-side apply of `config` by `writer` onto `live` (None: the object does not exist
/// yet): the merged object and the entries after it, or the conflicts (unless `force`).
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    managers: &Managers,
    writer: &Writer,
    force: bool,
    now: &str,
) -> Result<(Value, Managers), ApplyError> {
    let live = live.cloned().unwrap_or_else(|| json!({}));
    let applied = writer.scope.owned(&to_set(config));
    check_keys_deep("", config)?;
    let mut merged = live.clone();
    merge_value("", &mut merged, config)?;
    let last = managers
        .0
        .iter()
        .find(|e| e.is(writer, Operation::Apply))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: Vec<&Entry> =
        managers.0.iter().filter(|e| !e.is(writer, Operation::Apply)).collect();
    let kept = others.iter().fold(applied.clone(), |acc, e| acc.union(&e.fields));
    prune(&mut merged, &last.difference(&applied), &kept);

    let changed = writer.scope.owned(&changed(&live, &merged));
    let removed = writer.scope.owned(&to_set(&live).difference(&to_set(&merged)));
    let conflicts: Vec<Conflict> = others
        .iter()
        .flat_map(|e| {
            let describe = e.describe();
            e.fields
                .intersection(&changed)
                .paths()
                .into_iter()
                .map(move |path| Conflict { manager: describe.clone(), path })
        })
        .collect();
    if !force && !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }
    let object_changed = merged != live;
    let mut after = Managers(Vec::with_capacity(managers.0.len() + 1));
    let mut previous_time = None;
    for entry in &managers.0 {
        if entry.is(writer, Operation::Apply) {
            previous_time = entry.time.clone();
            continue;
        }
        let mut entry = entry.clone();
        entry.fields = entry.fields.difference(&changed).difference(&removed);
        after.0.push(entry);
    }
    let time = match previous_time {
        Some(time) if !object_changed => Some(time),
        _ => Some(now.to_string()),
    };
    after.0.push(Entry {
        manager: writer.manager.clone(),
        operation: Operation::Apply,
        api_version: writer.api_version.clone(),
        time,
        subresource: writer.subresource.clone(),
        fields: applied,
    });
    after.drop_empty();
    Ok((merged, after))
}

/// `value` without the object members that are null (an applied null removes a field).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Merges an applied value into the live one: objects recursively, keyed lists by key, sets
/// by value; anything else is replaced.
fn merge_value(field: &str, live: &mut Value, config: &Value) -> Result<(), ApplyError> {
    match (live, config) {
        (Value::Object(live), Value::Object(config)) => {
            for (name, value) in config {
                if value.is_null() {
                    live.remove(name);
                    continue;
                }
                match live.get_mut(name) {
                    Some(existing) => merge_value(name, existing, value)?,
                    None => {
                        live.insert(name.clone(), without_nulls(value));
                    }
                }
            }
            Ok(())
        }
        (Value::Array(live_items), Value::Array(items)) => {
            match list_kind(field, &[live_items, items]) {
                ListType::Map(keys) => {
                    for item in items {
                        let key = patch::list_item_key(keys, item).expect("checked by list_kind");
                        match find_keyed(keys, live_items, &key) {
                            Some(i) => merge_value(field, &mut live_items[i], item)?,
                            None => live_items.push(without_nulls(item)),
                        }
                    }
                }
                ListType::Set => {
                    for item in items {
                        if !live_items.contains(item) {
                            live_items.push(item.clone());
                        }
                    }
                }
                ListType::Atomic => *live_items = items.iter().map(without_nulls).collect(),
            }
            Ok(())
        }
        (live, config) => {
            *live = without_nulls(config);
            Ok(())
        }
    }
}

/// The keyed lists of an applied configuration must name each item once
/// (structured-merge-diff refuses the rest).
fn check_keys_deep(field: &str, value: &Value) -> Result<(), ApplyError> {
    match value {
        Value::Object(map) => map.iter().try_for_each(|(name, v)| check_keys_deep(name, v)),
        Value::Array(items) => {
            check_keys(field, items)?;
            items.iter().try_for_each(|item| check_keys_deep(field, item))
        }
        _ => Ok(()),
    }
}

fn check_keys(field: &str, items: &[Value]) -> Result<(), ApplyError> {
    let ListType::Map(keys) = patch::list_type(field, items) else { return Ok(()) };
    let mut seen: Vec<Map<String, Value>> = Vec::with_capacity(items.len());
    for item in items {
        let Some(key) = patch::list_item_key(keys, item) else {
            // Items without their key: the list is atomic (see list_kind).
            return Ok(());
        };
        if seen.contains(&key) {
            return Err(ApplyError::Invalid(format!(
                ".{field}: duplicate entries for key {}",
                print_element(&key_element(&key))
            )));
        }
        seen.push(key);
    }
    Ok(())
}

/// Removes from `value` the members of `remove` that nothing in `kept` is at or under, and
/// the objects and lists that this leaves empty.
fn prune(value: &mut Value, remove: &FieldSet, kept: &FieldSet) {
    for (element, gone) in &remove.children {
        let empty = FieldSet::default();
        let kept_here = kept.children.get(element).unwrap_or(&empty);
        match value {
            Value::Object(map) => {
                let Some(name) = element.strip_prefix("f:") else { continue };
                let Some(child) = map.get_mut(name) else { continue };
                if prune_child(child, gone, kept_here) {
                    map.remove(name);
                }
            }
            Value::Array(items) => {
                let position = if let Some(key) = element.strip_prefix("k:") {
                    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
                        continue;
                    };
                    let names: Vec<&str> = key.keys().map(String::as_str).collect();
                    items.iter().position(|i| patch::list_item_key(&names, i) == Some(key.clone()))
                } else if let Some(raw) = element.strip_prefix("v:") {
                    let Ok(item) = serde_json::from_str::<Value>(raw) else { continue };
                    items.iter().position(|i| *i == item)
                } else {
                    None
                };
                let Some(i) = position else { continue };
                if prune_child(&mut items[i], gone, kept_here) {
                    items.remove(i);
                }
            }
            _ => {}
        }
    }
}

/// Prunes one child; true when the child itself is to be removed.
fn prune_child(child: &mut Value, remove: &FieldSet, kept: &FieldSet) -> bool {
    if remove.member && kept.is_empty() {
        return true;
    }
    let was_empty = is_empty_container(child);
    prune(child, remove, kept);
    !was_empty && is_empty_container(child) && kept.is_empty()
}

fn is_empty_container(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer {
        Writer {
            manager: manager.into(),
            api_version: "v1".into(),
            subresource: String::new(),
            scope: Scope::Object { status_subresource: false },
        }
    }

    fn cm(data: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": data})
    }

    #[test]
    fn fields_v1_round_trips_and_prints_kube_paths() {
        let v1 = json!({
            "f:data": {"f:a": {}},
            "f:metadata": {"f:labels": {".": {}, "f:app": {}}, "f:finalizers": {"v:\"x\"": {}}},
            "f:spec": {"f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}}}}
        });
        let set = FieldSet::from_fields_v1(&v1).unwrap();
        assert_eq!(set.to_fields_v1(), v1);
        assert_eq!(
            set.paths(),
            [
                ".data.a",
                ".metadata.finalizers[=\"x\"]",
                ".metadata.labels",
                ".metadata.labels.app",
                ".spec.ports[port=80,protocol=\"TCP\"]",
                ".spec.ports[port=80,protocol=\"TCP\"].port",
            ]
        );
        assert!(FieldSet::from_fields_v1(&json!([1])).is_none());
    }

    #[test]
    fn object_sets_key_lists_by_merge_key_and_keep_other_lists_atomic() {
        let pod = json!({"spec": {
            "containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}], "args": ["a", "b"]}],
            "tolerations": [{"operator": "Exists"}]
        }, "metadata": {"finalizers": ["f"]}});
        assert_eq!(
            to_set(&pod).to_fields_v1(),
            json!({
                "f:metadata": {"f:finalizers": {"v:\"f\"": {}}},
                "f:spec": {
                    "f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:args": {}, "f:image": {}, "f:name": {},
                        "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}}}},
                    "f:tolerations": {}
                }
            })
        );
    }

    #[test]
    fn apply_creates_updates_and_removes_what_the_applier_dropped() {
        let me = writer("mine");
        let (created, managers) =
            apply(None, &cm(json!({"a": "1", "b": "2"})), &Managers::default(), &me, false, "t1")
                .unwrap();
        assert_eq!(created["data"], json!({"a": "1", "b": "2"}));
        assert_eq!(managers.0.len(), 1);
        assert_eq!(managers.0[0].fields.to_fields_v1(), json!({"f:data": {"f:a": {}, "f:b": {}}}));
        let (updated, managers) =
            apply(Some(&created), &cm(json!({"a": "3"})), &managers, &me, false, "t2").unwrap();
        assert_eq!(updated["data"], json!({"a": "3"}));
        assert_eq!(managers.0[0].time.as_deref(), Some("t2"));
        // Dropping every key removes the map too (Go leaves out empty maps).
        let mut bare = cm(json!(null));
        bare.as_object_mut().unwrap().remove("data");
        let (emptied, managers) =
            apply(Some(&updated), &bare, &managers, &me, false, "t3").unwrap();
        assert!(emptied.get("data").is_none(), "{emptied}");
        assert!(managers.0.is_empty());
    }

    #[test]
    fn fields_another_manager_owns_stay_and_conflict_unless_forced() {
        let me = writer("mine");
        let (obj, managers) =
            apply(None, &cm(json!({"a": "1", "b": "2"})), &Managers::default(), &me, false, "t1")
                .unwrap();
        // Another manager updates b: it owns b now, and mine no longer does.
        let mut edited = obj.clone();
        edited["data"]["b"] = json!("edited");
        let mut managers = managers;
        record_update(&mut managers, &obj, &edited, &writer("kubectl-edit"), "t2");
        let fields: Vec<(String, Value)> =
            managers.0.iter().map(|e| (e.manager.clone(), e.fields.to_fields_v1())).collect();
        assert_eq!(
            fields,
            [
                ("mine".to_string(), json!({"f:data": {"f:a": {}}})),
                ("kubectl-edit".to_string(), json!({"f:data": {"f:b": {}}}))
            ]
        );
        // Re-applying without b keeps it (another manager owns it).
        let (kept, managers) =
            apply(Some(&edited), &cm(json!({"a": "1"})), &managers, &me, false, "t3").unwrap();
        assert_eq!(kept["data"], json!({"a": "1", "b": "edited"}));
        // Applying b back is a conflict, the same value is not.
        let err = apply(Some(&kept), &cm(json!({"a": "1", "b": "2"})), &managers, &me, false, "t4")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using v1 at t2: .data.b"
        );
        let (_, shared) =
            apply(Some(&kept), &cm(json!({"a": "1", "b": "edited"})), &managers, &me, false, "t4")
                .unwrap();
        assert_eq!(shared.0.len(), 2, "{shared:?}");
        // Forced, the applier takes b over.
        let (forced, managers) =
            apply(Some(&kept), &cm(json!({"a": "1", "b": "2"})), &managers, &me, true, "t5")
                .unwrap();
        assert_eq!(forced["data"]["b"], "2");
        assert_eq!(managers.0.len(), 1);
        assert_eq!(managers.0[0].fields.to_fields_v1(), json!({"f:data": {"f:a": {}, "f:b": {}}}));
    }

    #[test]
    fn several_conflicts_are_grouped_by_manager() {
        let err = ApplyError::Conflicts(vec![
            Conflict { manager: "\"b\"".into(), path: ".data.x".into() },
            Conflict { manager: "\"a\"".into(), path: ".data.y".into() },
            Conflict { manager: "\"b\"".into(), path: ".data.z".into() },
        ]);
        assert_eq!(
            err.to_string(),
            "Apply failed with 3 conflicts: conflicts with \"a\":\n- .data.y\nconflicts with \"b\":\n- .data.x\n- .data.z"
        );
    }

    #[test]
    fn keyed_lists_merge_by_key_and_prune_only_the_appliers_items() {
        let me = writer("mine");
        let deploy = |containers: Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                "spec": {"template": {"spec": {"containers": containers}}}})
        };
        let (live, managers) = apply(
            None,
            &deploy(json!([{"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "busybox"}])),
            &Managers::default(),
            &me,
            false,
            "t1",
        )
        .unwrap();
        // The server defaults a field nobody applied; another manager adds a container.
        let mut defaulted = live.clone();
        defaulted["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        defaulted["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] =
            json!("TCP");
        let mut managers = managers;
        let mut added = defaulted.clone();
        added["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "theirs", "image": "x"}));
        record_update(&mut managers, &defaulted, &added, &writer("other"), "t2");
        let (merged, _) = apply(
            Some(&added),
            &deploy(json!([{"name": "web", "image": "nginx:2", "ports": [{"containerPort": 80}]}])),
            &managers,
            &me,
            false,
            "t3",
        )
        .unwrap();
        assert_eq!(
            merged["spec"]["template"]["spec"]["containers"],
            json!([
                {"name": "web", "image": "nginx:2", "imagePullPolicy": "Always",
                    "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                {"name": "theirs", "image": "x"}
            ])
        );
        let dup = deploy(json!([{"name": "a"}, {"name": "a"}]));
        assert!(matches!(
            apply(None, &dup, &Managers::default(), &me, false, "t"),
            Err(ApplyError::Invalid(_))
        ));
    }

    #[test]
    fn updates_own_what_they_change_and_no_op_writes_record_nothing() {
        let old = cm(json!({"a": "1"}));
        let mut managers = Managers::default();
        record_update(&mut managers, &old, &old, &writer("w"), "t1");
        assert!(managers.0.is_empty());
        record_update(&mut managers, &json!({}), &old, &writer("creator"), "t1");
        assert_eq!(managers.0[0].fields.to_fields_v1(), json!({"f:data": {"f:a": {}}}));
        let status_writer =
            Writer { scope: Scope::Status, subresource: "status".into(), ..writer("s") };
        let mut with_status = old.clone();
        with_status["status"] = json!({"phase": "Running"});
        record_update(&mut managers, &old, &with_status, &status_writer, "t2");
        assert_eq!(managers.0[1].fields.to_fields_v1(), json!({"f:status": {"f:phase": {}}}));
        let mut obj = old.clone();
        managers.store(&mut obj);
        assert_eq!(Managers::of(&obj), managers);
        assert_eq!(obj["metadata"]["managedFields"][1]["subresource"], "status");
        assert_eq!(
            Managers::incoming(&json!({"metadata": {"managedFields": [{}]}})),
            Incoming::Reset
        );
        assert_eq!(Managers::incoming(&json!({"metadata": {"managedFields": []}})), Incoming::Keep);
        assert_eq!(Managers::incoming(&obj), Incoming::Replace(managers));
    }
}
