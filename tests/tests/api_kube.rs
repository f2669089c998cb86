//! The API server driven by kube-rs, the client the agent uses: typed list, create, patch,
//! delete, and a `watcher` that survives a server restart (resuming from its version) and a
//! 410 Gone (re-listing).
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use weir_tests::apiserver::{ApiServer, TempDir};

fn configmap(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": value}})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_creates_patches_and_deletes() {
    let dir = TempDir::new("api-kube");
    let server = ApiServer::start_async(dir.path()).await;
    let client = server.kube_client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(names.iter().any(|n| n == ns), "{names:?}");
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = cms.create(&PostParams::default(), &configmap("k", "1")).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let patched = cms
        .patch("k", &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "2"}})))
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["v"], "2");
    let strategic = cms
        .patch(
            "k",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.metadata.labels.unwrap()["a"], "b");
    let selected = cms.list(&ListParams::default().labels("a=b")).await.unwrap();
    assert_eq!(selected.items.len(), 1);
    // A stale replace is a 409 that kube-rs reports as an API error.
    let mut stale = created.clone();
    stale.data = Some([("v".to_string(), "3".to_string())].into());
    match cms.replace("k", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
        other => panic!("stale replace gave {other:?}"),
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}})).unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let name = pod.metadata.name.unwrap();
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    cms.delete("k", &DeleteParams::default()).await.unwrap();
    match cms.get("k").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("get after delete gave {other:?}"),
    }
}

/// The next watcher event that satisfies `pred`, within 20 s.
async fn wait_for<S>(
    stream: &mut S,
    what: &str,
    pred: impl Fn(&watcher::Event<ConfigMap>) -> bool,
) -> watcher::Event<ConfigMap>
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) if pred(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watcher ended while waiting for {what}"),
            Err(_) => panic!("the watcher did not see {what} within 20 s"),
        }
    }
}

fn applied(name: &'static str, value: &'static str) -> impl Fn(&watcher::Event<ConfigMap>) -> bool {
    move |event| match event {
        watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => {
            cm.metadata.name.as_deref() == Some(name)
                && cm.data.as_ref().and_then(|d| d.get("v")).map(String::as_str) == Some(value)
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_watcher_survives_a_restart_and_relists_after_410() {
    let dir = TempDir::new("api-kube-watch");
    let path = dir.path().to_path_buf();
    let mut server = tokio::task::spawn_blocking({
        let path = path.clone();
        move || ApiServer::start_with(&path, &["--watch-history", "5"])
    })
    .await
    .unwrap();
    let listen = server.addr.to_string();
    let client = server.kube_client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &configmap("w", "0")).await.unwrap();
    let mut stream = watcher(cms.clone(), watcher::Config::default()).boxed();
    wait_for(&mut stream, "the initial list", |e| matches!(e, watcher::Event::InitDone)).await;
    cms.patch("w", &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "1"}})))
        .await
        .unwrap();
    wait_for(&mut stream, "v=1", applied("w", "1")).await;

    // Crash and come back on the same port: the watcher resumes from its version.
    server.kill();
    server = tokio::task::spawn_blocking({
        let (path, listen) = (path.clone(), listen.clone());
        move || ApiServer::start_with(&path, &["--watch-history", "5", "--listen", &listen])
    })
    .await
    .unwrap();
    cms.patch("w", &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "2"}})))
        .await
        .unwrap();
    let event = wait_for(&mut stream, "v=2 after the restart", |e| {
        applied("w", "2")(e) || matches!(e, watcher::Event::Init)
    })
    .await;
    assert!(
        matches!(event, watcher::Event::Apply(_)),
        "the watcher re-listed instead of resuming: {event:?}"
    );

    // Crash again and make more changes than the watch history holds before it reconnects:
    // its version is gone (410) and it lists again.
    server.kill();
    server = tokio::task::spawn_blocking({
        let (path, listen) = (path.clone(), listen.clone());
        move || ApiServer::start_with(&path, &["--watch-history", "5", "--listen", &listen])
    })
    .await
    .unwrap();
    for i in 3..12 {
        let patch = json!({"data": {"v": i.to_string()}});
        let (code, body) =
            server.json("PATCH", "/api/v1/namespaces/default/configmaps/w", Some(&patch));
        assert_eq!(code, 200, "{body}");
    }
    wait_for(&mut stream, "a re-list", |e| matches!(e, watcher::Event::Init)).await;
    wait_for(&mut stream, "v=11 in the re-list", applied("w", "11")).await;
    drop(server);
}
