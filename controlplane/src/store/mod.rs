//! A revisioned key-value store with watch, in etcd's model.
//!
//! Contract (what every implementation must do, checked by [`conformance`]):
//! - One global revision counter. Every successful write (create, update, delete) increments it
//!   by exactly one and stamps the written key with it (`mod_revision`); `create_revision` is the
//!   revision at which the key was (last) created. Revisions start at 1 for the first write.
//! - `create` fails with [`StoreError::AlreadyExists`] when the key exists. `update` and
//!   `delete` take an optional expected `mod_revision` (compare-and-swap); a mismatch fails with
//!   [`StoreError::Conflict`] carrying the current revision of the key, a missing key with
//!   [`StoreError::NotFound`]. Failed writes change nothing and do not bump the revision.
//! - `range` returns live keys with the given prefix in ascending key order, starting strictly
//!   after `start_after` when given, at most `limit` (0 = unlimited), with `more` telling whether
//!   keys were left out, and the store revision at which it was read. Reads always see the
//!   latest state (no reads at old revisions).
//! - `watch(prefix, after)` delivers every event on keys with that prefix whose revision is
//!   greater than `after`, in revision order, without gaps, first the retained history then
//!   live events. A watch that asks for history older than the compaction point fails with
//!   [`StoreError::Compacted`]. A watcher that does not keep up is ended (its channel closes);
//!   the client resumes from the last revision it saw.
//! - `compact(rev)` forgets history at and below `rev`; live keys are never lost.
use std::future::Future;

use bytes::Bytes;
use tokio::sync::mpsc;

pub mod conformance;
pub mod embedded;
pub mod etcd;
mod log;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A live key, its value and its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For `Put`, `kv` is the new state; for `Delete`, `kv` has the last value with
/// `mod_revision` set to the deletion's revision. `prev` is the state before the change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

/// The answer of a [`Store::range`].
#[derive(Clone, Debug, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// The store revision the range was read at.
    pub revision: i64,
    /// Keys past the last returned one were left out by the limit.
    pub more: bool,
}

/// A stream of events; it closes when the watcher falls behind or the store shuts down.
pub type WatchReceiver = mpsc::Receiver<Event>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} was modified: expected revision {expected}, current {current}")]
    Conflict { key: String, expected: i64, current: i64 },
    #[error(
        "revision {requested} has been compacted (oldest available is {compacted}+1); \
         list again and watch from the list's revision"
    )]
    Compacted { requested: i64, compacted: i64 },
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision { requested: i64, current: i64 },
    #[error("store I/O failed at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store data at {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("store backend failed: {detail}")]
    Backend { detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The store interface the API server is written against.
pub trait Store: Send + Sync + 'static {
    fn create(&self, key: &str, value: Bytes) -> impl Future<Output = Result<KeyValue>> + Send;
    fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_mod_revision: Option<i64>,
    ) -> impl Future<Output = Result<KeyValue>> + Send;
    /// Returns the deleted key's last state, `mod_revision` set to the deletion's revision.
    fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
    ) -> impl Future<Output = Result<KeyValue>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;
    fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<RangeResult>> + Send;
    fn watch(&self, prefix: &str, after: i64)
    -> impl Future<Output = Result<WatchReceiver>> + Send;
    fn compact(&self, revision: i64) -> impl Future<Output = Result<()>> + Send;
    /// The current revision and the compaction point.
    fn revisions(&self) -> impl Future<Output = Result<(i64, i64)>> + Send;
}
