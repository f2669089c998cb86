//! The agent's HTTP endpoints: `/healthz` (200 or 503, as kube-proxy) and `/metrics`
//! (Prometheus text). Both listeners serve both paths.
use std::{convert::Infallible, path::PathBuf, sync::Arc};

use weir_common::metrics::Counter;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::status::Status;
use crate::{
    maps::read_counters_pinned,
    policy::{SharedPolicyNames, drops, nft},
};

/// Where the datapath's own counters are read at scrape time.
#[derive(Clone, Debug)]
pub enum CounterSource {
    /// The eBPF datapath's pinned maps in this directory.
    Pinned(PathBuf),
    /// The NetworkPolicy counters of this nftables table, in the agent's network namespace.
    NftPolicy(String),
    None,
}

/// Serves until the task is dropped. Connection errors are logged and do not stop the server.
/// `names` names the eBPF datapath's per-policy drop counters.
pub async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    counters: CounterSource,
    names: SharedPolicyNames,
) {
    serve_with(listener, move |request| respond(request, &status, &counters, &names)).await
}

/// Answers every request on `listener` with `respond` (HTTP/1.1), until the task is dropped.
/// Connection errors are logged and do not stop the server.
pub async fn serve_with<F>(listener: TcpListener, respond: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("http: accept failed: {err}");
                continue;
            }
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("http: connection: {err}");
            }
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    status: &Status,
    source: &CounterSource,
    names: &SharedPolicyNames,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz" | "/livez" | "/readyz" => match status.health() {
            Ok(message) => text(StatusCode::OK, message),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        "/metrics" => text(StatusCode::OK, metrics(status, source, names).trim_end().to_string()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz or /metrics".into()),
    }
}

/// The agent's metrics, with the datapath's counters read now, so they are its own.
fn metrics(status: &Status, source: &CounterSource, names: &SharedPolicyNames) -> String {
    let (counters, drops): (Vec<(Counter, u64)>, String) = match source {
        CounterSource::Pinned(pin_dir) => {
            let counters = read_counters_pinned(pin_dir).unwrap_or_else(|err| {
                log::warn!("metrics: reading datapath counters: {err}");
                Vec::new()
            });
            let drops = drops::read_drops_pinned(pin_dir)
                .map(|drops| drops::drops_metrics(&drops, names))
                .unwrap_or_else(|err| {
                    log::warn!("metrics: reading per-policy drops: {err}");
                    String::new()
                });
            (counters, drops)
        }
        CounterSource::NftPolicy(table) => match nft::inspect::drop_counters(table) {
            Ok(counters) => {
                let metrics = nft::inspect::drop_metrics(&counters);
                (metrics.reasons, drops::named_drops_metrics(&metrics.policies))
            }
            Err(err) => {
                log::warn!("metrics: reading the counters of nftables table {table}: {err}");
                (Vec::new(), String::new())
            }
        },
        CounterSource::None => (Vec::new(), String::new()),
    };
    status.metrics(&counters) + &drops
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = code;
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
