//! Server-side read-modify-write with retries, as kube-apiserver's `GuaranteedUpdate`.
//!
//! Contract: [`read_modify_write`] reads the object and runs one attempt on it; the attempt
//! decides and writes with compare-and-swap on the revision it was given. When another writer
//! changed or removed the object between the read and the swap, the attempt ends with
//! [`WriteError::Raced`] (a store `Conflict` or `NotFound` converts to it with `?`) and runs
//! again on a fresh read, at most [`ATTEMPTS`] times, after a short random pause that grows
//! with each lost race (writers colliding on one object fall out of step; kube-apiserver
//! retries without a bound instead). So a request that did not ask for one
//! version of the object (a DELETE without preconditions, a PATCH without
//! `metadata.resourceVersion`, an update without one, a status write, a binding, a scale)
//! does not fail because of a concurrent writer. 409 Conflict comes only from the attempt
//! itself, for a precondition the client gave (a stale `metadata.resourceVersion`,
//! DeleteOptions `preconditions`), checked against each fresh read as Kubernetes does, or after
//! [`ATTEMPTS`] lost races in a row. An object missing at a read is 404.
use std::{future::Future, time::Duration};

use super::status::ApiError;
use crate::{
    resources::{Resource, meta},
    store::{KeyValue, Store, StoreError},
};

/// Reads of one request before a write that keeps losing its compare-and-swap gives up
/// with 409.
pub(crate) const ATTEMPTS: usize = 16;

/// How one attempt ended without an answer.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The object changed or vanished between the read and the compare-and-swap: read again.
    Raced,
    /// The answer for the client (also a 409 for a precondition the client gave).
    Api(ApiError),
}

impl From<ApiError> for WriteError {
    fn from(err: ApiError) -> WriteError {
        WriteError::Api(err)
    }
}

impl From<StoreError> for WriteError {
    fn from(err: StoreError) -> WriteError {
        match err {
            StoreError::Conflict { .. } | StoreError::NotFound { .. } => WriteError::Raced,
            other => WriteError::Api(other.into()),
        }
    }
}

/// Reads `resource` `name` and runs `attempt` on it until the attempt answers, reading again
/// after each lost race (see the module docs).
pub(crate) async fn read_modify_write<S, T, F, Fut>(
    store: &S,
    resource: &Resource,
    ns: Option<&str>,
    name: &str,
    mut attempt: F,
) -> Result<T, ApiError>
where
    S: Store,
    F: FnMut(KeyValue) -> Fut,
    Fut: Future<Output = Result<T, WriteError>>,
{
    let key = resource.key(ns, name);
    for lost in 0..ATTEMPTS {
        if lost > 0 {
            tokio::time::sleep(pause_after(lost)).await;
        }
        let Some(current) = store.get(&key).await? else {
            return Err(ApiError::not_found(resource, name));
        };
        match attempt(current).await {
            Ok(answer) => return Ok(answer),
            Err(WriteError::Raced) => continue,
            Err(WriteError::Api(err)) => return Err(err),
        }
    }
    log::warn!("{key}: the object changed under each of {ATTEMPTS} writes in a row; answering 409");
    Err(ApiError::conflict(resource, name))
}

/// The pause before reading again after `lost` lost races: random, below 2^lost ms (64 ms
/// at most), so writers that read the same version and collided do not all read again at
/// once.
fn pause_after(lost: usize) -> Duration {
    let ceiling = 1000 << lost.min(6);
    Duration::from_micros(u64::from_le_bytes(meta::random_bytes()) % ceiling)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        resources,
        store::{EmbeddedStore, embedded::tests::TempDir},
    };

    /// An attempt that loses its swap to another writer reads again and wins the next time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_race_is_read_again_and_retried() {
        let dir = TempDir::new("rmw-retry");
        let store = EmbeddedStore::open(&dir.0, Default::default()).unwrap();
        let cms = resources::find("", "v1", "configmaps").unwrap();
        let key = cms.key(Some("default"), "c");
        store.create(&key, Bytes::from_static(b"0")).await.unwrap();
        let mut reads = Vec::new();
        let written = read_modify_write(&store, cms, Some("default"), "c", |current| {
            reads.push(current.value.clone());
            let (store, key, racing) = (&store, &key, reads.len() < 3);
            async move {
                if racing {
                    // Another writer gets in between this read and the swap.
                    store.update(key, Bytes::from_static(b"other"), None).await?;
                }
                Ok::<_, WriteError>(
                    store
                        .update(key, Bytes::from_static(b"mine"), Some(current.mod_revision))
                        .await?,
                )
            }
        })
        .await
        .unwrap();
        assert_eq!(
            reads,
            vec![
                Bytes::from_static(b"0"),
                Bytes::from_static(b"other"),
                Bytes::from_static(b"other")
            ]
        );
        assert_eq!(written.value, Bytes::from_static(b"mine"));
        assert_eq!(store.get(&key).await.unwrap().unwrap().value, Bytes::from_static(b"mine"));
    }

    /// An attempt's own answer, a 409 for a stale precondition included, ends the loop at once;
    /// a missing object is 404; endless lost races give up with 409 after [`ATTEMPTS`] reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_end_the_loop_and_lost_races_are_bounded() {
        let dir = TempDir::new("rmw-bounded");
        let store = EmbeddedStore::open(&dir.0, Default::default()).unwrap();
        let cms = resources::find("", "v1", "configmaps").unwrap();
        store.create(&cms.key(Some("default"), "c"), Bytes::from_static(b"0")).await.unwrap();
        let mut runs = 0;
        let answer: Result<(), ApiError> =
            read_modify_write(&store, cms, Some("default"), "c", |_| {
                runs += 1;
                async { Err(ApiError::conflict(cms, "c").into()) }
            })
            .await;
        assert_eq!((answer.unwrap_err().code, runs), (409, 1));

        let mut runs = 0;
        let answer: Result<(), ApiError> =
            read_modify_write(&store, cms, Some("default"), "c", |_| {
                runs += 1;
                async { Err(WriteError::Raced) }
            })
            .await;
        assert_eq!((answer.unwrap_err().reason, runs), ("Conflict", ATTEMPTS));

        let answer: Result<(), ApiError> =
            read_modify_write(&store, cms, Some("default"), "missing", |_| async {
                Ok::<_, WriteError>(())
            })
            .await;
        assert_eq!(answer.unwrap_err().code, 404);
    }
}
