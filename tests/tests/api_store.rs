//! The store conformance suite (controlplane/src/store/conformance.rs) against every backend,
//! and the embedded store's crash recovery as a separate process would see it.
use std::time::Duration;

use bytes::Bytes;
use weir_controlplane::store::{EmbeddedStore, Store, conformance, embedded::Options};
use weir_tests::apiserver::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_conformance_suite() {
    let dir = TempDir::new("store-conformance");
    let store = EmbeddedStore::open(dir.path(), Options::default()).unwrap();
    match conformance::run_all(&store, "/conformance").await {
        Ok(ran) => assert_eq!(ran.len(), 8, "checks ran: {ran:?}"),
        Err(failures) => panic!("embedded store failed:\n{}", failures.join("\n")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_reopen_with_every_key_revision_and_event() {
    let dir = TempDir::new("store-reopen");
    let mut written = Vec::new();
    {
        let store = EmbeddedStore::open(dir.path(), Options::default()).unwrap();
        for i in 0..200 {
            let key = format!("/r/{:03}", i % 50);
            let kv = match store.get(&key).await.unwrap() {
                None => store.create(&key, Bytes::from(i.to_string())).await.unwrap(),
                Some(old) => store
                    .update(&key, Bytes::from(i.to_string()), Some(old.mod_revision))
                    .await
                    .unwrap(),
            };
            written.push(kv);
        }
        store.delete("/r/000", None).await.unwrap();
    }
    let store = EmbeddedStore::open(dir.path(), Options::default()).unwrap();
    let (revision, _) = store.revisions().await.unwrap();
    assert_eq!(revision, 201);
    let all = store.range("/r/", None, 0).await.unwrap();
    assert_eq!(all.kvs.len(), 49);
    for kv in &all.kvs {
        let last = written.iter().rev().find(|w| w.key == kv.key).unwrap();
        assert_eq!(kv, last, "{} changed across the restart", kv.key);
    }
    // A watcher that had seen revision 150 resumes and misses nothing.
    let mut rx = store.watch("/r/", 150).await.unwrap();
    for expected in 151..=201 {
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(event.revision(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_conformance_suite_against_a_real_etcd() {
    let etcd = tokio::task::spawn_blocking(weir_tests::apiserver::EtcdServer::start).await.unwrap();
    let store = weir_controlplane::store::EtcdStore::new(&etcd.endpoint).unwrap();
    match conformance::run_all(&store, "/conformance").await {
        Ok(ran) => assert_eq!(ran.len(), 8, "checks ran: {ran:?}"),
        Err(failures) => panic!("etcd store failed:\n{}", failures.join("\n")),
    }
    tokio::task::spawn_blocking(move || drop(etcd)).await.unwrap();
}
