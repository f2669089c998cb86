//! The embedded store: all live keys in an in-memory ordered index, every write appended to an
//! fsynced log (see `log.rs`) before it is acknowledged, the recent history of events kept in
//! memory for watches.
//!
//! Recovery: on open the log is replayed; the index, the revision counter and the event history
//! since the log's last rewrite are rebuilt exactly. The history is bounded
//! ([`Options::history_limit`] events; older ones are compacted away) and the log is rewritten
//! (live keys only) when it holds many more records than live keys; after a restart watches can
//! resume from any revision after the last rewrite and not compacted since.
//!
//! One process owns a data dir at a time (an exclusive `flock` on `store.lock`).
use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Event, EventKind, KeyValue, RangeResult, Result, Store, StoreError, WatchReceiver,
    log::{Log, Record},
};

/// Events a live watcher may have queued before it is considered stuck and ended.
const LIVE_BUFFER: usize = 4096;

#[derive(Clone, Debug)]
pub struct Options {
    /// Events kept for watches; older ones are compacted.
    pub history_limit: usize,
    /// The log is rewritten when it has at least this many records and twice as many as live
    /// keys.
    pub rewrite_threshold: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { history_limit: 10_000, rewrite_threshold: 50_000 }
    }
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Event>,
}

struct State {
    revision: i64,
    compacted: i64,
    index: BTreeMap<String, KeyValue>,
    history: VecDeque<Event>,
    watchers: Vec<Watcher>,
    log: Log,
    options: Options,
}

struct Inner {
    state: Mutex<State>,
    _lock: File,
}

/// The embedded, on-disk store. Cheap to clone (shared state).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl EmbeddedStore {
    /// Opens the store in `dir` (created if missing) and recovers its state.
    pub fn open(dir: &Path, options: Options) -> Result<EmbeddedStore> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("store.lock");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Io {
                path: lock_path.display().to_string(),
                source: std::io::Error::other(
                    "the data dir is in use by another weir apiserver; stop it or use another \
                     --data-dir",
                ),
            });
        }
        let log_path: PathBuf = dir.join("store.log");
        let (log, records) = Log::open(&log_path)?;
        let mut state = State {
            revision: 0,
            compacted: 0,
            index: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: Vec::new(),
            log,
            options,
        };
        let corrupt =
            |detail: String| StoreError::Corrupt { path: log_path.display().to_string(), detail };
        for record in records {
            match record {
                Record::Meta { revision, compacted } => {
                    state.revision = state.revision.max(revision);
                    state.compacted = state.compacted.max(compacted).max(revision);
                }
                Record::Put { revision, create_revision, key, value } => {
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                    };
                    if revision <= state.compacted {
                        // A snapshot entry written by a rewrite: state, not an event.
                        state.index.insert(key, kv);
                        continue;
                    }
                    if revision != state.revision + 1 {
                        return Err(corrupt(format!(
                            "record at revision {revision} follows revision {}",
                            state.revision
                        )));
                    }
                    let prev = state.index.insert(key, kv.clone());
                    state.record(Event { kind: EventKind::Put, kv, prev });
                }
                Record::Delete { revision, key } => {
                    if revision != state.revision + 1 {
                        return Err(corrupt(format!(
                            "record at revision {revision} follows revision {}",
                            state.revision
                        )));
                    }
                    let Some(prev) = state.index.remove(&key) else {
                        return Err(corrupt(format!("delete of missing key {key}")));
                    };
                    let kv = KeyValue { mod_revision: revision, ..prev.clone() };
                    state.record(Event { kind: EventKind::Delete, kv, prev: Some(prev) });
                }
            }
        }
        log::info!(
            "store {}: recovered {} keys at revision {} (history from {})",
            dir.display(),
            state.index.len(),
            state.revision,
            state.compacted
        );
        Ok(EmbeddedStore { inner: Arc::new(Inner { state: Mutex::new(state), _lock: lock }) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written: every mutation
        // is logged first and applied after; continue with what is there.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn create_sync(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        let mut state = self.state();
        if state.index.contains_key(key) {
            return Err(StoreError::AlreadyExists { key: key.to_string() });
        }
        let revision = state.revision + 1;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: revision,
            mod_revision: revision,
        };
        state.commit_put(kv.clone(), None)?;
        Ok(kv)
    }

    fn update_sync(&self, key: &str, value: Bytes, expected: Option<i64>) -> Result<KeyValue> {
        let mut state = self.state();
        let Some(prev) = state.index.get(key).cloned() else {
            return Err(StoreError::NotFound { key: key.to_string() });
        };
        check_expected(key, &prev, expected)?;
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.create_revision,
            mod_revision: state.revision + 1,
        };
        state.commit_put(kv.clone(), Some(prev))?;
        Ok(kv)
    }

    fn delete_sync(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        let mut state = self.state();
        let Some(prev) = state.index.get(key).cloned() else {
            return Err(StoreError::NotFound { key: key.to_string() });
        };
        check_expected(key, &prev, expected)?;
        let revision = state.revision + 1;
        state.log.append(&Record::Delete { revision, key: key.to_string() })?;
        state.index.remove(key);
        let kv = KeyValue { mod_revision: revision, ..prev.clone() };
        state.publish(Event { kind: EventKind::Delete, kv: kv.clone(), prev: Some(prev) });
        state.maybe_rewrite();
        Ok(kv)
    }

    fn range_sync(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> RangeResult {
        use std::ops::Bound;
        let state = self.state();
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (key, kv) in state.index.range::<String, _>((lower, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if limit > 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(kv.clone());
        }
        RangeResult { kvs, revision: state.revision, more }
    }

    fn watch_sync(&self, prefix: &str, after: i64) -> Result<WatchReceiver> {
        let mut state = self.state();
        if after < state.compacted {
            return Err(StoreError::Compacted { requested: after, compacted: state.compacted });
        }
        if after > state.revision {
            return Err(StoreError::FutureRevision { requested: after, current: state.revision });
        }
        let backlog: Vec<Event> = state
            .history
            .iter()
            .filter(|event| event.revision() > after && event.kv.key.starts_with(prefix))
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(backlog.len() + LIVE_BUFFER);
        for event in backlog {
            tx.try_send(event).expect("the channel has room for the backlog");
        }
        state.watchers.push(Watcher { prefix: prefix.to_string(), tx });
        Ok(rx)
    }

    fn compact_sync(&self, revision: i64) -> Result<()> {
        let mut state = self.state();
        if revision > state.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: state.revision,
            });
        }
        while state.history.front().is_some_and(|event| event.revision() <= revision) {
            state.history.pop_front();
        }
        state.compacted = state.compacted.max(revision);
        Ok(())
    }
}

