//! Bad input gets the right Status and code, and nothing is stored: malformed JSON, wrong
//! kind or apiVersion, invalid names and fields, oversized bodies, invalid selectors, unknown
//! paths and methods, stale updates, duplicate creates, missing namespaces, protobuf bodies.
use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, TempDir};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn revision(server: &ApiServer) -> String {
    let (code, list) = server.json("GET", "/api/v1/namespaces", None);
    assert_eq!(code, 200);
    list["metadata"]["resourceVersion"].as_str().unwrap().to_string()
}

fn check_status(body: &[u8], code: u16, reason: &str) -> Value {
    let status: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not a Status: {}", String::from_utf8_lossy(body)));
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["code"], code, "{status}");
    assert_eq!(status["reason"], reason, "{status}");
    status
}

/// method, path, content type, body, expected code, expected reason.
type Case = (&'static str, &'static str, &'static str, Vec<u8>, u16, &'static str);

#[test]
fn bad_requests_get_the_right_status_and_store_nothing() {
    let dir = TempDir::new("api-bad-input");
    let server = ApiServer::start(dir.path());
    let before = revision(&server);

    let cases: Vec<Case> = vec![
        ("POST", CMS, "application/json", b"{\"apiVersion\": \"v1\", \"kind\": ".to_vec(), 400, "BadRequest"),
        ("POST", CMS, "application/json", b"[1, 2]".to_vec(), 400, "BadRequest"),
        ("POST", CMS, "application/json", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}).to_string().into_bytes(), 400, "BadRequest"),
        ("POST", CMS, "application/json", json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "x"}}).to_string().into_bytes(), 400, "BadRequest"),
        ("POST", CMS, "application/json", json!({"kind": "ConfigMap", "metadata": {"name": "x"}}).to_string().into_bytes(), 400, "BadRequest"),
        ("POST", CMS, "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "other"}}).to_string().into_bytes(), 400, "BadRequest"),
        ("POST", CMS, "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_Valid"}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", CMS, "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", CMS, "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": {"bad key!": "v"}}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", "/api/v1/namespaces/default/pods", "application/json", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", "/api/v1/namespaces/default/services", "application/json", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}], "clusterIP": "10.96.0.1"}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies", "application/json", json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n"}, "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/40"}}]}]}}).to_string().into_bytes(), 422, "Invalid"),
        ("POST", "/api/v1/namespaces/nowhere/configmaps", "application/json", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}).to_string().into_bytes(), 404, "NotFound"),
        ("POST", CMS, "application/vnd.kubernetes.protobuf", b"k8s\x00".to_vec(), 415, "UnsupportedMediaType"),
        ("POST", CMS, "application/json", vec![b' '; 4 * 1024 * 1024], 413, "RequestEntityTooLarge"),
        ("GET", "/api/v1/namespaces/default/configmaps?labelSelector=app%20in%20web", "", vec![], 400, "BadRequest"),
        ("GET", "/api/v1/pods?fieldSelector=spec.bogus%3D1", "", vec![], 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps?continue=garbage", "", vec![], 400, "BadRequest"),
        ("GET", "/api/v1/namespaces/default/configmaps/missing", "", vec![], 404, "NotFound"),
        ("GET", "/api/v1/widgets", "", vec![], 404, "NotFound"),
        ("PUT", CMS, "application/json", b"{}".to_vec(), 405, "MethodNotAllowed"),
        ("DELETE", "/api/v1/namespaces/default", "", vec![], 403, "Forbidden"),
        ("PATCH", "/api/v1/namespaces/default/configmaps/missing", "application/merge-patch+json", b"{}".to_vec(), 404, "NotFound"),
    ];
    for (method, path, content_type, body, code, reason) in &cases {
        let resp = server.request(method, path, content_type, body);
        assert_eq!(resp.status, *code, "{method} {path}: {}", String::from_utf8_lossy(&resp.body));
        let status = check_status(&resp.body, *code, reason);
        if *code == 422 {
            assert!(
                status["details"]["causes"].as_array().is_some_and(|c| !c.is_empty()),
                "{status}"
            );
        }
    }
    assert_eq!(revision(&server), before, "a refused request changed the store");
    let (_, list) = server.json("GET", CMS, None);
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

