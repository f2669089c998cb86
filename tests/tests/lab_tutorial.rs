//! The upstream tutorial steps, run as written against a `weir lab` with real kubectl
//! (non-interactive forms where a tty would be needed).
use std::time::Duration;

use weir_tests::{lab::Lab, privileged::require_root, wait::eventually};

#[test]
fn the_upstream_tutorial_works_as_written() {
    require_root();
    let lab = Lab::up(2, "ebpf", "vxlan");
    let k = &lab.kubectl;
    k.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=3"]);
    k.ok(&["expose", "deployment", "web", "--port=80"]);
    lab.wait_ready("app=web");

    // A one-shot client pod, attached, removed afterwards.
    let page = client_get(&lab, "client");
    assert!(page.contains("web-"), "the client did not get a web page: {page}");
    eventually("the client pod is removed (--rm)", Duration::from_secs(30), || {
        let pods = k.ok(&["get", "pods", "-o", "name"]);
        pods.contains("pod/client").then_some(pods)
    });

    // exec and logs on one of the web pods.
    let pods = web_pods(&lab);
    let pod = &pods[0];
    let hostname = k.ok(&["exec", pod, "--", "cat", "/etc/hostname"]);
    assert_eq!(hostname.trim(), pod.trim_start_matches("pod/"), "exec sees the pod's hostname");
    let exit = k.run(&["exec", pod, "--", "sh", "-c", "exit 3"]);
    assert_eq!(exit.status.code(), Some(3), "exec passes the exit code through");
    for pod in &pods {
        k.ok(&["logs", pod]);
    }

    // scale
    k.ok(&["scale", "deployment", "web", "--replicas=5"]);
    eventually("5 web pods", Duration::from_secs(60), || {
        let n = web_pods(&lab).len();
        (n != 5).then(|| format!("{n} pods"))
    });
    lab.wait_ready("app=web");

    // a rollout and its undo
    k.ok(&["set", "image", "deployment/web", "nginx=httpd"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    k.ok(&["rollout", "undo", "deployment/web"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let image = k.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "nginx", "rollout undo restores the previous image");

    // delete a pod: the replacement gets a new address and the service follows.
    lab.wait_ready("app=web");
    let victim = web_pods(&lab)[0].clone();
    let old_ip = k.ok(&["get", &victim, "-o", "jsonpath={.status.podIP}"]);
    k.ok(&["delete", &victim]);
    eventually("the replacement pod is Ready", Duration::from_secs(60), || {
        let pods = web_pods(&lab);
        (pods.len() != 5 || pods.contains(&victim)).then(|| format!("{pods:?}"))
    });
    lab.wait_ready("app=web");
    let ips = k.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"]);
    assert!(!ips.split_whitespace().any(|ip| ip == old_ip), "{old_ip} reused at once: {ips}");
    eventually("the service's endpoints drop the old address", Duration::from_secs(30), || {
        let eps = k.ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ]);
        eps.split_whitespace().any(|ip| ip == old_ip).then_some(eps)
    });
    let page = client_get(&lab, "client2");
    assert!(page.contains("web-"), "the service still answers after the pod was replaced: {page}");
}

/// The tutorial's one-shot client: `kubectl run NAME --rm -i ... -- wget ... http://web`.
fn client_get(lab: &Lab, name: &str) -> String {
    lab.kubectl.ok(&[
        "run",
        name,
        "--rm",
        "-i",
        "--restart=Never",
        "--image=busybox",
        "--",
        "wget",
        "-qO-",
        "--timeout=2",
        "http://web",
    ])
}

fn web_pods(lab: &Lab) -> Vec<String> {
    let out = lab.kubectl.ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "--field-selector=status.phase=Running",
        "-o",
        "name",
    ]);
    out.lines().map(str::to_string).collect()
}
