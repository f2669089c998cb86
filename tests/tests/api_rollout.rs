//! Deployment rollouts paced by their strategy, with the test playing kubelet (no node runs,
//! so Pods stay unscheduled, are deleted at once, and become Ready only when the test says so
//! through `pods/status`):
//! - RollingUpdate with maxSurge 1 / maxUnavailable 0 on 4 replicas: at every observed step at
//!   most 5 live Pods and at least 4 Ready ones, old and new Pods side by side on the way, and
//!   the rollout completes (all Pods new, old ReplicaSet at 0, `kubectl rollout status`).
//! - Recreate: every old Pod is gone before the first new Pod exists (in the Pods' watch, and
//!   at every observed step).
use std::time::Duration;

use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, Kubectl, TempDir, WatchStream};

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";
const PODS: &str = "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb";

fn deployment(strategy: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 4,
            "strategy": strategy,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx:1.25"}]},
            },
        },
    })
}

/// The live (not terminating) Pods of the app.
fn live_pods(server: &ApiServer) -> Vec<Value> {
    let (status, list) = server.json("GET", PODS, None);
    assert_eq!(status, 200, "{list}");
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .collect()
}

fn ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn image(pod: &Value) -> &str {
    pod.pointer("/spec/containers/0/image").and_then(Value::as_str).unwrap_or("")
}

/// Marks a Pod Running and Ready, as a kubelet would.
fn make_ready(server: &ApiServer, pod: &Value) {
    let name = pod["metadata"]["name"].as_str().expect("pod name");
    let status = json!({"status": {"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    let (code, body) = server.json(
        "PATCH",
        &format!("/api/v1/namespaces/default/pods/{name}/status"),
        Some(&status),
    );
    assert!(code == 200 || code == 404, "ready {name}: {code} {body}");
}

/// The Deployment has rolled out `image` to all 4 replicas, as `kubectl rollout status` sees it.
fn rolled_out(server: &ApiServer, image: &str) -> bool {
    let (_, d) = server.json("GET", &format!("{DEPLOYMENTS}/web"), None);
    let s = &d["status"];
    d["spec"]["template"]["spec"]["containers"][0]["image"] == image
        && s["observedGeneration"] == d["metadata"]["generation"]
        && s["updatedReplicas"] == 4
        && s["replicas"] == 4
        && s["availableReplicas"] == 4
        && s["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "NewReplicaSetAvailable"))
}

fn old_replicaset_sizes(server: &ApiServer, image: &str) -> Vec<i64> {
    let (_, list) = server.json("GET", "/apis/apps/v1/namespaces/default/replicasets", None);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rs| rs["spec"]["template"]["spec"]["containers"][0]["image"] != image)
        .map(|rs| rs["spec"]["replicas"].as_i64().unwrap_or(-1))
        .collect()
}

/// Plays kubelet until 4 Ready Pods of the first template run (bounded: 20 s).
fn start(server: &ApiServer, strategy: Value) {
    let (code, body) = server.json("POST", DEPLOYMENTS, Some(&deployment(strategy)));
    assert_eq!(code, 201, "{body}");
    for _ in 0..400 {
        let pods = live_pods(server);
        pods.iter().filter(|p| !ready(p)).for_each(|p| make_ready(server, p));
        if pods.len() == 4 && pods.iter().all(ready) && rolled_out(server, "nginx:1.25") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the first rollout did not complete: {:?}", live_pods(server));
}

fn set_image(server: &ApiServer, image: &str) {
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "nginx", "image": image}]}}}});
    let (code, body) = server.json("PATCH", &format!("{DEPLOYMENTS}/web"), Some(&patch));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn rolling_updates_keep_within_max_surge_and_max_unavailable() {
    let dir = TempDir::new("api-rollout-rolling");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    start(
        &server,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
    );
    set_image(&server, "nginx:1.27");
    let mut mixed_steps = 0;
    let mut done = false;
    // Each step: check the bounds, then let one new Pod become Ready (bounded: 30 s).
    for _ in 0..600 {
        let pods = live_pods(&server);
        let ready_pods = pods.iter().filter(|p| ready(p)).count();
        let names: Vec<(&str, &str, bool)> = pods
            .iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap_or(""), image(p), ready(p)))
            .collect();
        assert!(pods.len() <= 5, "more than replicas + maxSurge Pods: {names:?}");
        assert!(ready_pods >= 4, "fewer than replicas - maxUnavailable Ready Pods: {names:?}");
        let new = pods.iter().filter(|p| image(p) == "nginx:1.27").count();
        if new > 0 && new < pods.len() {
            mixed_steps += 1;
        }
        if new == 4
            && pods.len() == 4
            && rolled_out(&server, "nginx:1.27")
            && old_replicaset_sizes(&server, "nginx:1.27") == [0]
        {
            done = true;
            break;
        }
        if let Some(pod) = pods.iter().find(|p| !ready(p)) {
            make_ready(&server, pod);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(done, "the rollout did not complete: {:?}", live_pods(&server));
    assert!(mixed_steps > 0, "old and new Pods were never seen side by side");
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let (_, deploy) = server.json("GET", &format!("{DEPLOYMENTS}/web"), None);
    assert_eq!(deploy["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "2");
}

#[test]
fn recreate_removes_every_old_pod_before_creating_new_ones() {
    let dir = TempDir::new("api-rollout-recreate");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    start(&server, json!({"type": "Recreate"}));
    let (_, list) = server.json("GET", PODS, None);
    let rv = list["metadata"]["resourceVersion"].as_str().expect("list resourceVersion");
    let mut watch = WatchStream::open(&server, &format!("{PODS}&watch=true&resourceVersion={rv}"));
    set_image(&server, "nginx:1.27");
    let mut done = false;
    for _ in 0..600 {
        let pods = live_pods(&server);
        let (new, old): (Vec<&Value>, Vec<&Value>) =
            pods.iter().partition(|p| image(p) == "nginx:1.27");
        assert!(
            new.is_empty() || old.is_empty(),
            "new Pods while old ones remain: {:?}",
            pods.iter().map(|p| (image(p), &p["metadata"]["name"])).collect::<Vec<_>>()
        );
        pods.iter().filter(|p| !ready(p)).for_each(|p| make_ready(&server, p));
        if new.len() == 4 && new.iter().all(|p| ready(p)) && rolled_out(&server, "nginx:1.27") {
            done = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(done, "the rollout did not complete: {:?}", live_pods(&server));
    // The watch saw the four old Pods deleted before the first new one was added.
    let (mut old_deleted, mut new_added) = (0, 0);
    while new_added < 4 {
        let event = watch.next_event();
        let new = image(&event["object"]) == "nginx:1.27";
        match event["type"].as_str() {
            Some("DELETED") if !new => old_deleted += 1,
            Some("ADDED") if new => {
                assert_eq!(old_deleted, 4, "a new Pod was added before the old ones were gone");
                new_added += 1;
            }
            _ => {}
        }
    }
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
}
