//! The store conformance suite: the contract of [`Store`](super::Store), checked against any
//! implementation. Every check works under its own unique key prefix and reasons about
//! revisions relative to what it observed, so the suite runs against a shared store (a real
//! etcd server) as well as a fresh one. Used by `tests/tests/api_store.rs` for every backend.
//!
//! Each check returns `Err(description)` instead of panicking so a runner can report all
//! failures with the backend's name.
use std::time::Duration;

use bytes::Bytes;

use super::{EventKind, Store, StoreError, WatchReceiver};

type Check = std::result::Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn v(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn fail(what: &str) -> impl FnOnce(StoreError) -> String + '_ {
    move |err| format!("{what}: unexpected error: {err}")
}

/// Runs every check against `store`, with keys under `base` (unique per run). Returns the
/// names of the checks that ran, or every failure.
pub async fn run_all<S: Store>(
    store: &S,
    base: &str,
) -> std::result::Result<Vec<&'static str>, Vec<String>> {
    let mut ran = Vec::new();
    let mut failures = Vec::new();
    macro_rules! run {
        ($name:ident) => {
            let prefix = format!("{base}/{}/", stringify!($name));
            match tokio::time::timeout(Duration::from_secs(20), $name(store, &prefix)).await {
                Ok(Ok(())) => ran.push(stringify!($name)),
                Ok(Err(err)) => failures.push(format!("{}: {err}", stringify!($name))),
                Err(_) => failures.push(format!("{}: timed out after 20 s", stringify!($name))),
            }
        };
    }
    run!(create_assigns_the_next_revision_and_rejects_duplicates);
    run!(update_is_compare_and_swap_on_mod_revision);
    run!(delete_is_compare_and_swap_and_reports_missing_keys);
    run!(range_is_by_prefix_in_key_order_with_limit_and_continue);
    run!(watch_replays_history_after_a_revision_then_follows_live);
    run!(watch_sees_only_its_prefix);
    run!(compacted_revisions_cannot_be_watched);
    run!(concurrent_swaps_from_one_revision_let_exactly_one_win);
    if failures.is_empty() { Ok(ran) } else { Err(failures) }
}

async fn current<S: Store>(store: &S) -> std::result::Result<i64, String> {
    Ok(store.revisions().await.map_err(fail("revisions"))?.0)
}

async fn next_event(rx: &mut WatchReceiver) -> std::result::Result<super::Event, String> {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err("watch closed unexpectedly".into()),
        Err(_) => Err("no watch event within 5 s".into()),
    }
}

pub async fn create_assigns_the_next_revision_and_rejects_duplicates<S: Store>(
    store: &S,
    p: &str,
) -> Check {
    let before = current(store).await?;
    let key = format!("{p}a");
    let kv = store.create(&key, v("one")).await.map_err(fail("create"))?;
    ensure!(kv.mod_revision > before, "create revision {} not after {before}", kv.mod_revision);
    ensure!(kv.create_revision == kv.mod_revision, "create_revision != mod_revision on create");
    let got = store.get(&key).await.map_err(fail("get"))?;
    ensure!(got.as_ref() == Some(&kv), "get returned {got:?}, expected {kv:?}");
    let after_create = current(store).await?;
    match store.create(&key, v("two")).await {
        Err(StoreError::AlreadyExists { .. }) => {}
        other => return Err(format!("duplicate create gave {other:?}, expected AlreadyExists")),
    }
    let got = store.get(&key).await.map_err(fail("get"))?.ok_or("key vanished")?;
    ensure!(got.value == v("one"), "failed create changed the value");
    ensure!(current(store).await? == after_create, "failed create bumped the revision");
    ensure!(
        store.get(&format!("{p}missing")).await.map_err(fail("get"))?.is_none(),
        "missing key found"
    );
    Ok(())
}

