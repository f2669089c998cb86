//! ReplicaSets and Deployments (pure): what their controllers decide from the current state.
//!
//! A ReplicaSet owns the Pods whose controller ownerReference names its uid; it creates Pods
//! from its template until it has `spec.replicas` live ones (not terminating, not
//! Succeeded/Failed) and deletes the surplus (unscheduled first, then not ready, then by name).
//! A Deployment owns ReplicaSets the same way; the one whose `pod-template-hash` label matches
//! the hash of the current template is the new one (created when missing, with the next
//! `deployment.kubernetes.io/revision`); the others are old. The strategy paces the move, as
//! kube's deployment controller (rolling.go, recreate.go):
//! - `RollingUpdate` (the default; maxSurge and maxUnavailable as counts or percentages of
//!   `spec.replicas`, 25% each by default, surge rounded up and unavailable down, unavailable 1
//!   when both are 0): the new ReplicaSet grows while all ReplicaSets together stay within
//!   replicas + maxSurge; old ones shrink (their unavailable replicas first, then oldest
//!   first) while replicas - maxUnavailable stay available. A ReplicaSet's available count is
//!   taken as at most its `spec.replicas` (its status can lag a scale-down).
//! - `Recreate`: old ReplicaSets go to zero, then, once none of their Pods is left, the new
//!   one is created (or scaled) with all replicas.
//! - `spec.paused`: no new ReplicaSet and no rollout step; a Deployment with a single active
//!   ReplicaSet is still scaled.
//!
//! The pass is re-run on every change of an owned ReplicaSet (its status included) and on the
//! deletion of a Pod of one, so a rollout advances as new Pods become available and old ones
//! go. As in Kubernetes, a template that matches an older
//! ReplicaSet (`kubectl rollout undo`) reuses it and gives it the next revision (the old
//! number goes to `deployment.kubernetes.io/revision-history`), the Deployment's annotations
//! (e.g. `kubernetes.io/change-cause`) are copied to the ReplicaSet it creates, and old
//! ReplicaSets scaled to zero beyond `spec.revisionHistoryLimit` (default 10) are deleted,
//! oldest revision first.
use serde_json::{Value, json};

use crate::resources::meta;

pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
/// Deployment annotations that stay on the Deployment (as Kubernetes' skip list).
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    REVISION_HISTORY_ANNOTATION,
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
];

/// A short stable hash of a Pod template (Kubernetes' pod-template-hash role).
pub fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = crc32fast::hash(template.to_string().as_bytes()) as u64;
    let mut out = String::new();
    for _ in 0..10 {
        out.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
        if n == 0 {
            break;
        }
    }
    out
}

pub fn owned_by(obj: &Value, uid: &str) -> bool {
    obj.pointer("/metadata/ownerReferences").and_then(Value::as_array).is_some_and(|refs| {
        refs.iter().any(|r| {
            r.get("uid").and_then(Value::as_str) == Some(uid)
                && r.get("controller").and_then(Value::as_bool) == Some(true)
        })
    })
}

fn owner_ref(kind: &str, obj: &Value) -> Value {
    json!([{
        "apiVersion": "apps/v1", "kind": kind,
        "name": meta::meta_str(obj, "name"), "uid": meta::meta_str(obj, "uid"),
        "controller": true, "blockOwnerDeletion": true,
    }])
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
        cs.iter().any(|c| {
            c.get("type") == Some(&json!("Ready")) && c.get("status") == Some(&json!("True"))
        })
    })
}

fn live(pod: &Value) -> bool {
    meta::meta_str(pod, "deletionTimestamp").is_none()
        && !matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
}

fn replicas(obj: &Value) -> i64 {
    obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0)
}

/// What a ReplicaSet's controller does now.
#[derive(Debug, Default)]
pub struct ReplicaSetPlan {
    /// Pods to create (complete objects, `generateName` set).
    pub create: Vec<Value>,
    /// Names of Pods to delete.
    pub delete: Vec<String>,
    /// The status to write.
    pub status: Value,
}

