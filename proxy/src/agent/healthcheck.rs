//! Health-check node ports, as kube-proxy serves them (its "service health server").
//!
//! A Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort` tells external
//! load balancers which nodes have endpoints of it: every node answers HTTP on that port,
//! `200` when the node has at least one local ready endpoint, `503` when it has none (so the
//! load balancer stops sending it traffic that would be dropped). The body is kube-proxy's:
//!
//! ```json
//! {"service":{"namespace":"default","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}
//! ```
//!
//! with the headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff` and
//! `X-Load-Balancing-Endpoint-Weight: <local endpoints>`. Any path is answered. A node whose
//! agent is unhealthy (its `/healthz` fails) also answers `503`, like kube-proxy 1.28+.
//!
//! The servers follow the desired state after every sync ([`HealthCheckServers::sync`]): a new
//! port starts a listener, a changed count is served from the next request on, a port no
//! longer wanted stops its listener. A port that cannot be bound (in use) is logged and tried
//! again at the next sync.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header::HeaderValue};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{http::serve_with, status::Status};
use crate::model::HealthCheck;

/// The running health-check servers of this node.
pub struct HealthCheckServers {
    address: IpAddr,
    status: Arc<Status>,
    servers: HashMap<u16, Server>,
}

struct Server {
    check: Arc<Mutex<HealthCheck>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthCheckServers {
    /// Servers listening on `address` (kube-proxy listens on every address; the agent uses
    /// the address of its own `--health-listen`).
    pub fn new(address: IpAddr, status: Arc<Status>) -> Self {
        Self { address, status, servers: HashMap::new() }
    }

    /// The ports currently served.
    #[cfg(test)]
    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().copied()
    }

    /// Makes the servers match `wanted` (port -> service and local endpoint count). Must run
    /// inside the Tokio runtime. Returns whether every wanted port is served (`false`: a port
    /// could not be bound, call again later).
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> bool {
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (&port, check) in wanted {
            if let Some(server) = self.servers.get(&port) {
                *lock(&server.check) = check.clone();
                continue;
            }
            match self.start(port, check.clone()) {
                Ok(server) => {
                    log::info!(
                        "health-check node port {port} for service {}: serving on {}",
                        check.service,
                        SocketAddr::new(self.address, port)
                    );
                    self.servers.insert(port, server);
                }
                Err(err) => log::warn!(
                    "health-check node port {port} for service {}: cannot listen on {}: {err}; \
                     retrying at the next sync",
                    check.service,
                    SocketAddr::new(self.address, port)
                ),
            }
        }
        self.servers.len() == wanted.len()
    }

    fn start(&self, port: u16, check: HealthCheck) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(SocketAddr::new(self.address, port))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let check = Arc::new(Mutex::new(check));
        let status = self.status.clone();
        let served = check.clone();
        let task = tokio::spawn(serve_with(listener, move |_| {
            let check = lock(&served).clone();
            respond(&check, status.health().is_ok())
        }));
        Ok(Server { check, task })
    }
}

fn lock(check: &Mutex<HealthCheck>) -> std::sync::MutexGuard<'_, HealthCheck> {
    // Only whole values are stored: a poisoned lock still holds a consistent one.
    check.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// kube-proxy's answer for one service.
fn respond(check: &HealthCheck, proxy_healthy: bool) -> Response<Full<Bytes>> {
    let (namespace, name) = check.service.split_once('/').unwrap_or(("default", &check.service));
    let body = json!({
        "service": { "namespace": namespace, "name": name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    if check.local_endpoints == 0 || !proxy_healthy {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("x-load-balancing-endpoint-weight", HeaderValue::from(check.local_endpoints));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use serde_json::Value;

    use super::*;

    fn check(local_endpoints: usize) -> HealthCheck {
        HealthCheck { service: "shop/web".into(), local_endpoints }
    }

    async fn body(response: Response<Full<Bytes>>) -> Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_node_with_local_endpoints_answers_200_with_kube_proxys_body() {
        let response = respond(&check(2), true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-load-balancing-endpoint-weight"], "2");
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(
            body(response).await,
            json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
                   "serviceProxyHealthy": true})
        );
    }

    #[tokio::test]
    async fn no_local_endpoint_or_an_unhealthy_agent_answers_503() {
        assert_eq!(respond(&check(0), true).status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = respond(&check(3), false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(response).await["serviceProxyHealthy"], false);
    }

    async fn get(port: u16) -> Option<(u16, Value)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream
            .write_all(b"GET /any/path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1)?;
        Some((code, serde_json::from_str(body).ok()?))
    }

    #[tokio::test]
    async fn servers_follow_the_desired_ports_and_counts() {
        let status = Arc::new(Status::new(std::time::Duration::from_secs(60)));
        status.applied(std::time::Instant::now(), Default::default());
        let mut servers = HealthCheckServers::new("127.0.0.1".parse().unwrap(), status);
        // A port the kernel picks, free when the server binds it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        servers.sync(&BTreeMap::from([(port, check(1))]));
        assert_eq!(servers.ports().collect::<Vec<_>>(), [port]);
        let (code, body) = get(port).await.expect("served");
        assert_eq!((code, body["localEndpoints"].as_u64()), (200, Some(1)));

        servers.sync(&BTreeMap::from([(port, check(0))]));
        let (code, body) = get(port).await.expect("served");
        assert_eq!((code, body["localEndpoints"].as_u64()), (503, Some(0)));

        servers.sync(&BTreeMap::new());
        assert_eq!(servers.ports().count(), 0);
        // The listener closes once its task is aborted.
        let mut closed = false;
        for _ in 0..100 {
            if get(port).await.is_none() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(closed, "port {port} still answers after its service left");
    }

    #[tokio::test]
    async fn a_busy_port_is_retried_at_the_next_sync() {
        let status = Arc::new(Status::new(std::time::Duration::from_secs(60)));
        let mut servers = HealthCheckServers::new("127.0.0.1".parse().unwrap(), status);
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        assert!(!servers.sync(&BTreeMap::from([(port, check(1))])));
        assert_eq!(servers.ports().count(), 0);
        drop(busy);
        assert!(servers.sync(&BTreeMap::from([(port, check(1))])));
        assert_eq!(servers.ports().collect::<Vec<_>>(), [port]);
    }
}
