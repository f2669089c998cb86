//! The controllers' informer cache and work queue (pure, no I/O), in client-go's shape.
//!
//! The cache holds the decoded Nodes, Pods, Services, EndpointSlices, Endpoints, ReplicaSets
//! and Deployments with the store revision each was read at, fed by the store's watch (and by
//! the controllers' own writes, so a second pass does not act on what it just changed). Every
//! change ([`Cache::apply`]) returns the work it causes, as keys:
//! - a Service change: that Service's endpoints;
//! - a Pod change: the Services in its namespace whose selector matches its old or its new
//!   labels, its owning ReplicaSet (and that one's Deployment when the Pod is terminating, in
//!   the old or the new state), and scheduling when it has no node;
//! - an EndpointSlice or Endpoints change: the Service it belongs to (so a stray edit is put
//!   back);
//! - a Node change: its pod CIDR, and scheduling of every unscheduled Pod;
//! - a ReplicaSet change: itself and its owning Deployment; a Deployment change: itself.
//!
//! Indexes answer what the work items read: Pods by (namespace, label), by owner uid and per
//! node, Services by (namespace, first selector label), EndpointSlices by Service,
//! ReplicaSets by owner uid, owners by uid. A change older than the cached revision is
//! ignored, so a re-list and a watch started before it can overlap.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use serde_json::Value;

use crate::resources::{self, Resource, meta};

use super::endpoints;

/// The resources the controllers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Pod,
    Service,
    EndpointSlice,
    Endpoints,
    ReplicaSet,
    Deployment,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Endpoints,
        Kind::ReplicaSet,
        Kind::Deployment,
    ];

    pub fn resource(self) -> &'static Resource {
        let (group, plural) = match self {
            Kind::Node => ("", "nodes"),
            Kind::Pod => ("", "pods"),
            Kind::Service => ("", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "endpointslices"),
            Kind::Endpoints => ("", "endpoints"),
            Kind::ReplicaSet => ("apps", "replicasets"),
            Kind::Deployment => ("apps", "deployments"),
        };
        resources::find(group, "v1", plural).expect("served resource")
    }

    /// The kind a store key belongs to, if the controllers read it.
    pub fn of_key(key: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| key.starts_with(&k.resource().prefix()))
    }
}

/// A decoded object and the store revision it was stored at.
#[derive(Clone, Debug, PartialEq)]
pub struct Cached {
    pub obj: Value,
    pub revision: i64,
}

/// What a work item acts on (store keys).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Work {
    /// A Node's pod CIDR.
    NodeCidr(String),
    /// A Pod without a node.
    Schedule(String),
    /// A Service's EndpointSlices and Endpoints.
    Endpoints(String),
    ReplicaSet(String),
    Deployment(String),
}

/// Work keys in arrival order, each at most once while it waits.
#[derive(Debug, Default)]
pub struct Queue {
    order: VecDeque<Work>,
    queued: HashSet<Work>,
}

impl Queue {
    pub fn push(&mut self, work: Work) {
        if self.queued.insert(work.clone()) {
            self.order.push_back(work);
        }
    }

    pub fn extend(&mut self, work: impl IntoIterator<Item = Work>) {
        for w in work {
            self.push(w);
        }
    }

    pub fn pop(&mut self) -> Option<Work> {
        let work = self.order.pop_front()?;
        self.queued.remove(&work);
        Some(work)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// (namespace, label key, label value)
type LabelKey = (String, String, String);

#[derive(Debug, Default)]
pub struct Cache {
    objects: HashMap<Kind, BTreeMap<String, Cached>>,
    pods_by_label: HashMap<LabelKey, BTreeSet<String>>,
    pods_by_owner: HashMap<String, BTreeSet<String>>,
    pods_per_node: HashMap<String, usize>,
    unscheduled: BTreeSet<String>,
    services_by_label: HashMap<LabelKey, BTreeSet<String>>,
    slices_by_service: HashMap<(String, String), BTreeSet<String>>,
    replicasets_by_owner: HashMap<String, BTreeSet<String>>,
    /// (kind, uid) → key, for ReplicaSets and Deployments (owners).
    owners: HashMap<(Kind, String), String>,
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer).and_then(Value::as_str)
}

fn labels(obj: &Value) -> impl Iterator<Item = (&str, &str)> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

/// A Service's selector as its pairs (sorted), or None when it selects nothing (no selector:
/// its EndpointSlices are the user's).
fn selector(service: &Value) -> Option<Vec<(&str, &str)>> {
    let map = service.pointer("/spec/selector")?.as_object()?;
    let pairs: Vec<(&str, &str)> =
        map.iter().filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))).collect();
    (!pairs.is_empty()).then_some(pairs)
}

