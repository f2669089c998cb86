//! Watches: a streamed HTTP response of newline-delimited `{"type", "object"}` events.
//!
//! resourceVersion semantics, as kube-apiserver: unset or "0" (or `sendInitialEvents=true`)
//! starts with a synthetic ADDED for every matching object, then follows changes; "N" delivers
//! every change after revision N. A version older than the compaction point gets an ERROR event
//! carrying a 410 Expired Status, after which the client must list again. With
//! `allowWatchBookmarks=true` a BOOKMARK with the current resourceVersion is sent every
//! bookmark interval (and after the initial events when `sendInitialEvents=true`, annotated
//! `k8s.io/initial-events-end`). Label and field selectors apply to both the old and the new
//! state: an object that stops matching is reported DELETED, one that starts matching ADDED.
//! The watch ends after `timeoutSeconds` (default 30 to 60 minutes), when the client goes away,
//! or when it falls too far behind (the client resumes from the last version it saw).
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use hyper::{Response, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    ApiState,
    handlers::{Selectors, decode, list_stored},
    http::{Body, Query},
    status::ApiError,
    stored, table,
};
use crate::{
    resources::Resource,
    store::{Event, EventKind, KeyValue, Store, StoreError},
};

fn line(kind: &str, object: Value) -> Bytes {
    let mut out =
        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON serializes");
    out.push(b'\n');
    Bytes::from(out)
}

struct Encoder {
    resource: &'static Resource,
    table: bool,
}

impl Encoder {
    /// The event line of a stored object: written from the stored bytes (no parse) unless a
    /// Table is wanted.
    fn event(&self, kind: &str, kv: &KeyValue) -> Result<Bytes, ApiError> {
        if self.table {
            let rv = kv.mod_revision.to_string();
            Ok(line(kind, table::table(self.resource, &[decode(kv)?], &rv, None)))
        } else {
            stored::watch_line(kind, kv)
        }
    }

    fn bookmark(&self, revision: i64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(), "metadata": metadata}),
        )
    }
}

/// How many recent event lines [`SharedLines`] keeps.
const SHARED_LINES: usize = 16;

