//! Service allocation through the API server: the ClusterIPs and NodePorts kept beside the
//! store stay distinct when creates race, are free again as soon as a delete returns, and are
//! rebuilt from the store after a restart; on the embedded store and on etcd.
use std::collections::HashSet;

use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, EtcdServer, TempDir};

const SERVICES: &str = "/api/v1/namespaces/default/services";

fn node_port_service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"type": "NodePort", "selector": {"app": name},
                    "ports": [{"port": 80, "protocol": "TCP"}]}})
}

fn held(svc: &Value) -> (String, i64) {
    (
        svc["spec"]["clusterIP"].as_str().expect("a clusterIP").to_string(),
        svc["spec"]["ports"][0]["nodePort"].as_i64().expect("a nodePort"),
    )
}

/// 8 clients create 15 Services each at once: all 120 get distinct addresses and ports.
fn racing_creates_get_distinct_addresses(server: &ApiServer) -> Vec<Value> {
    let created: Vec<Value> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|client| {
                scope.spawn(move || {
                    (0..15)
                        .map(|i| {
                            let name = format!("race-{client}-{i}");
                            let (code, svc) =
                                server.json("POST", SERVICES, Some(&node_port_service(&name)));
                            assert_eq!(code, 201, "{name}: {svc}");
                            svc
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().expect("client thread")).collect()
    });
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for svc in &created {
        let (ip, port) = held(svc);
        assert!(ips.insert(ip.clone()), "clusterIP {ip} handed out twice");
        assert!(ports.insert(port), "nodePort {port} handed out twice");
    }
    assert!(!ips.contains("10.96.0.1"), "the kubernetes Service's address was handed out");
    created
}

/// A deleted Service's address and port can be requested at once; a held one cannot.
fn deletes_release_at_once(server: &ApiServer, victim: &Value, holder: &Value) {
    let name = victim["metadata"]["name"].as_str().unwrap();
    let (ip, port) = held(victim);
    let mut wanted = node_port_service("reuse");
    wanted["spec"]["clusterIP"] = json!(ip);
    wanted["spec"]["ports"][0]["nodePort"] = json!(port);
    let (code, refused) = server.json("POST", SERVICES, Some(&wanted));
    assert_eq!(code, 422, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("already allocated"), "{refused}");
    let (code, _) = server.json("DELETE", &format!("{SERVICES}/{name}"), None);
    assert_eq!(code, 200);
    let (code, reused) = server.json("POST", SERVICES, Some(&wanted));
    assert_eq!(code, 201, "{reused}");
    assert_eq!(held(&reused), (ip, port));
    // Changing the type to ClusterIP gives the node port back.
    let holder_name = holder["metadata"]["name"].as_str().unwrap();
    let (_, port) = held(holder);
    let (code, patched) = server.json(
        "PATCH",
        &format!("{SERVICES}/{holder_name}"),
        Some(&json!({"spec": {"type": "ClusterIP"}})),
    );
    assert_eq!(code, 200, "{patched}");
    let mut wanted = node_port_service("port-reuse");
    wanted["spec"]["ports"][0]["nodePort"] = json!(port);
    let (code, reused) = server.json("POST", SERVICES, Some(&wanted));
    assert_eq!(code, 201, "{reused}");
}

/// After a restart the allocations are rebuilt from the store.
fn restart_rebuilds(server: &ApiServer, stored: &[Value]) {
    for svc in stored.iter().take(5) {
        let (ip, port) = held(svc);
        let mut wanted = node_port_service("after-restart");
        wanted["spec"]["clusterIP"] = json!(ip);
        let (code, refused) = server.json("POST", SERVICES, Some(&wanted));
        assert_eq!(code, 422, "clusterIP {ip} was free after the restart: {refused}");
        let mut wanted = node_port_service("after-restart");
        wanted["spec"]["ports"][0]["nodePort"] = json!(port);
        let (code, refused) = server.json("POST", SERVICES, Some(&wanted));
        assert_eq!(code, 422, "nodePort {port} was free after the restart: {refused}");
    }
    let (code, fresh) = server.json("POST", SERVICES, Some(&node_port_service("fresh")));
    assert_eq!(code, 201, "{fresh}");
    let taken: HashSet<(String, i64)> = stored.iter().map(held).collect();
    let (ip, port) = held(&fresh);
    assert!(taken.iter().all(|(i, p)| *i != ip && *p != port), "{fresh} reuses a held value");
}

/// Races, deletes and a restart (SIGKILL) on servers that `start` starts on one data dir.
fn allocation_survives(start: impl Fn(&std::path::Path) -> ApiServer) {
    let dir = TempDir::new("api-services");
    let mut server = start(dir.path());
    let created = racing_creates_get_distinct_addresses(&server);
    deletes_release_at_once(&server, &created[0], &created[1]);
    let (_, list) = server.json("GET", SERVICES, None);
    let stored: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["spec"]["type"] == "NodePort")
        .cloned()
        .collect();
    server.kill();
    let server = start(dir.path());
    restart_rebuilds(&server, &stored);
}

#[test]
fn service_allocation_is_unique_under_races_released_on_delete_and_rebuilt_after_restart() {
    allocation_survives(ApiServer::start);
}

#[test]
fn service_allocation_on_etcd() {
    let etcd = EtcdServer::start();
    allocation_survives(|dir| ApiServer::start_with(dir, &["--etcd-endpoints", &etcd.endpoint]));
}
