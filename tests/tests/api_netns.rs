//! `weir apiserver --netns-listen NAMESPACE_FILE=IP:PORT`: the same API served inside another
//! network namespace (what `weir lab up` uses for the lab's node namespaces), with the IP in the
//! serving certificate so kubectl there verifies it. Privileged: creates a test namespace.
use std::path::Path;

use weir_tests::{
    apiserver::{ApiServer, TempDir, kubectl_binary},
    netns::Netns,
    privileged::require_root,
    process::command_in,
};

/// Runs kubectl inside `ns` with `kubeconfig`; panics with its stderr when it fails.
fn kubectl_in(ns: &Netns, kubeconfig: &Path, home: &Path, args: &[&str]) -> String {
    let out = command_in(ns, None, kubectl_binary().to_str().unwrap())
        .unwrap()
        .arg("--request-timeout=20s")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl in the namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubectl_inside_a_namespace_reaches_the_server_over_https() {
    require_root();
    let ns = Netns::new("api").expect("test namespace");
    ns.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"]).expect("address in the test namespace");
    let dir = TempDir::new("api-netns");
    let listen = format!("{}=10.99.0.1:6443", ns.path().display());
    let server = ApiServer::start_with(dir.path(), &["--netns-listen", &listen]);

    // The admin kubeconfig pointed at the namespace's address.
    let kubeconfig = std::fs::read_to_string(&server.kubeconfig).unwrap();
    let inside = dir.path().join("inside.kubeconfig");
    std::fs::write(&inside, kubeconfig.replace(&server.addr.to_string(), "10.99.0.1:6443"))
        .unwrap();
    let home = TempDir::new("kubectl-home");
    let names = kubectl_in(&ns, &inside, home.path(), &["get", "ns", "-o", "name"]);
    assert!(names.contains("namespace/kube-system"), "{names}");

    // The same server on the host side; a restart keeps the CA (the certificate was issued
    // again only because a new IP came), and the inside kubeconfig still verifies.
    let host = weir_tests::apiserver::Kubectl::new(&server.kubeconfig);
    host.ok(&["get", "ns"]);
    drop(server);
    let _server = ApiServer::start_with(dir.path(), &["--netns-listen", &listen]);
    kubectl_in(&ns, &inside, home.path(), &["get", "ns", "default"]);
}

#[test]
fn a_missing_namespace_is_a_configuration_error() {
    let dir = TempDir::new("api-netns-bad");
    let out = std::process::Command::new(weir_tests::apiserver::weir_binary())
        .arg("apiserver")
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--netns-listen",
            "/run/netns/weirt-no-such-ns=10.99.0.1:6443",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/run/netns/weirt-no-such-ns"), "{err}");
}
