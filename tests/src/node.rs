//! A lab node for the node-runtime tests: a test API server, a node namespace with an address
//! and weir-cni's conflist, a test cgroup, and `weir node` running inside the namespace.
//!
//! The API server listens on 127.0.0.1 of the root namespace; the node reaches it through a
//! loopback forwarder the test process runs inside the node namespace (traffic stays on
//! loopback), and it reaches the node's kubelet API from inside the node namespace
//! (`--node-netns`), so kubectl exec/attach/logs work against `api.kubeconfig`. On drop the runtime is killed (SIGKILL), then every pod cgroup, every pod
//! namespace with the node's prefix, the node namespace, the IPAM store and the temp dirs are
//! removed, also when the test failed.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    apiserver::{ApiServer, TempDir, http_request, weir_binary},
    cgroup::TestCgroup,
    cni::{self, Node},
    names,
    process::command_in,
    wait::eventually,
};

/// The node's address (on its loopback; pods reach it through their default route).
pub const NODE_IP: &str = "10.200.0.1";
/// The kubelet API port.
pub const KUBELET_PORT: u16 = 10250;
/// The pod CIDR of the test node's IPAM.
pub const POD_SUBNET: &str = "10.244.7.0/24";
/// Network name in the conflist (names the IPAM store).
pub const NETWORK: &str = "weirt-lab";

/// Forwards connections accepted inside a namespace to an address of the root namespace.
struct Forwarder {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    port: u16,
}