fn check_expected(key: &str, current: &KeyValue, expected: Option<i64>) -> Result<()> {
    match expected {
        Some(expected) if expected != current.mod_revision => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            current: current.mod_revision,
        }),
        _ => Ok(()),
    }
}

impl State {
    fn commit_put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()> {
        self.log.append(&Record::Put {
            revision: kv.mod_revision,
            create_revision: kv.create_revision,
            key: kv.key.clone(),
            value: kv.value.clone(),
        })?;
        self.index.insert(kv.key.clone(), kv.clone());
        self.publish(Event { kind: EventKind::Put, kv, prev });
        self.maybe_rewrite();
        Ok(())
    }

    /// Appends an event to the history (bumping the revision) without notifying watchers.
    fn record(&mut self, event: Event) {
        self.revision = event.revision();
        self.history.push_back(event);
        while self.history.len() > self.options.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
    }

    fn publish(&mut self, event: Event) {
        self.watchers.retain(|watcher| {
            if !event.kv.key.starts_with(&watcher.prefix) {
                return !watcher.tx.is_closed();
            }
            // A full channel means the watcher does not keep up: end it (it resumes from the
            // last revision it saw) rather than buffer without bound.
            watcher.tx.try_send(event.clone()).is_ok()
        });
        self.record(event);
    }

