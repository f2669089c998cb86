//! Server-side field validation (`fieldValidation`), as kube-apiserver does it: unknown and
//! duplicate fields refuse a create, update or patch under Strict, come back as `Warning`
//! headers under Warn (the default) and are dropped silently under Ignore; known fields that
//! are empty or null are never reported; real kubectl's default (`--validate=strict`) refuses
//! a manifest with a typo and `--validate=false` accepts it.
use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, HttpResponse, Kubectl, TempDir};

const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "nginx"}]},
            },
        },
    })
}

/// A Deployment with the typo `spec.replica` (for `spec.replicas`).
fn with_typo(name: &str) -> Value {
    let mut d = deployment(name);
    d["spec"]["replica"] = json!(3);
    d
}

fn send(
    server: &ApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> HttpResponse {
    server.request(method, path, content_type, body.as_bytes())
}

fn post(server: &ApiServer, query: &str, obj: &Value) -> HttpResponse {
    send(server, "POST", &format!("{DEPLOYS}{query}"), "application/json", &obj.to_string())
}

fn body(resp: &HttpResponse) -> Value {
    serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
}

/// The 400 BadRequest Status's message.
fn bad_request(resp: &HttpResponse) -> String {
    let status = body(resp);
    assert_eq!(resp.status, 400, "{status}");
    assert_eq!(status["kind"], "Status", "{status}");
    assert_eq!(status["reason"], "BadRequest", "{status}");
    status["message"].as_str().unwrap().to_string()
}

fn exists(server: &ApiServer, name: &str) -> bool {
    server.json("GET", &format!("{DEPLOYS}/{name}"), None).0 == 200
}

#[test]
fn unknown_fields_are_refused_warned_or_dropped_by_mode() {
    let dir = TempDir::new("api-fieldval-modes");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);

    let strict = post(&server, "?fieldValidation=Strict", &with_typo("strict"));
    assert_eq!(
        bad_request(&strict),
        r#"Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: unknown field "spec.replica""#
    );
    assert!(!exists(&server, "strict"), "a refused create stored the object");

    for (name, query) in [("warn", "?fieldValidation=Warn"), ("default", "")] {
        let resp = post(&server, query, &with_typo(name));
        assert_eq!(resp.status, 201, "{}", body(&resp));
        assert_eq!(resp.header_values("warning"), [r#"299 - "unknown field \"spec.replica\"""#]);
        let (_, stored) = server.json("GET", &format!("{DEPLOYS}/{name}"), None);
        assert!(stored["spec"].get("replica").is_none(), "{stored}");
        assert_eq!(stored["spec"]["replicas"], 1, "defaulted as without the typo: {stored}");
    }

    let ignore = post(&server, "?fieldValidation=Ignore", &with_typo("ignore"));
    assert_eq!(ignore.status, 201, "{}", body(&ignore));
    assert!(ignore.header_values("warning").is_empty());
    assert!(body(&ignore)["spec"].get("replica").is_none());

    let bogus = post(&server, "?fieldValidation=Loose", &deployment("bogus"));
    let message = bad_request(&bogus);
    assert!(
        message.contains(r#""Loose""#) && message.contains(r#""Ignore", "Strict", "Warn""#),
        "{message}"
    );
    assert!(!exists(&server, "bogus"));
}

#[test]
fn strict_names_nested_and_duplicate_fields_on_create_update_and_patch() {
    let dir = TempDir::new("api-fieldval-strict");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);

    let mut nested = deployment("nested");
    nested["spec"]["replica"] = json!(2);
    nested["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = json!("Always");
    let message = bad_request(&post(&server, "?fieldValidation=Strict", &nested));
    assert!(
        message.ends_with(r#"strict decoding error: unknown field "spec.replica", unknown field "spec.template.spec.containers[0].imagePullPolcy""#),
        "{message}"
    );

    let duplicate = deployment("dup").to_string().replacen(
        r#""name":"dup""#,
        r#""name":"dup","name":"dup2""#,
        1,
    );
    let resp = send(
        &server,
        "POST",
        &format!("{DEPLOYS}?fieldValidation=Strict"),
        "application/json",
        &duplicate,
    );
    assert!(bad_request(&resp).contains(r#"duplicate field "metadata.name""#), "{}", body(&resp));
    assert!(!exists(&server, "dup") && !exists(&server, "dup2"));
    // Warn reports the repeated key; the last value wins, as in Go.
    let resp = send(&server, "POST", DEPLOYS, "application/json", &duplicate);
    assert_eq!(resp.status, 201, "{}", body(&resp));
    assert_eq!(resp.header_values("warning"), [r#"299 - "duplicate field \"metadata.name\"""#]);
    assert!(exists(&server, "dup2"));

    // Update and patches.
    let (code, created) = server.json("POST", DEPLOYS, Some(&deployment("web")));
    assert_eq!(code, 201, "{created}");
    let path = format!("{DEPLOYS}/web?fieldValidation=Strict");
    let mut update = created.clone();
    update["spec"]["paused"] = json!(true);
    update["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdat": {}});
    let message =
        bad_request(&send(&server, "PUT", &path, "application/json", &update.to_string()));
    assert!(message.ends_with(r#"unknown field "spec.strategy.rollingUpdat""#), "{message}");
    for content_type in ["application/merge-patch+json", "application/strategic-merge-patch+json"] {
        let resp = send(&server, "PATCH", &path, content_type, r#"{"spec": {"replica": 5}}"#);
        assert!(bad_request(&resp).ends_with(r#"unknown field "spec.replica""#), "{content_type}");
    }
    let json_patch = r#"[{"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolcy", "value": "Always"}]"#;
    let resp = send(&server, "PATCH", &path, "application/json-patch+json", json_patch);
    assert!(
        bad_request(&resp)
            .ends_with(r#"unknown field "spec.template.spec.containers[0].imagePullPolcy""#)
    );
    let (_, stored) = server.json("GET", &format!("{DEPLOYS}/web"), None);
    assert_eq!(
        stored["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"],
        "a refused write changed the object"
    );

    // Valid writes still pass under Strict, with no warning.
    update["spec"]["strategy"] = json!({"type": "Recreate"});
    let resp = send(&server, "PUT", &path, "application/json", &update.to_string());
    assert_eq!(resp.status, 200, "{}", body(&resp));
    assert!(resp.header_values("warning").is_empty());
    let resp = send(
        &server,
        "PATCH",
        &path,
        "application/strategic-merge-patch+json",
        r#"{"spec": {"replicas": 4, "template": {"spec": {"$setElementOrder/containers": [{"name": "c"}], "containers": [{"name": "c", "image": "nginx:2"}]}}}}"#,
    );
    assert_eq!(resp.status, 200, "{}", body(&resp));
    assert!(resp.header_values("warning").is_empty());
    assert_eq!(body(&resp)["spec"]["replicas"], 4);
    // The scale subresource is an autoscaling/v1 Scale.
    let scale = format!("{DEPLOYS}/web/scale?fieldValidation=Strict");
    let scale_patch =
        |patch: &str| send(&server, "PATCH", &scale, "application/merge-patch+json", patch);
    let resp = scale_patch(r#"{"spec": {"replica": 1}}"#);
    assert!(
        bad_request(&resp).starts_with(r#"Scale in version "v1" cannot be handled as a Scale"#)
    );
    let resp = scale_patch(r#"{"spec": {"replicas": 1}}"#);
    assert_eq!(resp.status, 200, "{}", body(&resp));
}

#[test]
fn valid_objects_with_empty_and_null_known_fields_pass_strict_without_warnings() {
    let dir = TempDir::new("api-fieldval-valid");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let meta = json!({"name": "x", "labels": {}, "annotations": {}, "finalizers": [], "ownerReferences": [], "generateName": null});
    let objects = [
        (
            "/api/v1/namespaces/default/pods",
            json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {
                    "containers": [{
                        "name": "c", "image": "nginx", "args": [], "env": [{"name": "A", "value": ""}],
                        "ports": [{"containerPort": 80, "protocol": "TCP"}], "resources": {},
                        "volumeMounts": [{"name": "v", "mountPath": "/v"}], "securityContext": {},
                        "readinessProbe": {"httpGet": {"path": "/", "port": 80}, "periodSeconds": 5},
                        "lifecycle": null,
                    }],
                    "initContainers": [], "volumes": [{"name": "v", "emptyDir": {}}],
                    "nodeSelector": {}, "tolerations": [], "affinity": null, "securityContext": {},
                    "dnsConfig": {"options": []}, "imagePullSecrets": [],
                },
                "status": {},
            }),
        ),
        (
            "/api/v1/namespaces/default/services",
            json!({
                "apiVersion": "v1", "kind": "Service", "metadata": meta,
                "spec": {
                    "selector": {"app": "x"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
                    "externalIPs": [], "ipFamilies": [], "sessionAffinityConfig": null, "type": "ClusterIP",
                },
                "status": {"loadBalancer": {}},
            }),
        ),
        (
            DEPLOYS,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                "spec": {
                    "replicas": 0, "selector": {"matchLabels": {"app": "x"}, "matchExpressions": []},
                    "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
                    "template": {"metadata": {"labels": {"app": "x"}, "annotations": null},
                        "spec": {"containers": [{"name": "c", "image": "nginx", "command": []}], "volumes": []}},
                },
            }),
        ),
        (
            "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
                "spec": {
                    "podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {"matchLabels": {}}}], "ports": []}],
                    "egress": [{}, {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": []}}]}],
                },
            }),
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {}, "hints": null, "nodeName": "n1"}],
                "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
            }),
        ),
        (
            "/api/v1/namespaces/default/configmaps",
            json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {}, "binaryData": {},
            }),
        ),
    ];
    // Each is created, then updated with what the server answered (managedFields, status,
    // defaults): both clean under Strict.
    let clean = |method: &str, path: String, obj: &Value, code: u16| {
        let resp = send(&server, method, &path, "application/json", &obj.to_string());
        assert_eq!(resp.status, code, "{method} {path}: {}", body(&resp));
        assert!(resp.header_values("warning").is_empty(), "{method} {path}");
        body(&resp)
    };
    for (path, obj) in &objects {
        let created = clean("POST", format!("{path}?fieldValidation=Strict"), obj, 201);
        clean("PUT", format!("{path}/x?fieldValidation=Strict"), &created, 200);
    }
}

const VALID: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  color: blue
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
"#;

#[test]
fn kubectl_refuses_typos_by_default_and_accepts_them_without_validation() {
    let dir = TempDir::new("api-fieldval-kubectl");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    let kubectl = Kubectl::new(&server.kubeconfig);
    // kubectl reads JSON manifests as well as YAML.
    let typo = dir.path().join("typo.json");
    std::fs::write(&typo, with_typo("web").to_string()).unwrap();
    let typo = typo.to_str().unwrap();
    let valid = dir.path().join("valid.yaml");
    std::fs::write(&valid, VALID).unwrap();
    let valid = valid.to_str().unwrap();

    let err = kubectl.fails(&["apply", "-f", typo]);
    assert!(err.contains(r#"unknown field "spec.replica""#), "{err}");
    assert!(kubectl.fails(&["get", "deploy", "web"]).contains("NotFound"));

    let out = kubectl.run(&["apply", "--validate=warn", "-f", typo]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(r#"Warning: unknown field "spec.replica""#), "{stderr}");
    kubectl.ok(&["delete", "deploy", "web"]);

    let out = kubectl.run(&["apply", "--validate=false", "-f", typo]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Warning"));
    // Applying the typo again patches the existing object: still refused by default.
    let err = kubectl.fails(&["apply", "-f", typo]);
    assert!(err.contains(r#"unknown field "spec.replica""#), "{err}");
    let mut fixed = deployment("web");
    fixed["spec"]["replicas"] = json!(3);
    let fixed_path = dir.path().join("fixed.json");
    std::fs::write(&fixed_path, fixed.to_string()).unwrap();
    let out = kubectl.ok(&["apply", "-f", fixed_path.to_str().unwrap()]);
    assert!(out.contains("configured"), "{out}");
    assert_eq!(kubectl.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]), "3");

    let created = kubectl.ok(&["create", "-f", valid]);
    assert_eq!(created.matches(" created").count(), 2, "{created}");
    let again = kubectl.ok(&["apply", "-f", valid]);
    assert_eq!(
        again.matches("configured").count() + again.matches("unchanged").count(),
        2,
        "{again}"
    );
}
