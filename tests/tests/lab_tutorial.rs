//! The upstream tutorial steps, run as written against a `weir lab` with real kubectl
//! (non-interactive forms where a tty would be needed), then docs/lab.md's network policy step.
use std::time::Duration;

use weir_tests::{apiserver::weir_binary, lab::Lab, privileged::require_root, wait::eventually};

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

    network_policy_step(&lab, "ebpf");
}

/// docs/lab.md's network policy step on a lab with `--dataplane nftables`: the same commands,
/// the same results (the no-window rule included: a new client under the policy gets its
/// first packets, DNS, through).
#[test]
fn the_policy_step_works_on_the_nftables_dataplane() {
    require_root();
    let lab = Lab::up(2, "nftables", "vxlan");
    lab.kubectl.ok(&["create", "deployment", "web", "--image=nginx", "--replicas=2"]);
    lab.kubectl.ok(&["expose", "deployment", "web", "--port=80"]);
    lab.wait_ready("app=web");
    network_policy_step(&lab, "nftables");
}

/// docs/lab.md's network policy step, command by command.
fn network_policy_step(lab: &Lab, dataplane: &str) {
    let k = &lab.kubectl;
    let page = client_get(lab, "before");
    assert!(page.contains("web-"), "before any policy the client gets the page: {page}");

    lab.apply(WEB_DENY_ALL);
    let mut attempt = 0;
    // Enforcement follows the API within moments; the tutorial's reader types slower than this.
    eventually("the default deny blocks an unlabelled client", Duration::from_secs(30), || {
        let out = client_run(lab, &attempt_name("denied", &mut attempt), &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() || text.contains("web-")).then_some(text)
    });

    lab.apply(WEB_ALLOW_ACCESS);
    let mut attempt = 0;
    eventually("a client labelled access=true gets the page", Duration::from_secs(30), || {
        let out =
            client_run(lab, &attempt_name("allowed", &mut attempt), &["--labels=access=true"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!out.status.success() || !text.contains("web-")).then_some(text)
    });
    // Once enforced, a new allowed client gets the page on its first try: the node runtime
    // starts its containers only after the agent has written its policy entry.
    // (A dropped DNS query is retried by the resolver, so the page alone does not show it: the
    // datapaths' not-ready drop counters do.)
    let dropped_before = lab.not_ready_drops(dataplane, 2);
    let out = client_run(lab, "allowed-first-try", &["--labels=access=true"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web-"),
        "a new labelled client did not get the page at once: {}",
        weir_tests::lab::text(&out)
    );
    let dropped = lab.not_ready_drops(dataplane, 2) - dropped_before;
    eprintln!(
        "{dataplane}: not-ready drops before the new client {dropped_before}, by it {dropped}"
    );
    assert_eq!(dropped, 0, "{dropped} packets of the new client were dropped as not ready");
    let out = client_run(lab, "unlabelled", &[]);
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("web-"),
        "an unlabelled client still gets no page: {}",
        weir_tests::lab::text(&out)
    );

    k.ok(&["run", "trusted", "--image=busybox", "--labels=access=true", "--", "sleep", "3600"]);
    k.ok(&["run", "untrusted", "--image=busybox", "--", "sleep", "3600"]);
    k.ok(&["wait", "--for=condition=Ready", "pod/trusted", "pod/untrusted", "--timeout=60s"]);
    let web = k.ok(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].metadata.name}"]);
    let to = format!("default/{}", web.trim());
    let trace = |from: &str| {
        std::process::Command::new(weir_binary())
            .args(["policy", "trace", "--from", from, "--to", &to, "--port", "80"])
            .env("KUBECONFIG", lab.state_dir().join("kubeconfig"))
            .output()
            .expect("running weir policy trace")
    };
    let allowed = trace("default/trusted");
    let text = String::from_utf8_lossy(&allowed.stdout);
    assert_eq!(allowed.status.code(), Some(0), "{}", weir_tests::lab::text(&allowed));
    assert!(
        text.contains("verdict: ALLOWED")
            && text.contains("allowed by NetworkPolicy default/web-allow-access"),
        "{text}"
    );
    let denied = trace("default/untrusted");
    let text = String::from_utf8_lossy(&denied.stdout);
    assert_eq!(denied.status.code(), Some(3), "{}", weir_tests::lab::text(&denied));
    assert!(text.contains("verdict: DENIED") && text.contains("web-deny-all"), "{text}");
    eprintln!("tutorial trace output:\n{}{}", String::from_utf8_lossy(&allowed.stdout), text);

    k.ok(&["delete", "networkpolicy", "web-deny-all", "web-allow-access"]);
    k.ok(&["delete", "pod", "trusted", "untrusted", "--wait=false"]);
    let mut attempt = 0;
    eventually(
        "without policies the unlabelled client gets the page",
        Duration::from_secs(30),
        || {
            let out = client_run(lab, &attempt_name("after", &mut attempt), &[]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (!text.contains("web-")).then_some(text)
        },
    );
}

/// The tutorial's two policies, as docs/lab.md shows them.
const WEB_DENY_ALL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-deny-all
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: ["Ingress"]
"#;

const WEB_ALLOW_ACCESS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-allow-access
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          access: "true"
    ports:
    - port: 80
"#;

/// The tutorial's name for the first attempt, a fresh one for each retry (a `--rm` pod may
/// still be terminating when the next starts).
fn attempt_name(base: &str, attempt: &mut u32) -> String {
    *attempt += 1;
    if *attempt == 1 { base.to_string() } else { format!("{base}-{attempt}") }
}

/// `kubectl run NAME --rm -i --restart=Never --image=busybox [EXTRA] -- wget ... http://web`,
/// not asserting success.
fn client_run(lab: &Lab, name: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", name, "--rm", "-i", "--restart=Never", "--image=busybox"];
    args.extend_from_slice(extra);
    args.extend(["--", "wget", "-qO-", "--timeout=2", "http://web"]);
    lab.kubectl.run(&args)
}

/// The tutorial's one-shot client: `kubectl run NAME --rm -i ... -- wget ... http://web`.
fn client_get(lab: &Lab, name: &str) -> String {
    let out = client_run(lab, name, &[]);
    assert!(out.status.success(), "the client {name} failed: {}", weir_tests::lab::text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
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
