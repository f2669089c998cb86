//! Running the real `weir agent` process in tests, against a test API server, with a test pin
//! directory and cgroup. Killed on drop.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::{
    apiserver::{ApiServer, http_request, try_http_request, weir_binary},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    dataplane::{Dataplane, table_name},
    names,
    netns::{Netns, run_in},
    process::command_in,
    relay::Relay,
};

/// How long an agent may take to report its first sync.
const START_WAIT: Duration = Duration::from_secs(30);
const STOP_WAIT: Duration = Duration::from_secs(10);

pub struct AgentProcess {
    child: Option<Child>,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    /// What the agent printed on stdout until it was ready.
    pub lines: Vec<String>,
    /// The namespace the agent (and its listeners) run in, when not the test's own.
    netns: Option<PathBuf>,
    /// The agent's `--flows-socket` (in a unique temp dir, removed on drop).
    pub flows_socket: PathBuf,
    _flows_dir: crate::apiserver::TempDir,
}

/// Where and how [`AgentProcess::start_with`] runs an agent.
pub struct AgentOptions<'a> {
    pub kubeconfig: &'a Path,
    pub node_name: &'a str,
    /// The namespace the agent runs in (the root namespace when `None`).
    pub netns: Option<&'a Netns>,
    pub extra_args: Vec<String>,
    /// A stdout line prefix to wait for besides the first sync.
    pub wait_for: Option<&'a str>,
}

/// Where a test agent runs and what it programs.
pub enum AgentSetup<'a> {
    /// eBPF: the agent runs in the test's namespace, maps pinned in a test pin directory, the
    /// socket load balancer on a test cgroup (clients run in it).
    Ebpf { pins: TestPinDir, cgroup: TestCgroup },
    /// nftables: the agent runs inside `netns` and programs a uniquely named table there; it
    /// reaches the API server through a relay on that namespace's loopback.
    Nftables { netns: &'a Netns, table: String, relay: Relay, kubeconfig: PathBuf },
}

impl<'a> AgentSetup<'a> {
    /// Everything an agent of `dataplane` needs to serve the clients in `client`.
    pub fn new(dataplane: Dataplane, client: &'a Netns, server: &ApiServer, role: &str) -> Self {
        match dataplane {
            Dataplane::Ebpf => AgentSetup::Ebpf {
                pins: TestPinDir::new(role).expect("test pin dir"),
                cgroup: TestCgroup::new(role).expect("test cgroup"),
            },
            Dataplane::Nftables => {
                let (relay, kubeconfig) = relayed_kubeconfig(server, client, role);
                AgentSetup::Nftables { netns: client, table: table_name(role), relay, kubeconfig }
            }
        }
    }

    pub fn dataplane(&self) -> Dataplane {
        match self {
            AgentSetup::Ebpf { .. } => Dataplane::Ebpf,
            AgentSetup::Nftables { .. } => Dataplane::Nftables,
        }
    }

    /// The cgroup clients must run in (eBPF only).
    pub fn cgroup(&self) -> Option<&TestCgroup> {
        match self {
            AgentSetup::Ebpf { cgroup, .. } => Some(cgroup),
            AgentSetup::Nftables { .. } => None,
        }
    }
}

/// A relay from `netns`'s loopback to the API server, and a kubeconfig naming it: for an agent
/// running inside `netns`.
pub fn relayed_kubeconfig(server: &ApiServer, netns: &Netns, role: &str) -> (Relay, PathBuf) {
    let relay = Relay::start(netns, server.addr).expect("API relay");
    let original = std::fs::read_to_string(&server.kubeconfig).expect("kubeconfig");
    let rewritten =
        original.replace(&format!("https://{}", server.addr), &format!("https://{}", relay.addr));
    assert_ne!(original, rewritten, "the kubeconfig names https://{}", server.addr);
    let kubeconfig = server.data_dir.join(format!("{}.kubeconfig", names::unique(role)));
    std::fs::write(&kubeconfig, rewritten).expect("writing the relayed kubeconfig");
    (relay, kubeconfig)
}

impl Drop for AgentSetup<'_> {
    fn drop(&mut self) {
        // Agents leave their table behind on exit (kube-proxy's behaviour); the test removes it.
        if let AgentSetup::Nftables { netns, table, .. } = self {
            let removed = netns.run(|| {
                weir_proxy::apply::nft::NftDataplane::open(table).and_then(|t| t.remove_table())
            });
            if !matches!(removed, Ok(Ok(()))) {
                eprintln!("warning: could not remove nftables table {table}: {removed:?}");
            }
        }
    }
}

impl AgentProcess {
    /// Starts `weir agent` (node `node-a`, eBPF) and waits for its first sync.
    pub fn start(server: &ApiServer, pins: &TestPinDir, cgroup: &TestCgroup) -> AgentProcess {
        let options = AgentOptions {
            kubeconfig: &server.kubeconfig,
            node_name: "node-a",
            netns: None,
            extra_args: Vec::new(),
            wait_for: None,
        };
        AgentProcess::start_with(&options, pins, cgroup)
    }

