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

/// The dual-stack service CIDRs of the family tests: IPv4 primary.
const DUAL_STACK: &str = "10.96.0.0/16,fd00:10:96::/112";

fn web_service(name: &str, spec: Value) -> Value {
    let mut svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                         "spec": {"selector": {"app": name}, "ports": [{"port": 80, "protocol": "TCP"}]}});
    for (k, v) in spec.as_object().expect("a spec object") {
        svc["spec"][k] = v.clone();
    }
    svc
}

fn create(server: &ApiServer, name: &str, spec: Value) -> Value {
    let (code, svc) = server.json("POST", SERVICES, Some(&web_service(name, spec)));
    assert_eq!(code, 201, "{name}: {svc}");
    svc
}

/// A request that must fail with 422 naming `field` and saying `says`.
fn refused(server: &ApiServer, method: &str, path: &str, body: &Value, field: &str, says: &str) {
    let (code, status) = server.json(method, path, Some(body));
    assert_eq!(code, 422, "{body}: {status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{field}: ")) && message.contains(says), "{message}");
    let causes = status["details"]["causes"].as_array().expect("causes");
    assert!(causes.iter().any(|c| c["field"] == field), "{status}");
}

fn families(svc: &Value) -> (Value, Value, Value) {
    let spec = &svc["spec"];
    (spec["ipFamilyPolicy"].clone(), spec["ipFamilies"].clone(), spec["clusterIPs"].clone())
}

fn in_v6_range(ip: &Value) -> bool {
    ip.as_str().is_some_and(|ip| ip.starts_with("fd00:10:96::"))
}