/// The uid of the controlling owner.
fn controller_uid(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/ownerReferences")?.as_array()?.iter().find_map(|r| {
        (r.get("controller").and_then(Value::as_bool) == Some(true))
            .then(|| r.get("uid").and_then(Value::as_str))
            .flatten()
    })
}

fn namespace(obj: &Value) -> String {
    meta::meta_str(obj, "namespace").unwrap_or("").to_string()
}

/// A Pod the scheduler should place.
pub fn needs_scheduling(pod: &Value) -> bool {
    str_at(pod, "/spec/nodeName").is_none_or(str::is_empty)
        && str_at(pod, "/spec/schedulerName").is_none_or(|s| s == "default-scheduler")
        && meta::meta_str(pod, "deletionTimestamp").is_none()
}

fn index_add(index: &mut HashMap<LabelKey, BTreeSet<String>>, at: LabelKey, key: &str) {
    index.entry(at).or_default().insert(key.to_string());
}

fn index_remove<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, BTreeSet<String>>,
    at: &K,
    key: &str,
) {
    if let Some(set) = index.get_mut(at) {
        set.remove(key);
        if set.is_empty() {
            index.remove(at);
        }
    }
}

impl Cache {
    pub fn get(&self, kind: Kind, key: &str) -> Option<&Cached> {
        self.objects.get(&kind)?.get(key)
    }

    pub fn keys(&self, kind: Kind) -> impl Iterator<Item = &String> {
        self.objects.get(&kind).into_iter().flat_map(|m| m.keys())
    }

    pub fn values(&self, kind: Kind) -> impl Iterator<Item = &Value> {
        self.objects.get(&kind).into_iter().flat_map(|m| m.values().map(|c| &c.obj))
    }

    pub fn len(&self, kind: Kind) -> usize {
        self.objects.get(&kind).map_or(0, BTreeMap::len)
    }

    /// A change of `key`: `Some(new)` for a put, `None` for a delete at `revision`. Returns
    /// the work it causes; nothing when the change is older than what is cached, or changes
    /// nothing.
    pub fn apply(&mut self, kind: Kind, key: &str, new: Option<Value>, revision: i64) -> Vec<Work> {
        let objects = self.objects.entry(kind).or_default();
        if objects.get(key).is_some_and(|c| c.revision > revision) {
            return Vec::new();
        }
        let old = match &new {
            Some(obj) => {
                if let Some(c) = objects.get_mut(key)
                    && c.obj == *obj
                {
                    c.revision = revision;
                    return Vec::new();
                }
                objects.insert(key.to_string(), Cached { obj: obj.clone(), revision })
            }
            None => objects.remove(key),
        };
        if old.is_none() && new.is_none() {
            return Vec::new();
        }
        let mut work = Vec::new();
        if let Some(old) = &old {
            self.unindex(kind, key, &old.obj);
            self.work_of(kind, key, &old.obj, &mut work);
        }
        if let Some(new) = &new {
            self.index(kind, key, new);
            self.work_of(kind, key, new, &mut work);
        }
        work.sort();
        work.dedup();
        work
    }