pub fn plan_replicaset(rs: &Value, pods: &[Value]) -> ReplicaSetPlan {
    let uid = meta::meta_str(rs, "uid").unwrap_or("");
    let ns = meta::meta_str(rs, "namespace");
    let mut owned: Vec<&Value> = pods
        .iter()
        .filter(|p| meta::meta_str(p, "namespace") == ns && owned_by(p, uid) && live(p))
        .collect();
    let want = replicas(rs) as usize;
    let mut plan = ReplicaSetPlan::default();
    if owned.len() < want {
        let name = meta::meta_str(rs, "name").unwrap_or("rs");
        let template = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
        for _ in owned.len()..want {
            let mut pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": template.get("metadata").cloned().unwrap_or(json!({})),
                "spec": template.get("spec").cloned().unwrap_or(json!({})),
            });
            let m = meta::metadata_mut(&mut pod);
            m.remove("name");
            m.insert("generateName".into(), json!(format!("{name}-")));
            m.insert("ownerReferences".into(), owner_ref("ReplicaSet", rs));
            plan.create.push(pod);
        }
    } else if owned.len() > want {
        // Unscheduled first, then not ready, then by name (deterministic).
        owned.sort_by_key(|p| {
            (
                p.pointer("/spec/nodeName").and_then(Value::as_str).is_some(),
                pod_ready(p),
                meta::meta_str(p, "name").unwrap_or("").to_string(),
            )
        });
        plan.delete = owned[..owned.len() - want]
            .iter()
            .filter_map(|p| meta::meta_str(p, "name").map(String::from))
            .collect();
        owned.drain(..owned.len() - want);
    }
    let count = owned.len() + plan.create.len();
    let ready = owned.iter().filter(|p| pod_ready(p)).count();
    plan.status = json!({
        "replicas": count,
        "fullyLabeledReplicas": count,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    plan
}

/// What a Deployment's controller does now.
#[derive(Debug, Default)]
pub struct DeploymentPlan {
    /// A new ReplicaSet to create.
    pub create: Option<Value>,
    /// (ReplicaSet name, replicas) for existing owned ReplicaSets whose size must change.
    pub scale: Vec<(String, i64)>,
    /// (ReplicaSet name, annotations to set) for an old ReplicaSet that becomes current again.
    pub annotate: Vec<(String, Value)>,
    /// Old ReplicaSets past the revision history limit.
    pub delete: Vec<String>,
    /// The revision annotation the Deployment should carry.
    pub revision: String,
    pub status: Value,
}

fn revision_of(rs: &Value) -> i64 {
    rs.pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// The Deployment's annotations that its ReplicaSets carry too.
fn copied_annotations(deploy: &Value) -> Value {
    let mut out = json!({});
    if let Some(map) = deploy.pointer("/metadata/annotations").and_then(Value::as_object) {
        for (k, v) in map.iter().filter(|(k, _)| !NOT_COPIED.contains(&k.as_str())) {
            out[k] = v.clone();
        }
    }
    out
}

/// Resolves maxSurge or maxUnavailable (a count, or a percentage of `replicas` rounded up or
/// down) as kube's intstr.GetScaledValueFromIntOrPercent.
fn scaled(value: Option<&Value>, replicas: i64, round_up: bool) -> i64 {
    let percent = |p: &str| p.strip_suffix('%').and_then(|n| n.trim().parse::<i64>().ok());
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => match percent(s) {
            Some(p) if round_up => (p * replicas + 99) / 100,
            Some(p) => p * replicas / 100,
            None => s.trim().parse().unwrap_or(0),
        },
        _ => {
            if round_up {
                (25 * replicas + 99) / 100
            } else {
                25 * replicas / 100
            }
        }
    }
    .max(0)
}

/// (maxSurge, maxUnavailable) of a RollingUpdate Deployment, as kube's ResolveFenceposts.
pub fn surge_and_unavailable(deploy: &Value, replicas: i64) -> (i64, i64) {
    let rolling = deploy.pointer("/spec/strategy/rollingUpdate");
    let surge = scaled(rolling.and_then(|r| r.get("maxSurge")), replicas, true);
    let unavailable = scaled(rolling.and_then(|r| r.get("maxUnavailable")), replicas, false);
    if surge == 0 && unavailable == 0 { (0, 1) } else { (surge, unavailable.min(replicas)) }
}

fn available(rs: &Value) -> i64 {
    rs.pointer("/status/availableReplicas")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .clamp(0, replicas(rs))
}

/// Old ReplicaSets' new sizes in a RollingUpdate step, as kube's reconcileOldReplicaSets:
/// `old` is (size, available) oldest first; returns the new sizes.
fn scale_down_old(
    old: &[(i64, i64)],
    new: (i64, i64),
    want: i64,
    max_unavailable: i64,
) -> Vec<i64> {
    let mut sizes: Vec<i64> = old.iter().map(|(s, _)| *s).collect();
    let all: i64 = sizes.iter().sum::<i64>() + new.0;
    let min_available = want - max_unavailable;
    let new_unavailable = (new.0 - new.1).max(0);
    let max_scaled_down = all - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return sizes;
    }
    // Unavailable replicas of old ReplicaSets first: removing them costs no availability.
    let mut scaled_down = 0;
    for (size, (_, avail)) in sizes.iter_mut().zip(old) {
        let cut = (max_scaled_down - scaled_down).min(*size - (*avail).min(*size)).max(0);
        *size -= cut;
        scaled_down += cut;
    }
    // Then available ones while enough stay available, oldest first.
    let available_now: i64 =
        new.1 + sizes.iter().zip(old).map(|(size, (_, avail))| (*avail).min(*size)).sum::<i64>();
    let mut budget = (available_now - min_available).min(max_scaled_down - scaled_down);
    for size in sizes.iter_mut() {
        let cut = budget.min(*size).max(0);
        *size -= cut;
        budget -= cut;
    }
    sizes
}

