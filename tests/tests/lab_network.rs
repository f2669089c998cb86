//! Pod networking in a `weir lab`, as a learner sees it: pods on one node and across nodes by
//! IP, a ClusterIP service with backends on both nodes, a NodePort on every node's address
//! from the underlay, and services by DNS name (short, namespaced, FQDN) — for both overlays
//! and both dataplanes. A dual-stack lab (`--ip-family dual`) does the same over IPv6: pods
//! with an address of each family, across nodes, a PreferDualStack Service's IPv6 ClusterIP
//! and AAAA record, and a NetworkPolicy enforced on both families.
use std::{collections::BTreeSet, process::Output, time::Duration};

use weir_tests::{lab::Lab, privileged::require_root, wait::eventually};

#[test]
fn vxlan_overlay_with_the_ebpf_dataplane() {
    require_root();
    check_networking(&Lab::up(2, "ebpf", "vxlan"));
}

#[test]
fn native_routing_with_the_nftables_dataplane() {
    require_root();
    check_networking(&Lab::up(2, "nftables", "native"));
}

#[test]
fn vxlan_overlay_with_the_nftables_dataplane() {
    require_root();
    check_networking(&Lab::up(2, "nftables", "vxlan"));
}

#[test]
fn native_routing_with_the_ebpf_dataplane() {
    require_root();
    check_networking(&Lab::up(2, "ebpf", "native"));
}

#[test]
fn dual_stack_vxlan_with_the_ebpf_dataplane() {
    require_root();
    check_dual_stack(&Lab::up_with(2, "ebpf", "vxlan", &["--ip-family", "dual"]));
}

#[test]
fn dual_stack_native_with_the_nftables_dataplane() {
    require_root();
    check_dual_stack(&Lab::up_with(2, "nftables", "native", &["--ip-family", "dual"]));
}

fn check_dual_stack(lab: &Lab) {
    deploy(lab, r#""ipFamilyPolicy":"PreferDualStack""#);
    let ips = |pod: &str| -> Vec<String> {
        let text = lab.kubectl.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIPs[*].ip}"]);
        text.split_whitespace().map(str::to_string).collect()
    };
    let client_ips = ips("client");
    assert_eq!(
        client_ips.len(),
        2,
        "a dual-stack pod has an address of each family: {client_ips:?}"
    );
    assert!(
        client_ips[0].contains('.') && client_ips[1].contains(':'),
        "IPv4 first: {client_ips:?}"
    );
    let wget = |url: &str| lab.exec("client", &["wget", "-qO-", "-T", "2", url]);

    // Same node and across nodes over IPv6: the page names the pod and the client's IPv6.
    for pod in ["web-1", "web-2"] {
        let v6 = ips(pod).into_iter().find(|ip| ip.contains(':')).expect("an IPv6 pod IP");
        let page = stdout(&wget(&format!("http://[{v6}]/")));
        assert!(page.contains(pod), "client -> [{v6}] ({pod}): {page:?}");
        assert!(page.contains(&client_ips[1]), "the server saw the client's IPv6: {page:?}");
    }

    // The Service got one ClusterIP per family; its IPv6 one balances over both nodes.
    let cluster_ips =
        lab.kubectl.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIPs[*]}"]);
    let cluster_ips: Vec<&str> = cluster_ips.split_whitespace().collect();
    assert_eq!(cluster_ips.len(), 2, "PreferDualStack on a dual-stack cluster: {cluster_ips:?}");
    let v6_vip = cluster_ips[1];
    let seen = web_pods_reached(lab, &format!("http://[{v6_vip}]/"));
    assert_eq!(seen.len(), 2, "IPv6 ClusterIP {v6_vip} reached only {seen:?}");

    // Cluster DNS answers AAAA with the IPv6 ClusterIP.
    let lookup = lab.exec("client", &["nslookup", "-type=AAAA", "web.default.svc.cluster.local"]);
    assert!(stdout(&lookup).contains(v6_vip), "AAAA of web: {lookup:?}");

    // NetworkPolicy holds for IPv6 as for IPv4: only pods labelled access=true reach web.
    lab.apply(
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"web-allow-access"},
        "spec":{"podSelector":{"matchLabels":{"app":"web"}},
        "ingress":[{"from":[{"podSelector":{"matchLabels":{"access":"true"}}}]}]}}"#,
    );
    let web2 = ips("web-2");
    let reaches = |ip: &str| {
        let url =
            if ip.contains(':') { format!("http://[{ip}]/") } else { format!("http://{ip}/") };
        stdout(&wget(&url)).contains("web-2")
    };
    eventually("the policy blocks the unlabelled client", Duration::from_secs(10), || {
        let open: Vec<&String> = web2.iter().filter(|ip| reaches(ip)).collect();
        (!open.is_empty()).then(|| format!("still reachable: {open:?}"))
    });
    lab.kubectl.ok(&["label", "pod", "client", "access=true"]);
    eventually("the labelled client is let in", Duration::from_secs(10), || {
        let closed: Vec<&String> = web2.iter().filter(|ip| !reaches(ip)).collect();
        (!closed.is_empty()).then(|| format!("still blocked: {closed:?}"))
    });
}