    /// Replaces the whole cache with what a re-list read (per kind: key → object, revision);
    /// returns the work of every difference, as if the missed events had been seen.
    pub fn replace(&mut self, listed: HashMap<Kind, BTreeMap<String, Cached>>) -> Vec<Work> {
        let mut work = Vec::new();
        for kind in Kind::ALL {
            let fresh = listed.get(&kind).cloned().unwrap_or_default();
            let gone: Vec<(String, i64)> = self
                .objects
                .get(&kind)
                .into_iter()
                .flatten()
                .filter(|(key, _)| !fresh.contains_key(*key))
                .map(|(key, c)| (key.clone(), c.revision))
                .collect();
            for (key, revision) in gone {
                // A re-list is the truth: drop it whatever its revision.
                work.extend(self.apply(kind, &key, None, revision));
            }
            for (key, c) in fresh {
                let stale = self.get(kind, &key).is_some_and(|old| old.revision > c.revision);
                if stale {
                    // The watch already delivered something newer than this list saw.
                    continue;
                }
                work.extend(self.apply(kind, &key, Some(c.obj), c.revision));
            }
        }
        work.sort();
        work.dedup();
        work
    }

    /// Every work item there is (the periodic resync).
    pub fn all_work(&self) -> Vec<Work> {
        let mut work: Vec<Work> = Vec::new();
        work.extend(self.keys(Kind::Node).cloned().map(Work::NodeCidr));
        work.extend(self.unscheduled.iter().cloned().map(Work::Schedule));
        work.extend(self.keys(Kind::Deployment).cloned().map(Work::Deployment));
        work.extend(self.keys(Kind::ReplicaSet).cloned().map(Work::ReplicaSet));
        work.extend(self.keys(Kind::Service).cloned().map(Work::Endpoints));
        // Services gone whose slices are left.
        let services = Kind::Service.resource();
        work.extend(
            self.slices_by_service
                .keys()
                .map(|(ns, name)| Work::Endpoints(services.key(Some(ns), name))),
        );
        work.sort();
        work.dedup();
        work
    }

    fn index(&mut self, kind: Kind, key: &str, obj: &Value) {
        let ns = namespace(obj);
        match kind {
            Kind::Pod => {
                for (k, v) in labels(obj) {
                    index_add(&mut self.pods_by_label, (ns.clone(), k.into(), v.into()), key);
                }
                if let Some(uid) = controller_uid(obj) {
                    self.pods_by_owner.entry(uid.to_string()).or_default().insert(key.into());
                }
                if let Some(node) = str_at(obj, "/spec/nodeName").filter(|n| !n.is_empty()) {
                    *self.pods_per_node.entry(node.to_string()).or_default() += 1;
                }
                if needs_scheduling(obj) {
                    self.unscheduled.insert(key.to_string());
                }
            }
            Kind::Service => {
                if let Some(first) = selector(obj).and_then(|s| s.first().copied()) {
                    index_add(
                        &mut self.services_by_label,
                        (ns, first.0.into(), first.1.into()),
                        key,
                    );
                }
            }
            Kind::EndpointSlice => {
                if let Some(service) = str_at(obj, &label_pointer(endpoints::SERVICE_NAME_LABEL)) {
                    self.slices_by_service
                        .entry((ns, service.to_string()))
                        .or_default()
                        .insert(key.to_string());
                }
            }
            Kind::ReplicaSet | Kind::Deployment => {
                if let Some(uid) = meta::meta_str(obj, "uid") {
                    self.owners.insert((kind, uid.to_string()), key.to_string());
                }
                if kind == Kind::ReplicaSet
                    && let Some(owner) = controller_uid(obj)
                {
                    self.replicasets_by_owner
                        .entry(owner.to_string())
                        .or_default()
                        .insert(key.to_string());
                }
            }
            Kind::Node | Kind::Endpoints => {}
        }
    }