/// On a dual-stack server: each policy gets its families and addresses, updates add and
/// remove the secondary family (freeing its address), deletes free both, bad requests are
/// refused naming the field, and a restart keeps every family's allocations.
#[test]
fn dual_stack_services_get_addresses_of_their_families_and_keep_them_across_a_restart() {
    let dir = TempDir::new("api-services-dual");
    let start = || ApiServer::start_with(dir.path(), &["--service-cidr", DUAL_STACK]);
    let mut server = start();
    let (code, kubernetes) = server.json("GET", &format!("{SERVICES}/kubernetes"), None);
    assert_eq!(code, 200, "{kubernetes}");
    assert_eq!(
        families(&kubernetes),
        (json!("SingleStack"), json!(["IPv4"]), json!(["10.96.0.1"])),
        "the kubernetes Service is single-stack on the primary family"
    );
    let single = create(&server, "single", json!({}));
    let (policy, fams, ips) = families(&single);
    assert_eq!((policy, fams), (json!("SingleStack"), json!(["IPv4"])));
    assert_eq!(ips.as_array().unwrap().len(), 1, "{single}");
    let prefer = create(&server, "prefer", json!({"ipFamilyPolicy": "PreferDualStack"}));
    let (_, fams, ips) = families(&prefer);
    assert_eq!(fams, json!(["IPv4", "IPv6"]));
    assert!(in_v6_range(&ips[1]) && ips[0] == prefer["spec"]["clusterIP"], "{prefer}");
    let v6_first = create(
        &server,
        "v6-first",
        json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]}),
    );
    let (_, fams, ips) = families(&v6_first);
    assert_eq!(fams, json!(["IPv6", "IPv4"]));
    assert!(in_v6_range(&ips[0]) && ips[0] == v6_first["spec"]["clusterIP"], "{v6_first}");
    let headless = create(
        &server,
        "headless",
        json!({"clusterIP": "None", "ipFamilyPolicy": "PreferDualStack"}),
    );
    assert_eq!(families(&headless).1, json!(["IPv4", "IPv6"]));
    assert_eq!(families(&headless).2, json!(["None"]));

    // Bad input: 422 naming the field.
    let prefer_ips = |ips: Value| {
        web_service(
            "bad",
            json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": ips[0], "clusterIPs": ips}),
        )
    };
    for (body, field, says) in [
        (
            prefer_ips(json!(["10.96.9.9", "10.96.9.10"])),
            "spec.clusterIPs",
            "no more than one IP for each IP family",
        ),
        (
            web_service("bad", json!({"ipFamilies": ["IPv6"], "clusterIP": "10.96.9.9"})),
            "spec.clusterIPs[0]",
            "expected an IPv6 value",
        ),
        (
            prefer_ips(json!(["10.96.9.9", "fd00:99::9"])),
            "spec.clusterIPs[1]",
            "not in the valid range. The range of valid IPs is fd00:10:96::/112",
        ),
        (
            prefer_ips(json!(["10.96.9.9", ips[0].clone()])),
            "spec.clusterIPs[1]",
            "provided IP is already allocated",
        ),
        (
            web_service("bad", json!({"ipFamilyPolicy": "DualStack"})),
            "spec.ipFamilyPolicy",
            "Unsupported value",
        ),
        (
            web_service("bad", json!({"ipFamilies": ["IPv4", "IPv6"]})),
            "spec.ipFamilyPolicy",
            "when multiple IP families are specified",
        ),
    ] {
        refused(&server, "POST", SERVICES, &body, field, says);
    }

    // Upgrade: the secondary family gets an address.
    let path = |name: &str| format!("{SERVICES}/{name}");
    let (code, up) = server.json(
        "PATCH",
        &path("single"),
        Some(&json!({"spec": {"ipFamilyPolicy": "RequireDualStack"}})),
    );
    assert_eq!(code, 200, "{up}");
    let (_, fams, up_ips) = families(&up);
    assert_eq!(fams, json!(["IPv4", "IPv6"]));
    assert_eq!(up_ips[0], single["spec"]["clusterIPs"][0], "the primary address is kept");
    assert!(in_v6_range(&up_ips[1]), "{up}");
    // Releasing it needs SingleStack; the primary never changes.
    refused(
        &server,
        "PATCH",
        &path("single"),
        &json!({"spec": {"clusterIPs": [up_ips[0].clone()]}}),
        "spec.clusterIPs[0]",
        "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary clusterIP",
    );
    refused(
        &server,
        "PATCH",
        &path("single"),
        &json!({"spec": {"clusterIP": "10.96.200.1", "clusterIPs": ["10.96.200.1", up_ips[1].clone()]}}),
        "spec.clusterIPs[0]",
        "may not change once set",
    );
    // Downgrade: the released address can be requested at once.
    let (code, down) = server.json(
        "PATCH",
        &path("single"),
        Some(&json!({"spec": {"ipFamilyPolicy": "SingleStack"}})),
    );
    assert_eq!(code, 200, "{down}");
    assert_eq!(
        families(&down),
        (json!("SingleStack"), json!(["IPv4"]), json!([up_ips[0].clone()]))
    );
    let wants_v6 = |ip: &Value| json!({"ipFamilies": ["IPv6"], "clusterIP": ip});
    create(&server, "took-released", wants_v6(&up_ips[1]));
    // A delete frees both families' addresses.
    let (code, _) = server.json("DELETE", &path("prefer"), None);
    assert_eq!(code, 200);
    let reused = prefer_ips(prefer["spec"]["clusterIPs"].clone());
    let (code, reused) = server.json("POST", SERVICES, Some(&reused));
    assert_eq!(code, 201, "{reused}");
    assert_eq!(reused["spec"]["clusterIPs"], prefer["spec"]["clusterIPs"]);

    // After a restart every family's addresses are still held.
    let (_, list) = server.json("GET", SERVICES, None);
    let held: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["spec"]["clusterIPs"].as_array().cloned().unwrap_or_default())
        .filter(|ip| ip != "None")
        .collect();
    server.kill();
    let server = start();
    for ip in held.iter().filter(|ip| in_v6_range(ip)) {
        refused(
            &server,
            "POST",
            SERVICES,
            &web_service("after-restart", wants_v6(ip)),
            "spec.clusterIPs[0]",
            "already allocated",
        );
    }
    let fresh = create(&server, "fresh", json!({"ipFamilyPolicy": "RequireDualStack"}));
    for ip in fresh["spec"]["clusterIPs"].as_array().unwrap() {
        assert!(!held.contains(ip), "{ip} handed out again after the restart");
    }
}