impl Forwarder {
    fn start(node: &Node, target: SocketAddr) -> Forwarder {
        let listener = node
            .ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .expect("entering the node namespace")
            .expect("binding the forwarder");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inner, _)) => {
                        let _ = inner.set_nonblocking(false);
                        let Ok(outer) = TcpStream::connect(target) else { continue };
                        pipe(inner, outer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Forwarder { stop, accept: Some(accept), port }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Everything one node test needs.
pub struct LabNode {
    runtime: Option<Child>,
    pub prefix: String,
    pub state_dir: TempDir,
    pub conf_dir: TempDir,
    pub kubeconfig: PathBuf,
    pub cgroup: TestCgroup,
    _forwarder: Forwarder,
    pub api: ApiServer,
    _api_dir: TempDir,
    pub node: Node,
}

impl LabNode {
    /// API server, node namespace, conflist; the runtime is started by [`LabNode::start`].
    // Not `Default`: it starts processes and creates namespaces.
    #[allow(clippy::new_without_default)]
    pub fn new() -> LabNode {
        crate::privileged::require_root();
        let _ = weir_binary();
        let node = Node::new().expect("node namespace");
        let api_dir = TempDir::new("api");
        // The API server reaches the node runtime (exec, attach, logs through the pod proxy)
        // from inside the node namespace, as in the lab.
        let node_netns = node.ns.path();
        let api = ApiServer::start_with(
            api_dir.path(),
            &["--disable-controllers", "--node-netns", node_netns.to_str().expect("utf-8")],
        );
        node.ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]).expect("node address");
        let forwarder = Forwarder::start(&node, api.addr);
        let admin = std::fs::read_to_string(&api.kubeconfig).expect("admin kubeconfig");
        let kubeconfig = node.data_dir.path().join("node.kubeconfig");
        std::fs::write(
            &kubeconfig,
            admin.replace(
                &format!("https://{}", api.addr),
                &format!("https://127.0.0.1:{}", forwarder.port),
            ),
        )
        .expect("writing the node kubeconfig");
        let conf_dir = TempDir::new("cni-conf");
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{
                "type": "weir-cni",
                "ipam": {"ranges": [[{"subnet": POD_SUBNET}]], "dataDir": node.data_dir.path()},
            }],
        });
        std::fs::write(conf_dir.path().join("10-weir.conflist"), conflist.to_string())
            .expect("writing the conflist");
        let _ = cni::weir_cni();
        LabNode {
            runtime: None,
            prefix: format!("{}-", names::unique("p")),
            state_dir: TempDir::new("node-state"),
            conf_dir,
            kubeconfig,
            cgroup: TestCgroup::new("node").expect("test cgroup"),
            _forwarder: forwarder,
            api,
            _api_dir: api_dir,
            node,
        }
    }

    /// Starts `weir node` inside the node namespace and waits until it is ready.
    pub fn start(&mut self) {
        assert!(self.runtime.is_none(), "the runtime is already running");
        let bin_dir = cni::weir_cni().parent().expect("bin dir").to_path_buf();
        let mut cmd = command_in(&self.node.ns, None, weir_binary().to_str().expect("utf-8"))
            .expect("command in the node namespace");
        cmd.arg("node")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", "node-a", "--node-ip", NODE_IP])
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .arg("--cni-bin-dir")
            .arg(&bin_dir)
            .arg("--cni-conf-dir")
            .arg(self.conf_dir.path())
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .args(["--netns-prefix", &self.prefix])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawning weir node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.runtime = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("weir node did not report ready within 30 s");
            if line == "weir node: ready" {
                break;
            }
        }
    }

    /// SIGKILL of the runtime (a crash); its pods keep running.
    pub fn kill_runtime(&mut self) {
        if let Some(mut child) = self.runtime.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn kubelet_addr(&self) -> SocketAddr {
        SocketAddr::new(NODE_IP.parse().expect("ip"), KUBELET_PORT)
    }

    /// A GET on the kubelet API from inside the node namespace: (status, body).
    pub fn kubelet_get(&self, path: &str) -> (u16, String) {
        let addr = self.kubelet_addr();
        let resp = self
            .node
            .ns
            .run(|| http_request(addr, "GET", path, None, "", b""))
            .expect("entering the node namespace");
        (resp.status, String::from_utf8_lossy(&resp.body).into_owned())
    }

    /// A TCP connection opened inside the node namespace.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.node
            .ns
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .expect("entering the node namespace")
    }

    /// Creates a pod on node-a in `default`; returns it.
    pub fn create_pod(&self, name: &str, spec: Value) -> Value {
        let mut spec = spec;
        spec["nodeName"] = json!("node-a");
        let (code, pod) = self.api.json(
            "POST",
            "/api/v1/namespaces/default/pods",
            Some(&json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "namespace": "default"}, "spec": spec})),
        );
        assert_eq!(code, 201, "creating pod {name}: {pod}");
        pod
    }

    pub fn pod(&self, name: &str) -> Value {
        let (code, pod) =
            self.api.json("GET", &format!("/api/v1/namespaces/default/pods/{name}"), None);
        if code == 404 {
            return Value::Null;
        }
        assert_eq!(code, 200, "getting pod {name}: {pod}");
        pod
    }

    pub fn delete_pod(&self, name: &str) {
        let (code, body) = self.api.json(
            "DELETE",
            &format!("/api/v1/namespaces/default/pods/{name}?gracePeriodSeconds=0"),
            None,
        );
        assert!(code == 200 || code == 202, "deleting pod {name}: {code} {body}");
    }

    /// Waits until `check(pod)` is true; returns the pod.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        eventually(&format!("pod {name}: {what}"), timeout, || {
            last = self.pod(name);
            if check(&last) { None } else { Some(last["status"].to_string()) }
        });
        last
    }

    /// Waits for phase Running and a pod IP; returns the IP.
    pub fn wait_running(&self, name: &str) -> String {
        let pod = self.wait_pod(name, "Running with an IP", Duration::from_secs(30), |p| {
            p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
        });
        pod["status"]["podIP"].as_str().expect("podIP").to_string()
    }

    /// Pod namespaces, pod cgroups and IPAM reservations left on the node.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .map(|n| format!("netns {n}"))
            .collect();
        left.extend(
            std::fs::read_dir(self.cgroup.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| format!("cgroup {}", e.path().display())),
        );
        left.extend(
            self.node
                .reservations(NETWORK)
                .unwrap_or_default()
                .into_iter()
                .map(|r| format!("ip {r}")),
        );
        let procs = std::fs::read_to_string(self.cgroup.procs_file()).unwrap_or_default();
        if !procs.trim().is_empty() {
            left.push(format!("processes {}", procs.trim()));
        }
        left
    }

    /// Waits until nothing of any pod is left.
    pub fn assert_clean(&self) {
        eventually("the node is clean", Duration::from_secs(30), || {
            let left = self.leftovers();
            if left.is_empty() { None } else { Some(format!("{left:?}")) }
        });
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.kill_runtime();
        if let Ok(entries) = std::fs::read_dir(self.cgroup.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.join("cgroup.procs").exists() {
                    let _ = std::fs::write(path.join("cgroup.kill"), "1");
                    for _ in 0..100 {
                        if std::fs::remove_dir(&path).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    let _ = crate::netns::ip(&["netns", "del", &name]);
                }
            }
        }
    }
}

/// Reads from `stream` until `done(text so far)` or `timeout`; returns the text.
pub fn read_until(
    stream: &mut TcpStream,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    stream.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    while Instant::now() < deadline {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if done(&text) {
            return text;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// Sends a GET with keep-alive on `stream` (for streaming responses).
pub fn send_get(stream: &mut TcpStream, host: SocketAddr, path: &str) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("writing the request");
}