    fn unindex(&mut self, kind: Kind, key: &str, obj: &Value) {
        let ns = namespace(obj);
        match kind {
            Kind::Pod => {
                for (k, v) in labels(obj) {
                    index_remove(&mut self.pods_by_label, &(ns.clone(), k.into(), v.into()), key);
                }
                if let Some(uid) = controller_uid(obj) {
                    index_remove(&mut self.pods_by_owner, &uid.to_string(), key);
                }
                if let Some(node) = str_at(obj, "/spec/nodeName").filter(|n| !n.is_empty())
                    && let Some(count) = self.pods_per_node.get_mut(node)
                {
                    *count -= 1;
                    if *count == 0 {
                        self.pods_per_node.remove(node);
                    }
                }
                self.unscheduled.remove(key);
            }
            Kind::Service => {
                if let Some(first) = selector(obj).and_then(|s| s.first().copied()) {
                    index_remove(
                        &mut self.services_by_label,
                        &(ns, first.0.into(), first.1.into()),
                        key,
                    );
                }
            }
            Kind::EndpointSlice => {
                if let Some(service) = str_at(obj, &label_pointer(endpoints::SERVICE_NAME_LABEL)) {
                    index_remove(&mut self.slices_by_service, &(ns, service.to_string()), key);
                }
            }
            Kind::ReplicaSet | Kind::Deployment => {
                if let Some(uid) = meta::meta_str(obj, "uid") {
                    self.owners.remove(&(kind, uid.to_string()));
                }
                if kind == Kind::ReplicaSet
                    && let Some(owner) = controller_uid(obj)
                {
                    index_remove(&mut self.replicasets_by_owner, &owner.to_string(), key);
                }
            }
            Kind::Node | Kind::Endpoints => {}
        }
    }

    /// The work one state of an object (before or after a change) causes.
    fn work_of(&self, kind: Kind, key: &str, obj: &Value, work: &mut Vec<Work>) {
        let ns = namespace(obj);
        let services = Kind::Service.resource();
        match kind {
            Kind::Pod => {
                work.extend(self.services_selecting(&ns, obj).map(|s| Work::Endpoints(s.clone())));
                if let Some(rs) = controller_uid(obj)
                    .and_then(|uid| self.owners.get(&(Kind::ReplicaSet, uid.to_string())))
                {
                    work.push(Work::ReplicaSet(rs.clone()));
                    // A terminating Pod (and its removal) can hold a Recreate rollout back,
                    // and its ReplicaSet's status no longer counts it: the Deployment looks.
                    if meta::meta_str(obj, "deletionTimestamp").is_some()
                        && let Some(d) = self
                            .get(Kind::ReplicaSet, rs)
                            .and_then(|c| controller_uid(&c.obj))
                            .and_then(|uid| self.owners.get(&(Kind::Deployment, uid.to_string())))
                    {
                        work.push(Work::Deployment(d.clone()));
                    }
                }
                if self.unscheduled.contains(key) {
                    work.push(Work::Schedule(key.to_string()));
                }
            }
            Kind::Service => work.push(Work::Endpoints(key.to_string())),
            Kind::EndpointSlice => {
                if let Some(service) = str_at(obj, &label_pointer(endpoints::SERVICE_NAME_LABEL)) {
                    work.push(Work::Endpoints(services.key(Some(&ns), service)));
                }
            }
            Kind::Endpoints => {
                if let Some(name) = meta::meta_str(obj, "name") {
                    work.push(Work::Endpoints(services.key(Some(&ns), name)));
                }
            }
            Kind::Node => {
                work.push(Work::NodeCidr(key.to_string()));
                work.extend(self.unscheduled.iter().cloned().map(Work::Schedule));
            }
            Kind::ReplicaSet => {
                work.push(Work::ReplicaSet(key.to_string()));
                if let Some(d) = controller_uid(obj)
                    .and_then(|uid| self.owners.get(&(Kind::Deployment, uid.to_string())))
                {
                    work.push(Work::Deployment(d.clone()));
                }
            }
            Kind::Deployment => work.push(Work::Deployment(key.to_string())),
        }
    }

