//! The in-process controllers seen through kubectl: Node pod-CIDR allocation, the scheduler
//! (readiness, nodeSelector, taints, spreading), and EndpointSlices/Endpoints that follow Pod
//! IPs and readiness and go away with their Service.
use std::time::Duration;

use weir_tests::apiserver::{ApiServer, Kubectl, TempDir};

const NODES_AND_PODS: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {zone: east}
status:
  conditions:
  - {type: Ready, status: "True"}
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
  labels: {zone: west}
status:
  conditions:
  - {type: Ready, status: "True"}
---
apiVersion: v1
kind: Node
metadata:
  name: node-c
  labels: {zone: west, dedicated: db}
spec:
  taints:
  - {key: dedicated, value: db, effect: NoSchedule}
status:
  conditions:
  - {type: Ready, status: "True"}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec:
  containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec:
  containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned, labels: {app: other}}
spec:
  nodeSelector: {zone: east}
  containers: [{name: c, image: nginx}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, labels: {app: db}}
spec:
  nodeSelector: {dedicated: db}
  tolerations: [{key: dedicated, operator: Equal, value: db, effect: NoSchedule}]
  containers: [{name: c, image: postgres}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Polls a jsonpath until it equals `want` (bounded: 10 s).
fn eventually(kubectl: &Kubectl, args: &[&str], want: &str) {
    eventually_as(kubectl, args, want, |s| s.to_string())
}

/// [`eventually`] comparing the output's words in sorted order.
fn eventually_sorted(kubectl: &Kubectl, args: &[&str], want: &str) {
    eventually_as(kubectl, args, want, |s| {
        let mut words: Vec<&str> = s.split_whitespace().collect();
        words.sort();
        words.join(" ")
    })
}

fn eventually_as(kubectl: &Kubectl, args: &[&str], want: &str, normalize: impl Fn(&str) -> String) {
    let mut last = String::new();
    for _ in 0..100 {
        let out = kubectl.run(args);
        last = normalize(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("kubectl {} gave {last:?}, expected {want:?}", args.join(" "));
}

#[test]
fn controllers_allocate_cidrs_schedule_pods_and_maintain_endpoint_slices() {
    let dir = TempDir::new("api-controllers");
    let server = ApiServer::start(dir.path());
    let kubectl = Kubectl::new(&server.kubeconfig);
    let manifest = dir.path().join("m.yaml");
    std::fs::write(&manifest, NODES_AND_PODS).unwrap();
    kubectl.ok(&["apply", "-f", manifest.to_str().unwrap()]);

    eventually(
        &kubectl,
        &["get", "node", "node-a", "-o", "jsonpath={.spec.podCIDR}"],
        "10.244.0.0/24",
    );
    eventually(
        &kubectl,
        &["get", "node", "node-b", "-o", "jsonpath={.spec.podCIDRs[0]}"],
        "10.244.1.0/24",
    );
    eventually(
        &kubectl,
        &["get", "node", "node-c", "-o", "jsonpath={.spec.podCIDR}"],
        "10.244.2.0/24",
    );

    // Taints keep ordinary pods off node-c; selectors and tolerations place the others;
    // web-1 and web-2 spread over node-a and node-b.
    eventually(&kubectl, &["get", "pod", "pinned", "-o", "jsonpath={.spec.nodeName}"], "node-a");
    eventually(&kubectl, &["get", "pod", "db", "-o", "jsonpath={.spec.nodeName}"], "node-c");
    eventually_sorted(
        &kubectl,
        &["get", "pod", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"],
        "node-a node-b",
    );

    // No IPs yet: an empty slice. Then the Pods get IPs (as a node agent would report them).
    eventually(
        &kubectl,
        &[
            "get",
            "endpointslice",
            "web-ipv4",
            "-o",
            "jsonpath={.metadata.labels.kubernetes\\.io/service-name}",
        ],
        "web",
    );
    for (pod, ip, ready) in [("web-1", "10.244.1.5", "True"), ("web-2", "10.244.0.7", "False")] {
        let status = format!(
            r#"{{"status":{{"podIP":"{ip}","conditions":[{{"type":"Ready","status":"{ready}"}}]}}}}"#
        );
        kubectl.ok(&["patch", "pod", pod, "--subresource=status", "--type=merge", "-p", &status]);
    }
    eventually_sorted(
        &kubectl,
        &[
            "get",
            "endpointslice",
            "web-ipv4",
            "-o",
            "jsonpath={range .endpoints[*]}{.addresses[0]}={.conditions.ready} {end}",
        ],
        "10.244.0.7=false 10.244.1.5=true",
    );
    eventually(
        &kubectl,
        &["get", "endpointslice", "web-ipv4", "-o", "jsonpath={.ports[0].port}"],
        "8080",
    );
    eventually(
        &kubectl,
        &["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].addresses[0].ip}"],
        "10.244.1.5",
    );

    // A deleted Pod on a node terminates first (nobody finishes it here: no node runtime):
    // its endpoint stays, not ready and terminating. Forced, it leaves the slice; a deleted
    // Service takes its slices and Endpoints along.
    kubectl.ok(&["delete", "pod", "web-1", "--wait=false"]);
    eventually_sorted(
        &kubectl,
        &[
            "get",
            "endpointslice",
            "web-ipv4",
            "-o",
            "jsonpath={range .endpoints[*]}{.addresses[0]}={.conditions.ready}/{.conditions.terminating} {end}",
        ],
        "10.244.0.7=false/false 10.244.1.5=false/true",
    );
    kubectl.ok(&["delete", "pod", "web-1", "--grace-period=0", "--force"]);
    eventually(
        &kubectl,
        &["get", "endpointslice", "web-ipv4", "-o", "jsonpath={.endpoints[*].addresses[0]}"],
        "10.244.0.7",
    );
    kubectl.ok(&["delete", "service", "web"]);
    eventually(&kubectl, &["get", "endpointslices", "-o", "name"], "");
    eventually(&kubectl, &["get", "endpoints", "-o", "name"], "");
}

#[test]
fn dual_stack_cluster_cidrs_give_each_node_one_subnet_per_family() {
    let dir = TempDir::new("api-dual-stack");
    let server = ApiServer::start_with(
        dir.path(),
        &["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56", "--node-cidr-mask-size-ipv4", "25"],
    );
    let kubectl = Kubectl::new(&server.kubeconfig);
    for name in ["node-a", "node-b"] {
        let node =
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        let (code, body) = server.json("POST", "/api/v1/nodes", Some(&node));
        assert_eq!(code, 201, "{body}");
        // One at a time, so the order of the subnets is known.
        eventually(
            &kubectl,
            &["get", "node", name, "-o", "jsonpath={.spec.podCIDR}"],
            match name {
                "node-a" => "10.244.0.0/25",
                _ => "10.244.0.128/25",
            },
        );
    }
    eventually(
        &kubectl,
        &["get", "node", "node-b", "-o", "jsonpath={.spec.podCIDRs}"],
        r#"["10.244.0.128/25","fd00:10:244:1::/64"]"#,
    );
    eventually(
        &kubectl,
        &["get", "node", "node-a", "-o", "jsonpath={.spec.podCIDRs[1]}"],
        "fd00:10:244::/64",
    );
}

#[test]
fn bad_cluster_cidr_flags_exit_64_and_say_why() {
    for (args, says) in [
        (&["--cluster-cidr", "10.0.0.0/16,10.1.0.0/16"][..], "two IPv4 CIDRs"),
        (&["--cluster-cidr", "10.0.0.0/16,fd00::/56,10.2.0.0/16"][..], "3 CIDRs"),
        (
            &["--cluster-cidr", "fd00::/56", "--node-cidr-mask-size-ipv6", "40"][..],
            "--node-cidr-mask-size-ipv6 40",
        ),
        (&["--cluster-cidr", "10.0.0.0/33"][..], "prefix must be 0 to 32"),
    ] {
        let dir = TempDir::new("api-bad-cidr");
        let out = std::process::Command::new(weir_tests::apiserver::weir_binary())
            .args(["apiserver", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("--cluster-cidr") && stderr.contains(says), "{args:?}: {stderr}");
    }
}