/// kubectl applies a dual-stack manifest (twice: no change the second time) and prints it.
#[test]
fn kubectl_applies_and_prints_a_dual_stack_service() {
    let dir = TempDir::new("api-services-kubectl");
    let server = ApiServer::start_with(dir.path(), &["--service-cidr", DUAL_STACK]);
    let kubectl = weir_tests::apiserver::Kubectl::new(&server.kubeconfig);
    let manifest = dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  selector: {app: web}\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    let file = manifest.to_str().unwrap();
    assert!(kubectl.ok(&["apply", "-f", file]).contains("service/web created"));
    assert!(kubectl.ok(&["apply", "-f", file]).contains("service/web unchanged"));
    let ips = kubectl.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIPs}"]);
    let ips: Vec<String> = serde_json::from_str(&ips).expect("clusterIPs as JSON");
    assert!(ips[0].starts_with("fd00:10:96::") && ips[1].starts_with("10.96."), "{ips:?}");
    let wide = kubectl.ok(&["get", "svc", "web", "-o", "wide"]);
    assert!(wide.contains(&ips[0]) && wide.contains("app=web"), "{wide}");
    let described = kubectl.ok(&["describe", "svc", "web"]);
    assert!(described.contains("RequireDualStack") && described.contains(&ips[1]), "{described}");
}

/// On a single-stack server: RequireDualStack is refused, PreferDualStack gets one family,
/// the other family is refused; an IPv6-only server allocates IPv6.
#[test]
fn single_stack_servers_refuse_require_dual_stack_and_give_prefer_one_family() {
    let dir = TempDir::new("api-services-single");
    let server = ApiServer::start(dir.path());
    refused(
        &server,
        "POST",
        SERVICES,
        &web_service("require", json!({"ipFamilyPolicy": "RequireDualStack"})),
        "spec.ipFamilyPolicy",
        "this cluster is not configured for dual-stack services",
    );
    refused(
        &server,
        "POST",
        SERVICES,
        &web_service("v6", json!({"ipFamilies": ["IPv6"]})),
        "spec.ipFamilies[0]",
        "not configured on this cluster",
    );
    let prefer = create(&server, "prefer", json!({"ipFamilyPolicy": "PreferDualStack"}));
    assert_eq!(families(&prefer).1, json!(["IPv4"]));
    assert_eq!(prefer["spec"]["clusterIPs"].as_array().unwrap().len(), 1, "{prefer}");
    drop(server);

    let dir = TempDir::new("api-services-v6");
    let server = ApiServer::start_with(dir.path(), &["--service-cidr", "fd00:10:96::/108"]);
    let (_, kubernetes) = server.json("GET", &format!("{SERVICES}/kubernetes"), None);
    assert_eq!(families(&kubernetes).2, json!(["fd00:10:96::1"]), "{kubernetes}");
    let svc = create(&server, "web", json!({}));
    assert_eq!(families(&svc).1, json!(["IPv6"]));
    assert!(in_v6_range(&svc["spec"]["clusterIP"]), "{svc}");
}

#[test]
fn bad_service_cidr_flags_exit_64_and_say_why() {
    for (cidr, says) in [
        ("10.96.0.0/31", "an IPv4 service CIDR needs a prefix between /8 and /30"),
        ("fd00::/48", "an IPv6 service CIDR needs a prefix between /64 and /126"),
        ("10.0.0.0/16,10.1.0.0/16", "two IPv4 CIDRs"),
        ("10.0.0.0/16,fd00::/112,10.2.0.0/16", "3 CIDRs"),
        ("ten", "\"ten\" is not a CIDR"),
    ] {
        let dir = TempDir::new("api-bad-service-cidr");
        let out = std::process::Command::new(weir_tests::apiserver::weir_binary())
            .args(["apiserver", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--service-cidr", cidr])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cidr}: {stderr}");
        assert!(stderr.contains("--service-cidr") && stderr.contains(says), "{cidr}: {stderr}");
    }
}