    /// Keys of the Services in `ns` whose selector matches `pod`'s labels.
    fn services_selecting<'a>(
        &'a self,
        ns: &str,
        pod: &'a Value,
    ) -> impl Iterator<Item = &'a String> + 'a {
        let pod_labels: HashMap<&str, &str> = labels(pod).collect();
        let mut found: BTreeSet<&String> = BTreeSet::new();
        for (k, v) in &pod_labels {
            let at = (ns.to_string(), k.to_string(), v.to_string());
            for key in self.services_by_label.get(&at).into_iter().flatten() {
                let matches = self
                    .get(Kind::Service, key)
                    .and_then(|s| selector(&s.obj))
                    .is_some_and(|sel| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
                if matches {
                    found.insert(key);
                }
            }
        }
        found.into_iter()
    }

    /// The Pods that may back `service` (its namespace, carrying its first selector label),
    /// in key order; the endpoints decision checks the whole selector.
    pub fn pod_candidates(&self, service: &Value) -> Vec<&Value> {
        let Some(first) = selector(service).and_then(|s| s.first().copied()) else {
            return Vec::new();
        };
        let at = (namespace(service), first.0.to_string(), first.1.to_string());
        self.pods_by_label
            .get(&at)
            .into_iter()
            .flatten()
            .filter_map(|key| self.get(Kind::Pod, key).map(|c| &c.obj))
            .collect()
    }

    /// The EndpointSlices labelled with the Service `name` in `ns` (key, cached).
    pub fn slices_of(&self, ns: &str, name: &str) -> Vec<(&String, &Cached)> {
        self.slices_by_service
            .get(&(ns.to_string(), name.to_string()))
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, self.get(Kind::EndpointSlice, key)?)))
            .collect()
    }

    /// The Pods whose controlling owner has `uid`, in key order.
    pub fn pods_owned_by(&self, uid: &str) -> Vec<&Value> {
        self.owned(&self.pods_by_owner, Kind::Pod, uid)
    }

    /// The ReplicaSets whose controlling owner has `uid`, in key order.
    pub fn replicasets_owned_by(&self, uid: &str) -> Vec<&Value> {
        self.owned(&self.replicasets_by_owner, Kind::ReplicaSet, uid)
    }

    fn owned(
        &self,
        index: &HashMap<String, BTreeSet<String>>,
        kind: Kind,
        uid: &str,
    ) -> Vec<&Value> {
        index
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|key| self.get(kind, key).map(|c| &c.obj))
            .collect()
    }

    /// Pods bound to each node.
    pub fn pods_per_node(&self) -> &HashMap<String, usize> {
        &self.pods_per_node
    }
}

