//! The upstream tutorial's kubectl steps, as written, against `weir apiserver` with a fake node
//! (tests/src/kubelet.rs plays the node runtime: Pods become Running and Ready, graceful
//! deletions are finished, attach is served). Real kubectl 1.37, whose typed commands send
//! protobuf bodies (`create deployment`), attach over WebSocket (`run -i`) and wait for
//! deletions (`delete pod`, `run --rm`).
use std::time::Duration;

use weir_tests::{
    apiserver::{ApiServer, Kubectl, TempDir},
    kubelet::FakeNode,
    wait::eventually,
};

const WAIT: Duration = Duration::from_secs(30);

fn pods(kubectl: &Kubectl, jsonpath: &str) -> Vec<String> {
    let out = kubectl.run(&["get", "pods", "-l", "app=web", "-o", &format!("jsonpath={jsonpath}")]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

/// Waits until the app has `count` Pods that are not terminating; returns their names.
fn live_pods(kubectl: &Kubectl, count: usize) -> Vec<String> {
    let mut names = Vec::new();
    eventually(&format!("{count} live web pods"), WAIT, || {
        names = pods(kubectl, "{.items[?(@.status.phase==\"Running\")].metadata.name}");
        let all = pods(kubectl, "{.items[*].metadata.name}");
        (names.len() != count || all.len() != count).then(|| format!("{all:?}"))
    });
    names
}

#[test]
fn tutorial_steps_work_with_real_kubectl() {
    let dir = TempDir::new("api-tutorial");
    let server = ApiServer::start(dir.path());
    let node = FakeNode::start(&server, "node-a");
    let kubectl = Kubectl::new(&server.kubeconfig);

    let out = kubectl.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=3"]);
    assert!(out.contains("deployment.apps/web created"), "{out}");
    live_pods(&kubectl, 3);
    let out = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(out.contains("successfully rolled out"), "{out}");

    let out = kubectl.ok(&["expose", "deployment", "web", "--port=80"]);
    assert!(out.contains("service/web exposed"), "{out}");
    eventually("3 endpoints for web", WAIT, || {
        let out = kubectl.run(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[0]}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.split_whitespace().count() != 3).then_some(text)
    });

    // `kubectl run --rm -i`: create, wait for Running, attach (WebSocket through the API
    // server to the node), wait for the Pod to finish, delete it and wait until it is gone.
    let out = kubectl.ok(&[
        "run",
        "client",
        "--rm",
        "-i",
        "--restart=Never",
        "--image=busybox",
        "--",
        "wget",
        "-qO-",
        "--timeout=2",
        "http://web",
    ]);
    assert!(out.contains("pod \"client\" deleted"), "{out}");
    let attaches = node.requests_to("/attach/default/client/client");
    assert_eq!(attaches.len(), 1, "{attaches:?}");
    assert!(attaches[0].contains("stdin=true"), "{attaches:?}");
    kubectl.fails(&["get", "pod", "client"]);

    kubectl.ok(&["scale", "deployment", "web", "--replicas=5"]);
    live_pods(&kubectl, 5);

    // A new image, its rollout, the history, and undo back to revision 1's template.
    kubectl.ok(&["set", "image", "deployment/web", "nginx=httpd"]);
    let out = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    eventually("every pod runs httpd", WAIT, || {
        let images = pods(&kubectl, "{.items[*].spec.containers[0].image}");
        (images.len() != 5 || images.iter().any(|i| i != "httpd")).then(|| format!("{images:?}"))
    });
    let history = kubectl.ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains("REVISION"), "{history}");
    let revisions: Vec<&str> =
        history.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(revisions.contains(&"1") && revisions.contains(&"2"), "{history}");
    let out = kubectl.ok(&["rollout", "undo", "deployment/web"]);
    assert!(out.contains("rolled back"), "{out}");
    eventually("every pod runs nginx again", WAIT, || {
        let images = pods(&kubectl, "{.items[*].spec.containers[0].image}");
        (images.len() != 5 || images.iter().any(|i| i != "nginx")).then(|| format!("{images:?}"))
    });
    let revision = kubectl.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(revision, "3");
    let replicasets = kubectl.ok(&["get", "rs", "-o", "name"]);
    assert_eq!(replicasets.lines().count(), 2, "undo reuses the first ReplicaSet: {replicasets}");

    // Delete a Pod: it terminates gracefully (the node finishes it), the ReplicaSet replaces it.
    let before = live_pods(&kubectl, 5);
    let victim = &before[0];
    let out = kubectl.ok(&["delete", "pod", victim]);
    assert!(out.contains("deleted"), "{out}");
    let after = live_pods(&kubectl, 5);
    assert!(!after.contains(victim), "{victim} still there: {after:?}");

    let wide = kubectl.ok(&["get", "pods", "-o", "wide"]);
    assert!(wide.contains("node-a") && wide.contains("10.244.0."), "{wide}");
    for what in [&format!("pod/{}", after[0]), "deployment/web", "service/web"] {
        let out = kubectl.ok(&["describe", what]);
        assert!(out.contains("Name:"), "{out}");
    }
    kubectl.ok(&["get", "events"]);
}
