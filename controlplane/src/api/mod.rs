//! The HTTP(S) API server: listeners, authentication, routing to discovery and resource
//! handlers.
//!
//! Contract: HTTPS with the generated serving certificate on `listen` (HTTP/1.1); optionally
//! plain HTTP on a loopback `insecure_listen` for debugging (refused on other addresses). Every
//! request except /healthz, /readyz, /livez and /version needs a bearer token (401 otherwise);
//! reader tokens may only read (403 otherwise). Bodies over [`MAX_BODY`] get 413; more than
//! `max_in_flight` concurrent non-watch requests get 429. The default, kube-system and
//! kube-public namespaces and the `kubernetes` Service exist from the first start.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use hyper::{Request, Response, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};

use crate::{
    auth::{self, Role, Tokens},
    resources::{self, SYSTEM_NAMESPACES},
    store::{EmbeddedStore, Store, embedded},
};

mod discovery;
pub(crate) mod handlers;
pub mod http;
mod proxy;
mod read_modify_write;
mod services;
pub mod status;
mod stored;
mod table;
mod watch;

use http::{Body, Query, error_response, json_response, text_response};
pub use services::{ServiceCidr, ServiceCidrs};
use status::ApiError;

/// Request bodies larger than this are refused with 413 (kube-apiserver's limit).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub insecure_listen: Option<SocketAddr>,
    pub kubeconfig_out: Option<PathBuf>,
    /// The CIDR, or pair of one IPv4 and one IPv6 CIDR (the primary family first), that
    /// Service ClusterIPs are allocated from.
    pub service_cidr: String,
    pub bookmark_interval: Duration,
    pub max_in_flight: usize,
    /// The CIDR, or IPv4,IPv6 pair, that Node pod CIDRs are allocated from (one subnet per
    /// family per node); None disables it.
    pub cluster_cidr: Option<String>,
    /// Per-node subnet mask sizes (kube-controller-manager's --node-cidr-mask-size-ipv4/-ipv6).
    pub node_cidr_mask_size_ipv4: u8,
    pub node_cidr_mask_size_ipv6: u8,
    /// Run the in-process controllers (pod CIDRs, scheduler, EndpointSlices/Endpoints).
    pub controllers: bool,
    /// Nodes that get an agent token (and `<data-dir>/nodes/NAME.kubeconfig`).
    pub node_tokens: Vec<String>,
    /// Store events kept for watches to resume from; older versions get 410 Gone.
    pub watch_history: usize,
    /// Extra HTTPS listeners inside other network namespaces: (namespace file such as
    /// /run/netns/NAME, address). Their IPs go into the serving certificate.
    pub netns_listen: Vec<(PathBuf, SocketAddr)>,
    /// The network namespace (a /run/netns file) the nodes' kubelet endpoints are reached
    /// from, for logs, exec and attach; None: this process's own namespace.
    pub node_netns: Option<PathBuf>,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            insecure_listen: None,
            kubeconfig_out: None,
            service_cidr: "10.96.0.0/12".into(),
            bookmark_interval: Duration::from_secs(60),
            max_in_flight: 400,
            watch_history: embedded::Options::default().history_limit,
            cluster_cidr: Some("10.244.0.0/16".into()),
            node_cidr_mask_size_ipv4: crate::controllers::nodeipam::DEFAULT_NODE_MASK_IPV4,
            node_cidr_mask_size_ipv6: crate::controllers::nodeipam::DEFAULT_NODE_MASK_IPV6,
            node_tokens: Vec::new(),
            controllers: true,
            netns_listen: Vec::new(),
            node_netns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "--insecure-listen {0} is not a loopback address; plain HTTP is only for local \
         debugging, use 127.0.0.1:PORT"
    )]
    InsecureNotLoopback(SocketAddr),
    #[error("--cluster-cidr: {0}")]
    BadClusterCidr(String),
    #[error("--service-cidr: {0}")]
    BadServiceCidr(String),
    #[error("binding {addr} failed: {source}; is another server using it?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr} inside the network namespace {}: {source}", path.display())]
    NetnsListen {
        path: PathBuf,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("creating the initial objects failed: {0}")]
    Bootstrap(String),
}

