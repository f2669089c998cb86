//! The lab's node runtime (`weir node`) against a real API server and the real weir-cni, in a
//! test node namespace: pods run, are reachable, log, exec over WebSocket, restart, probe,
//! and leave nothing behind after deletion or a runtime crash.
use std::{net::SocketAddr, time::Duration};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use weir_tests::{
    apiserver::TempDir,
    cni,
    node::{LabNode, read_until, send_get},
};

const WAIT: Duration = Duration::from_secs(30);

fn busybox(command: &str) -> Value {
    json!({"containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", command],
                           "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]})
}

/// What an exec/attach session returned: stdout, stderr, the status on channel 3.
struct Session {
    stdout: String,
    stderr: String,
    status: Value,
}

/// Runs a kubelet exec/attach session over WebSocket (v5) from inside the node namespace;
/// `stdin` is sent and then closed (v5 close frame).
fn ws_session(lab: &LabNode, path: &str, stdin: Option<&[u8]>) -> Session {
    let addr: SocketAddr = lab.kubelet_addr();
    let stream = lab.connect(addr).expect("connecting to the kubelet API");
    stream.set_nonblocking(true).expect("nonblocking");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::from_std(stream).expect("tokio stream");
        let mut request = format!("ws://{addr}{path}").into_client_request().expect("request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().expect("header"),
        );
        let (mut ws, response) =
            tokio_tungstenite::client_async(request, stream).await.expect("WebSocket handshake");
        assert_eq!(
            response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap()),
            Some("v5.channel.k8s.io")
        );
        if let Some(data) = stdin {
            let mut frame = vec![0u8];
            frame.extend_from_slice(data);
            ws.send(Message::Binary(frame.into())).await.expect("stdin");
            ws.send(Message::Binary(vec![255u8, 0].into())).await.expect("close stdin");
        }
        let mut session =
            Session { stdout: String::new(), stderr: String::new(), status: Value::Null };
        let read = async {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(data) = msg else { continue };
                let text = String::from_utf8_lossy(&data[1..]).into_owned();
                match data[0] {
                    1 => session.stdout.push_str(&text),
                    2 => session.stderr.push_str(&text),
                    3 => session.status = serde_json::from_str(&text).expect("status JSON"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("the session ended in time");
        session
    })
}

fn exit_code(status: &Value) -> i64 {
    if status["status"] == "Success" {
        return 0;
    }
    status["details"]["causes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
        .and_then(|c| c["message"].as_str())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no exit code in {status}"))
}

fn netns_of(lab: &LabNode, pod: &Value) -> String {
    let uid = pod["metadata"]["uid"].as_str().expect("uid").replace('-', "");
    format!("{}{}", lab.prefix, &uid[..12])
}

#[test]
fn busybox_pod_runs_logs_and_execs() {
    let mut lab = LabNode::new();
    lab.start();
    let node = lab.api.json("GET", "/api/v1/nodes/node-a", None).1;
    assert_eq!(node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250, "{node}");
    assert!(node["status"]["conditions"].to_string().contains("\"Ready\""), "{node}");

    let pod = lab.create_pod(
        "box",
        busybox("echo hello from $POD_NAME; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"),
    );
    let ip = lab.wait_running("box");
    assert!(ip.starts_with("10.244.7."), "pod IP {ip}");
    cni::ping(&lab.node.ns, &ip).expect("the pod answers ping from the node");
    let pod_now = lab.wait_pod("box", "Ready", WAIT, |p| {
        p["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    });
    let cs = &pod_now["status"]["containerStatuses"][0];
    assert!(
        cs["state"]["running"].is_object()
            && cs["containerID"].as_str().unwrap().starts_with("weir://"),
        "{cs}"
    );
    assert_eq!(pod_now["status"]["hostIP"], weir_tests::node::NODE_IP);

    // Logs: whole, tail, timestamps, follow.
    let (code, logs) = lab.kubelet_get("/containerLogs/default/box/main");
    assert_eq!(code, 200, "{logs}");
    assert!(logs.starts_with("hello from box\n"), "{logs}");
    let (_, tail) = lab.kubelet_get("/containerLogs/default/box/main?tailLines=1");
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.starts_with("tick "), "{tail}");
    let (_, stamped) =
        lab.kubelet_get("/containerLogs/default/box/main?timestamps=true&tailLines=2");
    for line in stamped.lines() {
        let (ts, text) = line.split_once(' ').expect("timestamp and text");
        assert!(ts.ends_with('Z') && ts.contains('T'), "{line}");
        assert!(text.starts_with("tick ") || text == "hello from box", "{line}");
    }
    let addr = lab.kubelet_addr();
    let mut follow = lab.connect(addr).expect("kubelet");
    send_get(&mut follow, addr, "/containerLogs/default/box/main?follow=true&tailLines=1");
    let first = read_until(&mut follow, WAIT, |t| t.matches("tick ").count() >= 1);
    let seen: Vec<u64> =
        first.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).collect();
    let start = *seen.last().expect("a tick");
    let more = read_until(&mut follow, WAIT, |t| t.contains(&format!("tick {}", start + 3)));
    assert!(more.contains(&format!("tick {}", start + 3)), "follow streamed: {more}");
    drop(follow);

    // Exec: resolv.conf, hostname, env, exit code; stdin.
    let session = ws_session(
        &lab,
        "/exec/default/box/main?command=sh&command=-c&command=cat+/etc/resolv.conf%3B+hostname%3B+echo+pod%3D%24POD_NAME%3B+echo+oops+%3E%262%3B+exit+3&stdout=1&stderr=1",
        None,
    );
    assert!(session.stdout.contains("nameserver 10.96.0.10"), "{}", session.stdout);
    assert!(
        session.stdout.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{}",
        session.stdout
    );
    assert!(session.stdout.contains("options ndots:5"), "{}", session.stdout);
    assert!(session.stdout.contains("\nbox\n"), "hostname: {}", session.stdout);
    assert!(session.stdout.contains("pod=box"), "{}", session.stdout);
    assert_eq!(session.stderr, "oops\n");
    assert_eq!(exit_code(&session.status), 3, "{}", session.status);
    let cat = ws_session(
        &lab,
        "/exec/default/box/main?command=cat&stdin=1&stdout=1",
        Some(b"through stdin\n"),
    );
    assert_eq!(cat.stdout, "through stdin\n");
    assert_eq!(exit_code(&cat.status), 0);
    let tty = ws_session(&lab, "/exec/default/box/main?command=tty&stdout=1&tty=1", None);
    assert!(tty.stdout.contains("/dev/pts/"), "tty: {}", tty.stdout);
    // The host's /etc/resolv.conf is untouched.
    assert!(!std::fs::read_to_string("/etc/resolv.conf").unwrap().contains("svc.cluster.local"));

    // Delete (grace 0): netns, cgroup and address go.
    let netns = netns_of(&lab, &pod);
    assert!(std::path::Path::new("/run/netns").join(&netns).exists());
    lab.delete_pod("box");
    lab.assert_clean();
}

#[test]
fn nginx_page_names_pod_and_client() {
    let mut lab = LabNode::new();
    lab.start();
    lab.create_pod(
        "web",
        json!({"containers": [{"name": "nginx", "image": "docker.io/library/nginx:1.27",
                               "ports": [{"containerPort": 8080}]}]}),
    );
    let ip = lab.wait_running("web");
    let target: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let mut stream = None;
    weir_tests::wait::eventually("the web server listens", WAIT, || match lab.connect(target) {
        Ok(s) => {
            stream = Some(s);
            None
        }
        Err(e) => Some(e.to_string()),
    });
    let mut stream = stream.unwrap();
    let local = stream.local_addr().unwrap();
    // Two requests on one connection (keep-alive), any path answers 200.
    for path in ["/", "/any/path"] {
        send_get(&mut stream, target, path);
        let page = read_until(&mut stream, WAIT, |t| t.contains("</html>"));
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("pod: web") && page.contains("namespace: default"), "{page}");
        assert!(page.contains(&format!("client address: {local}")), "{page} (client {local})");
    }
    let (_, logs) = lab.kubelet_get("/containerLogs/default/web/nginx");
    assert!(logs.contains("GET /any/path"), "{logs}");
    lab.delete_pod("web");
    lab.assert_clean();
}

fn status_of(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

#[test]
fn restart_policies_and_crash_loop() {
    let mut lab = LabNode::new();
    lab.start();
    lab.create_pod("crash", busybox("echo boom; exit 2"));
    lab.create_pod("done", {
        let mut s = busybox("exit 0");
        s["restartPolicy"] = json!("Never");
        s
    });
    lab.create_pod("fail", {
        let mut s = busybox("exit 7");
        s["restartPolicy"] = json!("Never");
        s
    });
    let crash =
        lab.wait_pod("crash", "CrashLoopBackOff with restarts", Duration::from_secs(60), |p| {
            let cs = status_of(p);
            cs["restartCount"].as_u64().unwrap_or(0) >= 2
                && cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        });
    let cs = status_of(&crash);
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 2, "{cs}");
    assert_eq!(crash["status"]["phase"], "Running");
    let (_, previous) = lab.kubelet_get("/containerLogs/default/crash/main?previous=true");
    assert_eq!(previous, "boom\n");
    let done = lab.wait_pod("done", "Succeeded", WAIT, |p| p["status"]["phase"] == "Succeeded");
    assert_eq!(status_of(&done)["state"]["terminated"]["reason"], "Completed");
    assert_eq!(status_of(&done)["restartCount"], 0);
    let fail = lab.wait_pod("fail", "Failed", WAIT, |p| p["status"]["phase"] == "Failed");
    assert_eq!(status_of(&fail)["state"]["terminated"]["exitCode"], 7);
    for name in ["crash", "done", "fail"] {
        lab.delete_pod(name);
    }
    lab.assert_clean();
}

#[test]
fn probes_flip_ready_and_restart() {
    let mut lab = LabNode::new();
    lab.start();
    let flags = TempDir::new("probe-flags");
    let ready = flags.path().join("ready");
    let alive = flags.path().join("alive");
    std::fs::write(&alive, "").unwrap();
    lab.create_pod(
        "probed",
        json!({"containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"],
            "ports": [{"name": "none", "containerPort": 9}],
            "readinessProbe": {"exec": {"command": ["test", "-f", ready]}, "periodSeconds": 1},
            "livenessProbe": {"exec": {"command": ["test", "-f", alive]}, "periodSeconds": 1, "failureThreshold": 2}}]}),
    );
    lab.create_pod(
        "tcp",
        json!({"containers": [{"name": "main", "image": "nginx", "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            "livenessProbe": {"httpGet": {"port": 9999, "path": "/"}, "initialDelaySeconds": 5,
                              "periodSeconds": 1, "failureThreshold": 1}}]}),
    );
    let is_ready = |p: &Value| status_of(p)["ready"] == true;
    lab.wait_running("probed");
    let pod = lab.pod("probed");
    assert!(!is_ready(&pod), "ready before the probe passed: {pod}");
    std::fs::write(&ready, "").unwrap();
    lab.wait_pod("probed", "Ready", WAIT, is_ready);
    std::fs::remove_file(&ready).unwrap();
    lab.wait_pod("probed", "not Ready again", WAIT, |p| !is_ready(p));
    std::fs::remove_file(&alive).unwrap();
    lab.wait_pod("probed", "restarted by liveness", WAIT, |p| {
        status_of(p)["restartCount"].as_u64() >= Some(1)
    });
    // TCP readiness passes; the HTTP liveness probe on a closed port restarts the container.
    lab.wait_pod("tcp", "Ready via tcpSocket", WAIT, is_ready);
    lab.wait_pod("tcp", "restarted by the HTTP probe", WAIT, |p| {
        status_of(p)["restartCount"].as_u64() >= Some(1)
    });
    wait_event(&lab, "Unhealthy");
    lab.delete_pod("probed");
    lab.delete_pod("tcp");
    lab.assert_clean();
}