/// The JSON lines of the latest store events, shared by the watchers that send them: an event
/// fanned out to N watchers is written once and the same bytes are queued N times. Keyed by
/// (revision, event type): a revision names one store event, so one object state.
#[derive(Default)]
pub(crate) struct SharedLines(Mutex<VecDeque<(i64, &'static str, Bytes)>>);

impl SharedLines {
    fn line(&self, kind: &'static str, kv: &KeyValue) -> Result<Bytes, ApiError> {
        let lock = || self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let found = lock()
            .iter()
            .find(|(revision, k, _)| *revision == kv.mod_revision && *k == kind)
            .map(|(_, _, line)| line.clone());
        if let Some(line) = found {
            return Ok(line);
        }
        let line = stored::watch_line(kind, kv)?;
        let mut lines = lock();
        if lines.len() == SHARED_LINES {
            lines.pop_front();
        }
        lines.push_back((kv.mod_revision, kind, line.clone()));
        Ok(line)
    }
}

fn error_line(err: &ApiError) -> Bytes {
    line("ERROR", err.to_status())
}

/// Translates a store event into the kind of watch event this watcher sees, if any; the
/// object is always `event.kv` (for DELETED the last state, or the state that stopped
/// matching).
pub(super) fn translate(
    event: &Event,
    selectors: &Selectors,
) -> Result<Option<&'static str>, ApiError> {
    let prev_matched = match &event.prev {
        Some(prev) => selectors.matches_stored(prev)?,
        None => false,
    };
    match event.kind {
        EventKind::Delete => Ok(prev_matched.then_some("DELETED")),
        EventKind::Put => {
            let matches = selectors.matches_stored(&event.kv)?;
            Ok(match (prev_matched, matches) {
                (false, true) => Some("ADDED"),
                (true, true) => Some("MODIFIED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            })
        }
    }
}

/// The line a watcher sends for a store event, if any (JSON lines shared among watchers).
fn event_line(
    event: &Event,
    selectors: &Selectors,
    encoder: &Encoder,
    shared: &SharedLines,
) -> Result<Option<Bytes>, ApiError> {
    let Some(kind) = translate(event, selectors)? else { return Ok(None) };
    if encoder.table { encoder.event(kind, &event.kv) } else { shared.line(kind, &event.kv) }
        .map(Some)
}

pub(crate) async fn watch<S: Store>(
    state: Arc<ApiState<S>>,
    resource: &'static Resource,
    ns: Option<&str>,
    query: &Query,
    wants_table: bool,
) -> Result<Response<Body>, ApiError> {
    let selectors = Selectors::from_query(resource, query)?;
    let rv = query.get("resourceVersion").filter(|v| !v.is_empty());
    let send_initial = query.flag("sendInitialEvents") || matches!(rv, None | Some("0"));
    let bookmarks = query.flag("allowWatchBookmarks");
    let timeout = match query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()) {
        Some(t) if t > 0 => Duration::from_secs(t),
        // kube-apiserver picks between 30 and 60 minutes; a fixed value is as good.
        _ => Duration::from_secs(45 * 60),
    };
    let encoder = Encoder { resource, table: wants_table };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let prefix = resource.scope_prefix(ns);
    let mut initial = Vec::new();
    let start: Result<i64, ApiError> = if send_initial && rv.is_none_or(|v| v == "0") {
        let (items, revision, _) =
            list_stored(&state.store, resource, ns, &selectors, 0, None).await?;
        initial = items;
        Ok(revision)
    } else {
        let requested = rv.unwrap_or("0");
        requested.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("resourceVersion {requested:?} is not a valid version"))
        })
    };
    let start = start?;
    let events = match state.store.watch(&prefix, start).await {
        Ok(events) => Ok(events),
        Err(StoreError::Compacted { compacted, .. }) => {
            Err(ApiError::gone(format!("too old resource version: {start} ({compacted})")))
        }
        Err(StoreError::FutureRevision { current, .. }) => Err(ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {start}, current: {current}"),
        )),
        Err(err) => Err(err.into()),
    };
    let bookmark_interval = state.config.bookmark_interval;
    let store_state = state.clone();
    tokio::spawn(async move {
        let mut events = match events {
            Ok(events) => events,
            Err(err) => {
                let _ = tx.send(error_line(&err)).await;
                return;
            }
        };
        let mut last = start;
        for kv in &initial {
            let line = match encoder.event("ADDED", kv) {
                Ok(line) => line,
                Err(err) => {
                    let _ = tx.send(error_line(&err)).await;
                    return;
                }
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
        drop(initial);
        if send_initial && bookmarks && tx.send(encoder.bookmark(start, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return };
                    last = event.revision();
                    match event_line(&event, &selectors, &encoder, &store_state.watch_lines) {
                        Ok(Some(line)) => {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(err) => {
                            let _ = tx.send(error_line(&err)).await;
                            return;
                        }
                    }
                }
                _ = ticker.tick(), if bookmarks => {
                    // Every event up to the current revision is already in our queue (the store
                    // publishes before it advances), so after draining it the bookmark is exact.
                    let current = store_state.store.revisions().await.map(|r| r.0).unwrap_or(last);
                    while let Ok(event) = events.try_recv() {
                        last = event.revision();
                        if let Ok(Some(line)) = event_line(&event, &selectors, &encoder, &store_state.watch_lines) && tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    last = last.max(current);
                    if tx.send(encoder.bookmark(last, false)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::Stream(rx))
        .expect("static headers are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_lines_write_an_event_once_and_stay_bounded() {
        let shared = SharedLines::default();
        let kv = |revision: i64| KeyValue {
            key: "/k".into(),
            value: Bytes::from_static(b"{\"metadata\":{\"name\":\"a\"}}"),
            create_revision: 1,
            mod_revision: revision,
        };
        let first = shared.line("MODIFIED", &kv(3)).unwrap();
        let again = shared.line("MODIFIED", &kv(3)).unwrap();
        assert_eq!(first.as_ptr(), again.as_ptr(), "the second watcher reuses the bytes");
        assert_eq!(first, stored::watch_line("MODIFIED", &kv(3)).unwrap());
        let deleted = shared.line("DELETED", &kv(3)).unwrap();
        assert_ne!(deleted, first);
        for revision in 4..100 {
            shared.line("ADDED", &kv(revision)).unwrap();
        }
        assert_eq!(shared.0.lock().unwrap().len(), SHARED_LINES);
        let evicted = shared.line("MODIFIED", &kv(3)).unwrap();
        assert_eq!(evicted, first);
        assert_ne!(evicted.as_ptr(), first.as_ptr());
    }
}
