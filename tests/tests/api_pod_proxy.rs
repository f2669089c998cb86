//! `kubectl logs`, `logs -f` and `exec` through weir's API server to a node's kubelet endpoint
//! (a fake kubelet in the test: tests/src/kubelet.rs), the errors when the node cannot serve,
//! who may exec, graceful Pod deletion as watchers see it, and the spec.nodeName /
//! status.phase field selectors the node runtime relies on.
use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use serde_json::{Value, json};
use weir_tests::{
    apiserver::{ApiServer, Kubectl, TempDir, WatchStream, http_request},
    kubelet::FakeNode,
    wait::eventually,
};

const WAIT: Duration = Duration::from_secs(30);

fn create_pod(server: &ApiServer, name: &str, spec: Value) {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec});
    let (code, body) = server.json("POST", "/api/v1/namespaces/default/pods", Some(&pod));
    assert_eq!(code, 201, "{body}");
}

fn phase(server: &ApiServer, name: &str) -> String {
    let (_, pod) = server.json("GET", &format!("/api/v1/namespaces/default/pods/{name}"), None);
    pod["status"]["phase"].as_str().unwrap_or("").to_string()
}

/// A Node whose kubelet endpoint is a closed loopback port.
fn register_dead_node(server: &ApiServer, name: &str) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    let (code, body) = server.json("POST", "/api/v1/nodes", Some(&node));
    assert_eq!(code, 201, "{body}");
    // A merge patch, as the node runtime writes it (the pod-CIDR controller may update the
    // new Node at the same moment).
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    let (code, body) = server.json("PATCH", &format!("/api/v1/nodes/{name}/status"), Some(&status));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn logs_and_exec_reach_the_node_and_errors_say_why_not() {
    let dir = TempDir::new("api-pod-proxy");
    let server = ApiServer::start(dir.path());
    let node = FakeNode::start(&server, "node-a");
    let kubectl = Kubectl::new(&server.kubeconfig);
    create_pod(
        &server,
        "p",
        json!({"nodeName": "node-a", "containers": [{"name": "app", "image": "busybox"}]}),
    );
    eventually("p running", WAIT, || {
        let p = phase(&server, "p");
        (p != "Running").then_some(p)
    });

    // The node runtime's selectors.
    let (_, list) = server.json("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a", None);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    let (_, list) = server.json("GET", "/api/v1/pods?fieldSelector=status.phase%3DPending", None);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");

    assert_eq!(kubectl.ok(&["logs", "p"]), "p/app line 1\np/app line 2\np/app line 3\n");
    assert_eq!(kubectl.ok(&["logs", "p", "--tail=1", "--timestamps"]), "p/app line 3\n");
    let seen = node.requests_to("/containerLogs/default/p/app");
    assert!(
        seen.iter().any(|r| r.contains("tailLines=1") && r.contains("timestamps=true")),
        "{seen:?}"
    );

    // logs -f streams lines as the node writes them.
    let mut follow = kubectl.command(&["logs", "-f", "p"]).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 6 {
        match rx.recv_timeout(WAIT) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(lines.last().map(String::as_str), Some("p/app line 6"), "{lines:?}");

    // exec over WebSocket (v5.channel.k8s.io), through the API server's upgrade proxy.
    assert_eq!(kubectl.ok(&["exec", "p", "--", "echo", "hello", "world"]), "hello world\n");
    let seen = node.requests_to("/exec/default/p/app");
    assert!(
        seen.iter().any(|r| r.contains("command=echo&command=hello&command=world")),
        "{seen:?}"
    );
    let mut cat = kubectl
        .command(&["exec", "-i", "p", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(b"ping\npong\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping\npong\n");

    // Only tokens that may write can exec (kubectl uses GET for the WebSocket).
    let reader = server.token("reader");
    let as_reader = |path: &str| {
        http_request(server.insecure_addr.unwrap(), "GET", path, Some(&reader), "", b"")
    };
    let resp = as_reader("/api/v1/namespaces/default/pods/p/exec?command=ls&stdout=true");
    assert_eq!(resp.status, 403, "{}", String::from_utf8_lossy(&resp.body));
    let resp = as_reader("/api/v1/namespaces/default/pods/p/log");
    assert_eq!(resp.status, 200, "readers may read logs");

    // Errors name the step that failed.
    create_pod(
        &server,
        "two",
        json!({"nodeName": "node-a", "containers": [
        {"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}),
    );
    let (code, status) = server.json("GET", "/api/v1/namespaces/default/pods/two/log", None);
    assert_eq!(code, 400);
    assert!(status["message"].as_str().unwrap().contains("choose one of: [a b]"), "{status}");
    assert_eq!(kubectl.ok(&["logs", "two", "-c", "b", "--tail=1"]), "two/b line 3\n");
    create_pod(
        &server,
        "nowhere",
        json!({"nodeSelector": {"no": "such-node"},
        "containers": [{"name": "c", "image": "busybox"}]}),
    );
    let (code, status) = server.json("GET", "/api/v1/namespaces/default/pods/nowhere/log", None);
    assert_eq!(code, 503);
    assert!(status["message"].as_str().unwrap().contains("not scheduled"), "{status}");
    register_dead_node(&server, "node-dead");
    create_pod(
        &server,
        "stuck",
        json!({"nodeName": "node-dead", "containers": [{"name": "c", "image": "busybox"}]}),
    );
    let (code, status) = server.json("GET", "/api/v1/namespaces/default/pods/stuck/log", None);
    assert_eq!(code, 502);
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("node-dead") && message.contains("unreachable"), "{status}");
    let err = kubectl.fails(&["exec", "stuck", "--", "true"]);
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn pods_on_nodes_terminate_gracefully() {
    let dir = TempDir::new("api-graceful");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    register_dead_node(&server, "node-b");
    create_pod(
        &server,
        "q",
        json!({"nodeName": "node-b", "terminationGracePeriodSeconds": 20,
        "containers": [{"name": "c", "image": "busybox"}]}),
    );
    let (_, list) = server.json("GET", "/api/v1/namespaces/default/pods", None);
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut watch = WatchStream::open(
        &server,
        &format!("/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}"),
    );
    let path = "/api/v1/namespaces/default/pods/q";

    // The first DELETE marks it (the Pod's own grace period) and answers 200 with the Pod.
    let (code, pod) = server.json("DELETE", path, None);
    assert_eq!(code, 200, "{pod}");
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 20);
    assert!(pod["metadata"]["deletionTimestamp"].is_string(), "{pod}");
    // A shorter period replaces it; a longer one does not.
    let (code, pod) = server.json("DELETE", path, Some(&json!({"gracePeriodSeconds": 5})));
    assert_eq!((code, pod["metadata"]["deletionGracePeriodSeconds"].clone()), (200, json!(5)));
    let (_, pod) = server.json("DELETE", path, Some(&json!({"gracePeriodSeconds": 60})));
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 5);
    // What the node runtime sends once the containers are gone.
    let (code, _) = server.json("DELETE", &format!("{path}?gracePeriodSeconds=0"), None);
    assert_eq!(code, 200);
    assert_eq!(server.json("GET", path, None).0, 404);
    let types: Vec<String> =
        (0..3).map(|_| watch.next_event()["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types, ["MODIFIED", "MODIFIED", "DELETED"]);

    // Unscheduled Pods go at once; so does a forced delete.
    create_pod(
        &server,
        "free",
        json!({"nodeSelector": {"no": "node"}, "containers": [{"name": "c", "image": "busybox"}]}),
    );
    let (code, _) = server.json("DELETE", "/api/v1/namespaces/default/pods/free", None);
    assert_eq!(code, 200);
    assert_eq!(server.json("GET", "/api/v1/namespaces/default/pods/free", None).0, 404);
    create_pod(
        &server,
        "r",
        json!({"nodeName": "node-b", "containers": [{"name": "c", "image": "busybox"}]}),
    );
    let out = kubectl.ok(&["delete", "pod", "r", "--grace-period=0", "--force"]);
    assert!(out.contains("deleted"), "{out}");
    assert_eq!(server.json("GET", "/api/v1/namespaces/default/pods/r", None).0, 404);
}