#[test]
fn unknown_image_without_command_is_err_image_pull() {
    let mut lab = LabNode::new();
    lab.start();
    lab.create_pod(
        "bad",
        json!({"containers": [{"name": "app", "image": "quay.io/example/app:1.0"}]}),
    );
    let pod = lab.wait_pod("bad", "ErrImagePull", WAIT, |p| {
        status_of(p)["state"]["waiting"]["reason"] == "ErrImagePull"
    });
    let message =
        status_of(&pod)["state"]["waiting"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("quay.io/example/app:1.0")
            && message.contains("busybox")
            && message.contains("command"),
        "{message}"
    );
    assert_eq!(pod["status"]["phase"], "Pending");
    lab.delete_pod("bad");
    // A deleted Node is registered again by the heartbeat.
    let (code, body) = lab.api.json("DELETE", "/api/v1/nodes/node-a", None);
    assert_eq!(code, 200, "{body}");
    weir_tests::wait::eventually("node-a registered again", WAIT, || {
        let (code, node) = lab.api.json("GET", "/api/v1/nodes/node-a", None);
        (code != 200 || node["status"]["addresses"].is_null()).then(|| format!("{code} {node}"))
    });
    lab.assert_clean();
}

#[test]
fn graceful_delete_and_runtime_crash_leak_nothing() {
    let mut lab = LabNode::new();
    lab.start();
    // A finalizer keeps the object after deletion so the deletionTimestamp path is visible.
    lab.create_pod(
        "keep",
        busybox("trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.2; done"),
    );
    let (code, body) = lab.api.json(
        "PATCH",
        "/api/v1/namespaces/default/pods/keep",
        Some(&json!({"metadata": {"finalizers": ["weir.test/hold"]}})),
    );
    assert_eq!(code, 200, "{body}");
    lab.create_pod("a", busybox("sleep 3600"));
    lab.create_pod("b", busybox("sleep 3600"));
    let ip_a = lab.wait_running("a");
    lab.wait_running("b");
    lab.wait_running("keep");

    let (code, body) = lab.api.json("DELETE", "/api/v1/namespaces/default/pods/keep", None);
    assert!(code == 200 || code == 202, "{code} {body}");
    let keep = lab.pod("keep");
    let keep_netns = netns_of(&lab, &keep);
    weir_tests::wait::eventually("keep's sandbox is removed", WAIT, || {
        let exists = std::path::Path::new("/run/netns").join(&keep_netns).exists();
        exists.then(|| "netns still there".to_string())
    });
    let (code, body) = lab.api.json(
        "PATCH",
        "/api/v1/namespaces/default/pods/keep",
        Some(&json!({"metadata": {"finalizers": null}})),
    );
    assert!(code == 200 || code == 404, "{body}");

    // Crash: pods keep their sandboxes, the restarted runtime adopts them (same IP).
    lab.kill_runtime();
    lab.delete_pod("b"); // deleted while no runtime runs
    lab.start();
    let pod_a = lab.wait_pod("a", "running again after adoption", WAIT, |p| {
        status_of(p)["restartCount"].as_u64() >= Some(1)
            && status_of(p)["state"]["running"].is_object()
    });
    assert_eq!(
        pod_a["status"]["podIP"].as_str(),
        Some(ip_a.as_str()),
        "the adopted pod kept its address"
    );
    cni::ping(&lab.node.ns, &ip_a).expect("adopted pod reachable");
    // b's sandbox was cleaned by the restarted runtime.
    lab.delete_pod("a");
    lab.assert_clean();
}