pub async fn update_is_compare_and_swap_on_mod_revision<S: Store>(store: &S, p: &str) -> Check {
    let key = format!("{p}k");
    let created = store.create(&key, v("1")).await.map_err(fail("create"))?;
    let updated = store
        .update(&key, v("2"), Some(created.mod_revision))
        .await
        .map_err(fail("update with the current revision"))?;
    ensure!(updated.mod_revision > created.mod_revision, "update did not advance mod_revision");
    ensure!(updated.create_revision == created.create_revision, "update changed create_revision");
    match store.update(&key, v("3"), Some(created.mod_revision)).await {
        Err(StoreError::Conflict { current, .. }) => {
            ensure!(
                current == updated.mod_revision,
                "conflict reported current {current}, expected {}",
                updated.mod_revision
            )
        }
        other => return Err(format!("stale update gave {other:?}, expected Conflict")),
    }
    let got = store.get(&key).await.map_err(fail("get"))?.ok_or("key vanished")?;
    ensure!(got.value == v("2"), "a rejected update changed the value");
    let unconditional =
        store.update(&key, v("4"), None).await.map_err(fail("unconditional update"))?;
    ensure!(unconditional.mod_revision > updated.mod_revision, "revision did not advance");
    match store.update(&format!("{p}missing"), v("x"), None).await {
        Err(StoreError::NotFound { .. }) => {}
        other => return Err(format!("update of a missing key gave {other:?}, expected NotFound")),
    }
    Ok(())
}

pub async fn delete_is_compare_and_swap_and_reports_missing_keys<S: Store>(
    store: &S,
    p: &str,
) -> Check {
    let key = format!("{p}d");
    let created = store.create(&key, v("x")).await.map_err(fail("create"))?;
    match store.delete(&key, Some(created.mod_revision - 1)).await {
        Err(StoreError::Conflict { .. }) => {}
        other => return Err(format!("stale delete gave {other:?}, expected Conflict")),
    }
    let deleted = store.delete(&key, Some(created.mod_revision)).await.map_err(fail("delete"))?;
    ensure!(deleted.mod_revision > created.mod_revision, "delete revision not after create");
    ensure!(deleted.value == v("x"), "delete did not return the last value");
    ensure!(store.get(&key).await.map_err(fail("get"))?.is_none(), "deleted key still there");
    match store.delete(&key, None).await {
        Err(StoreError::NotFound { .. }) => {}
        other => return Err(format!("second delete gave {other:?}, expected NotFound")),
    }
    // The key can be created again, with a new create_revision.
    let again = store.create(&key, v("y")).await.map_err(fail("re-create"))?;
    ensure!(again.create_revision > deleted.mod_revision, "re-create kept the old create_revision");
    Ok(())
}

pub async fn range_is_by_prefix_in_key_order_with_limit_and_continue<S: Store>(
    store: &S,
    p: &str,
) -> Check {
    for name in ["c", "a", "e", "b", "d"] {
        store.create(&format!("{p}in/{name}"), v(name)).await.map_err(fail("create"))?;
    }
    // Keys sharing the string prefix but not the "directory" must not show up.
    store.create(&format!("{p}inx"), v("x")).await.map_err(fail("create"))?;
    store.create(&format!("{p}im"), v("x")).await.map_err(fail("create"))?;
    let prefix = format!("{p}in/");
    let all = store.range(&prefix, None, 0).await.map_err(fail("range"))?;
    let names: Vec<&str> = all.kvs.iter().map(|kv| &kv.key[prefix.len()..]).collect();
    ensure!(names == ["a", "b", "c", "d", "e"], "range gave {names:?}");
    ensure!(!all.more, "unlimited range said more");
    ensure!(
        all.revision >= all.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0),
        "range revision too old"
    );
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = store.range(&prefix, after.as_deref(), 2).await.map_err(fail("range page"))?;
        let keys: Vec<String> =
            page.kvs.iter().map(|kv| kv.key[prefix.len()..].to_string()).collect();
        after = page.kvs.last().map(|kv| kv.key.clone());
        pages.push((keys, page.more));
        if !page.more {
            break;
        }
    }
    let expected = vec![
        (vec!["a".to_string(), "b".to_string()], true),
        (vec!["c".to_string(), "d".to_string()], true),
        (vec!["e".to_string()], false),
    ];
    ensure!(pages == expected, "pages were {pages:?}");
    let empty = store.range(&format!("{p}nothing/"), None, 0).await.map_err(fail("range"))?;
    ensure!(empty.kvs.is_empty() && !empty.more, "empty prefix returned keys");
    Ok(())
}

