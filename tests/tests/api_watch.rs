//! Watch semantics over the wire: initial events and the initial-events-end bookmark,
//! selectors that objects move in and out of, 410 Gone past compaction, list paging.
use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, TempDir, WatchStream};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn cm(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}})
}

#[test]
fn initial_events_then_a_bookmark_then_selector_transitions() {
    let dir = TempDir::new("api-watch");
    let server = ApiServer::start(dir.path());
    for (name, app) in [("a", "web"), ("b", "db")] {
        assert_eq!(server.json("POST", CMS, Some(&cm(name, json!({"app": app})))).0, 201);
    }
    let mut watch = WatchStream::open(
        &server,
        &format!(
            "{CMS}?watch=true&labelSelector=app%3Dweb&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        ),
    );
    let first = watch.next_event();
    assert_eq!(
        (first["type"].as_str(), first["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("a"))
    );
    let bookmark = watch.next_event();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    // b starts matching: ADDED; a stops matching: DELETED (for this watcher).
    assert_eq!(
        server
            .json(
                "PATCH",
                &format!("{CMS}/b"),
                Some(&json!({"metadata": {"labels": {"app": "web"}}}))
            )
            .0,
        200
    );
    let e = watch.next_event();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("b"))
    );
    assert_eq!(
        server
            .json(
                "PATCH",
                &format!("{CMS}/a"),
                Some(&json!({"metadata": {"labels": {"app": "other"}}}))
            )
            .0,
        200
    );
    let e = watch.next_event();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("a"))
    );
    assert_eq!(server.json("DELETE", &format!("{CMS}/b"), None).0, 200);
    let e = watch.next_event();
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("b"))
    );
}

#[test]
fn watching_from_a_compacted_version_gets_410_gone() {
    let dir = TempDir::new("api-watch-gone");
    let server = ApiServer::start_with(dir.path(), &["--watch-history", "5"]);
    let (code, first) = server.json("POST", CMS, Some(&cm("x", json!({}))));
    assert_eq!(code, 201);
    for i in 0..10 {
        assert_eq!(
            server
                .json("PATCH", &format!("{CMS}/x"), Some(&json!({"data": {"i": i.to_string()}})))
                .0,
            200
        );
    }
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = WatchStream::open(&server, &format!("{CMS}?watch=true&resourceVersion={rv}"));
    let e = watch.next_event();
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    // A fresh list gives a version to watch from again.
    let (_, list) = server.json("GET", CMS, None);
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch = WatchStream::open(&server, &format!("{CMS}?watch=true&resourceVersion={rv}"));
    assert_eq!(server.json("DELETE", &format!("{CMS}/x"), None).0, 200);
    assert_eq!(watch.next_event()["type"], "DELETED");
}

#[test]
fn lists_page_with_limit_and_continue() {
    let dir = TempDir::new("api-paging");
    let server = ApiServer::start(dir.path());
    for i in 0..7 {
        let labels = if i % 2 == 0 { json!({"even": "yes"}) } else { json!({}) };
        assert_eq!(server.json("POST", CMS, Some(&cm(&format!("c{i}"), labels))).0, 201);
    }
    let mut names = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let path = format!("{CMS}?limit=2&labelSelector=even&continue={token}");
        let (code, page) = server.json("GET", &path, None);
        assert_eq!(code, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            names.push(item["metadata"]["name"].as_str().unwrap().to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(next) => token = next.to_string(),
            None => break,
        }
    }
    assert_eq!(names, ["c0", "c2", "c4", "c6"]);
}
