//! `kubectl get` against weir's API server prints the columns kube-apiserver's printers
//! define (names, order, `-o wide` extras) with the cells computed from the objects: services,
//! deployments, replica sets, endpoint slices, endpoints and network policies. Pods and nodes
//! with real states are covered by node_kubectl.rs.
use serde_json::json;
use weir_tests::apiserver::{ApiServer, Kubectl, TempDir};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  selector: {app: web, tier: front}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - {name: nginx, image: "nginx:1.25"}
      - {name: sidecar, image: busybox}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: ["10.244.1.2"]
- addresses: ["10.244.1.3"]
- addresses: ["10.244.2.2"]
- addresses: ["10.244.2.3"]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector:
    matchLabels: {role: db}
    matchExpressions:
    - {key: env, operator: In, values: [prod, dev]}
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: web}
"#;

/// The header words of a kubectl table.
fn header(table: &str) -> Vec<&str> {
    table.lines().next().unwrap_or("").split_whitespace().collect()
}

/// The cells of `name`'s row, split on runs of 2+ spaces (cells may contain one space).
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn kubectl_get_prints_kube_apiservers_columns() {
    let dir = TempDir::new("api-printers");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let kubectl = Kubectl::new(&server.kubeconfig);
    let manifest = dir.path().join("shop.yaml");
    std::fs::write(&manifest, MANIFEST).expect("writing the manifest");
    kubectl.ok(&["apply", "-f", manifest.to_str().expect("utf-8")]);
    // What the deployment controller would report.
    let (code, body) = server.json(
        "PATCH",
        "/apis/apps/v1/namespaces/shop/deployments/web/status",
        Some(&json!({"status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3,
                                "availableReplicas": 2}})),
    );
    assert_eq!(code, 200, "{body}");

    let svc = kubectl.ok(&["get", "svc", "-n", "shop", "-o", "wide"]);
    assert_eq!(
        header(&svc),
        ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE", "SELECTOR"]
    );
    let web = row(&svc, "web");
    assert_eq!(web[1], "NodePort");
    assert!(web[2].starts_with("10.96."), "cluster IP: {svc}");
    assert_eq!(web[3], "<none>", "{svc}");
    // Every port of a NodePort service has a node port: 80:30080/TCP,53:3xxxx/UDP.
    assert!(web[4].starts_with("80:30080/TCP,53:3") && web[4].ends_with("/UDP"), "{svc}");
    assert_eq!(web[6], "app=web,tier=front", "{svc}");
    let lb = row(&svc, "lb");
    assert_eq!(lb[1], "LoadBalancer");
    assert_eq!(lb[3], "<pending>", "{svc}");
    assert!(lb[4].starts_with("443") && lb[4].ends_with("/TCP"), "{svc}");
    assert_eq!(row(&svc, "ext")[1..4], ["ExternalName", "<none>", "db.example.com"], "{svc}");
    // Without -o wide the priority-1 SELECTOR column is not shown.
    assert_eq!(
        header(&kubectl.ok(&["get", "svc", "-n", "shop"])),
        ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    );

    let deploy = kubectl.ok(&["get", "deploy", "-n", "shop", "-o", "wide"]);
    assert_eq!(
        header(&deploy),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    );
    let web = row(&deploy, "web");
    assert_eq!(web[1..4], ["2/3", "3", "2"], "{deploy}");
    assert_eq!(web[5..], ["nginx,sidecar", "nginx:1.25,busybox", "app=web"], "{deploy}");

    let slices = kubectl.ok(&["get", "endpointslices", "-n", "shop"]);
    assert_eq!(header(&slices), ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]);
    assert_eq!(
        row(&slices, "web-abcde")[1..4],
        ["IPv4", "8080", "10.244.1.2,10.244.1.3,10.244.2.2 + 1 more..."],
        "{slices}"
    );

    let policies = kubectl.ok(&["get", "networkpolicies", "-n", "shop"]);
    assert_eq!(header(&policies), ["NAME", "POD-SELECTOR", "AGE"]);
    assert_eq!(row(&policies, "deny-all")[1], "<none>", "{policies}");
    assert_eq!(row(&policies, "db-from-web")[1], "env in (dev,prod),role=db", "{policies}");

    // Single objects print the same columns.
    let one = kubectl.ok(&["get", "netpol", "db-from-web", "-n", "shop"]);
    assert_eq!(header(&one), ["NAME", "POD-SELECTOR", "AGE"]);
}
