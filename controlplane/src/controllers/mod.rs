//! Controllers that run inside the API server: node pod-CIDR allocation, scheduling,
//! EndpointSlices/Endpoints for Services, ReplicaSets and Deployments.
//!
//! Shape (client-go informers and kube-controller-manager work queues): one task keeps a
//! [`cache::Cache`] of the decoded objects, filled by a list of each resource and then kept by
//! the store's watch from the list's revision. Each change queues the keys it affects (a
//! Service; the Services selecting a Pod's old or new labels; a Pod's ReplicaSet; ...), and a
//! work item reads only those objects from the cache and writes only what differs
//! (compare-and-swap on the cached revision; a conflict is left to the event that caused it,
//! which queues the key again). Each decision is a pure function (see the submodules). The
//! task's own writes go into the cache at once, so the next item sees them before their
//! event arrives. A broken watch (the store ended it, or history was compacted) and, as the
//! safety net, every [`RESYNC`] lead to a new list that replaces the cache, queues the work of
//! every difference and then every key once; an unchanged state writes nothing.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    sync::mpsc::{self, error::TryRecvError},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    api::{ApiState, handlers},
    resources::{Resource, meta},
    store::{Event, EventKind, KeyValue, Store, StoreError},
};

pub mod cache;
pub mod endpoints;
pub mod nodeipam;
pub mod scheduler;
pub mod workloads;

use cache::{Cache, Cached, Kind, Queue, Work};

