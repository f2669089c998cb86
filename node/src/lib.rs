//! weir's node runtime for the lab (`weir node`): it plays kubelet for one node.
//!
//! Contract (docs/node-runtime.md):
//! - The Node object is created when missing and its status (addresses, Ready heartbeat,
//!   kubelet endpoint) kept current.
//! - Pods bound to the node are reconciled level-triggered from a watch's full state: a pod
//!   the runtime runs but the API no longer lists is torn down even when its delete event was
//!   never seen. One task per pod ([`pod`]) owns the pod's sandbox and containers.
//! - Everything the runtime makes is recorded under the state dir before it is made; on start
//!   the runtime kills every process left in its pod cgroups, adopts the sandboxes of pods that
//!   still exist and tears down the rest, so nothing leaks across a crash.
//! - The kubelet API (logs, exec, attach) is served on plain HTTP ([`kubelet`]).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

pub mod agnhost;
pub mod cni;
pub mod kubelet;
pub mod logs;
pub mod node;
pub mod pod;
pub mod portforward;
pub mod probe;
pub mod rules;
pub mod runtime;
pub mod sandbox;
pub mod spawn;
pub mod spdy;
pub mod web;

/// `weir node`'s configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// The node's addresses (InternalIPs, pods' hostIPs): one, or one per family with the
    /// primary first, as kubelet's `--node-ip`.
    pub node_ips: Vec<IpAddr>,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cgroup: PathBuf,
    pub netns_prefix: String,
    pub cluster_dns: String,
    pub cluster_domain: String,
    /// The `weir` binary, exec'd for the built-in images (web server, DNS).
    pub weir_binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--netns-prefix must be 1-40 characters of [A-Za-z0-9_.-]: got {0:?}")]
    Prefix(String),
    #[error("--cgroup {0} is not a cgroup v2 directory (no cgroup.procs): create it first")]
    Cgroup(PathBuf),
    #[error("--cni-bin-dir {0} is not a directory")]
    CniBin(PathBuf),
    #[error("--kubeconfig {0} does not exist")]
    Kubeconfig(PathBuf),
    #[error("--node-name must be a DNS subdomain: got {0:?}")]
    NodeName(String),
    #[error(
        "--node-ip {0}: give one address, or two of different families (IPv4,IPv6) for a \
         dual-stack node"
    )]
    NodeIps(String),
}

impl Config {
    /// The primary node address (Node status.addresses' first InternalIP, pods' hostIP).
    pub fn node_ip(&self) -> IpAddr {
        self.node_ips[0]
    }

    /// Checks what can be checked before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ips = &self.node_ips;
        if ips.is_empty()
            || ips.len() > 2
            || (ips.len() == 2 && ips[0].is_ipv4() == ips[1].is_ipv4())
        {
            let text: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            return Err(ConfigError::NodeIps(text.join(",")));
        }
        let p = &self.netns_prefix;
        if p.is_empty()
            || p.len() > 40
            || !p.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(ConfigError::Prefix(p.clone()));
        }
        let n = &self.node_name;
        if n.is_empty()
            || n.len() > 253
            || !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
        {
            return Err(ConfigError::NodeName(n.clone()));
        }
        if !self.cgroup.join("cgroup.procs").exists() {
            return Err(ConfigError::Cgroup(self.cgroup.clone()));
        }
        if !self.cni_bin_dir.is_dir() {
            return Err(ConfigError::CniBin(self.cni_bin_dir.clone()));
        }
        if !self.kubeconfig.exists() {
            return Err(ConfigError::Kubeconfig(self.kubeconfig.clone()));
        }
        Ok(())
    }
}

/// State shared by the pod tasks and the kubelet API.
pub struct Shared {
    pub config: Config,
    /// Running pods by (namespace, name).
    pub pods: Mutex<HashMap<(String, String), Arc<PodShared>>>,
    /// busybox's applets (for mapping `/bin/sh` to `busybox sh`).
    pub applets: Vec<String>,
}

/// What the kubelet API needs of one pod.
pub struct PodShared {
    pub uid: String,
    /// The pod's network namespace (`/run/netns/...`), where port-forwards connect.
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub dir: PathBuf,
    pub containers: Mutex<HashMap<String, Arc<ContainerShared>>>,
}

/// What the kubelet API needs of one container.
pub struct ContainerShared {
    pub name: String,
    /// How commands exec'd into the container run.
    pub exec: rules::ExecStyle,
    pub workdir: String,
    pub env: Mutex<Vec<(String, String)>>,
    pub live: Mutex<Live>,
    /// Bumped whenever the container starts or exits.
    pub changes: watch::Sender<u64>,
    /// Output of the current run: (1 stdout | 2 stderr, bytes).
    pub output: broadcast::Sender<(u8, Bytes)>,
    pub stdin_once: bool,
    /// `spec.tty`: the container runs on a pseudo terminal (stdout and stderr merged).
    pub tty: bool,
    /// Whether a client has attached yet (the first one of a `stdinOnce` container also gets
    /// the output written before it came).
    pub attached: std::sync::atomic::AtomicBool,
}

/// A container's stdin as attach sessions share it (None once closed).
pub type StdinPipe = Arc<tokio::sync::Mutex<Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>>>;

/// The current run of a container.
#[derive(Default)]
pub struct Live {
    /// Index of the current (or last) run's log file.
    pub run: Option<u32>,
    pub pid: Option<u32>,
    pub stdin: Option<StdinPipe>,
    /// The master side of the run's pseudo terminal (`spec.tty`), for resizes.
    pub tty: Option<Arc<std::os::fd::OwnedFd>>,
    /// The run's log file and the lock its writers hold per line.
    pub log: Option<(PathBuf, Arc<Mutex<std::fs::File>>)>,
}

impl ContainerShared {
    pub fn new(
        name: &str,
        exec: rules::ExecStyle,
        workdir: &str,
        stdin_once: bool,
        tty: bool,
    ) -> Self {
        Self {
            name: name.to_string(),
            exec,
            workdir: workdir.to_string(),
            env: Mutex::new(Vec::new()),
            live: Mutex::new(Live::default()),
            changes: watch::channel(0).0,
            output: broadcast::channel(256).0,
            stdin_once,
            tty,
            attached: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn bump(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

pub use runtime::run;