pub(crate) struct ApiState<S> {
    pub(crate) store: S,
    pub(crate) tokens: Tokens,
    pub(crate) config: Config,
    pub(crate) in_flight: Semaphore,
    /// Serializes Service creates and updates from picking addresses until they are stored
    /// and recorded in `allocations`.
    pub(crate) alloc_lock: tokio::sync::Mutex<()>,
    /// The ClusterIPs and NodePorts the stored Services hold. This server must be the only
    /// writer of Services in the store (also with etcd): others' writes are picked up only by
    /// the periodic repair.
    pub(crate) allocations: std::sync::Mutex<services::Allocations>,
    pub(crate) server_address: String,
    /// Watch event lines shared among the watchers that send them.
    pub(crate) watch_lines: watch::SharedLines,
}

/// A started server; dropping it (or [`RunningServer::shutdown`]) stops it.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub insecure_addr: Option<SocketAddr>,
    /// The listeners inside other network namespaces (namespace file, bound address).
    pub netns_addrs: Vec<(PathBuf, SocketAddr)>,
    pub admin_token: String,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// Stops accepting, closes every connection (watches included).
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }

    /// Runs until a listener fails (it does not on its own).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts the server with the etcd store at `endpoint` (the data dir still holds the
/// certificates and tokens).
pub async fn start_with_etcd(config: Config, endpoint: &str) -> Result<RunningServer, ServerError> {
    let store = crate::store::EtcdStore::new(endpoint)?;
    start_with_store(config, store).await
}

/// Starts the server with the embedded store in `<data-dir>/store`.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let options =
        embedded::Options { history_limit: config.watch_history.max(1), ..Default::default() };
    let store = EmbeddedStore::open(&config.data_dir.join("store"), options)?;
    start_with_store(config, store).await
}