/// How often the cache is listed again and every key visited (the safety net).
const RESYNC: Duration = Duration::from_secs(300);
/// Wait before listing again after a failure, and before retrying failed work.
const RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn run<S: Store>(
    state: Arc<ApiState<S>>,
    cluster_cidr: Option<nodeipam::ClusterCidrs>,
) {
    let mut controllers = Controllers {
        state,
        cluster_cidr,
        cache: Cache::default(),
        queue: Queue::default(),
        failed: Vec::new(),
        pump: None,
    };
    loop {
        match controllers.relist().await {
            Ok(events) => controllers.follow(events).await,
            Err(err) => {
                log::warn!("controllers: listing failed: {err}; listing again in {RETRY:?}");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

struct Controllers<S> {
    state: Arc<ApiState<S>>,
    cluster_cidr: Option<nodeipam::ClusterCidrs>,
    cache: Cache,
    queue: Queue,
    /// Work that failed (not a conflict), retried after [`RETRY`].
    failed: Vec<Work>,
    /// Moves store events into an unbounded channel, so a long run of work never makes the
    /// store end the watch for falling behind.
    pump: Option<JoinHandle<()>>,
}

/// An object as the cache keeps it: the stored JSON, without resourceVersion.
fn decode(kv: &KeyValue) -> Option<Value> {
    match serde_json::from_slice(&kv.value) {
        Ok(obj) => Some(obj),
        Err(err) => {
            log::warn!("controllers: stored object {} is not JSON ({err}); ignored", kv.key);
            None
        }
    }
}

fn strip_resource_version(mut obj: Value) -> Value {
    if obj.is_object() {
        meta::metadata_mut(&mut obj).remove("resourceVersion");
    }
    obj
}

/// The revision a returned object carries.
fn revision_of(obj: &Value) -> i64 {
    meta::meta_str(obj, "resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0)
}

impl<S: Store> Controllers<S> {
    /// Lists every resource, starts the watch from the first list's revision (events the
    /// later lists already saw are ignored by revision), replaces the cache and queues work.
    async fn relist(&mut self) -> Result<mpsc::UnboundedReceiver<Event>, StoreError> {
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
        let mut listed: HashMap<Kind, BTreeMap<String, Cached>> = HashMap::new();
        let mut from = None;
        for kind in Kind::ALL {
            let page = self.state.store.range(&kind.resource().prefix(), None, 0).await?;
            from.get_or_insert(page.revision);
            let objects = page
                .kvs
                .iter()
                .filter_map(|kv| {
                    Some((kv.key.clone(), Cached { obj: decode(kv)?, revision: kv.mod_revision }))
                })
                .collect();
            listed.insert(kind, objects);
        }
        let mut watch = self.state.store.watch("/registry/", from.unwrap_or(0)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.pump = Some(tokio::spawn(async move {
            while let Some(event) = watch.recv().await {
                if tx.send(event).is_err() {
                    break;
                }
            }
        }));
        let work = self.cache.replace(listed);
        self.queue.extend(work);
        self.queue.extend(self.cache.all_work());
        Ok(rx)
    }

    /// Applies events and runs work until the watch breaks or the resync is due.
    async fn follow(&mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        let resync = Instant::now() + RESYNC;
        let mut retry_at: Option<Instant> = None;
        loop {
            loop {
                match events.try_recv() {
                    Ok(event) => self.apply_event(event),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if retry_at.is_some_and(|at| at <= Instant::now()) {
                retry_at = None;
                self.queue.extend(std::mem::take(&mut self.failed));
            }
            if let Some(work) = self.queue.pop() {
                if let Err(err) = self.process(&work).await {
                    log::warn!("controllers: {work:?}: {err}; retrying in {RETRY:?}");
                    self.failed.push(work);
                    retry_at.get_or_insert(Instant::now() + RETRY);
                }
                continue;
            }
            let wake = retry_at.map_or(resync, |at| at.min(resync));
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.apply_event(event),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= resync {
                        return;
                    }
                }
            }
        }
    }

    fn apply_event(&mut self, event: Event) {
        let Some(kind) = Kind::of_key(&event.kv.key) else { return };
        let work = match event.kind {
            EventKind::Put => {
                let Some(obj) = decode(&event.kv) else { return };
                self.cache.apply(kind, &event.kv.key, Some(obj), event.kv.mod_revision)
            }
            EventKind::Delete => self.cache.apply(kind, &event.kv.key, None, event.kv.mod_revision),
        };
        self.queue.extend(work);
    }

    /// Puts what this task wrote into the cache (its event, arriving later, is then ignored).
    fn wrote(&mut self, kind: Kind, key: &str, obj: Option<Value>, revision: i64) {
        let work = self.cache.apply(kind, key, obj, revision);
        self.queue.extend(work);
    }

    async fn process(&mut self, work: &Work) -> Result<(), String> {
        match work {
            Work::NodeCidr(key) => self.node_cidr(key).await,
            Work::Schedule(key) => self.schedule(key).await,
            Work::Endpoints(key) => self.endpoints(key).await,
            Work::ReplicaSet(key) => self.replicaset(key).await,
            Work::Deployment(key) => self.deployment(key).await,
        }
    }

    /// Writes `new` over the cached `current` unless nothing changed (compare-and-swap; a
    /// conflict or a vanished object is left to its event).
    async fn write(
        &mut self,
        kind: Kind,
        key: &str,
        current: &Cached,
        new: Value,
    ) -> Result<(), String> {
        let new = strip_resource_version(new);
        if new == current.obj {
            return Ok(());
        }
        match self.state.store.update(key, handlers::encode(&new), Some(current.revision)).await {
            Ok(kv) => {
                self.wrote(kind, key, Some(new), kv.mod_revision);
                Ok(())
            }
            Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Creates an object through the API's create path (defaulting, validation, uid).
    async fn create(&mut self, kind: Kind, ns: &str, obj: Value) -> Result<(), String> {
        let resource = kind.resource();
        match handlers::create(
            &self.state,
            resource,
            Some(ns),
            obj,
            false,
            &handlers::Ownership::Unchanged,
        )
        .await
        {
            Ok((_, created)) => {
                let name = meta::meta_str(&created, "name").unwrap_or("").to_string();
                let revision = revision_of(&created);
                self.wrote(
                    kind,
                    &resource.key(Some(ns), &name),
                    Some(strip_resource_version(created)),
                    revision,
                );
                Ok(())
            }
            Err(err) if err.code == 409 || err.code == 404 || err.code == 403 => Ok(()),
            Err(err) => Err(err.message),
        }
    }

    /// Deletes through the API's delete path (graceful for Pods on a node, cascading).
    async fn delete(&mut self, kind: Kind, ns: &str, name: &str) -> Result<(), String> {
        let resource = kind.resource();
        match handlers::delete(&self.state, resource, Some(ns), name, &json!({}), false).await {
            Ok((_, last)) => {
                let key = resource.key(Some(ns), name);
                let revision = revision_of(&last);
                // Marked for a graceful deletion (kept, terminating), or gone.
                if meta::meta_str(&last, "deletionTimestamp").is_some() {
                    self.wrote(kind, &key, Some(strip_resource_version(last)), revision);
                } else {
                    self.wrote(kind, &key, None, revision);
                }
                Ok(())
            }
            Err(err) if err.code == 404 || err.code == 409 => Ok(()),
            Err(err) => Err(err.message),
        }
    }

    async fn node_cidr(&mut self, key: &str) -> Result<(), String> {
        let Some(cidrs) = &self.cluster_cidr else { return Ok(()) };
        let Some(node) = self.cache.get(Kind::Node, key).cloned() else { return Ok(()) };
        if node.obj.pointer("/spec/podCIDR").and_then(Value::as_str).is_some() {
            return Ok(());
        }
        let used: Vec<String> =
            self.cache.values(Kind::Node).flat_map(nodeipam::pod_cidrs_of).collect();
        let Some(subnets) = cidrs.allocate(&used) else {
            log::warn!(
                "controllers: the cluster CIDR is full; node {:?} gets no pod CIDR",
                meta::meta_str(&node.obj, "name")
            );
            return Ok(());
        };
        let mut new = node.obj.clone();
        if !new.get("spec").is_some_and(Value::is_object) {
            new["spec"] = json!({});
        }
        new["spec"]["podCIDR"] = json!(subnets[0]);
        new["spec"]["podCIDRs"] = json!(subnets);
        self.write(Kind::Node, key, &node, new).await
    }

    async fn schedule(&mut self, key: &str) -> Result<(), String> {
        let Some(pod) = self.cache.get(Kind::Pod, key).cloned() else { return Ok(()) };
        if !cache::needs_scheduling(&pod.obj) {
            return Ok(());
        }
        let Some(node) =
            scheduler::choose(&pod.obj, self.cache.values(Kind::Node), self.cache.pods_per_node())
                .map(String::from)
        else {
            return Ok(());
        };
        let mut new = pod.obj.clone();
        new["spec"]["nodeName"] = json!(node);
        self.write(Kind::Pod, key, &pod, new).await
    }

    async fn endpoints(&mut self, service_key: &str) -> Result<(), String> {
        let services = Kind::Service.resource();
        let Some((ns, name)) =
            service_key.strip_prefix(&services.prefix()).and_then(|rest| rest.split_once('/'))
        else {
            return Ok(());
        };
        let (ns, name) = (ns.to_string(), name.to_string());
        let desired = self
            .cache
            .get(Kind::Service, service_key)
            .and_then(|svc| endpoints::desired(&svc.obj, self.cache.pod_candidates(&svc.obj)));
        let slices = Kind::EndpointSlice.resource();
        let mut wanted = Vec::new();
        if let Some((desired_slices, desired_endpoints)) = desired {
            for (slice_name, slice) in desired_slices {
                wanted.push(slices.key(Some(&ns), &slice_name));
                self.upsert(Kind::EndpointSlice, &ns, &slice_name, slice).await?;
            }
            self.upsert(Kind::Endpoints, &ns, &name, desired_endpoints).await?;
        }
        // Slices we made whose Service (or selector, or address family) is gone.
        let stale: Vec<(String, Cached)> = self
            .cache
            .slices_of(&ns, &name)
            .into_iter()
            .filter(|(key, slice)| {
                !wanted.contains(key)
                    && slice
                        .obj
                        .pointer("/metadata/labels")
                        .and_then(|l| l.get(endpoints::MANAGED_BY_LABEL))
                        .and_then(Value::as_str)
                        == Some(endpoints::MANAGED_BY)
            })
            .map(|(key, slice)| (key.clone(), slice.clone()))
            .collect();
        for (key, slice) in stale {
            match self.state.store.delete(&key, Some(slice.revision)).await {
                Ok(kv) => self.wrote(Kind::EndpointSlice, &key, None, kv.mod_revision),
                Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => {}
                Err(err) => return Err(err.to_string()),
            }
        }
        Ok(())
    }

    /// Creates the object or updates its content (keeping identity metadata).
    async fn upsert(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        desired: Value,
    ) -> Result<(), String> {
        let key = kind.resource().key(Some(ns), name);
        let Some(current) = self.cache.get(kind, &key).cloned() else {
            return self.create(kind, ns, desired).await;
        };
        let mut new = current.obj.clone();
        if let (Some(map), Some(want)) = (new.as_object_mut(), desired.as_object()) {
            for (field, value) in want {
                if field == "metadata" {
                    continue;
                }
                map.insert(field.clone(), value.clone());
            }
        }
        for field in ["labels", "ownerReferences"] {
            if let Some(v) = desired.pointer(&format!("/metadata/{field}")) {
                meta::metadata_mut(&mut new).insert(field.into(), v.clone());
            }
        }
        self.write(kind, &key, &current, new).await
    }

    /// A cached owner that is not being deleted, with its uid and namespace.
    fn live_owner(&self, kind: Kind, key: &str) -> Option<(Cached, String, String)> {
        let owner = self.cache.get(kind, key)?.clone();
        if meta::meta_str(&owner.obj, "deletionTimestamp").is_some() {
            return None;
        }
        let uid = meta::meta_str(&owner.obj, "uid").unwrap_or("").to_string();
        let ns = meta::meta_str(&owner.obj, "namespace").unwrap_or("").to_string();
        Some((owner, uid, ns))
    }

    /// A Deployment: its ReplicaSets (created, scaled, annotated, pruned) and its status.
    async fn deployment(&mut self, key: &str) -> Result<(), String> {
        let Some((deploy, uid, ns)) = self.live_owner(Kind::Deployment, key) else { return Ok(()) };
        let owned: Vec<Value> =
            self.cache.replicasets_owned_by(&uid).into_iter().cloned().collect();
        let pods: Vec<Value> = owned
            .iter()
            .filter_map(|rs| meta::meta_str(rs, "uid"))
            .flat_map(|rs_uid| self.cache.pods_owned_by(rs_uid))
            .cloned()
            .collect();
        let plan = workloads::plan_deployment(&deploy.obj, &owned, &pods);
        if let Some(rs) = plan.create {
            self.create(Kind::ReplicaSet, &ns, rs).await?;
        }
        let mut changed: Vec<String> = plan.scale.iter().map(|(n, _)| n.clone()).collect();
        changed.extend(plan.annotate.iter().map(|(n, _)| n.clone()));
        changed.sort();
        changed.dedup();
        let replicasets: &Resource = Kind::ReplicaSet.resource();
        for name in changed {
            let rs_key = replicasets.key(Some(&ns), &name);
            let Some(rs) = self.cache.get(Kind::ReplicaSet, &rs_key).cloned() else { continue };
            let mut new = rs.obj.clone();
            if let Some((_, replicas)) = plan.scale.iter().find(|(n, _)| *n == name) {
                new["spec"]["replicas"] = json!(replicas);
            }
            if let Some((_, set)) = plan.annotate.iter().find(|(n, _)| *n == name) {
                let annotations =
                    meta::metadata_mut(&mut new).entry("annotations").or_insert(json!({}));
                for (k, v) in set.as_object().into_iter().flatten() {
                    annotations[k] = v.clone();
                }
            }
            self.write(Kind::ReplicaSet, &rs_key, &rs, new).await?;
        }
        for name in plan.delete {
            self.delete(Kind::ReplicaSet, &ns, &name).await?;
        }
        let Some(deploy) = self.cache.get(Kind::Deployment, key).cloned() else { return Ok(()) };
        let mut new = deploy.obj.clone();
        new["status"] = plan.status;
        let annotations = meta::metadata_mut(&mut new).entry("annotations").or_insert(json!({}));
        if let Some(map) = annotations.as_object_mut()
            && !plan.revision.is_empty()
        {
            map.insert(workloads::REVISION_ANNOTATION.into(), json!(plan.revision));
        }
        self.write(Kind::Deployment, key, &deploy, new).await
    }

    /// A ReplicaSet: its Pods (created, deleted) and its status.
    async fn replicaset(&mut self, key: &str) -> Result<(), String> {
        let Some((rs, uid, ns)) = self.live_owner(Kind::ReplicaSet, key) else { return Ok(()) };
        let owned: Vec<Value> = self.cache.pods_owned_by(&uid).into_iter().cloned().collect();
        let plan = workloads::plan_replicaset(&rs.obj, &owned);
        for pod in plan.create {
            self.create(Kind::Pod, &ns, pod).await?;
        }
        for name in plan.delete {
            self.delete(Kind::Pod, &ns, &name).await?;
        }
        let Some(rs) = self.cache.get(Kind::ReplicaSet, key).cloned() else { return Ok(()) };
        let mut new = rs.obj.clone();
        new["status"] = plan.status;
        self.write(Kind::ReplicaSet, key, &rs, new).await
    }
}
