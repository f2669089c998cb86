//! `weir agent` end to end, on both dataplanes: the real agent process against weir's API
//! server (real HTTPS, kube-rs watchers), programming the socket load balancer for a test
//! cgroup, or (`--dataplane nftables`, the agent running inside the client's namespace) an
//! nftables table there. Service and EndpointSlice changes made through the API reach real TCP
//! connections; /healthz and /metrics answer; a SIGKILLed agent leaves the datapath working and
//! its successor adopts it without rewriting anything.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use serde_json::{Value, json};
use weir_tests::{
    agent::{AgentProcess, AgentSetup, SLICES, create_endpoint_slice, create_service},
    apiserver::{ApiServer, TempDir, weir_binary},
    dataplane::{Dataplane, for_each_dataplane},
    privileged::require_root,
    probe::spread,
    topology::ServiceNet,
    wait::eventually,
};

const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 3);
const WAIT: Duration = Duration::from_secs(15);

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

#[test]
fn lb_agent_programs_services_from_the_api_server_and_survives_its_own_restart() {
    require_root();
    for_each_dataplane(programs_services_and_survives_restart);
}

fn programs_services_and_survives_restart(dataplane: Dataplane) {
    let net = ServiceNet::new("agent", 205, 2).unwrap();
    assert_eq!(net.backends, [BACKEND_A, BACKEND_B]);
    let client = &net.client;
    let data = TempDir::new("agent-api");
    let api = ApiServer::start(data.path());
    let setup = AgentSetup::new(dataplane, client, &api, "agent");
    let cgroup = setup.cgroup();

    let vip = create_service(&api, "web");
    create_endpoint_slice(&api, "web", &[BACKEND_A, BACKEND_B]);

    let mut agent = AgentProcess::start_on(&api, &setup);
    eventually("traffic to the service reaching both backends", WAIT, || {
        let result = spread(client, cgroup, &format!("{vip}:80"), 100);
        (result["backends"].as_object().map(|b| b.len()) != Some(2)).then(|| result.to_string())
    });
    assert_eq!(agent.get(agent.health, "/healthz").0, 200);

    // An endpoint removed through the API stops receiving connections.
    let (code, body) = api.json(
        "PATCH",
        &format!("{SLICES}/web-1"),
        Some(&json!({"endpoints": [
            {"addresses": [BACKEND_A.to_string()], "conditions": {"ready": true}}]})),
    );
    assert_eq!(code, 200, "{body}");
    eventually("the removed endpoint leaving the rotation", WAIT, || {
        let result = spread(client, cgroup, &format!("{vip}:80"), 50);
        (result["backends"].as_object().map(|b| b.len()) != Some(1)).then(|| result.to_string())
    });
    let (code, metrics) = agent.get(agent.metrics, "/metrics");
    assert_eq!(code, 200);
    let frontends = format!("weir_service_frontends {}", cluster_ip_ports(&api));
    assert!(metrics.contains(&frontends), "{frontends}: {metrics}");
    if let AgentSetup::Ebpf { pins, .. } = &setup {
        eprintln!("checking the eBPF datapath's counters and `weir inspect services`");
        inspect_ebpf(&metrics, pins, &vip);
    }

    // SIGKILL: the datapath keeps working without an agent; the next one adopts it as it is.
    agent.kill();
    assert_eq!(spread(client, cgroup, &format!("{vip}:80"), 20)["ok"], true);
    let agent = AgentProcess::start_on(&api, &setup);
    let (_, metrics) = agent.get(agent.metrics, "/metrics");
    assert!(
        metrics.contains("weir_map_operations_total 0"),
        "a restart rewrites nothing: {metrics}"
    );
    assert!(metrics.contains(&frontends), "{frontends}: {metrics}");

    // Deleting the service through the API removes it from the datapath.
    let (code, body) = api.json("DELETE", "/api/v1/namespaces/default/services/web", None);
    assert_eq!(code, 200, "{body}");
    eventually("the deleted service disappearing", WAIT, || {
        let result = spread(client, cgroup, &format!("{vip}:80"), 1);
        (result["ok"] != false).then(|| result.to_string())
    });
}

/// The eBPF datapath's own views: its counters in /metrics and the live maps.
fn inspect_ebpf(metrics: &str, pins: &weir_tests::bpffs::TestPinDir, vip: &str) {
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
}

#[test]
fn lb_agent_serves_health_check_node_ports_with_the_local_endpoint_count() {
    require_root();
    for_each_dataplane(serves_health_check_node_ports);
}

/// kube-proxy's service health server: a LoadBalancer Service with `externalTrafficPolicy:
/// Local` gets an HTTP answer on its `healthCheckNodePort` from every node, 200 with the
/// node's local endpoint count while it has some, 503 once it has none, nothing once the
/// service is gone. (The agent serves it on the address of its `--health-listen`, loopback
/// here.)
fn serves_health_check_node_ports(dataplane: Dataplane) {
    let net = ServiceNet::new("hcnp", 213, 1).unwrap();
    let data = TempDir::new("hcnp-api");
    let api = ApiServer::start(data.path());
    let setup = AgentSetup::new(dataplane, &net.client, &api, "hcnp");
    // A node port of this process, so that parallel runs do not share it.
    let port = 31000 + (std::process::id() % 1700) as u16;
    let (code, service) = api.json(
        "POST",
        "/api/v1/namespaces/default/services",
        Some(&json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "web-local", "namespace": "default"},
                     "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                              "healthCheckNodePort": port,
                              "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})),
    );
    assert_eq!(code, 201, "{service}");
    assert_eq!(service["spec"]["healthCheckNodePort"], port, "{service}");
    let slice = |node: &str| {
        let mut slice = weir_tests::agent::endpoint_slice("web-local", &[BACKEND_A]);
        slice["endpoints"][0]["nodeName"] = json!(node);
        slice
    };
    let (code, body) = api.json("POST", SLICES, Some(&slice("node-a")));
    assert_eq!(code, 201, "{body}");

    let agent = AgentProcess::start_on(&api, &setup);
    let agent = &agent;
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let answer = |expected_code: u16, expected_local: u64| {
        move || match agent.try_get(addr, "/") {
            Some((code, body))
                if code == expected_code
                    && serde_json::from_str::<Value>(&body).is_ok_and(|b| {
                        b["localEndpoints"] == expected_local
                            && b["service"] == json!({"namespace": "default", "name": "web-local"})
                    }) =>
            {
                None
            }
            other => Some(format!("{other:?}")),
        }
    };
    eventually("200 with one local endpoint", WAIT, answer(200, 1));

    // The endpoint moves to another node: this node has none left.
    let (code, body) = api.json(
        "PATCH",
        &format!("{SLICES}/web-local-1"),
        Some(&json!({"endpoints": slice("node-b")["endpoints"]})),
    );
    assert_eq!(code, 200, "{body}");
    eventually("503 with no local endpoint", WAIT, answer(503, 0));

    let (code, body) = api.json("DELETE", "/api/v1/namespaces/default/services/web-local", None);
    assert_eq!(code, 200, "{body}");
    eventually("the port closed after the service left", WAIT, || {
        agent.try_get(addr, "/").map(|answer| format!("{answer:?}"))
    });
}
