//! Controllers that run inside the API server: node pod-CIDR allocation, scheduling, and
//! EndpointSlices/Endpoints for Services. Each decision is a pure function (see the
//! submodules); this loop reads the whole state, applies the decisions, and is level-triggered:
//! it runs after every change in the store (coalesced) and every few seconds anyway, and it
//! writes only what differs, so it converges and never depends on seeing a particular event.
use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::{Value, json};

use crate::{
    api::{ApiState, handlers},
    resources::{self, Resource, meta},
    store::{Store, StoreError},
};

pub mod endpoints;
pub mod nodeipam;
pub mod scheduler;
pub mod workloads;

const RESYNC: Duration = Duration::from_secs(5);

fn resource(group: &str, plural: &str) -> &'static Resource {
    resources::find(group, "v1", plural).expect("served resource")
}

pub(crate) async fn run<S: Store>(
    state: Arc<ApiState<S>>,
    cluster_cidr: Option<nodeipam::ClusterCidr>,
) {
    loop {
        let Ok((revision, _)) = state.store.revisions().await else {
            tokio::time::sleep(RESYNC).await;
            continue;
        };
        let mut changes = match state.store.watch("/registry/", revision).await {
            Ok(rx) => rx,
            Err(_) => {
                tokio::time::sleep(RESYNC).await;
                continue;
            }
        };
        loop {
            if let Err(err) = reconcile(&state, cluster_cidr.as_ref()).await {
                log::warn!("controllers: {err}");
            }
            tokio::select! {
                change = changes.recv() => {
                    if change.is_none() {
                        break;
                    }
                    // Coalesce a burst of changes into one pass.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while changes.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    }
}

async fn list<S: Store>(
    state: &ApiState<S>,
    resource: &Resource,
) -> Result<Vec<(crate::store::KeyValue, Value)>, String> {
    let page = state.store.range(&resource.prefix(), None, 0).await.map_err(|e| e.to_string())?;
    page.kvs
        .into_iter()
        .map(|kv| handlers::decode(&kv).map(|obj| (kv, obj)).map_err(|e| e.message))
        .collect()
}

/// Writes `obj` over `kv` unless nothing changed (compare-and-swap; a conflict is retried on
/// the next pass).
async fn write<S: Store>(
    state: &ApiState<S>,
    kv: &crate::store::KeyValue,
    old: &Value,
    new: Value,
) -> Result<(), String> {
    let strip = |v: &Value| {
        let mut v = v.clone();
        meta::metadata_mut(&mut v).remove("resourceVersion");
        v
    };
    let new = strip(&new);
    if new == strip(old) {
        return Ok(());
    }
    match state.store.update(&kv.key, handlers::encode(&new), Some(kv.mod_revision)).await {
        Ok(_) | Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

async fn reconcile<S: Store>(
    state: &ApiState<S>,
    cluster_cidr: Option<&nodeipam::ClusterCidr>,
) -> Result<(), String> {
    let nodes = list(state, resource("", "nodes")).await?;
    // Node pod CIDRs.
    if let Some(cidr) = cluster_cidr {
        let mut used: Vec<String> = nodes
            .iter()
            .filter_map(|(_, n)| {
                n.pointer("/spec/podCIDR").and_then(Value::as_str).map(String::from)
            })
            .collect();
        for (kv, node) in &nodes {
            if node.pointer("/spec/podCIDR").and_then(Value::as_str).is_some() {
                continue;
            }
            let Some(subnet) = cidr.allocate(&used) else {
                log::warn!(
                    "controllers: the cluster CIDR is full; node {:?} gets no pod CIDR",
                    meta::meta_str(node, "name")
                );
                break;
            };
            let mut new = node.clone();
            if !new.get("spec").is_some_and(Value::is_object) {
                new["spec"] = json!({});
            }
            new["spec"]["podCIDR"] = json!(subnet);
            new["spec"]["podCIDRs"] = json!([subnet]);
            write(state, kv, node, new).await?;
            used.push(subnet);
        }
    }
    let nodes: Vec<Value> =
        list(state, resource("", "nodes")).await?.into_iter().map(|(_, n)| n).collect();
    // Scheduling.
    let pods = list(state, resource("", "pods")).await?;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (_, pod) in &pods {
        if let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
            *per_node.entry(node.to_string()).or_default() += 1;
        }
    }
    for (kv, pod) in &pods {
        let unscheduled =
            pod.pointer("/spec/nodeName").and_then(Value::as_str).is_none_or(str::is_empty);
        let ours = pod
            .pointer("/spec/schedulerName")
            .and_then(Value::as_str)
            .is_none_or(|s| s == "default-scheduler");
        if !unscheduled || !ours || meta::meta_str(pod, "deletionTimestamp").is_some() {
            continue;
        }
        if let Some(node) = scheduler::choose(pod, &nodes, &per_node) {
            let mut new = pod.clone();
            new["spec"]["nodeName"] = json!(node);
            *per_node.entry(node.to_string()).or_default() += 1;
            write(state, kv, pod, new).await?;
        }
    }
    workloads_pass(state).await?;
    // EndpointSlices and Endpoints.
    let pods: Vec<Value> =
        list(state, resource("", "pods")).await?.into_iter().map(|(_, p)| p).collect();
    let slices_resource =
        resources::find("discovery.k8s.io", "v1", "endpointslices").expect("served");
    let endpoints_resource = resource("", "endpoints");
    let existing_slices = list(state, slices_resource).await?;
    let existing_endpoints = list(state, endpoints_resource).await?;
    let mut wanted_slices: Vec<String> = Vec::new();
    for (_, svc) in list(state, resource("", "services")).await? {
        let Some((slices, endpoints)) = endpoints::desired(&svc, &pods) else { continue };
        let ns = meta::meta_str(&svc, "namespace").unwrap_or("").to_string();
        for (name, slice) in slices {
            wanted_slices.push(slices_resource.key(Some(&ns), &name));
            upsert(state, slices_resource, &ns, &name, slice, &existing_slices).await?;
        }
        let name = meta::meta_str(&svc, "name").unwrap_or("").to_string();
        upsert(state, endpoints_resource, &ns, &name, endpoints, &existing_endpoints).await?;
    }
    // Slices we made whose Service or address family is gone.
    for (kv, slice) in &existing_slices {
        let ours = slice
            .pointer(&format!(
                "/metadata/labels/{}",
                endpoints::MANAGED_BY_LABEL.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            == Some(endpoints::MANAGED_BY);
        if ours && !wanted_slices.contains(&kv.key) {
            let _ = state.store.delete(&kv.key, Some(kv.mod_revision)).await;
        }
    }
    Ok(())
}

/// Creates the object or updates its content (keeping identity metadata).
async fn upsert<S: Store>(
    state: &ApiState<S>,
    resource: &'static Resource,
    ns: &str,
    name: &str,
    desired: Value,
    existing: &[(crate::store::KeyValue, Value)],
) -> Result<(), String> {
    let key = resource.key(Some(ns), name);
    match existing.iter().find(|(kv, _)| kv.key == key) {
        None => match handlers::create(state, resource, Some(ns), desired, false).await {
            Ok(_) => Ok(()),
            Err(err) if err.code == 409 || err.code == 404 || err.code == 403 => Ok(()),
            Err(err) => Err(err.message),
        },
        Some((kv, current)) => {
            let mut new = current.clone();
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
            write(state, kv, current, new).await
        }
    }
}

fn apps(plural: &str) -> &'static Resource {
    resources::find("apps", "v1", plural).expect("served resource")
}

/// Deployments (ReplicaSets and their sizes), then ReplicaSets (Pods), then statuses.
async fn workloads_pass<S: Store>(state: &ApiState<S>) -> Result<(), String> {
    let pods_resource = resource("", "pods");
    let deployments = list(state, apps("deployments")).await?;
    let replicasets = list(state, apps("replicasets")).await?;
    let rs_objects: Vec<Value> = replicasets.iter().map(|(_, r)| r.clone()).collect();
    for (kv, deploy) in &deployments {
        if meta::meta_str(deploy, "deletionTimestamp").is_some() {
            continue;
        }
        let plan = workloads::plan_deployment(deploy, &rs_objects);
        let ns = meta::meta_str(deploy, "namespace").unwrap_or("").to_string();
        if let Some(rs) = plan.create {
            match handlers::create(state, apps("replicasets"), Some(&ns), rs, false).await {
                Ok(_) => {}
                Err(err) if err.code == 409 || err.code == 403 => {}
                Err(err) => return Err(err.message),
            }
        }
        let mut changed: Vec<String> = plan.scale.iter().map(|(n, _)| n.clone()).collect();
        changed.extend(plan.annotate.iter().map(|(n, _)| n.clone()));
        changed.sort();
        changed.dedup();
        for name in changed {
            let key = apps("replicasets").key(Some(&ns), &name);
            let Some((rs_kv, rs)) = replicasets.iter().find(|(k, _)| k.key == key) else {
                continue;
            };
            let mut new = rs.clone();
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
            write(state, rs_kv, rs, new).await?;
        }
        for name in plan.delete {
            match handlers::delete(state, apps("replicasets"), Some(&ns), &name, &json!({}), false)
                .await
            {
                Ok(_) => {}
                Err(err) if err.code == 404 || err.code == 409 => {}
                Err(err) => return Err(err.message),
            }
        }
        let mut new = deploy.clone();
        new["status"] = plan.status;
        let annotations = meta::metadata_mut(&mut new).entry("annotations").or_insert(json!({}));
        if let Some(map) = annotations.as_object_mut() {
            map.insert(workloads::REVISION_ANNOTATION.into(), json!(plan.revision));
        }
        write(state, kv, deploy, new).await?;
    }
    let replicasets = list(state, apps("replicasets")).await?;
    let pods: Vec<Value> = list(state, pods_resource).await?.into_iter().map(|(_, p)| p).collect();
    for (kv, rs) in &replicasets {
        if meta::meta_str(rs, "deletionTimestamp").is_some() {
            continue;
        }
        let plan = workloads::plan_replicaset(rs, &pods);
        let ns = meta::meta_str(rs, "namespace").unwrap_or("").to_string();
        for pod in plan.create {
            match handlers::create(state, pods_resource, Some(&ns), pod, false).await {
                Ok(_) => {}
                Err(err) if err.code == 403 || err.code == 404 => {}
                Err(err) => return Err(err.message),
            }
        }
        for name in plan.delete {
            match handlers::delete(state, pods_resource, Some(&ns), &name, &json!({}), false).await
            {
                Ok(_) => {}
                Err(err) if err.code == 404 || err.code == 409 => {}
                Err(err) => return Err(err.message),
            }
        }
        let mut new = rs.clone();
        new["status"] = plan.status;
        write(state, kv, rs, new).await?;
    }
    Ok(())
}