#[test]
fn conflicts_are_409_and_leave_the_object_alone() {
    let dir = TempDir::new("api-conflicts");
    let server = ApiServer::start(dir.path());
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"v": "1"}});
    let (code, created) = server.json("POST", CMS, Some(&cm));
    assert_eq!(code, 201);
    let dup = server.request("POST", CMS, "application/json", cm.to_string().as_bytes());
    check_status(&dup.body, 409, "AlreadyExists");

    let mut fresh = created.clone();
    fresh["data"]["v"] = json!("2");
    let (code, updated) = server.json("PUT", &format!("{CMS}/c"), Some(&fresh));
    assert_eq!(code, 200, "{updated}");
    // The first version is stale now.
    let mut stale = created.clone();
    stale["data"]["v"] = json!("3");
    let resp = server.request(
        "PUT",
        &format!("{CMS}/c"),
        "application/json",
        stale.to_string().as_bytes(),
    );
    check_status(&resp.body, 409, "Conflict");
    let patch = json!({"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "data": {"v": "4"}});
    let resp = server.request(
        "PATCH",
        &format!("{CMS}/c"),
        "application/merge-patch+json",
        patch.to_string().as_bytes(),
    );
    check_status(&resp.body, 409, "Conflict");
    let (_, now) = server.json("GET", &format!("{CMS}/c"), None);
    assert_eq!(now, updated);
    // A JSON patch whose test fails is refused as a whole.
    let patch = json!([{"op": "replace", "path": "/data/v", "value": "5"}, {"op": "test", "path": "/data/v", "value": "nope"}]);
    let resp = server.request(
        "PATCH",
        &format!("{CMS}/c"),
        "application/json-patch+json",
        patch.to_string().as_bytes(),
    );
    check_status(&resp.body, 422, "Invalid");
    let (_, now) = server.json("GET", &format!("{CMS}/c"), None);
    assert_eq!(now, updated);
    // Server-side dry run validates and stores nothing.
    let resp = server.request(
        "POST",
        &format!("{CMS}?dryRun=All"),
        "application/json",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry"}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(resp.status, 201);
    let (code, _) = server.json("GET", &format!("{CMS}/dry"), None);
    assert_eq!(code, 404);
}

#[test]
fn insecure_listen_is_refused_off_loopback() {
    let dir = TempDir::new("api-insecure");
    let out = std::process::Command::new(weir_tests::apiserver::weir_binary())
        .args([
            "apiserver",
            "--listen",
            "127.0.0.1:0",
            "--insecure-listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn requests_beyond_the_in_flight_limit_get_429() {
    use std::io::Write;
    let dir = TempDir::new("api-inflight");
    let server = ApiServer::start_with(dir.path(), &["--max-requests-inflight", "2"]);
    let addr = server.insecure_addr.unwrap();
    let token = server.token("admin");
    // Requests that hold their slot: the body they announce never fully arrives. The server
    // parses them asynchronously, so a probe can overtake one of them; the overtaken one is
    // then rightly refused with 429 and no longer holds a slot. Such a request is replaced
    // by a fresh one until both slots are held and a probe is refused (bounded).
    let hold = || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST {CMS} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.set_nonblocking(true).unwrap();
        stream
    };
    let mut held: Vec<std::net::TcpStream> = (0..2).map(|_| hold()).collect();
    let mut status = 0;
    let mut replaced = Vec::new();
    for _ in 0..200 {
        status = server.request("GET", CMS, "", b"").status;
        if status == 429 {
            break;
        }
        for stream in held.iter_mut() {
            let mut buf = [0u8; 512];
            match stream.peek(&mut buf) {
                Ok(n) => {
                    replaced.push(
                        String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string(),
                    );
                    *stream = hold();
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => panic!("a held request failed: {err}"),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        status, 429,
        "a third request got {status}, not 429, while two requests held their slots; held requests answered early: {replaced:?}"
    );
    let resp = server.request("GET", CMS, "", b"");
    check_status(&resp.body, 429, "TooManyRequests");
    // Once the slots are free, requests pass again.
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        if server.request("GET", CMS, "", b"").status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ok, "requests still refused after the held ones went away");
}
