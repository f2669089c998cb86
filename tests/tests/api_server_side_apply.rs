//! Server-side apply against the API server, driven by the real kubectl (`apply --server-side`,
//! `--field-manager`, `--force-conflicts`, `scale`, `get --show-managed-fields`), by kube-rs
//! (`Patch::Apply`), and by raw requests for what kube-apiserver refuses.
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use weir_tests::apiserver::{ApiServer, Kubectl, TempDir};

fn configmap_yaml(name: &str, data: &[(&str, &str)]) -> String {
    let mut yaml = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n");
    if !data.is_empty() {
        yaml.push_str("data:\n");
        for (k, v) in data {
            yaml.push_str(&format!("  {k}: {v:?}\n"));
        }
    }
    yaml
}

/// Writes `text` to `dir/file` and returns the path as kubectl takes it.
fn manifest(dir: &TempDir, file: &str, text: &str) -> String {
    let path = dir.path().join(file);
    std::fs::write(&path, text).expect("writing a manifest");
    path.to_str().expect("a UTF-8 temp path").to_string()
}

/// The object as `kubectl get -o json --show-managed-fields` prints it.
fn get_json(kubectl: &Kubectl, what: &[&str]) -> Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
    serde_json::from_str(&kubectl.ok(&args)).expect("kubectl -o json prints JSON")
}

/// The managedFields entry of `manager` with `operation` (and `subresource`, "" for none).
fn entry<'a>(
    obj: &'a Value,
    manager: &str,
    operation: &str,
    subresource: &str,
) -> Option<&'a Value> {
    obj["metadata"]["managedFields"].as_array()?.iter().find(|e| {
        e["manager"] == manager
            && e["operation"] == operation
            && e["subresource"].as_str().unwrap_or("") == subresource
    })
}

