//! Restart: objects and resourceVersions survive a crash (SIGKILL) and a graceful stop, and a
//! watch resumed from the last version it saw misses nothing that happened while the server
//! was down.
use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, TempDir, WatchStream};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn rv(obj: &Value) -> i64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a resourceVersion")
}

fn configmap(name: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": value}})
}

#[test]
fn objects_and_versions_survive_a_crash_and_a_resumed_watch_misses_nothing() {
    let dir = TempDir::new("api-restart");
    let mut server = ApiServer::start(dir.path());
    let (code, created) = server.json("POST", CMS, Some(&configmap("a", "1")));
    assert_eq!(code, 201, "{created}");
    let mut watch = WatchStream::open(
        &server,
        &format!("{CMS}?watch=true&resourceVersion={}", rv(&created) - 1),
    );
    let seen = watch.next_event();
    assert_eq!(seen["type"], "ADDED");
    let last_seen = rv(&seen["object"]);
    assert_eq!(last_seen, rv(&created));
    drop(watch);

    // Changes the watcher does not see: an update, a create, a delete.
    let (code, updated) =
        server.json("PATCH", &format!("{CMS}/a"), Some(&json!({"data": {"v": "2"}})));
    assert_eq!(code, 200, "{updated}");
    let (code, _) = server.json("POST", CMS, Some(&configmap("b", "1")));
    assert_eq!(code, 201);
    let (code, _) = server.json("DELETE", &format!("{CMS}/b"), None);
    assert_eq!(code, 200);
    let (_, before) = server.json("GET", &format!("{CMS}/a"), None);
    let (_, list_before) = server.json("GET", CMS, None);

    server.kill();
    let server = ApiServer::start(dir.path());
    let (code, after) = server.json("GET", &format!("{CMS}/a"), None);
    assert_eq!(code, 200);
    assert_eq!(after, before, "the object changed across the crash");
    let (_, list_after) = server.json("GET", CMS, None);
    assert_eq!(
        list_after["metadata"]["resourceVersion"],
        list_before["metadata"]["resourceVersion"]
    );

    let mut watch =
        WatchStream::open(&server, &format!("{CMS}?watch=true&resourceVersion={last_seen}"));
    let events: Vec<(String, String, i64)> = (0..3)
        .map(|_| {
            let e = watch.next_event();
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"].as_str().unwrap().to_string(),
                rv(&e["object"]),
            )
        })
        .collect();
    let kinds: Vec<(&str, &str)> =
        events.iter().map(|(t, n, _)| (t.as_str(), n.as_str())).collect();
    assert_eq!(kinds, [("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "b")]);
    assert!(events.windows(2).all(|w| w[0].2 < w[1].2), "versions not increasing: {events:?}");
    // And it follows live changes after the restart, with versions continuing from before.
    let (code, c) = server.json("POST", CMS, Some(&configmap("c", "1")));
    assert_eq!(code, 201);
    assert!(rv(&c) > events[2].2);
    let live = watch.next_event();
    assert_eq!((live["type"].as_str(), rv(&live["object"])), (Some("ADDED"), rv(&c)));
}

#[test]
fn a_graceful_stop_keeps_everything_and_the_certificates() {
    let dir = TempDir::new("api-restart-graceful");
    let mut server = ApiServer::start(dir.path());
    let (code, created) = server.json("POST", CMS, Some(&configmap("kept", "x")));
    assert_eq!(code, 201);
    let ca_before = std::fs::read(dir.path().join("pki/ca.crt")).unwrap();
    let token_before = server.token("admin");
    server.terminate();
    let server = ApiServer::start(dir.path());
    let (code, after) = server.json("GET", &format!("{CMS}/kept"), None);
    assert_eq!(code, 200);
    assert_eq!(rv(&after), rv(&created));
    assert_eq!(after["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(std::fs::read(dir.path().join("pki/ca.crt")).unwrap(), ca_before);
    assert_eq!(server.token("admin"), token_before);
}