/// Starts the server on any store.
pub async fn start_with_store<S: Store>(
    config: Config,
    store: S,
) -> Result<RunningServer, ServerError> {
    if let Some(addr) = config.insecure_listen
        && !addr.ip().is_loopback()
    {
        return Err(ServerError::InsecureNotLoopback(addr));
    }
    let service_cidrs =
        ServiceCidrs::parse(&config.service_cidr).map_err(ServerError::BadServiceCidr)?;
    let cluster_cidr = match &config.cluster_cidr {
        Some(cidr) => Some(
            crate::controllers::nodeipam::ClusterCidrs::parse(
                cidr,
                config.node_cidr_mask_size_ipv4,
                config.node_cidr_mask_size_ipv6,
            )
            .map_err(ServerError::BadClusterCidr)?,
        ),
        None => None,
    };
    let mut san_ips: Vec<std::net::IpAddr> =
        config.netns_listen.iter().map(|(_, a)| a.ip()).collect();
    if !config.listen.ip().is_unspecified() {
        san_ips.push(config.listen.ip());
    }
    let pki = auth::ensure_pki(&config.data_dir.join("pki"), &san_ips)?;
    let tls = auth::tls_config(&pki)?;
    let mut tokens = Tokens::ensure(&config.data_dir)?;
    tokens.ensure_nodes(&config.data_dir, &config.node_tokens)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let insecure = match config.insecure_listen {
        Some(want) => {
            let l = TcpListener::bind(want)
                .await
                .map_err(|source| ServerError::Bind { addr: want, source })?;
            let a = l.local_addr().map_err(|source| ServerError::Bind { addr: want, source })?;
            Some((l, a))
        }
        None => None,
    };
    let mut netns_listeners = Vec::new();
    for (path, want) in &config.netns_listen {
        let netns_error =
            |source| ServerError::NetnsListen { path: path.clone(), addr: *want, source };
        let std_listener = crate::netns::listen_in(path, *want).map_err(netns_error)?;
        let bound = std_listener.local_addr().map_err(netns_error)?;
        let listener = TcpListener::from_std(std_listener).map_err(netns_error)?;
        netns_listeners.push((path.clone(), bound, listener));
    }
    let admin = tokens.for_user("admin").map(|e| e.token.clone()).unwrap_or_default();
    let state = Arc::new(ApiState {
        store,
        tokens,
        in_flight: Semaphore::new(config.max_in_flight),
        alloc_lock: tokio::sync::Mutex::new(()),
        allocations: std::sync::Mutex::new(services::Allocations::new(service_cidrs)),
        server_address: addr.to_string(),
        config: config.clone(),
        watch_lines: Default::default(),
    });
    handlers::repair_allocations(&state).await.map_err(|e| ServerError::Bootstrap(e.message))?;
    bootstrap(&state).await?;
    if let Some(path) = &config.kubeconfig_out {
        let text = auth::kubeconfig(&format!("https://{addr}"), Some(&pki.ca_pem), &admin, "admin");
        auth::write_kubeconfig(path, &text)?;
    }
    for node in &config.node_tokens {
        let user = format!("system:node:{node}");
        let token = tokens_for_kubeconfig(&state.tokens, &user);
        let text = auth::kubeconfig(&format!("https://{addr}"), Some(&pki.ca_pem), &token, &user);
        auth::write_kubeconfig(
            &config.data_dir.join("nodes").join(format!("{node}.kubeconfig")),
            &text,
        )?;
    }
    let mut tasks = JoinSet::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tasks.spawn(accept_loop(listener, Some(acceptor.clone()), state.clone()));
    let mut netns_addrs = Vec::new();
    for (path, bound, listener) in netns_listeners {
        tasks.spawn(accept_loop(listener, Some(acceptor.clone()), state.clone()));
        netns_addrs.push((path, bound));
    }
    tasks.spawn(namespace_finalizer(state.clone()));
    tasks.spawn(allocation_repair(state.clone()));
    if config.controllers {
        tasks.spawn(crate::controllers::run(state.clone(), cluster_cidr));
    }
    let insecure_addr = insecure.as_ref().map(|(_, a)| *a);
    if let Some((l, _)) = insecure {
        tasks.spawn(accept_loop(l, None, state.clone()));
    }
    log::info!("weir apiserver: serving https://{addr}");
    Ok(RunningServer { addr, insecure_addr, netns_addrs, admin_token: admin, tasks })
}

fn tokens_for_kubeconfig(tokens: &Tokens, user: &str) -> String {
    tokens.for_user(user).map(|e| e.token.clone()).unwrap_or_default()
}

async fn bootstrap<S: Store>(state: &Arc<ApiState<S>>) -> Result<(), ServerError> {
    let ns = resources::find("", "v1", "namespaces").expect("namespaces are served");
    for name in SYSTEM_NAMESPACES {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        handlers::create_if_missing(state, ns, None, obj)
            .await
            .map_err(|e| ServerError::Bootstrap(e.message))?;
    }
    let svc = resources::find("", "v1", "services").expect("services are served");
    // Single-stack on the primary family, as kube-apiserver's.
    let address = state.allocations.lock().expect("allocations lock").cidrs().primary().first();
    let kubernetes = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": address.to_string(), "ipFamilyPolicy": "SingleStack", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}
    });
    handlers::create_if_missing(state, svc, Some("default"), kubernetes)
        .await
        .map_err(|e| ServerError::Bootstrap(e.message))?;
    Ok(())
}

/// How often the Service allocations are reconciled with the store (kube-apiserver: 3 min).
const ALLOCATION_REPAIR: Duration = Duration::from_secs(180);

async fn allocation_repair<S: Store>(state: Arc<ApiState<S>>) {
    loop {
        tokio::time::sleep(ALLOCATION_REPAIR).await;
        if let Err(err) = handlers::repair_allocations(&state).await {
            log::warn!("service allocation repair: {}", err.message);
        }
    }
}

async fn namespace_finalizer<S: Store>(state: Arc<ApiState<S>>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        ticker.tick().await;
        if let Err(err) = handlers::finalize_namespaces(&state).await {
            log::warn!("namespace finalizer: {}", err.message);
        }
    }
}