/// Pods web-1 (node 1) and web-2 (node 2) serving the page, a busybox `client` on node 1, and
/// Service `web` over both web pods, with `fields` (JSON members) added to its spec.
/// Returns the two node names once every pod is Ready.
fn deploy(lab: &Lab, fields: &str) -> (String, String) {
    let (node1, node2) = (lab.node_name(1), lab.node_name(2));
    lab.apply(&server("web-1", &node1));
    lab.apply(&server("web-2", &node2));
    lab.apply(&format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"client"}},
        "spec":{{"nodeName":"{node1}","containers":[{{"name":"client","image":"busybox","command":["sleep","3600"]}}]}}}}"#
    ));
    lab.apply(&format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"web"}},
        "spec":{{{fields},"selector":{{"app":"web"}},"ports":[{{"port":80,"targetPort":80}}]}}}}"#
    ));
    for pod in ["pod/web-1", "pod/web-2", "pod/client"] {
        lab.wait_ready(pod);
    }
    (node1, node2)
}

/// The web pods that answered `url` from the client, in at most 40 tries.
fn web_pods_reached(lab: &Lab, url: &str) -> BTreeSet<&'static str> {
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let page = stdout(&lab.exec("client", &["wget", "-qO-", "-T", "2", url]));
        seen.extend(["web-1", "web-2"].into_iter().filter(|p| page.contains(p)));
        if seen.len() == 2 {
            break;
        }
    }
    seen
}

fn server(name: &str, node: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","labels":{{"app":"web"}}}},
        "spec":{{"nodeName":"{node}","containers":[{{"name":"web","image":"nginx","ports":[{{"containerPort":80}}]}}]}}}}"#
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_networking(lab: &Lab) {
    let (node1, node2) = deploy(lab, r#""type":"NodePort""#);
    let ip = |pod: &str| lab.kubectl.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIP}"]);
    let wget = |url: &str| lab.exec("client", &["wget", "-qO-", "-T", "2", url]);

    // Same node, then across nodes, by pod IP: the page names the pod that answered.
    for (pod, node) in [("web-1", &node1), ("web-2", &node2)] {
        let page = wget(&format!("http://{}/", ip(pod)));
        assert!(stdout(&page).contains(pod), "client -> {pod} on {node}: {page:?}");
    }

    // ClusterIP with one backend per node: both answer (bounded tries).
    let cluster_ip = lab.kubectl.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let seen = web_pods_reached(lab, &format!("http://{cluster_ip}/"));
    assert_eq!(seen.len(), 2, "ClusterIP {cluster_ip} reached only {seen:?}");

    // DNS: short, namespaced and fully qualified names.
    for name in ["web", "web.default", "web.default.svc.cluster.local"] {
        let page = wget(&format!("http://{name}/"));
        assert!(stdout(&page).contains("web-"), "http://{name}/ from the client: {page:?}");
    }

    // NodePort on every node's address, from outside the cluster (the underlay).
    let node_port =
        lab.kubectl.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.ports[0].nodePort}"]);
    for index in [1, 2] {
        let url = format!("http://{}:{node_port}/", lab.node_address(index));
        eventually(&format!("NodePort {url}"), Duration::from_secs(10), || {
            let page = lab.get_from_underlay(&url);
            (!stdout(&page).contains("web-")).then(|| format!("{page:?}"))
        });
    }
}