#[test]
fn kubectl_server_side_apply_creates_updates_prunes_and_reports_conflicts() {
    let dir = TempDir::new("api-ssa-kubectl");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    let name = "ssa-test";

    // A new object: created from the applied configuration, owned by kubectl's Apply entry.
    let file = manifest(&dir, "cm.yaml", &configmap_yaml(name, &[("a", "1"), ("b", "2")]));
    let out = kubectl.ok(&["apply", "--server-side", "-f", &file]);
    assert!(out.contains(&format!("configmap/{name} serverside-applied")), "{out}");
    let cm = get_json(&kubectl, &["configmap", name]);
    assert_eq!(cm["data"], json!({"a": "1", "b": "2"}));
    let applied = entry(&cm, "kubectl", "Apply", "").unwrap_or_else(|| panic!("{cm:#}"));
    assert_eq!(applied["fieldsType"], "FieldsV1");
    assert_eq!(applied["apiVersion"], "v1");
    assert_eq!(applied["fieldsV1"], json!({"f:data": {"f:a": {}, "f:b": {}}}));
    assert!(applied["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{applied}");
    assert_eq!(cm["metadata"]["managedFields"].as_array().unwrap().len(), 1, "{cm:#}");
    let uid = cm["metadata"]["uid"].clone();

    // A changed value, then a key left out: the first is updated, the second removed.
    let file = manifest(&dir, "cm.yaml", &configmap_yaml(name, &[("a", "changed"), ("b", "2")]));
    kubectl.ok(&["apply", "--server-side", "-f", &file]);
    assert_eq!(get_json(&kubectl, &["configmap", name])["data"], json!({"a": "changed", "b": "2"}));
    let file = manifest(&dir, "cm.yaml", &configmap_yaml(name, &[("a", "changed")]));
    kubectl.ok(&["apply", "--server-side", "-f", &file]);
    let cm = get_json(&kubectl, &["configmap", name]);
    assert_eq!(cm["data"], json!({"a": "changed"}));
    assert_eq!(cm["metadata"]["uid"], uid);
    assert_eq!(
        entry(&cm, "kubectl", "Apply", "").unwrap()["fieldsV1"],
        json!({"f:data": {"f:a": {}}})
    );

    // `kubectl diff --server-side` (a dry-run apply) sees no difference for the applied file
    // and exactly the change for another one.
    let diff = kubectl.run(&["diff", "--server-side", "-f", &file]);
    assert_eq!(diff.status.code(), Some(0), "{}", String::from_utf8_lossy(&diff.stdout));
    let changed = manifest(&dir, "changed.yaml", &configmap_yaml(name, &[("a", "next")]));
    let diff = kubectl.run(&["diff", "--server-side", "-f", &changed]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(diff.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&diff.stderr));
    assert!(text.contains("-  a: changed") && text.contains("+  a: next"), "{text}");
    assert!(!text.contains("resourceVersion"), "{text}");
    assert_eq!(get_json(&kubectl, &["configmap", name])["data"]["a"], "changed");

    // Another field manager changing kubectl's field: a conflict, nothing written.
    let theirs = manifest(&dir, "other.yaml", &configmap_yaml(name, &[("a", "theirs")]));
    let err = kubectl.fails(&["apply", "--server-side", "--field-manager", "other", "-f", &theirs]);
    assert!(
        err.contains("Apply failed with 1 conflict: conflict with \"kubectl\": .data.a"),
        "{err}"
    );
    assert!(err.contains("--force-conflicts"), "kubectl's advice is missing: {err}");
    assert_eq!(get_json(&kubectl, &["configmap", name])["data"]["a"], "changed");
    // Applying the value that is already there is no conflict: both own it then.
    let same = manifest(&dir, "same.yaml", &configmap_yaml(name, &[("a", "changed")]));
    kubectl.ok(&["apply", "--server-side", "--field-manager", "other", "-f", &same]);
    let cm = get_json(&kubectl, &["configmap", name]);
    assert!(
        entry(&cm, "other", "Apply", "").is_some() && entry(&cm, "kubectl", "Apply", "").is_some()
    );

    // Forced, the other manager takes the field over; kubectl no longer owns anything.
    kubectl.ok(&[
        "apply",
        "--server-side",
        "--field-manager",
        "other",
        "--force-conflicts",
        "-f",
        &theirs,
    ]);
    let cm = get_json(&kubectl, &["configmap", name]);
    assert_eq!(cm["data"], json!({"a": "theirs"}));
    assert_eq!(
        entry(&cm, "other", "Apply", "").unwrap()["fieldsV1"],
        json!({"f:data": {"f:a": {}}})
    );
    assert!(entry(&cm, "kubectl", "Apply", "").is_none(), "{cm:#}");
    // kubectl's next apply of its old value conflicts with the new owner.
    let err = kubectl.fails(&["apply", "--server-side", "-f", &file]);
    assert!(err.contains("conflict with \"other\": .data.a"), "{err}");

    // -o yaml shows managedFields only when asked to.
    let yaml = kubectl.ok(&["get", "configmap", name, "-o", "yaml", "--show-managed-fields"]);
    for expected in
        ["managedFields:", "manager: other", "operation: Apply", "fieldsType: FieldsV1", "f:a: {}"]
    {
        assert!(yaml.contains(expected), "{expected:?} missing from\n{yaml}");
    }
    let plain = kubectl.ok(&["get", "configmap", name, "-o", "yaml"]);
    assert!(!plain.contains("managedFields"), "{plain}");

    // Other writes record Update entries under their manager.
    kubectl.ok(&["create", "configmap", "plain", "--from-literal=x=1"]);
    let plain = get_json(&kubectl, &["configmap", "plain"]);
    let created =
        entry(&plain, "kubectl-create", "Update", "").unwrap_or_else(|| panic!("{plain:#}"));
    assert_eq!(created["fieldsV1"]["f:data"], json!({"f:x": {}}));
    kubectl.ok(&["label", "configmap", "plain", "team=blue"]);
    let plain = get_json(&kubectl, &["configmap", "plain"]);
    let labelled =
        entry(&plain, "kubectl-label", "Update", "").unwrap_or_else(|| panic!("{plain:#}"));
    assert_eq!(labelled["fieldsV1"], json!({"f:metadata": {"f:labels": {"f:team": {}}}}));
}

#[test]
fn a_scaled_deployment_keeps_its_replicas_when_reapplied_without_them() {
    let dir = TempDir::new("api-ssa-scale");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    let deployment = |replicas: Option<u32>, image: &str| {
        let replicas = replicas.map(|r| format!("  replicas: {r}\n")).unwrap_or_default();
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ssa-web\nspec:\n{replicas}  selector:\n    matchLabels: {{app: ssa-web}}\n  template:\n    metadata:\n      labels: {{app: ssa-web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n        ports:\n        - containerPort: 80\n"
        )
    };
    let file = manifest(&dir, "deploy.yaml", &deployment(Some(2), "nginx:1.25"));
    kubectl.ok(&["apply", "--server-side", "-f", &file]);
    let deploy = get_json(&kubectl, &["deployment", "ssa-web"]);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let fields = &entry(&deploy, "kubectl", "Apply", "").unwrap()["fieldsV1"];
    assert_eq!(fields["f:spec"]["f:replicas"], json!({}));
    let container =
        &fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
    assert_eq!(container["."], json!({}), "{fields:#}");
    assert_eq!(
        container["f:ports"]["k:{\"containerPort\":80,\"protocol\":\"TCP\"}"]["f:containerPort"],
        json!({}),
        "{fields:#}"
    );

    kubectl.ok(&["scale", "deployment", "ssa-web", "--replicas=5"]);
    let deploy = get_json(&kubectl, &["deployment", "ssa-web"]);
    assert_eq!(deploy["spec"]["replicas"], 5);
    // kubectl scale names no field manager: the server takes the user agent's ("kubectl").
    let scaler =
        entry(&deploy, "kubectl", "Update", "scale").unwrap_or_else(|| panic!("{deploy:#}"));
    assert_eq!(scaler["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
    assert_eq!(scaler["apiVersion"], "apps/v1");
    let applier = &entry(&deploy, "kubectl", "Apply", "").unwrap()["fieldsV1"];
    assert!(applier["f:spec"].get("f:replicas").is_none(), "{applier:#}");

    // Re-applied without replicas (and with a new image): the scaled count stays.
    let file = manifest(&dir, "deploy.yaml", &deployment(None, "nginx:1.26"));
    kubectl.ok(&["apply", "--server-side", "-f", &file]);
    let deploy = get_json(&kubectl, &["deployment", "ssa-web"]);
    assert_eq!(deploy["spec"]["replicas"], 5, "{deploy:#}");
    assert_eq!(deploy["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.26");
    assert_eq!(deploy["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 1);

    // Applying a replica count again conflicts with the scale, as kube-apiserver names it.
    let file = manifest(&dir, "deploy.yaml", &deployment(Some(2), "nginx:1.26"));
    let err = kubectl.fails(&["apply", "--server-side", "-f", &file]);
    assert!(
        err.contains("conflict with \"kubectl\" with subresource \"scale\" using apps/v1"),
        "{err}"
    );
    assert!(err.contains(".spec.replicas"), "{err}");
    assert_eq!(get_json(&kubectl, &["deployment", "ssa-web"])["spec"]["replicas"], 5);
}

fn applied_cm(name: &str, value: &str) -> Patch<Value> {
    Patch::Apply(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": value}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_patch_apply_creates_updates_and_forces() {
    let dir = TempDir::new("api-ssa-kube");
    let server = ApiServer::start_async(dir.path()).await;
    let cms: Api<ConfigMap> = Api::namespaced(server.kube_client().await, "default");
    let params = PatchParams::apply("weir-test");

    let created = cms.patch("kube-ssa", &params, &applied_cm("kube-ssa", "1")).await.unwrap();
    assert_eq!(created.data.as_ref().unwrap()["k"], "1");
    let managed = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("weir-test"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    assert_eq!(managed[0].fields_v1.as_ref().unwrap().0, json!({"f:data": {"f:k": {}}}));

    let updated = cms.patch("kube-ssa", &params, &applied_cm("kube-ssa", "2")).await.unwrap();
    assert_eq!(updated.data.as_ref().unwrap()["k"], "2");
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    assert_ne!(updated.metadata.resource_version, created.metadata.resource_version);
    // The same configuration again changes nothing, not even the version.
    let again = cms.patch("kube-ssa", &params, &applied_cm("kube-ssa", "2")).await.unwrap();
    assert_eq!(again.metadata.resource_version, updated.metadata.resource_version);

    let other = PatchParams::apply("weir-other");
    match cms.patch("kube-ssa", &other, &applied_cm("kube-ssa", "3")).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert_eq!(status.reason, "Conflict");
            assert!(status.message.contains("conflict with \"weir-test\": .data.k"), "{status:?}");
        }
        other => panic!("a conflicting apply gave {other:?}"),
    }
    let forced =
        cms.patch("kube-ssa", &other.clone().force(), &applied_cm("kube-ssa", "3")).await.unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["k"], "3");
    let managers: Vec<String> =
        forced.metadata.managed_fields.unwrap().into_iter().filter_map(|e| e.manager).collect();
    assert_eq!(managers, ["weir-other"]);

    // A merge patch is an Update of its field manager.
    let merge_params = PatchParams { field_manager: Some("merger".into()), ..Default::default() };
    let merged = cms
        .patch("kube-ssa", &merge_params, &Patch::Merge(json!({"data": {"extra": "x"}})))
        .await
        .unwrap();
    let entry = merged
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|e| e.manager.as_deref() == Some("merger"))
        .expect("an entry for the merge patch");
    assert_eq!(entry.operation.as_deref(), Some("Update"));
    assert_eq!(entry.fields_v1.unwrap().0, json!({"f:data": {"f:extra": {}}}));
}

const APPLY: &str = "application/apply-patch+yaml";

#[test]
fn bad_apply_requests_are_refused_as_kube_apiserver_refuses_them() {
    let dir = TempDir::new("api-ssa-bad");
    let server = ApiServer::start(dir.path());
    let path = "/api/v1/namespaces/default/configmaps/bad-ssa";
    let with_manager = format!("{path}?fieldManager=raw");
    let status = |resp: &weir_tests::apiserver::HttpResponse| -> Value {
        serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
    };
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad-ssa\ndata:\n  k: v\n";

    // No fieldManager: kube-apiserver's PatchOptions validation (422 Invalid).
    let resp = server.request("PATCH", path, APPLY, yaml.as_bytes());
    assert_eq!(resp.status, 422, "{}", String::from_utf8_lossy(&resp.body));
    let body = status(&resp);
    assert_eq!(
        body["message"],
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    assert_eq!(body["details"]["causes"][0]["field"], "fieldManager");

    // Broken YAML, a non-object, a name or namespace that is not the URL's, managedFields.
    for (body, expected) in [
        ("data: [unclosed\n  k: v", "error decoding YAML"),
        ("- just\n- a list\n", "error decoding YAML"),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\n",
            "the name of the object (other) does not match the name on the URL (bad-ssa)",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad-ssa\n  namespace: kube-system\n",
            "does not match the namespace on the request (default)",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad-ssa\n  managedFields: [{manager: x}]\n",
            "metadata.managedFields must be nil",
        ),
        (
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bad-ssa\n",
            "does not match the resource",
        ),
    ] {
        let resp = server.request("PATCH", &with_manager, APPLY, body.as_bytes());
        assert_eq!(resp.status, 400, "{body:?}: {}", String::from_utf8_lossy(&resp.body));
        let message = status(&resp)["message"].as_str().unwrap_or("").to_string();
        assert!(message.contains(expected), "{body:?}: {message}");
    }
    // Nothing was created by the refused requests.
    assert_eq!(server.json("GET", path, None).0, 404);

    // A YAML body creates (201), the same again is 200; `force` belongs to apply only.
    let resp = server.request("PATCH", &with_manager, APPLY, yaml.as_bytes());
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(status(&resp)["metadata"]["managedFields"][0]["manager"], "raw");
    let resp =
        server.request("PATCH", &format!("{with_manager}&force=true"), APPLY, yaml.as_bytes());
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let resp = server.request(
        "PATCH",
        &format!("{path}?force=true"),
        "application/merge-patch+json",
        br#"{"data": {"k": "w"}}"#,
    );
    assert_eq!(resp.status, 422, "{}", String::from_utf8_lossy(&resp.body));
    assert!(
        status(&resp)["message"].as_str().unwrap_or("").contains("force: Forbidden"),
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    let resp =
        server.request("PATCH", &format!("{with_manager}&force=maybe"), APPLY, yaml.as_bytes());
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));

    // Duplicate keys in a keyed list are refused, not merged.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: dup\nspec:\n  containers:\n  - {name: a, image: x}\n  - {name: a, image: y}\n";
    let resp = server.request(
        "PATCH",
        "/api/v1/namespaces/default/pods/dup?fieldManager=raw",
        APPLY,
        pod.as_bytes(),
    );
    assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(&resp.body));
    assert!(
        String::from_utf8_lossy(&resp.body).contains("duplicate entries for key [name=\\\"a\\\"]")
    );

    // The scale subresource does not take apply patches: 415 with what to do instead.
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {"metadata": {"labels": {"app": "d"}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}});
    let (code, _) =
        server.json("POST", "/apis/apps/v1/namespaces/default/deployments", Some(&deploy));
    assert_eq!(code, 201);
    let scale = r#"{"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "d"}, "spec": {"replicas": 3}}"#;
    let resp = server.request(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/d/scale?fieldManager=raw",
        APPLY,
        scale.as_bytes(),
    );
    assert_eq!(resp.status, 415, "{}", String::from_utf8_lossy(&resp.body));
    assert!(String::from_utf8_lossy(&resp.body).contains("scale subresource"));

    // The status subresource takes them, and owns only status; it never creates.
    let status_apply = r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "status": {"observedGeneration": 7}}"#;
    let resp = server.request(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/d/status?fieldManager=status-writer",
        APPLY,
        status_apply.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let body = status(&resp);
    let entry = body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["manager"] == "status-writer")
        .cloned()
        .unwrap_or_else(|| panic!("{body:#}"));
    assert_eq!(entry["subresource"], "status");
    assert_eq!(entry["fieldsV1"], json!({"f:status": {"f:observedGeneration": {}}}));
    let resp = server.request(
        "PATCH",
        "/apis/apps/v1/namespaces/default/deployments/missing/status?fieldManager=status-writer",
        APPLY,
        status_apply.replace("\"d\"", "\"missing\"").as_bytes(),
    );
    assert_eq!(resp.status, 404, "{}", String::from_utf8_lossy(&resp.body));
}