/// The JSON pointer of a label (its '/' escaped).
fn label_pointer(label: &str) -> String {
    format!("/metadata/labels/{}", label.replace('~', "~0").replace('/', "~1"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(kind: Kind, ns: &str, name: &str) -> String {
        kind.resource().key(Some(ns), name)
    }

    fn pod(name: &str, labels: Value, node: Option<&str>) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": labels},
               "spec": {"nodeName": node}})
    }

    fn service(name: &str, selector: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"selector": selector}})
    }

    fn endpoints_work(work: &[Work]) -> Vec<&str> {
        work.iter()
            .filter_map(|w| match w {
                Work::Endpoints(k) => Some(k.rsplit('/').next().unwrap()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pod_label_change_requeues_the_services_of_its_old_and_new_labels() {
        let mut cache = Cache::default();
        let mut revision = 0;
        let mut put = |cache: &mut Cache, kind, key: &str, obj: Value| {
            revision += 1;
            cache.apply(kind, key, Some(obj), revision)
        };
        put(
            &mut cache,
            Kind::Service,
            &key(Kind::Service, "ns", "web"),
            service("web", json!({"app": "web"})),
        );
        put(
            &mut cache,
            Kind::Service,
            &key(Kind::Service, "ns", "db"),
            service("db", json!({"app": "db", "tier": "1"})),
        );
        put(
            &mut cache,
            Kind::Service,
            &key(Kind::Service, "ns", "none"),
            service("none", json!({})),
        );
        let p = key(Kind::Pod, "ns", "p");
        let work = put(&mut cache, Kind::Pod, &p, pod("p", json!({"app": "web"}), Some("n1")));
        assert_eq!(endpoints_work(&work), ["web"]);
        // Moves from web to db (which needs both labels).
        let work = put(&mut cache, Kind::Pod, &p, pod("p", json!({"app": "db"}), Some("n1")));
        assert_eq!(endpoints_work(&work), ["web"], "db does not select it yet");
        let work =
            put(&mut cache, Kind::Pod, &p, pod("p", json!({"app": "db", "tier": "1"}), Some("n1")));
        assert_eq!(endpoints_work(&work), ["db"]);
        let candidates = cache.pod_candidates(&service("db", json!({"app": "db", "tier": "1"})));
        assert_eq!(candidates.len(), 1);
        assert!(cache.pod_candidates(&service("web", json!({"app": "web"}))).is_empty());
        // A pod in another namespace with the same labels touches nothing here.
        let mut other = pod("q", json!({"app": "db", "tier": "1"}), None);
        other["metadata"]["namespace"] = json!("other");
        let work = put(&mut cache, Kind::Pod, &key(Kind::Pod, "other", "q"), other);
        assert!(endpoints_work(&work).is_empty(), "{work:?}");
        assert!(work.contains(&Work::Schedule(key(Kind::Pod, "other", "q"))));
        // The same object again (a write-through, then its event) does nothing.
        let work =
            put(&mut cache, Kind::Pod, &p, pod("p", json!({"app": "db", "tier": "1"}), Some("n1")));
        assert!(work.is_empty());
        assert_eq!(cache.pods_per_node().get("n1"), Some(&1));
        let work = cache.apply(Kind::Pod, &p, None, 100);
        assert_eq!(endpoints_work(&work), ["db"]);
        assert_eq!(cache.pods_per_node().get("n1"), None);
    }

    #[test]
    fn changes_older_than_the_cache_are_ignored() {
        let mut cache = Cache::default();
        let p = key(Kind::Pod, "ns", "p");
        cache.apply(Kind::Pod, &p, Some(pod("p", json!({"v": "2"}), None)), 10);
        assert!(cache.apply(Kind::Pod, &p, Some(pod("p", json!({"v": "1"}), None)), 9).is_empty());
        assert!(cache.apply(Kind::Pod, &p, None, 8).is_empty());
        assert_eq!(cache.get(Kind::Pod, &p).unwrap().obj["metadata"]["labels"]["v"], "2");
    }

    #[test]
    fn a_missed_event_is_repaired_by_the_relist() {
        let mut cache = Cache::default();
        let web = key(Kind::Service, "ns", "web");
        let api = key(Kind::Service, "ns", "api");
        cache.apply(Kind::Service, &web, Some(service("web", json!({"app": "web"}))), 1);
        cache.apply(Kind::Service, &api, Some(service("api", json!({"app": "api"}))), 2);
        let p = key(Kind::Pod, "ns", "p");
        cache.apply(Kind::Pod, &p, Some(pod("p", json!({"app": "web"}), Some("n1"))), 3);
        let gone = key(Kind::Pod, "ns", "gone");
        cache.apply(Kind::Pod, &gone, Some(pod("gone", json!({"app": "api"}), Some("n1"))), 4);
        // The watch broke; meanwhile p moved to api and gone was deleted.
        let mut listed: HashMap<Kind, BTreeMap<String, Cached>> = HashMap::new();
        for (kind, k, obj, revision) in [
            (Kind::Service, &web, service("web", json!({"app": "web"})), 1),
            (Kind::Service, &api, service("api", json!({"app": "api"})), 2),
            (Kind::Pod, &p, pod("p", json!({"app": "api"}), Some("n1")), 7),
        ] {
            listed.entry(kind).or_default().insert(k.clone(), Cached { obj, revision });
        }
        let work = cache.replace(listed);
        assert_eq!(endpoints_work(&work), ["api", "web"]);
        assert!(cache.get(Kind::Pod, &gone).is_none());
        assert_eq!(cache.pods_per_node().get("n1"), Some(&1));
        assert_eq!(cache.pod_candidates(&service("api", json!({"app": "api"}))).len(), 1);
    }

    #[test]
    fn slices_pods_and_replicasets_lead_to_their_owners() {
        let mut cache = Cache::default();
        let d = json!({"metadata": {"name": "d", "namespace": "ns", "uid": "d-uid"}});
        let rs = json!({"metadata": {"name": "rs", "namespace": "ns", "uid": "rs-uid",
            "ownerReferences": [{"uid": "d-uid", "controller": true}]}});
        let dk = key(Kind::Deployment, "ns", "d");
        let rsk = key(Kind::ReplicaSet, "ns", "rs");
        cache.apply(Kind::Deployment, &dk, Some(d), 1);
        let work = cache.apply(Kind::ReplicaSet, &rsk, Some(rs), 2);
        assert_eq!(work, [Work::ReplicaSet(rsk.clone()), Work::Deployment(dk.clone())]);
        let mut owned = pod("p", json!({}), Some("n1"));
        owned["metadata"]["ownerReferences"] = json!([{"uid": "rs-uid", "controller": true}]);
        let work = cache.apply(Kind::Pod, &key(Kind::Pod, "ns", "p"), Some(owned), 3);
        assert_eq!(work, [Work::ReplicaSet(rsk.clone())]);
        assert_eq!(cache.pods_owned_by("rs-uid").len(), 1);
        let mut terminating = cache.get(Kind::Pod, &key(Kind::Pod, "ns", "p")).unwrap().obj.clone();
        terminating["metadata"]["deletionTimestamp"] = json!("2000-01-01T00:00:00Z");
        let work = cache.apply(Kind::Pod, &key(Kind::Pod, "ns", "p"), Some(terminating), 4);
        assert_eq!(work, [Work::ReplicaSet(rsk.clone()), Work::Deployment(dk.clone())]);
        let work = cache.apply(Kind::Pod, &key(Kind::Pod, "ns", "p"), None, 5);
        assert_eq!(work, [Work::ReplicaSet(rsk.clone()), Work::Deployment(dk.clone())]);
        assert!(cache.pods_owned_by("rs-uid").is_empty());
        assert_eq!(cache.replicasets_owned_by("d-uid").len(), 1);
        let slice = json!({"metadata": {"name": "web-ipv4", "namespace": "ns",
            "labels": {endpoints::SERVICE_NAME_LABEL: "web"}}});
        let work = cache.apply(
            Kind::EndpointSlice,
            &key(Kind::EndpointSlice, "ns", "web-ipv4"),
            Some(slice),
            4,
        );
        assert_eq!(work, [Work::Endpoints(key(Kind::Service, "ns", "web"))]);
        assert_eq!(cache.slices_of("ns", "web").len(), 1);
        // The Service is gone but its slice is left: the resync visits it.
        assert!(cache.all_work().contains(&Work::Endpoints(key(Kind::Service, "ns", "web"))));
    }

    #[test]
    fn node_changes_retry_unscheduled_pods() {
        let mut cache = Cache::default();
        let p = key(Kind::Pod, "ns", "p");
        cache.apply(Kind::Pod, &p, Some(pod("p", json!({}), None)), 1);
        let n = Kind::Node.resource().key(None, "n1");
        let work = cache.apply(Kind::Node, &n, Some(json!({"metadata": {"name": "n1"}})), 2);
        assert_eq!(work, [Work::NodeCidr(n), Work::Schedule(p.clone())]);
        // Bound: no longer retried.
        cache.apply(Kind::Pod, &p, Some(pod("p", json!({}), Some("n1"))), 3);
        assert!(!cache.all_work().contains(&Work::Schedule(p)));
    }

    #[test]
    fn the_queue_holds_each_key_once() {
        let mut q = Queue::default();
        q.extend([
            Work::Endpoints("a".into()),
            Work::Endpoints("b".into()),
            Work::Endpoints("a".into()),
        ]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some(Work::Endpoints("a".into())));
        q.push(Work::Endpoints("a".into()));
        assert_eq!(q.pop(), Some(Work::Endpoints("b".into())));
        assert_eq!(q.pop(), Some(Work::Endpoints("a".into())));
        assert!(q.is_empty());
    }
}