pub async fn watch_replays_history_after_a_revision_then_follows_live<S: Store>(
    store: &S,
    p: &str,
) -> Check {
    let start = current(store).await?;
    let a = store.create(&format!("{p}a"), v("1")).await.map_err(fail("create"))?;
    let a2 = store.update(&format!("{p}a"), v("2"), None).await.map_err(fail("update"))?;
    let del = store.delete(&format!("{p}a"), None).await.map_err(fail("delete"))?;
    let mut rx = store.watch(p, start).await.map_err(fail("watch"))?;
    let e1 = next_event(&mut rx).await?;
    ensure!(e1.kind == EventKind::Put && e1.kv == a, "first event {e1:?}");
    ensure!(e1.prev.is_none(), "create event has a prev");
    let e2 = next_event(&mut rx).await?;
    ensure!(e2.kind == EventKind::Put && e2.kv == a2, "second event {e2:?}");
    ensure!(
        e2.prev.as_ref().map(|kv| &kv.value) == Some(&v("1")),
        "update event prev {:?}",
        e2.prev
    );
    let e3 = next_event(&mut rx).await?;
    ensure!(e3.kind == EventKind::Delete, "third event {e3:?}");
    ensure!(e3.kv.mod_revision == del.mod_revision && e3.kv.key == del.key, "delete event {e3:?}");
    ensure!(
        e3.prev.as_ref().map(|kv| &kv.value) == Some(&v("2")),
        "delete event prev {:?}",
        e3.prev
    );
    // From the middle of the history: only what came after.
    let mut mid = store.watch(p, a.mod_revision).await.map_err(fail("watch from the middle"))?;
    ensure!(
        next_event(&mut mid).await?.kv.mod_revision == a2.mod_revision,
        "watch from the middle did not start after it"
    );
    // Live events, in order, with no gaps.
    let mut revisions = Vec::new();
    for i in 0..20 {
        revisions.push(
            store
                .create(&format!("{p}live{i:02}"), v("x"))
                .await
                .map_err(fail("create"))?
                .mod_revision,
        );
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(next_event(&mut rx).await?.kv.mod_revision);
    }
    ensure!(seen == revisions, "live events {seen:?}, expected {revisions:?}");
    Ok(())
}

pub async fn watch_sees_only_its_prefix<S: Store>(store: &S, p: &str) -> Check {
    let start = current(store).await?;
    let mut rx = store.watch(&format!("{p}mine/"), start).await.map_err(fail("watch"))?;
    store.create(&format!("{p}other/x"), v("x")).await.map_err(fail("create"))?;
    store.create(&format!("{p}mine-not/x"), v("x")).await.map_err(fail("create"))?;
    let mine = store.create(&format!("{p}mine/x"), v("x")).await.map_err(fail("create"))?;
    let event = next_event(&mut rx).await?;
    ensure!(event.kv == mine, "watch delivered {event:?}");
    Ok(())
}

pub async fn compacted_revisions_cannot_be_watched<S: Store>(store: &S, p: &str) -> Check {
    let first = store.create(&format!("{p}a"), v("1")).await.map_err(fail("create"))?;
    let second = store.update(&format!("{p}a"), v("2"), None).await.map_err(fail("update"))?;
    let third = store.update(&format!("{p}a"), v("3"), None).await.map_err(fail("update"))?;
    store.compact(second.mod_revision).await.map_err(fail("compact"))?;
    match store.watch(p, first.mod_revision).await {
        Err(StoreError::Compacted { .. }) => {}
        Ok(_) => return Err("watch from a compacted revision succeeded".into()),
        Err(err) => {
            return Err(format!("watch from a compacted revision gave {err}, expected Compacted"));
        }
    }
    let mut rx =
        store.watch(p, second.mod_revision).await.map_err(fail("watch at the compaction point"))?;
    let event = next_event(&mut rx).await?;
    ensure!(event.kv == third, "watch at the compaction point delivered {event:?}");
    let live = store.get(&format!("{p}a")).await.map_err(fail("get"))?;
    ensure!(live == Some(third), "compaction lost the live key");
    Ok(())
}

pub async fn concurrent_swaps_from_one_revision_let_exactly_one_win<S: Store>(
    store: &S,
    p: &str,
) -> Check {
    let key = format!("{p}race");
    let created = store.create(&key, v("0")).await.map_err(fail("create"))?;
    let attempts = (0..8).map(|i| {
        let key = key.clone();
        async move { store.update(&key, v(&i.to_string()), Some(created.mod_revision)).await }
    });
    let results = join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts =
        results.iter().filter(|r| matches!(r, Err(StoreError::Conflict { .. }))).count();
    ensure!(wins == 1 && conflicts == 7, "{wins} wins and {conflicts} conflicts out of 8");
    Ok(())
}

/// Polls futures concurrently on the current task (no extra dependency for join_all).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, fut) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => out[i] = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}
