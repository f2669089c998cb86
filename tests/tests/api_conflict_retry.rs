//! A request that names no version of an object never gets 409 because someone else wrote the
//! object at the same moment (issue 4: a Pod DELETE answered 409 while the node runtime wrote
//! the Pod's status). Threads race DELETEs (graceful and forced), metadata PATCHes, PUTs
//! without resourceVersion, status writes, bindings and scale PATCHes on the same objects, as
//! kube-apiserver's read-modify-write loop allows; a stale resourceVersion in an update or
//! patch and a DELETE with stale preconditions still get 409 and change nothing.
use std::{
    sync::{Barrier, Mutex},
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, TempDir};

const PODS: &str = "/api/v1/namespaces/default/pods";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";
const NODE: &str = "node-a";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON: &str = "application/json";
/// Pods raced against their deletion, and how many of them race at once.
const POD_COUNT: usize = 50;
const POD_BATCH: usize = 10;
/// Writes per racing thread and object.
const ROUNDS: usize = 12;

/// A server without controllers (nothing else writes the objects) and one Node, so Pods bound
/// to it are deleted gracefully.
fn start(dir: &TempDir) -> ApiServer {
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}});
    let (code, body) = server.json("POST", "/api/v1/nodes", Some(&node));
    assert_eq!(code, 201, "{body}");
    server
}

fn create_pod(server: &ApiServer, name: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": "busybox"}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec});
    let (code, body) = server.json("POST", PODS, Some(&pod));
    assert_eq!(code, 201, "{body}");
    body
}

/// Sends requests and keeps every answer that was not among the allowed codes.
struct Race<'a> {
    server: &'a ApiServer,
    unexpected: Mutex<Vec<String>>,
}