async fn accept_loop<S: Store>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<ApiState<S>>,
) {
    // Connections live in this set: when the loop is aborted they are all closed with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        log::warn!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    let result = match tls {
                        Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => builder.serve_connection(TokioIo::new(tls_stream), service).with_upgrades().await,
                            Ok(Err(err)) => {
                                log::debug!("TLS handshake failed: {err}");
                                return;
                            }
                            Err(_) => return,
                        },
                        None => builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await,
                    };
                    if let Err(err) = result {
                        log::debug!("connection ended: {err}");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle<S: Store>(state: Arc<ApiState<S>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let response = route(state, req).await.unwrap_or_else(|err| error_response(&err));
    log::debug!("{method} {path} -> {}", response.status());
    response
}

async fn route<S: Store>(
    state: Arc<ApiState<S>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["healthz" | "readyz" | "livez", ..] => return Ok(text_response(200, "ok")),
        ["version"] => return Ok(json_response(200, &discovery::version())),
        _ => {}
    }
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let entry = state.tokens.authenticate(authorization).ok_or_else(ApiError::unauthorized)?;
    let role = entry.role;
    // exec, attach and portforward reach into a Pod: writes, whatever the method (kubectl's
    // WebSocket client uses GET), as Kubernetes authorizes them as `create pods/exec`.
    let runs_commands = matches!(segments.last(), Some(&("exec" | "attach" | "portforward")));
    let read_only = (req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD)
        && !runs_commands;
    if role == Role::Node && !read_only {
        let node = entry.user.strip_prefix("system:node:").unwrap_or("");
        if !auth::node_may_write(node, req.method().as_str(), &segments) {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} may not {} {path}: node tokens write only their own Node, Pod status and Events",
                    entry.user,
                    req.method()
                ),
            ));
        }
    }
    if role == Role::Reader && !read_only {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!("this token may only read; {} {path} is forbidden", req.method()),
        ));
    }
    let get = |value: Option<serde_json::Value>| match (read_only, value) {
        (false, _) => Err(ApiError::method_not_allowed(req.method().as_str())),
        (true, Some(v)) => Ok(json_response(200, &v)),
        (true, None) => Err(ApiError::no_route()),
    };
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if let (true, ["api"] | ["apis"]) = (read_only, segments.as_slice())
        && let Some(media_type) = discovery::aggregated_media_type(accept)
    {
        let version = if media_type.contains("v=v2beta1") { "v2beta1" } else { "v2" };
        let document = discovery::aggregated_discovery(segments[0] == "api", version);
        let mut response = json_response(200, &document);
        let value = header::HeaderValue::from_str(&media_type).expect("a valid media type");
        response.headers_mut().insert(header::CONTENT_TYPE, value);
        return Ok(response);
    }
    match segments.as_slice() {
        ["api"] => return get(Some(discovery::api_versions(&state.server_address))),
        ["api", version] => return get(discovery::api_resource_list("", version)),
        ["apis"] => return get(Some(discovery::api_group_list())),
        ["apis", group] => return get(discovery::api_group(group)),
        ["apis", group, version] => return get(discovery::api_resource_list(group, version)),
        ["openapi", "v3"] => return get(Some(discovery::openapi_v3_index())),
        ["openapi", "v3", rest @ ..] => {
            return get(discovery::openapi_v3_document(&rest.join("/")));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", version, rest),
        ["apis", group, version, rest @ ..] => (group, version, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (group, version) = (group.to_string(), version.to_string());
    let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    // Watches and the streams proxied to nodes are long-running: not counted as in flight.
    let _permit = if Query::parse(req.uri().query()).flag("watch")
        || rest.first().map(String::as_str) == Some("watch")
        || matches!(
            rest.last().map(String::as_str),
            Some("log" | "exec" | "attach" | "portforward")
        ) {
        None
    } else {
        Some(state.in_flight.try_acquire().map_err(|_| ApiError::too_many_requests())?)
    };
    handlers::resource_request(state.clone(), req, &group, &version, rest).await
}
