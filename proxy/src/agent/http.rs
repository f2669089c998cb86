//! The agent's HTTP endpoints: `/healthz` (200 or 503, as kube-proxy) and `/metrics`
//! (Prometheus text). Both listeners serve both paths.
use std::{convert::Infallible, path::PathBuf, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::status::Status;
use crate::{
    maps::read_counters_pinned,
    policy::{SharedPolicyNames, drops},
};

/// Serves until the task is dropped. Connection errors are logged and do not stop the server.
/// `pin_dir` holds the eBPF datapath's counters (`None`: the nftables dataplane has none).
/// `names` names the per-policy drop counters.
pub async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    pin_dir: Option<PathBuf>,
    names: SharedPolicyNames,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("http: accept failed: {err}");
                continue;
            }
        };
        let status = status.clone();
        let pin_dir = pin_dir.clone();
        let names = names.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &status, pin_dir.as_deref(), &names);
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
    pin_dir: Option<&std::path::Path>,
    names: &SharedPolicyNames,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/healthz" | "/livez" | "/readyz" => match status.health() {
            Ok(message) => text(StatusCode::OK, message),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        "/metrics" => {
            // Read at scrape time from the pinned map, so the counters are the datapath's own.
            let counters = pin_dir.map_or_else(Vec::new, |pin_dir| {
                read_counters_pinned(pin_dir).unwrap_or_else(|err| {
                    log::warn!("metrics: reading datapath counters: {err}");
                    Vec::new()
                })
            });
            let mut body = status.metrics(&counters);
            if let Some(pin_dir) = pin_dir {
                match drops::read_drops_pinned(pin_dir) {
                    Ok(drops) => body.push_str(&drops::drops_metrics(&drops, names)),
                    Err(err) => log::warn!("metrics: reading per-policy drops: {err}"),
                }
            }
            text(StatusCode::OK, body.trim_end().to_string())
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz or /metrics".into()),
    }
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