impl<'a> Race<'a> {
    fn new(server: &'a ApiServer) -> Race<'a> {
        Race { server, unexpected: Mutex::new(Vec::new()) }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &Value,
        allowed: &[u16],
    ) -> (u16, Value) {
        let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let resp = self.server.request(method, path, content_type, &bytes);
        let answer: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        if !allowed.contains(&resp.status) {
            let seen = format!("{method} {path} {body}: {} {answer}", resp.status);
            self.unexpected.lock().unwrap().push(seen);
        }
        (resp.status, answer)
    }

    /// Writes `pods/NAME/status` with a merge patch, as the node runtime does, until the Pod
    /// is gone.
    fn patch_status(&self, pod: &str, writer: usize) {
        for round in 0..ROUNDS {
            let ready = if round % 2 == 0 { "True" } else { "False" };
            let status = json!({"status": {"phase": "Running",
                "message": format!("{writer}-{round}"),
                "conditions": [{"type": "Ready", "status": ready}]}});
            let (code, _) =
                self.send("PATCH", &format!("{PODS}/{pod}/status"), MERGE, &status, &[200, 404]);
            if code == 404 {
                return;
            }
        }
    }

    /// Replaces `pods/NAME/status` with a PUT that names no resourceVersion (unconditional).
    fn put_status(&self, pod: &str) {
        for round in 0..ROUNDS {
            let (code, mut obj) =
                self.send("GET", &format!("{PODS}/{pod}"), "", &Value::Null, &[200, 404]);
            if code == 404 {
                return;
            }
            obj["metadata"].as_object_mut().unwrap().remove("resourceVersion");
            obj["status"]["reason"] = json!(format!("put-{round}"));
            let (code, _) =
                self.send("PUT", &format!("{PODS}/{pod}/status"), JSON, &obj, &[200, 404]);
            if code == 404 {
                return;
            }
        }
    }

    /// Adds one label per round with a patch that names no resourceVersion.
    fn patch_labels(&self, pod: &str, writer: usize, content_type: &str) {
        for round in 0..ROUNDS {
            let mut patch = json!({"metadata": {"labels": {}}});
            patch["metadata"]["labels"][format!("w{writer}-{round}")] = json!("x");
            let (code, _) =
                self.send("PATCH", &format!("{PODS}/{pod}"), content_type, &patch, &[200, 404]);
            if code == 404 {
                return;
            }
        }
    }

    fn assert_no_surprises(&self, what: &str) {
        let unexpected = self.unexpected.lock().unwrap();
        let conflicts = unexpected.iter().filter(|s| s.contains(": 409 ")).count();
        assert!(
            unexpected.is_empty(),
            "{what}: {} unexpected answers ({conflicts} of them 409), the first ones:\n{}",
            unexpected.len(),
            unexpected.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Every Pod is raced by a status PATCHer, a status PUTter and two label PATCHers while it is
/// deleted: Pods on the Node gracefully (30 s, shortened to 10 s, then 0 as the node runtime
/// finishes), the others at once. No DELETE and no write answers 409; every Pod ends gone.
#[test]
fn deletes_and_patches_racing_status_writes_never_get_409() {
    let dir = TempDir::new("api-conflict-delete");
    let server = start(&dir);
    let race = Race::new(&server);
    for batch in 0..POD_COUNT / POD_BATCH {
        let names: Vec<String> =
            (0..POD_BATCH).map(|i| format!("race-{:02}", batch * POD_BATCH + i)).collect();
        for (i, name) in names.iter().enumerate() {
            create_pod(&server, name, (i % 2 == 0).then_some(NODE));
        }
        // The five threads of a Pod start together.
        let starts: Vec<Barrier> = names.iter().map(|_| Barrier::new(5)).collect();
        thread::scope(|s| {
            for (i, (name, start)) in names.iter().zip(&starts).enumerate() {
                let (race, name) = (&race, name.as_str());
                let graceful = i % 2 == 0;
                s.spawn(move || {
                    start.wait();
                    race.patch_status(name, 0);
                });
                s.spawn(move || {
                    start.wait();
                    race.put_status(name);
                });
                for (writer, content_type) in [(1, MERGE), (2, STRATEGIC)] {
                    s.spawn(move || {
                        start.wait();
                        race.patch_labels(name, writer, content_type);
                    });
                }
                s.spawn(move || {
                    start.wait();
                    let path = format!("{PODS}/{name}");
                    let pause = Duration::from_millis(2 + (i as u64 % 4) * 3);
                    let graces: &[i64] = if graceful { &[30, 10, 0] } else { &[30] };
                    for grace in graces {
                        thread::sleep(pause);
                        let options = json!({"kind": "DeleteOptions", "apiVersion": "v1",
                            "gracePeriodSeconds": grace});
                        race.send("DELETE", &path, JSON, &options, &[200]);
                    }
                });
            }
        });
    }
    race.assert_no_surprises("deleting Pods while their status is written");
    for i in 0..POD_COUNT {
        let (code, pod) = server.json("GET", &format!("{PODS}/race-{i:02}"), None);
        assert_eq!(code, 404, "race-{i:02} is still there: {pod}");
    }
}

/// Writes that race each other all land: every label of two PATCHers on each of 10 Pods is
/// there at the end (a lost race was applied again to the latest object, not dropped or
/// refused), a binding racing status writes binds, and scale PATCHes racing Deployment status
/// writes set the replicas.
#[test]
fn racing_patches_bindings_and_scales_all_land() {
    let dir = TempDir::new("api-conflict-land");
    let server = start(&dir);
    let race = Race::new(&server);
    let names: Vec<String> = (0..10).map(|i| format!("land-{i}")).collect();
    for name in &names {
        create_pod(&server, name, None);
    }
    let deployments: Vec<String> = (0..5).map(|i| format!("web-{i}")).collect();
    for name in &deployments {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "app", "image": "nginx"}]}}}});
        let (code, body) = server.json("POST", DEPLOYMENTS, Some(&deployment));
        assert_eq!(code, 201, "{body}");
    }
    thread::scope(|s| {
        for name in &names {
            let (race, name) = (&race, name.as_str());
            s.spawn(move || race.patch_status(name, 0));
            s.spawn(move || race.put_status(name));
            s.spawn(move || race.patch_labels(name, 1, MERGE));
            s.spawn(move || race.patch_labels(name, 2, STRATEGIC));
            s.spawn(move || {
                thread::sleep(Duration::from_millis(5));
                let binding = json!({"apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name}, "target": {"kind": "Node", "name": NODE}});
                race.send("POST", &format!("{PODS}/{name}/binding"), JSON, &binding, &[201]);
            });
        }
        for name in &deployments {
            let (race, name) = (&race, name.as_str());
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let status =
                        json!({"status": {"observedGeneration": round, "replicas": round}});
                    let path = format!("{DEPLOYMENTS}/{name}/status");
                    race.send("PATCH", &path, MERGE, &status, &[200]);
                }
            });
            s.spawn(move || {
                for replicas in 1..=ROUNDS {
                    let scale = json!({"spec": {"replicas": replicas}});
                    let path = format!("{DEPLOYMENTS}/{name}/scale");
                    race.send("PATCH", &path, MERGE, &scale, &[200]);
                }
            });
        }
    });
    race.assert_no_surprises("racing patches, bindings and scales");
    for name in &names {
        let (code, pod) = server.json("GET", &format!("{PODS}/{name}"), None);
        assert_eq!(code, 200, "{pod}");
        assert_eq!(pod["spec"]["nodeName"], NODE, "{name} was not bound: {pod}");
        for writer in [1, 2] {
            for round in 0..ROUNDS {
                let label = format!("w{writer}-{round}");
                assert_eq!(pod["metadata"]["labels"][&label], "x", "{name} lost {label}: {pod}");
            }
        }
    }
    for name in &deployments {
        let (code, deployment) = server.json("GET", &format!("{DEPLOYMENTS}/{name}"), None);
        assert_eq!(code, 200, "{deployment}");
        assert_eq!(deployment["spec"]["replicas"], ROUNDS, "{name}: {deployment}");
        assert_eq!(deployment["status"]["replicas"], ROUNDS - 1, "{name}: {deployment}");
    }
}