    fn maybe_rewrite(&mut self) {
        let live = self.index.len() as u64;
        if self.log.records < self.options.rewrite_threshold || self.log.records < 2 * live {
            return;
        }
        let meta = Record::Meta { revision: self.revision, compacted: self.compacted };
        let snapshot = self.index.values().map(|kv| Record::Put {
            revision: kv.mod_revision,
            create_revision: kv.create_revision,
            key: kv.key.clone(),
            value: kv.value.clone(),
        });
        // A failed rewrite leaves the old log in place, which is still complete.
        match self.log.rewrite(std::iter::once(meta).chain(snapshot)) {
            Ok(()) => log::info!("store: log rewritten with {live} live keys"),
            Err(err) => log::warn!("store: log rewrite failed (the old log stays): {err}"),
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| StoreError::Backend { detail: format!("store task failed: {err}") })?
}

impl Store for EmbeddedStore {
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.create_sync(&key, value)).await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Option<i64>) -> Result<KeyValue> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.update_sync(&key, value, expected)).await
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        let (store, key) = (self.clone(), key.to_string());
        blocking(move || store.delete_sync(&key, expected)).await
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.state().index.get(key).cloned())
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult> {
        Ok(self.range_sync(prefix, start_after, limit))
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchReceiver> {
        self.watch_sync(prefix, after)
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.compact_sync(revision)
    }

    async fn revisions(&self) -> Result<(i64, i64)> {
        let state = self.state();
        Ok((state.revision, state.compacted))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A unique temp dir removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);
    impl TempDir {
        pub(crate) fn new(what: &str) -> TempDir {
            static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("weir-store-test-{}-{seq}-{what}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn v(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let dir = TempDir::new("conformance");
        let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
        let ran = super::super::conformance::run_all(&store, "/conf").await.unwrap();
        assert_eq!(ran.len(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_recovers_keys_revisions_and_history() {
        let dir = TempDir::new("restart");
        let (a, b, deleted) = {
            let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
            let a = store.create("/k/a", v("1")).await.unwrap();
            let b = store.create("/k/b", v("1")).await.unwrap();
            let b = store.update("/k/b", v("2"), Some(b.mod_revision)).await.unwrap();
            store.create("/k/c", v("1")).await.unwrap();
            let deleted = store.delete("/k/c", None).await.unwrap();
            (a, b, deleted)
        };
        let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
        assert_eq!(store.revisions().await.unwrap(), (deleted.mod_revision, 0));
        assert_eq!(store.get("/k/a").await.unwrap(), Some(a.clone()));
        assert_eq!(store.get("/k/b").await.unwrap(), Some(b.clone()));
        assert_eq!(store.get("/k/c").await.unwrap(), None);
        let mut rx = store.watch("/k/", a.mod_revision).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            seen.push((event.kind, event.kv.key, event.kv.mod_revision));
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[3], (EventKind::Delete, "/k/c".to_string(), deleted.mod_revision));
        let next = store.create("/k/d", v("1")).await.unwrap();
        assert_eq!(next.mod_revision, deleted.mod_revision + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_tail_loses_only_the_unacknowledged_write() {
        let dir = TempDir::new("torn");
        {
            let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
            store.create("/k/a", v("1")).await.unwrap();
            store.create("/k/b", v("1")).await.unwrap();
        }
        let log = dir.0.join("store.log");
        let len = std::fs::metadata(&log).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        file.set_len(len - 3).unwrap();
        drop(file);
        let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
        assert_eq!(store.revisions().await.unwrap().0, 1);
        assert!(store.get("/k/b").await.unwrap().is_none());
        // New writes go after the truncated point and survive another restart.
        store.create("/k/c", v("1")).await.unwrap();
        drop(store);
        let store = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
        assert_eq!(store.revisions().await.unwrap().0, 2);
        assert!(store.get("/k/c").await.unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rewrite_and_history_limit_keep_live_keys_and_the_counter() {
        let dir = TempDir::new("rewrite");
        let options = Options { history_limit: 10, rewrite_threshold: 20 };
        let last = {
            let store = EmbeddedStore::open(&dir.0, options.clone()).unwrap();
            let mut last = store.create("/k/x", v("0")).await.unwrap().mod_revision;
            for i in 1..50 {
                last = store.update("/k/x", v(&i.to_string()), None).await.unwrap().mod_revision;
            }
            let (revision, compacted) = store.revisions().await.unwrap();
            assert_eq!(revision, last);
            assert_eq!(compacted, last - 10);
            assert!(matches!(store.watch("/k/", 1).await, Err(StoreError::Compacted { .. })));
            last
        };
        let records =
            super::super::log::decode_all(&std::fs::read(dir.0.join("store.log")).unwrap()).0;
        assert!(records.len() < 30, "log was not rewritten: {} records", records.len());
        let store = EmbeddedStore::open(&dir.0, options).unwrap();
        assert_eq!(store.revisions().await.unwrap().0, last);
        assert_eq!(store.get("/k/x").await.unwrap().unwrap().value, v("49"));
    }

    #[test]
    fn a_second_process_cannot_open_the_same_dir() {
        let dir = TempDir::new("lock");
        let _first = EmbeddedStore::open(&dir.0, Options::default()).unwrap();
        let second = EmbeddedStore::open(&dir.0, Options::default());
        assert!(matches!(second, Err(StoreError::Io { .. })));
    }
}
