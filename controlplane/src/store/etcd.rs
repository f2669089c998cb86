//! The etcd backend: the same [`Store`] contract on a real etcd (v3.4+) through its v3 JSON
//! gateway (`/v3/kv/*`, `/v3/watch`) over plain HTTP.
//!
//! Mapping: create is a transaction on `create_revision == 0`; update and delete compare the
//! key's `mod_revision` (or, unconditionally, its existence); range is a prefix range with
//! limit; a watch first reads at the requested revision (so a compacted or future revision
//! fails like in the embedded store) and then opens an etcd watch from the next revision with
//! previous values. etcd's revision counter starts at 1 on an empty store, so revisions are
//! not the embedded store's numbers; only their order and gaps are the contract. etcd does not
//! report its compaction point: [`Store::revisions`] returns 0 for it.
//!
//! Not supported: TLS and authentication to etcd, several endpoints (only the first is used).
use std::net::SocketAddr;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::mpsc};

use super::{Event, EventKind, KeyValue, RangeResult, Result, Store, StoreError, WatchReceiver};

/// Events a watcher may have queued before it is ended (as in the embedded store).
const LIVE_BUFFER: usize = 4096;

#[derive(Clone, Debug)]
pub struct EtcdStore {
    addr: SocketAddr,
}

fn backend(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend { detail: format!("etcd: {detail}") }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of the range of keys starting with `prefix` (etcd's "prefix end").
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_from(v: &Value) -> Result<KeyValue> {
    let decode = |field: &str| -> Result<Vec<u8>> {
        match v.get(field).and_then(Value::as_str) {
            Some(s) => B64.decode(s).map_err(|e| backend(format!("bad base64 in {field}: {e}"))),
            None => Ok(Vec::new()),
        }
    };
    Ok(KeyValue {
        key: String::from_utf8(decode("key")?).map_err(|_| backend("a key is not UTF-8"))?,
        value: Bytes::from(decode("value")?),
        create_revision: int(v.get("create_revision")),
        mod_revision: int(v.get("mod_revision")),
    })
}

fn header_revision(v: &Value) -> i64 {
    int(v.pointer("/header/revision"))
}

impl EtcdStore {
    /// An etcd store at `endpoint` (`http://HOST:PORT`, or `HOST:PORT`). Checks nothing yet:
    /// the first request does.
    pub fn new(endpoint: &str) -> Result<EtcdStore> {
        let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
        if endpoint.starts_with("https://") {
            return Err(backend(format!("{endpoint}: TLS to etcd is not supported; use http://")));
        }
        let addr =
            hostport.parse().map_err(|_| backend(format!("{endpoint:?} is not http://IP:PORT")))?;
        Ok(EtcdStore { addr })
    }

    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| backend(format!("connecting to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(backend)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::post(format!("http://{}{path}", self.addr))
            .header(header::HOST, self.addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(backend)?;
        sender.send_request(request).await.map_err(backend)
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value> {
        let response = self.send(path, &body).await?;
        let bytes = response.into_body().collect().await.map_err(backend)?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| backend(format!("{path}: bad JSON: {e}")))?;
        if let Some(message) = value.get("error").and_then(Value::as_str) {
            return Err(backend(format!("{path}: {message}")));
        }
        Ok(value)
    }

    async fn txn(&self, compare: Value, success: Value, failure: Value) -> Result<(bool, Value)> {
        let out = self
            .call(
                "/v3/kv/txn",
                json!({"compare": [compare], "success": [success], "failure": [failure]}),
            )
            .await?;
        Ok((out.get("succeeded").and_then(Value::as_bool).unwrap_or(false), out))
    }

    fn exists(key: &str) -> Value {
        json!({"key": b64(key.as_bytes()), "target": "CREATE", "result": "GREATER", "create_revision": "0"})
    }

    fn mod_is(key: &str, revision: i64) -> Value {
        json!({"key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string()})
    }

    fn range_op(key: &str) -> Value {
        json!({"request_range": {"key": b64(key.as_bytes())}})
    }

    /// The error of a failed conditional write, from the failure branch's range.
    fn failed_write(key: &str, expected: Option<i64>, out: &Value) -> StoreError {
        match out.pointer("/responses/0/response_range/kvs/0") {
            None => StoreError::NotFound { key: key.to_string() },
            Some(kv) => StoreError::Conflict {
                key: key.to_string(),
                expected: expected.unwrap_or(0),
                current: int(kv.get("mod_revision")),
            },
        }
    }
}

impl Store for EtcdStore {
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        let compare = json!({"key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"});
        let put = json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(&value)}});
        let (ok, out) = self.txn(compare, put, Self::range_op(key)).await?;
        if !ok {
            return Err(StoreError::AlreadyExists { key: key.to_string() });
        }
        let revision = header_revision(&out);
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(&self, key: &str, value: Bytes, expected: Option<i64>) -> Result<KeyValue> {
        let compare = match expected {
            Some(revision) => Self::mod_is(key, revision),
            None => Self::exists(key),
        };
        let put = json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(&value), "prev_kv": true}});
        let (ok, out) = self.txn(compare, put, Self::range_op(key)).await?;
        if !ok {
            return Err(Self::failed_write(key, expected, &out));
        }
        let prev = out.pointer("/responses/0/response_put/prev_kv").map(kv_from).transpose()?;
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.map(|p| p.create_revision).unwrap_or(0),
            mod_revision: header_revision(&out),
        })
    }

    async fn delete(&self, key: &str, expected: Option<i64>) -> Result<KeyValue> {
        let compare = match expected {
            Some(revision) => Self::mod_is(key, revision),
            None => Self::exists(key),
        };
        let delete = json!({"request_delete_range": {"key": b64(key.as_bytes()), "prev_kv": true}});
        let (ok, out) = self.txn(compare, delete, Self::range_op(key)).await?;
        if !ok {
            return Err(Self::failed_write(key, expected, &out));
        }
        let prev = out
            .pointer("/responses/0/response_delete_range/prev_kvs/0")
            .ok_or_else(|| StoreError::NotFound { key: key.to_string() })?;
        let prev = kv_from(prev)?;
        Ok(KeyValue { mod_revision: header_revision(&out), ..prev })
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let out = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())})).await?;
        out.pointer("/kvs/0").map(kv_from).transpose()
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult> {
        let start = match start_after {
            Some(after) if after >= prefix => {
                let mut k = after.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let out = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(&start), "range_end": b64(&prefix_end(prefix)), "limit": limit.to_string()}),
            )
            .await?;
        let kvs = out
            .get("kvs")
            .and_then(Value::as_array)
            .map(|kvs| kvs.iter().map(kv_from).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        Ok(RangeResult {
            kvs,
            revision: header_revision(&out),
            more: out.get("more").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    async fn watch(&self, prefix: &str, after: i64) -> Result<WatchReceiver> {
        // A read at `after` fails exactly when the history after it is gone or in the future.
        if after > 0 {
            let probe = json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)), "revision": after.to_string(), "count_only": true});
            match self.call("/v3/kv/range", probe).await {
                Ok(_) => {}
                Err(StoreError::Backend { detail }) if detail.contains("compacted") => {
                    return Err(StoreError::Compacted { requested: after, compacted: 0 });
                }
                Err(StoreError::Backend { detail }) if detail.contains("future revision") => {
                    let current = self.revisions().await?.0;
                    return Err(StoreError::FutureRevision { requested: after, current });
                }
                Err(err) => return Err(err),
            }
        }
        let request = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": (after + 1).to_string(),
            "prev_kv": true,
        }});
        let response = self.send("/v3/watch", &request).await?;
        let mut body = response.into_body();
        let mut buffer: Vec<u8> = Vec::new();
        // Wait for "created" so that every write after this call returns is seen.
        let mut pending: Vec<Value> = Vec::new();
        let mut created = false;
        for _ in 0..1000 {
            let Some(frame) = body.frame().await else { break };
            if let Ok(data) = frame.map_err(backend)?.into_data() {
                buffer.extend_from_slice(&data);
            }
            for message in drain_lines(&mut buffer) {
                if message.pointer("/result/created").and_then(Value::as_bool) == Some(true) {
                    created = true;
                }
                pending.push(message);
            }
            if created {
                break;
            }
        }
        if !created {
            return Err(backend("the watch was not created"));
        }
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        tokio::spawn(async move {
            let forward = |message: Value| -> bool {
                if message.pointer("/result/canceled").and_then(Value::as_bool) == Some(true) {
                    return false;
                }
                for event in message
                    .pointer("/result/events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(event) = to_event(event) else { return false };
                    if tx.try_send(event).is_err() {
                        return false;
                    }
                }
                true
            };
            for message in pending {
                if !forward(message) {
                    return;
                }
            }
            loop {
                tokio::select! {
                    frame = body.frame() => {
                        let Some(Ok(frame)) = frame else { return };
                        if let Ok(data) = frame.into_data() {
                            buffer.extend_from_slice(&data);
                        }
                        for message in drain_lines(&mut buffer) {
                            if !forward(message) {
                                return;
                            }
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        match self
            .call("/v3/kv/compaction", json!({"revision": revision.to_string(), "physical": true}))
            .await
        {
            Ok(_) => Ok(()),
            // Compacting at or below the current compaction point is a no-op, as in the
            // embedded store.
            Err(StoreError::Backend { detail }) if detail.contains("compacted") => Ok(()),
            Err(StoreError::Backend { detail }) if detail.contains("future revision") => {
                let current = self.revisions().await?.0;
                Err(StoreError::FutureRevision { requested: revision, current })
            }
            Err(err) => Err(err),
        }
    }

    async fn revisions(&self) -> Result<(i64, i64)> {
        let out = self.call("/v3/kv/range", json!({"key": b64(b"\0"), "count_only": true})).await?;
        Ok((header_revision(&out), 0))
    }
}

/// Splits complete newline-terminated JSON messages off the front of `buffer`.
fn drain_lines(buffer: &mut Vec<u8>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buffer.drain(..=end).collect();
        if let Ok(value) = serde_json::from_slice::<Value>(&line) {
            out.push(value);
        }
    }
    out
}

fn to_event(event: &Value) -> Option<Event> {
    let kv = kv_from(event.get("kv")?).ok()?;
    let prev = event.get("prev_kv").map(kv_from).transpose().ok()?;
    if event.get("type").and_then(Value::as_str) == Some("DELETE") {
        let last = prev.clone()?;
        Some(Event {
            kind: EventKind::Delete,
            kv: KeyValue { mod_revision: kv.mod_revision, ..last },
            prev,
        })
    } else {
        Some(Event { kind: EventKind::Put, kv, prev })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_and_messages() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), vec![b'a', 0x80]);
        let mut buffer = b"{\"a\":1}\n{\"b\":".to_vec();
        assert_eq!(drain_lines(&mut buffer), vec![json!({"a": 1})]);
        assert_eq!(buffer, b"{\"b\":".to_vec());
        assert!(EtcdStore::new("https://127.0.0.1:2379").is_err());
        assert!(EtcdStore::new("http://127.0.0.1:2379").is_ok());
    }

    #[test]
    fn delete_events_carry_the_last_value() {
        let event = json!({"type": "DELETE", "kv": {"key": "YQ==", "mod_revision": "5"}, "prev_kv": {"key": "YQ==", "value": "eA==", "create_revision": "2", "mod_revision": "4"}});
        let e = to_event(&event).unwrap();
        assert_eq!(e.kind, EventKind::Delete);
        assert_eq!((e.kv.mod_revision, e.kv.create_revision, &e.kv.value[..]), (5, 2, &b"x"[..]));
    }
}