#[test]
fn attach_streams_output_and_feeds_stdin() {
    let mut lab = LabNode::new();
    lab.start();
    let mut spec = busybox("read line; echo got $line; echo bye >&2");
    spec["containers"][0]["stdin"] = json!(true);
    spec["containers"][0]["stdinOnce"] = json!(true);
    spec["restartPolicy"] = json!("Never");
    lab.create_pod("talk", spec);
    lab.wait_running("talk");
    let session =
        ws_session(&lab, "/attach/default/talk/main?stdin=1&stdout=1&stderr=1", Some(b"hello\n"));
    assert_eq!(session.stdout, "got hello\n");
    assert_eq!(session.stderr, "bye\n");
    assert_eq!(exit_code(&session.status), 0);
    lab.wait_pod("talk", "Succeeded", WAIT, |p| p["status"]["phase"] == "Succeeded");
    // Attaching after the container exited gets its status and no output (kubelet's
    // behaviour: what it wrote is in the logs, which kubectl prints itself).
    let late = ws_session(&lab, "/attach/default/talk/main?stdout=1", None);
    assert_eq!(late.stdout, "");
    assert_eq!(exit_code(&late.status), 0);
    lab.delete_pod("talk");
    lab.assert_clean();
}

#[test]
fn cni_failure_is_reported_and_retried() {
    let mut lab = LabNode::new();
    lab.start();
    // Sorted first, so it is the config in use: a plugin that does not exist.
    let broken = lab.conf_dir.path().join("00-broken.conflist");
    std::fs::write(
        &broken,
        json!({"cniVersion": "1.0.0", "name": "broken", "plugins": [{"type": "weirt-missing-plugin"}]})
            .to_string(),
    )
    .unwrap();
    lab.create_pod("wait", busybox("sleep 3600"));
    let pod = lab.wait_pod("wait", "ContainerCreating with the CNI error", WAIT, |p| {
        let waiting = &status_of(p)["state"]["waiting"];
        waiting["reason"] == "ContainerCreating"
            && waiting["message"].as_str().is_some_and(|m| m.contains("weirt-missing-plugin"))
    });
    assert_eq!(pod["status"]["phase"], "Pending");
    assert!(
        !std::path::Path::new("/run/netns").join(netns_of(&lab, &pod)).exists(),
        "half-made sandbox left"
    );
    wait_event(&lab, "FailedCreatePodSandBox");
    std::fs::remove_file(&broken).unwrap();
    lab.wait_running("wait");
    lab.delete_pod("wait");
    lab.assert_clean();
}

/// Waits for an event with `reason` in the default namespace. The runtime posts events on
/// their own task, so one may land after the pod status that follows it.
fn wait_event(lab: &LabNode, reason: &str) {
    weir_tests::wait::eventually(&format!("a {reason} event"), WAIT, || {
        let (_, events) = lab.api.json("GET", "/api/v1/namespaces/default/events", None);
        let text = events.to_string();
        if text.contains(reason) { None } else { Some(text) }
    });
}
