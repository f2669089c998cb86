//! `weir dns`: the cluster's DNS server (the lab's kube-dns; also runs on real clusters).
//!
//! Watches Services, EndpointSlices and Pods, rebuilds the Kubernetes DNS records from them on
//! every change ([`records`], pure) and answers over UDP and TCP with hickory's server
//! ([`server`]). Names outside the cluster domain go to the configured upstreams
//! ([`forward`]) or are refused. The process prints `weir dns: serving <addr> ...` once the
//! first full list of every kind is loaded; queries that arrive earlier wait in the sockets.
pub mod config;
pub mod forward;
pub mod records;
pub mod server;
mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hickory_server::Server;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use thiserror::Error;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::Notify,
};

pub use self::config::{ConfigError, DnsConfig};
use self::{
    forward::Forwarder,
    server::{Current, Handler},
};

/// A TCP connection that sends no request for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Attempts to find one free port for both UDP and TCP when listening on port 0.
const FREE_PORT_ATTEMPTS: usize = 20;

#[derive(Debug, Error)]
pub enum DnsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig given and no configuration found ($KUBECONFIG, ~/.kube/config, or the \
         in-cluster service account)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot listen on {addr} ({proto}); is another DNS server using the port?")]
    Listen {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the watchers stopped before the first list completed")]
    WatchStopped,
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: DnsConfig) -> Result<(), DnsError> {
    let zone = config.validate()?;
    // Reading the kubeconfig is part of the configuration: checked before any port is bound.
    let client = client(&config).await?;
    let (udp, tcp) = bind(config.listen).await?;
    let addr = udp.local_addr().map_err(|source| DnsError::Listen {
        addr: config.listen,
        proto: "udp",
        source,
    })?;
    let changed = Arc::new(Notify::new());
    let (stores, tasks) = watch::start(&client, changed.clone());
    let abort_watchers = || tasks.iter().for_each(|t| t.abort());
    // One signal subscription for the whole run, so a signal between two waits is not lost.
    let shutdown = shutdown();
    tokio::pin!(shutdown);

    tokio::select! {
        ready = stores.ready() => if ready.is_err() {
            abort_watchers();
            return Err(DnsError::WatchStopped);
        },
        _ = &mut shutdown => {
            abort_watchers();
            return Ok(());
        }
    }

    // The SOA serial: seconds since the epoch at start, then one more per rebuild.
    let mut serial =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1);
    let current = Current::default();
    current.set(stores.records(&zone, serial));
    let handler =
        Handler { current: current.clone(), forwarder: Forwarder::new(&config.upstreams) };
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    let upstreams = if config.upstreams.is_empty() {
        "none, other names are refused".to_string()
    } else {
        config.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    // The lab and the tests wait for this line.
    println!("weir dns: serving {addr} (udp, tcp) for {zone}; upstreams: {upstreams}");

    loop {
        tokio::select! {
            _ = changed.notified() => {
                serial = serial.wrapping_add(1);
                let records = stores.records(&zone, serial);
                log::debug!("rebuilt the records: {} names, serial {serial}", records.len());
                current.set(records);
            }
            _ = &mut shutdown => break,
        }
    }
    log::info!("weir dns: shutting down");
    abort_watchers();
    if let Err(err) = server.shutdown_gracefully().await {
        log::debug!("DNS server shutdown: {err}");
    }
    Ok(())
}

/// UDP and TCP sockets on the same address; with port 0, on one port that is free for both.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let listen_error = |proto, source| DnsError::Listen { addr: listen, proto, source };
    let attempts = if listen.port() == 0 { FREE_PORT_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).await.map_err(|e| listen_error("udp", e))?;
        let bound = udp.local_addr().map_err(|e| listen_error("udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(err) => last = Some(err),
        }
    }
    let err = last.unwrap_or_else(|| std::io::Error::other("no attempt made"));
    Err(listen_error("tcp", err))
}

async fn client(config: &DnsConfig) -> Result<Client, DnsError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|source| DnsError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| DnsError::Kubeconfig { path: path.clone(), source })?
        }
        None => kube::Config::infer().await.map_err(DnsError::Infer)?,
    };
    Client::try_from(kube_config).map_err(DnsError::Client)
}

async fn shutdown() {
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
