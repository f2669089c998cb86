//! `weir agent` end to end: the real agent process against weir's API server (real HTTPS,
//! kube-rs watchers), programming the socket load balancer for a test cgroup. Service and
//! EndpointSlice changes made through the API reach real TCP connections; /healthz and
//! /metrics answer; a SIGKILLed agent leaves the datapath working and its successor adopts it
//! without rewriting anything.
use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_tests::{
    apiserver::{ApiServer, TempDir, http_request, weir_binary},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    privileged::require_root,
    probe::spread,
    topology::ServiceNet,
};

const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 3);
const WAIT: Duration = Duration::from_secs(15);

/// A running `weir agent`, killed on drop.
struct Agent {
    child: Child,
    health: SocketAddr,
    metrics: SocketAddr,
}

impl Agent {
    fn start(server: &ApiServer, pins: &TestPinDir, cgroup: &TestCgroup) -> Agent {
        let mut child = Command::new(weir_binary())
            .arg("agent")
            .arg("--kubeconfig")
            .arg(&server.kubeconfig)
            .args(["--node-name", "node-a"])
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--cgroup")
            .arg(cgroup.path())
            .args(["--health-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir agent");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut health, mut metrics) = (None, None);
        let deadline = Instant::now() + WAIT;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("weir agent did not report its first sync in time");
            if let Some(addr) = line.strip_prefix("weir agent: serving health on http://") {
                health = addr.parse().ok();
            } else if let Some(addr) = line.strip_prefix("weir agent: serving metrics on http://") {
                metrics = addr.parse().ok();
            } else if line.starts_with("weir agent: first sync done") {
                break;
            }
        }
        Agent { child, health: health.unwrap(), metrics: metrics.unwrap() }
    }

    fn get(&self, addr: SocketAddr, path: &str) -> (u16, String) {
        let response = http_request(addr, "GET", path, None, "", b"");
        (response.status, String::from_utf8_lossy(&response.body).into_owned())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 100 ms until it holds or [`WAIT`] passes.
fn eventually(what: &str, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match check() {
            None => return,
            Some(state) => last = state,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen within {WAIT:?}; last state: {last}");
}

/// The frontends the API's services call for: one per port of every service with a cluster IP
/// (the API server's own `kubernetes` service included, as in every cluster).
fn cluster_ip_ports(api: &ApiServer) -> usize {
    let (code, list) = api.json("GET", "/api/v1/services", None);
    assert_eq!(code, 200, "{list}");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["spec"]["clusterIP"].as_str().is_some_and(|ip| ip != "None"))
        .map(|s| s["spec"]["ports"].as_array().map_or(0, Vec::len))
        .sum()
}

fn slice(backends: &[Ipv4Addr]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": backends.iter().map(|ip| json!({"addresses": [ip.to_string()],
                                                     "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

#[test]
fn lb_agent_programs_services_from_the_api_server_and_survives_its_own_restart() {
    require_root();
    let net = ServiceNet::new("agent", 205, 2).unwrap();
    assert_eq!(net.backends, [BACKEND_A, BACKEND_B]);
    let client = &net.client;
    let cgroup = TestCgroup::new("agent").unwrap();
    let pins = TestPinDir::new("agent").unwrap();
    let data = TempDir::new("agent-api");
    let api = ApiServer::start(data.path());

    let (code, service) = api.json(
        "POST",
        "/api/v1/namespaces/default/services",
        Some(&json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "web", "namespace": "default"},
                     "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})),
    );
    assert_eq!(code, 201, "{service}");
    let vip = service["spec"]["clusterIP"].as_str().expect("allocated clusterIP").to_string();
    let slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    let (code, body) = api.json("POST", slices, Some(&slice(&[BACKEND_A, BACKEND_B])));
    assert_eq!(code, 201, "{body}");

    let mut agent = Agent::start(&api, &pins, &cgroup);
    eventually("traffic to the service reaching both backends", || {
        let result = spread(client, Some(&cgroup), &format!("{vip}:80"), 100);
        (result["backends"].as_object().map(|b| b.len()) != Some(2)).then(|| result.to_string())
    });
    assert_eq!(agent.get(agent.health, "/healthz").0, 200);

    // An endpoint removed through the API stops receiving connections.
    let (code, body) = api.json(
        "PATCH",
        &format!("{slices}/web-1"),
        Some(&json!({"endpoints": [
            {"addresses": [BACKEND_A.to_string()], "conditions": {"ready": true}}]})),
    );
    assert_eq!(code, 200, "{body}");
    eventually("the removed endpoint leaving the rotation", || {
        let result = spread(client, Some(&cgroup), &format!("{vip}:80"), 50);
        (result["backends"].as_object().map(|b| b.len()) != Some(1)).then(|| result.to_string())
    });
    let (code, metrics) = agent.get(agent.metrics, "/metrics");
    assert_eq!(code, 200);
    let frontends = format!("weir_service_frontends {}", cluster_ip_ports(&api));
    assert!(metrics.contains(&frontends), "{frontends}: {metrics}");
    assert!(
        metrics.contains("weir_datapath_events_total{reason=\"sock_translated\"}"),
        "{metrics}"
    );

    // `weir inspect services` shows the live maps.
    let inspect = Command::new(weir_binary())
        .args(["inspect", "services", "--output", "json", "--pin-dir"])
        .arg(pins.path())
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{inspect:?}");
    let rows: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let web = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["frontend"] == format!("{vip}:80"))
        .unwrap_or_else(|| panic!("{vip}:80 in {rows}"));
    assert_eq!(web["backends"], json!([format!("{BACKEND_A}:8080")]), "{web}");
    assert_eq!(web["protocol"], "TCP");

    // SIGKILL: the datapath keeps working without an agent; the next one adopts it as it is.
    agent.kill();
    assert_eq!(spread(client, Some(&cgroup), &format!("{vip}:80"), 20)["ok"], true);
    let agent = Agent::start(&api, &pins, &cgroup);
    let (_, metrics) = agent.get(agent.metrics, "/metrics");
    assert!(
        metrics.contains("weir_map_operations_total 0"),
        "a restart rewrites nothing: {metrics}"
    );
    assert!(metrics.contains(&frontends), "{frontends}: {metrics}");

    // Deleting the service through the API removes it from the datapath.
    let (code, body) = api.json("DELETE", "/api/v1/namespaces/default/services/web", None);
    assert_eq!(code, 200, "{body}");
    eventually("the deleted service disappearing", || {
        let result = spread(client, Some(&cgroup), &format!("{vip}:80"), 1);
        (result["ok"] != false).then(|| result.to_string())
    });
}