fn assert_conflict(code: u16, answer: &Value, what: &str) {
    assert_eq!(code, 409, "{what}: {answer}");
    assert_eq!(answer["reason"], "Conflict", "{what}: {answer}");
}

/// What a client asks to be conditional stays conditional: a stale resourceVersion in a PUT
/// (main resource and status), in a merge patch and in DeleteOptions preconditions gets 409,
/// as does a wrong uid precondition and a second binding; none of them changes the Pod.
#[test]
fn stale_versions_and_preconditions_still_get_409() {
    let dir = TempDir::new("api-conflict-stale");
    let server = start(&dir);
    let race = Race::new(&server);
    let created = create_pod(&server, "stale", Some(NODE));
    let path = format!("{PODS}/stale");
    let stale_rv = created["metadata"]["resourceVersion"].clone();
    let status = json!({"status": {"phase": "Running"}});
    let (code, current) = server.json("PATCH", &format!("{path}/status"), Some(&status));
    assert_eq!(code, 200, "{current}");
    assert_ne!(current["metadata"]["resourceVersion"], stale_rv);

    let stale_delete = json!({"kind": "DeleteOptions", "apiVersion": "v1",
        "preconditions": {"resourceVersion": stale_rv}});
    let (code, answer) = race.send("DELETE", &path, JSON, &stale_delete, &[409]);
    assert_conflict(code, &answer, "DELETE with a stale preconditions.resourceVersion");
    let wrong_uid = json!({"kind": "DeleteOptions", "apiVersion": "v1",
        "preconditions": {"uid": "not-the-uid"}});
    let (code, answer) = race.send("DELETE", &path, JSON, &wrong_uid, &[409]);
    assert_conflict(code, &answer, "DELETE with a wrong preconditions.uid");

    let mut stale_put = current.clone();
    stale_put["metadata"]["resourceVersion"] = stale_rv.clone();
    stale_put["metadata"]["labels"] = json!({"stale": "put"});
    let (code, answer) = race.send("PUT", &path, JSON, &stale_put, &[409]);
    assert_conflict(code, &answer, "PUT with a stale resourceVersion");
    stale_put["status"]["phase"] = json!("Failed");
    let (code, answer) = race.send("PUT", &format!("{path}/status"), JSON, &stale_put, &[409]);
    assert_conflict(code, &answer, "PUT of the status with a stale resourceVersion");
    let stale_patch =
        json!({"metadata": {"resourceVersion": stale_rv, "labels": {"stale": "patch"}}});
    let (code, answer) = race.send("PATCH", &path, MERGE, &stale_patch, &[409]);
    assert_conflict(code, &answer, "merge PATCH with a stale resourceVersion");
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "stale"},
        "target": {"kind": "Node", "name": "node-b"}});
    let (code, answer) = race.send("POST", &format!("{path}/binding"), JSON, &binding, &[409]);
    assert_conflict(code, &answer, "binding a bound Pod");
    race.assert_no_surprises("stale versions");

    let (code, now) = server.json("GET", &path, None);
    assert_eq!(code, 200, "{now}");
    assert_eq!(now, current, "a refused request changed the Pod");

    // The current version as precondition deletes (gracefully: the Pod is on the Node).
    let fresh = json!({"kind": "DeleteOptions", "apiVersion": "v1",
        "preconditions": {"resourceVersion": current["metadata"]["resourceVersion"]}});
    let (code, answer) = race.send("DELETE", &path, JSON, &fresh, &[200]);
    assert_eq!(code, 200, "{answer}");
    assert!(answer["metadata"]["deletionTimestamp"].is_string(), "{answer}");
    race.assert_no_surprises("a current precondition");
}