/// `pods` are the Pods of the Deployment's ReplicaSets (Recreate waits until the old ones'
/// are gone).
pub fn plan_deployment(deploy: &Value, replicasets: &[Value], pods: &[Value]) -> DeploymentPlan {
    let uid = meta::meta_str(deploy, "uid").unwrap_or("");
    let ns = meta::meta_str(deploy, "namespace");
    let name = meta::meta_str(deploy, "name").unwrap_or("deploy");
    let owned: Vec<&Value> = replicasets
        .iter()
        .filter(|r| {
            meta::meta_str(r, "namespace") == ns
                && owned_by(r, uid)
                && meta::meta_str(r, "deletionTimestamp").is_none()
        })
        .collect();
    let template = deploy.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let hash = template_hash(&template);
    let want = replicas(deploy);
    let paused = deploy.pointer("/spec/paused").and_then(Value::as_bool).unwrap_or(false);
    let recreate =
        deploy.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
    let mut plan = DeploymentPlan::default();
    let current = owned.iter().find(|r| {
        r.pointer(&format!("/metadata/labels/{TEMPLATE_HASH_LABEL}")).and_then(Value::as_str)
            == Some(hash.as_str())
    });
    let is_current = |rs: &Value| current.is_some_and(|c| std::ptr::eq(*c, rs));
    let rs_name = |rs: &Value| meta::meta_str(rs, "name").unwrap_or("").to_string();
    let mut old: Vec<&Value> = owned.iter().copied().filter(|r| !is_current(r)).collect();
    old.sort_by_key(|r| (revision_of(r), rs_name(r)));
    let max_revision = owned.iter().map(|r| revision_of(r)).max().unwrap_or(0);
    plan.revision = if max_revision > 0 { max_revision.to_string() } else { String::new() };
    // The new ReplicaSet's size: None leaves it as it is (or not created yet).
    let mut new_size: Option<i64> = None;
    let mut old_sizes: Vec<i64> = old.iter().map(|r| replicas(r)).collect();
    let current_size = current.map(|c| replicas(c)).unwrap_or(0);
    if paused {
        // Only scaling: the one active ReplicaSet (or the new one when none is) takes `want`.
        let active: Vec<&&Value> = owned.iter().filter(|r| replicas(r) > 0).collect();
        match (active.as_slice(), current) {
            ([only], _) if is_current(only) => new_size = Some(want),
            ([only], _) => {
                if let Some(i) = old.iter().position(|r| std::ptr::eq(*r, **only)) {
                    old_sizes[i] = want;
                }
            }
            ([], Some(_)) => new_size = Some(want),
            _ => {}
        }
    } else if recreate {
        if old_sizes.iter().any(|s| *s > 0) {
            old_sizes.iter_mut().for_each(|s| *s = 0);
        } else {
            let old_uids: Vec<&str> = old.iter().filter_map(|r| meta::meta_str(r, "uid")).collect();
            let old_pods_left = pods.iter().any(|p| {
                old_uids.iter().any(|u| owned_by(p, u))
                    && !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded" | "Failed")
                    )
            });
            if !old_pods_left {
                new_size = Some(want);
            }
        }
    } else {
        let (surge, max_unavailable) = surge_and_unavailable(deploy, want);
        let all: i64 = current_size + old_sizes.iter().sum::<i64>();
        let target = if current_size > want {
            want
        } else {
            current_size + (want + surge - all).min(want - current_size).max(0)
        };
        new_size = Some(target);
        // As kube: a pass that resizes an existing new ReplicaSet does nothing else.
        if current.is_none() || target == current_size {
            let new_available = current.map(|c| available(c)).unwrap_or(0);
            let old_state: Vec<(i64, i64)> =
                old.iter().map(|r| (replicas(r), available(r))).collect();
            old_sizes = scale_down_old(&old_state, (target, new_available), want, max_unavailable);
        }
    }
    match current {
        None => {
            if let Some(size) = new_size {
                let mut template = template.clone();
                let labels = meta::metadata_mut(&mut template).entry("labels").or_insert(json!({}));
                labels[TEMPLATE_HASH_LABEL] = json!(hash);
                let mut selector = deploy.pointer("/spec/selector").cloned().unwrap_or(json!({}));
                if !selector.get("matchLabels").is_some_and(Value::is_object) {
                    selector["matchLabels"] = json!({});
                }
                selector["matchLabels"][TEMPLATE_HASH_LABEL] = json!(hash);
                plan.revision = (max_revision + 1).to_string();
                let mut annotations = copied_annotations(deploy);
                annotations[REVISION_ANNOTATION] = json!(plan.revision);
                plan.create = Some(json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {
                        "name": format!("{name}-{hash}"),
                        "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                        "annotations": annotations,
                        "ownerReferences": owner_ref("Deployment", deploy),
                    },
                    "spec": {"replicas": size, "selector": selector, "template": template},
                }));
            }
        }
        Some(rs) => {
            let revision = revision_of(rs);
            if revision < max_revision {
                // Rolled back to this template: it becomes the newest revision.
                let old = rs
                    .pointer(&format!(
                        "/metadata/annotations/{}",
                        REVISION_HISTORY_ANNOTATION.replace('/', "~1")
                    ))
                    .and_then(Value::as_str)
                    .filter(|h| !h.is_empty());
                let history = match old {
                    Some(h) => format!("{h},{revision}"),
                    None => revision.to_string(),
                };
                let mut annotations = copied_annotations(deploy);
                annotations[REVISION_ANNOTATION] = json!((max_revision + 1).to_string());
                annotations[REVISION_HISTORY_ANNOTATION] = json!(history);
                plan.annotate.push((rs_name(rs), annotations));
                plan.revision = (max_revision + 1).to_string();
            } else {
                plan.revision = revision.to_string();
            }
            if let Some(size) = new_size.filter(|s| *s != current_size) {
                plan.scale.push((rs_name(rs), size));
            }
        }
    }
    for (rs, size) in old.iter().zip(&old_sizes) {
        if replicas(rs) != *size {
            plan.scale.push((rs_name(rs), *size));
        }
    }
    // Revision history: old ReplicaSets that are fully scaled down, newest kept.
    let limit = deploy.pointer("/spec/revisionHistoryLimit").and_then(Value::as_i64).unwrap_or(10);
    let mut retired: Vec<&&Value> = owned
        .iter()
        .filter(|r| {
            !current.is_some_and(|c| std::ptr::eq(*c, **r))
                && replicas(r) == 0
                && r.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0) == 0
        })
        .collect();
    retired.sort_by_key(|r| std::cmp::Reverse(revision_of(r)));
    plan.delete = retired
        .iter()
        .skip(limit.max(0) as usize)
        .filter_map(|r| meta::meta_str(r, "name").map(String::from))
        .collect();
    let sum = |field: &str, only_current: bool| -> i64 {
        owned
            .iter()
            .filter(|r| !only_current || current.is_some_and(|c| std::ptr::eq(*c, **r)))
            .map(|r| r.pointer(&format!("/status/{field}")).and_then(Value::as_i64).unwrap_or(0))
            .sum()
    };
    let (total, updated, ready, available) = (
        sum("replicas", false),
        sum("replicas", true),
        sum("readyReplicas", false),
        sum("availableReplicas", false),
    );
    let complete = updated == want && total == updated && available >= updated;
    let now = meta::now_rfc3339();
    // Timestamps change only when a condition does, so an unchanged state writes nothing.
    let stamp = |kind: &str, status: &str, reason: &str| -> (Value, Value) {
        let old = deploy
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(kind)));
        match old {
            Some(c)
                if c.get("status") == Some(&json!(status))
                    && c.get("reason") == Some(&json!(reason)) =>
            {
                (
                    c.get("lastUpdateTime").cloned().unwrap_or(json!(now)),
                    c.get("lastTransitionTime").cloned().unwrap_or(json!(now)),
                )
            }
            _ => (json!(now), json!(now)),
        }
    };
    let available_status = if available >= want { "True" } else { "False" };
    let available_reason =
        if available >= want { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" };
    let (progressing_status, progressing_reason) = if paused {
        ("Unknown", "DeploymentPaused")
    } else if complete {
        ("True", "NewReplicaSetAvailable")
    } else {
        ("True", "ReplicaSetUpdated")
    };
    let (a_update, a_transition) = stamp("Available", available_status, available_reason);
    let (p_update, p_transition) = stamp("Progressing", progressing_status, progressing_reason);
    plan.status = json!({
        "observedGeneration": deploy.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (total - available).max(0),
        "conditions": [
            {"type": "Available", "status": available_status, "reason": available_reason,
             "lastUpdateTime": a_update, "lastTransitionTime": a_transition},
            {"type": "Progressing", "status": progressing_status, "reason": progressing_reason,
             "lastUpdateTime": p_update, "lastTransitionTime": p_transition},
        ],
    });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_replicasets_beyond_the_history_limit_are_deleted_oldest_first() {
        let mut d = deploy("nginx:9", 1);
        d["spec"]["revisionHistoryLimit"] = json!(2);
        let old: Vec<Value> = (1..=4)
            .map(|rev| {
                json!({"metadata": {"name": format!("web-{rev}"), "namespace": "ns",
                    "annotations": {REVISION_ANNOTATION: rev.to_string()},
                    "ownerReferences": [{"uid": "d-uid", "controller": true}]},
                    "spec": {"replicas": 0}, "status": {"replicas": 0}})
            })
            .collect();
        let plan = plan_deployment(&d, &old, &[]);
        assert_eq!(plan.revision, "5");
        assert_eq!(plan.delete, ["web-2", "web-1"]);
    }

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "web-abc", "namespace": "ns", "uid": "rs-uid", "generation": 2},
               "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    }

    fn pod(name: &str, owner: &str, node: Option<&str>, ready: bool) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns", "ownerReferences": [{"uid": owner, "controller": true}]},
               "spec": {"nodeName": node},
               "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn replicasets_create_missing_pods_from_the_template() {
        let plan = plan_replicaset(
            &rs(3),
            &[pod("a", "rs-uid", Some("n"), true), pod("x", "other", None, true)],
        );
        assert_eq!(plan.create.len(), 2);
        assert_eq!(plan.create[0]["metadata"]["generateName"], "web-abc-");
        assert_eq!(plan.create[0]["metadata"]["labels"]["app"], "web");
        assert_eq!(plan.create[0]["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
        assert_eq!(plan.status["replicas"], 3);
        assert_eq!(plan.status["readyReplicas"], 1);
        assert_eq!(plan.status["observedGeneration"], 2);
    }

    #[test]
    fn replicasets_delete_unscheduled_and_unready_pods_first() {
        let pods = [
            pod("a", "rs-uid", Some("n"), true),
            pod("b", "rs-uid", Some("n"), false),
            pod("c", "rs-uid", None, true),
        ];
        let plan = plan_replicaset(&rs(1), &pods);
        assert_eq!(plan.delete, ["c", "b"]);
        assert_eq!(plan.status["replicas"], 1);
        assert_eq!(plan.status["readyReplicas"], 1);
    }

    fn deploy(image: &str, replicas: i64) -> Value {
        json!({"metadata": {"name": "web", "namespace": "ns", "uid": "d-uid", "generation": 1},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    #[test]
    fn deployments_create_a_replicaset_per_template_and_retire_old_ones() {
        let d = deploy("nginx:1", 2);
        let plan = plan_deployment(&d, &[], &[]);
        let new = plan.create.unwrap();
        let hash = template_hash(&d["spec"]["template"]);
        assert_eq!(new["metadata"]["name"], format!("web-{hash}"));
        assert_eq!(new["spec"]["selector"]["matchLabels"][TEMPLATE_HASH_LABEL], hash.as_str());
        assert_eq!(
            new["spec"]["template"]["metadata"]["labels"][TEMPLATE_HASH_LABEL],
            hash.as_str()
        );
        assert_eq!(plan.revision, "1");
        // The template changes: a second ReplicaSet of one Pod (maxSurge 25% of 2, rounded
        // up); the first keeps both (maxUnavailable 25% of 2, rounded down, is 0).
        let mut old = new.clone();
        old["metadata"]["uid"] = json!("rs1");
        old["metadata"]["namespace"] = json!("ns");
        old["status"] = json!({"replicas": 2, "readyReplicas": 2, "availableReplicas": 2});
        let d2 = deploy("nginx:2", 2);
        let plan = plan_deployment(&d2, &[old.clone()], &[]);
        assert_eq!(plan.create.as_ref().unwrap()["spec"]["replicas"], 1);
        assert_eq!(plan.revision, "2");
        assert!(plan.scale.is_empty());
        assert_eq!(plan.status["updatedReplicas"], 0);
        // Back to the old template (rollout undo): the old ReplicaSet is reused and becomes
        // revision 3, the second goes to zero.
        let mut second = plan.create.clone().unwrap();
        second["metadata"]["namespace"] = json!("ns");
        second["metadata"]["uid"] = json!("rs2");
        let mut undo = d.clone();
        undo["metadata"]["annotations"] = json!({"kubernetes.io/change-cause": "undo"});
        let plan = plan_deployment(&undo, &[old.clone(), second.clone()], &[]);
        assert!(plan.create.is_none());
        assert_eq!(plan.revision, "3");
        assert_eq!(
            plan.annotate,
            vec![(
                format!("web-{hash}"),
                json!({REVISION_ANNOTATION: "3", REVISION_HISTORY_ANNOTATION: "1",
                       "kubernetes.io/change-cause": "undo"})
            )]
        );
        assert_eq!(plan.scale, vec![(second["metadata"]["name"].as_str().unwrap().into(), 0)]);
        // Back to the old template with the new one done: complete.
        let plan = plan_deployment(&d, &[old.clone()], &[]);
        assert!(plan.create.is_none() && plan.scale.is_empty());
        assert_eq!(plan.status["conditions"][1]["reason"], "NewReplicaSetAvailable");
        assert_eq!(plan.status["availableReplicas"], 2);
        // Unchanged conditions keep their timestamps, so a settled state writes nothing.
        let mut settled = d.clone();
        settled["status"] = plan.status.clone();
        settled["status"]["conditions"][0]["lastUpdateTime"] = json!("2000-01-01T00:00:00Z");
        let again = plan_deployment(&settled, &[old], &[]);
        assert_eq!(again.status["conditions"][0]["lastUpdateTime"], "2000-01-01T00:00:00Z");
    }

    fn owned_rs(name: &str, uid: &str, rev: i64, spec: i64, available: i64, image: &str) -> Value {
        let template = deploy(image, 1)["spec"]["template"].clone();
        json!({"metadata": {"name": name, "namespace": "ns", "uid": uid,
                "labels": {TEMPLATE_HASH_LABEL: template_hash(&template)},
                "annotations": {REVISION_ANNOTATION: rev.to_string()},
                "ownerReferences": [{"uid": "d-uid", "controller": true}]},
               "spec": {"replicas": spec, "template": template},
               "status": {"replicas": spec, "readyReplicas": available,
                          "availableReplicas": available}})
    }

    #[test]
    fn surge_and_unavailable_resolve_as_kube() {
        let with = |surge: Value, unavailable: Value| {
            let mut d = deploy("x", 10);
            d["spec"]["strategy"] = json!({"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}});
            surge_and_unavailable(&d, 10)
        };
        assert_eq!(surge_and_unavailable(&deploy("x", 10), 10), (3, 2));
        assert_eq!(with(json!("15%"), json!("15%")), (2, 1));
        assert_eq!(with(json!(0), json!(0)), (0, 1));
        assert_eq!(with(json!("1%"), json!("5%")), (1, 0));
        assert_eq!(with(json!(2), json!(20)), (2, 10));
    }

    #[test]
    fn rolling_updates_step_within_surge_and_availability() {
        let mut d = deploy("new", 4);
        d["spec"]["strategy"] = json!({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
        let new_name = format!("web-{}", template_hash(&d["spec"]["template"]));
        // Four old ready Pods: the new ReplicaSet starts with one, the old one keeps four.
        let old = owned_rs("web-old", "rs1", 1, 4, 4, "old");
        let plan = plan_deployment(&d, std::slice::from_ref(&old), &[]);
        assert_eq!(plan.create.as_ref().unwrap()["spec"]["replicas"], 1);
        assert!(plan.scale.is_empty());
        // The new Pod is not available yet: nothing moves.
        let new = owned_rs(&new_name, "rs2", 2, 1, 0, "new");
        let plan = plan_deployment(&d, &[old.clone(), new], &[]);
        assert!(plan.create.is_none() && plan.scale.is_empty(), "{:?}", plan.scale);
        // Available: one old Pod goes; then the new ReplicaSet may grow by one.
        let new = owned_rs(&new_name, "rs2", 2, 1, 1, "new");
        let plan = plan_deployment(&d, &[old, new.clone()], &[]);
        assert_eq!(plan.scale, vec![("web-old".to_string(), 3)]);
        let old = owned_rs("web-old", "rs1", 1, 3, 3, "old");
        let plan = plan_deployment(&d, &[old, new], &[]);
        assert_eq!(plan.scale, vec![(new_name.clone(), 2)]);
        // Unavailable old Pods go first (within the surge), though fewer than 4 are available.
        let old = owned_rs("web-old", "rs1", 1, 3, 1, "old");
        let new = owned_rs(&new_name, "rs2", 2, 2, 2, "new");
        let plan = plan_deployment(&d, &[old, new], &[]);
        assert_eq!(plan.scale, vec![("web-old".to_string(), 2)]);
        // Only the replicas changed: the single ReplicaSet is resized at once.
        let only = owned_rs(&new_name, "rs2", 2, 4, 4, "new");
        let plan = plan_deployment(&deploy("new", 7), &[only], &[]);
        assert_eq!(plan.scale, vec![(new_name, 7)]);
    }

    #[test]
    fn recreate_scales_old_to_zero_and_waits_for_their_pods() {
        let mut d = deploy("new", 3);
        d["spec"]["strategy"] = json!({"type": "Recreate"});
        let old = owned_rs("web-old", "rs1", 1, 3, 3, "old");
        let plan = plan_deployment(&d, &[old], &[]);
        assert!(plan.create.is_none());
        assert_eq!(plan.scale, vec![("web-old".to_string(), 0)]);
        assert_eq!(plan.revision, "1");
        let old = owned_rs("web-old", "rs1", 1, 0, 0, "old");
        let mut terminating = pod("p", "rs1", Some("n"), true);
        terminating["metadata"]["deletionTimestamp"] = json!("2000-01-01T00:00:00Z");
        let plan = plan_deployment(&d, std::slice::from_ref(&old), &[terminating]);
        assert!(plan.create.is_none() && plan.scale.is_empty());
        let plan = plan_deployment(&d, &[old], &[]);
        assert_eq!(plan.create.as_ref().unwrap()["spec"]["replicas"], 3);
        assert_eq!(plan.revision, "2");
    }

    #[test]
    fn paused_deployments_scale_but_do_not_roll() {
        let mut d = deploy("new", 5);
        d["spec"]["paused"] = json!(true);
        let old = owned_rs("web-old", "rs1", 1, 3, 3, "old");
        let plan = plan_deployment(&d, &[old], &[]);
        assert!(plan.create.is_none());
        assert_eq!(plan.scale, vec![("web-old".to_string(), 5)]);
        assert_eq!(plan.revision, "1");
        assert_eq!(plan.status["conditions"][1]["reason"], "DeploymentPaused");
    }
}