    /// Starts an eBPF `weir agent` as `options` say and waits for its first sync (and the line
    /// `options.wait_for`).
    pub fn start_with(
        options: &AgentOptions,
        pins: &TestPinDir,
        cgroup: &TestCgroup,
    ) -> AgentProcess {
        let mut command = match options.netns {
            Some(ns) => command_in(ns, None, &weir_binary().to_string_lossy())
                .expect("preparing weir agent in a namespace"),
            None => Command::new(weir_binary()),
        };
        command
            .arg("agent")
            .arg("--kubeconfig")
            .arg(options.kubeconfig)
            .args(&options.extra_args)
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--cgroup")
            .arg(cgroup.path());
        Self::spawn(command, options.node_name, options.netns.map(Netns::path), options.wait_for)
    }

    /// Starts `weir agent` (node `node-a`) on the dataplane of `setup` and waits for its first
    /// sync.
    pub fn start_on(server: &ApiServer, setup: &AgentSetup<'_>) -> AgentProcess {
        match setup {
            AgentSetup::Ebpf { pins, cgroup } => Self::start(server, pins, cgroup),
            AgentSetup::Nftables { netns, table, kubeconfig, .. } => {
                let mut command = command_in(netns, None, &weir_binary().to_string_lossy())
                    .expect("preparing weir agent in the namespace");
                command.arg("agent").arg("--kubeconfig").arg(kubeconfig).args([
                    "--dataplane",
                    "nftables",
                    "--nft-table",
                    table,
                ]);
                Self::spawn(command, "node-a", Some(netns.path()), None)
            }
        }
    }

    fn spawn(
        mut command: Command,
        node_name: &str,
        netns: Option<PathBuf>,
        wait_for: Option<&str>,
    ) -> AgentProcess {
        let flows_dir = crate::apiserver::TempDir::new("flows");
        let flows_socket = flows_dir.path().join("flows.sock");
        let mut child = command
            .args(["--node-name", node_name])
            .arg("--flows-socket")
            .arg(&flows_socket)
            .args(["--health-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            // WEIR_TEST_AGENT_LOG (a RUST_LOG filter) shows more of what the agent does.
            .env("RUST_LOG", std::env::var("WEIR_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir agent");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut health, mut metrics) = (None, None);
        let deadline = Instant::now() + START_WAIT;
        let (mut synced, mut waited) = (false, wait_for.is_none());
        let mut lines = Vec::new();
        while !(synced && waited) {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
                panic!("weir agent did not report its first sync (and {wait_for:?}) in time; it printed {lines:?}")
            });
            if let Some(addr) = line.strip_prefix("weir agent: serving health on http://") {
                health = addr.parse().ok();
            } else if let Some(addr) = line.strip_prefix("weir agent: serving metrics on http://") {
                metrics = addr.parse().ok();
            } else if line.starts_with("weir agent: first sync done") {
                synced = true;
            }
            if wait_for.is_some_and(|prefix| line.starts_with(prefix)) {
                waited = true;
            }
            lines.push(line);
        }
        AgentProcess {
            child: Some(child),
            health: health.expect("health address"),
            metrics: metrics.expect("metrics address"),
            lines,
            netns,
            flows_socket,
            _flows_dir: flows_dir,
        }
    }

    /// `GET path` on one of the agent's listeners: (status, body).
    pub fn get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        let request = || http_request(addr, "GET", path, None, "", b"");
        let response = match &self.netns {
            Some(netns) => run_in(netns, request).expect("entering the agent's namespace"),
            None => request(),
        };
        (response.status, String::from_utf8_lossy(&response.body).into_owned())
    }

    /// Like [`AgentProcess::get`], or `None` when nothing answers HTTP on `addr` (in the
    /// agent's namespace).
    pub fn try_get(&self, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        let request = || try_http_request(addr, "GET", path, None, "", b"");
        let response = match &self.netns {
            Some(netns) => run_in(netns, request).expect("entering the agent's namespace"),
            None => request(),
        };
        response.ok().map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
    }

    /// The agent's process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits (bounded) for a clean exit; panics if it does not exit cleanly.
    pub fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on the PID of a child we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "weir agent exited with {status} on SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("weir agent did not exit within {STOP_WAIT:?} of SIGTERM");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of the default namespace's EndpointSlices.
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// Creates Service `default/<name>` without a selector (its endpoints come from
/// [`endpoint_slice`], as for any selector-less service) with port `http` 80 -> 8080, and
/// returns the cluster IP the API server allocated.
pub fn create_service(api: &ApiServer, name: &str) -> String {
    let (code, service) = api.json(
        "POST",
        "/api/v1/namespaces/default/services",
        Some(&json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})),
    );
    assert_eq!(code, 201, "creating service {name}: {service}");
    service["spec"]["clusterIP"].as_str().expect("an allocated clusterIP").to_string()
}

/// EndpointSlice `<service>-1` for service `service` with ready endpoints on port 8080.
pub fn endpoint_slice(service: &str, backends: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Creates the [`endpoint_slice`] of `service`.
pub fn create_endpoint_slice(api: &ApiServer, service: &str, backends: &[Ipv4Addr]) {
    let (code, body) = api.json("POST", SLICES, Some(&endpoint_slice(service, backends)));
    assert_eq!(code, 201, "creating the endpoint slice of {service}: {body}");
}
