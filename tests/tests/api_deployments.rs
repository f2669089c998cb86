//! Deployments and ReplicaSets through kubectl: the controllers create ReplicaSets and Pods,
//! `kubectl scale` (the scale subresource) resizes, `kubectl rollout status` waits for ready
//! Pods, `kubectl set image` rolls to a new ReplicaSet, and delete cascades to everything.
use std::time::Duration;

use weir_tests::{
    apiserver::{ApiServer, Kubectl, TempDir},
    kubelet::FakeNode,
};

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers: [{name: nginx, image: "nginx:1.25"}]
"#;

/// Polls until the output has `count` words (bounded: 15 s); returns them.
fn words(kubectl: &Kubectl, args: &[&str], count: usize) -> Vec<String> {
    let mut last = Vec::new();
    for _ in 0..150 {
        let out = kubectl.run(args);
        last = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
        if out.status.success() && last.len() == count {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("kubectl {} gave {last:?}, expected {count} words", args.join(" "));
}

/// Marks every Pod of the app Ready with an IP, as a node agent would.
fn make_ready(kubectl: &Kubectl, pods: &[String]) {
    for (i, pod) in pods.iter().enumerate() {
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"10.244.0.{}","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
            i + 10
        );
        kubectl.ok(&["patch", "pod", pod, "--subresource=status", "--type=merge", "-p", &status]);
    }
}

const PODS: &[&str] = &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].metadata.name}"];

#[test]
fn deployments_scale_roll_out_and_cascade() {
    let dir = TempDir::new("api-deployments");
    let server = ApiServer::start(dir.path());
    // Finishes the graceful deletions of scaled-down Pods, as a node runtime does.
    let _node = FakeNode::start(&server, "node-a");
    let kubectl = Kubectl::new(&server.kubeconfig);
    let manifest = dir.path().join("m.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    kubectl.ok(&["apply", "-f", manifest.to_str().unwrap()]);

    words(&kubectl, PODS, 2);
    let scaled = kubectl.ok(&["scale", "deployment", "web", "--replicas=3"]);
    assert!(scaled.contains("scaled"), "{scaled}");
    let pods = words(&kubectl, PODS, 3);
    make_ready(&kubectl, &pods);
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    words(
        &kubectl,
        &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"],
        3,
    );

    // A new template: a second ReplicaSet takes over, the first goes to zero.
    kubectl.ok(&["set", "image", "deployment/web", "nginx=nginx:1.27"]);
    words(&kubectl, &["get", "rs", "-o", "name"], 2);
    let pods = words(
        &kubectl,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[?(@.spec.containers[0].image==\"nginx:1.27\")].metadata.name}",
        ],
        3,
    );
    words(&kubectl, PODS, 3);
    make_ready(&kubectl, &pods);
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let revision = kubectl.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(revision, "2");

    kubectl.ok(&["scale", "deployment", "web", "--replicas=1"]);
    words(&kubectl, PODS, 1);

    kubectl.ok(&["delete", "deployment", "web"]);
    words(&kubectl, &["get", "rs", "-o", "name"], 0);
    words(&kubectl, PODS, 0);
}
