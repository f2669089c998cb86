//! `weir dns` against a real API server: records for ClusterIP, headless and ExternalName
//! Services, named ports, Pods; NXDOMAIN with the SOA; updates when objects change; names
//! outside the cluster domain REFUSED or forwarded; bad flags. Questions go over UDP and TCP
//! with hickory's client to a loopback port.
use std::{process::Command, time::Duration};

use serde_json::{Value, json};
use weir_tests::{
    apiserver::{ApiServer, TempDir, weir_binary},
    dns::{DnsServer, RecordType, ResponseCode, Transport, answer_texts},
    wait::eventually,
};

const UPDATE_WAIT: Duration = Duration::from_secs(20);
const BOTH: [Transport; 2] = [Transport::Udp, Transport::Tcp];

fn create(
    api: &ApiServer,
    path: &str,
    (api_version, kind): (&str, &str),
    mut body: Value,
) -> Value {
    body["apiVersion"] = json!(api_version);
    body["kind"] = json!(kind);
    let (code, created) = api.json("POST", path, Some(&body));
    assert_eq!(code, 201, "POST {path}: {created}");
    created
}

fn service(api: &ApiServer, body: Value) -> Value {
    create(api, "/api/v1/namespaces/default/services", ("v1", "Service"), body)
}

fn endpoint_slice(api: &ApiServer, body: Value) -> Value {
    let path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
    create(api, path, ("discovery.k8s.io/v1", "EndpointSlice"), body)
}

/// Waits until `name` answers `qtype` with exactly `want` (sorted texts) over UDP.
fn eventually_answers(dns: &DnsServer, name: &str, qtype: RecordType, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(&format!("{name} {qtype} -> {want:?}"), UPDATE_WAIT, || {
        let response = dns.query(Transport::Udp, name, qtype);
        let got = answer_texts(&response);
        (response.metadata.response_code != ResponseCode::NoError || got != want)
            .then(|| format!("{} {got:?}", response.metadata.response_code))
    });
}

fn eventually_nxdomain(dns: &DnsServer, name: &str) {
    eventually(&format!("{name} NXDOMAIN"), UPDATE_WAIT, || {
        let response = dns.query(Transport::Udp, name, RecordType::A);
        (response.metadata.response_code != ResponseCode::NXDomain)
            .then(|| format!("{} {:?}", response.metadata.response_code, answer_texts(&response)))
    });
}

#[test]
fn dns_cluster_ip_services_answer_a_srv_ptr_and_nxdomain_over_udp_and_tcp() {
    let dir = TempDir::new("dns-api");
    let api = ApiServer::start(dir.path());
    let created = service(
        &api,
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]}}),
    );
    let cluster_ip = created["spec"]["clusterIP"].as_str().expect("a ClusterIP").to_string();
    let dns = DnsServer::start(&api, &[]);

    for transport in BOTH {
        let response = dns.query(transport, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative, "{transport:?}: answers are authoritative");
        assert_eq!(answer_texts(&response), vec![cluster_ip.clone()], "{transport:?}");
        assert!(response.answers.iter().all(|r| r.ttl == 5), "TTL 5 s");

        // Case does not matter.
        let response = dns.query(transport, "WEB.Default.SVC.Cluster.Local.", RecordType::A);
        assert_eq!(answer_texts(&response), vec![cluster_ip.clone()], "{transport:?}");

        let response =
            dns.query(transport, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(answer_texts(&response), vec!["0 100 80 web.default.svc.cluster.local."]);
        let response =
            dns.query(transport, "_dns._udp.web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(answer_texts(&response), vec!["0 100 53 web.default.svc.cluster.local."]);

        let reverse = {
            let mut octets: Vec<&str> = cluster_ip.split('.').collect();
            octets.reverse();
            format!("{}.in-addr.arpa.", octets.join("."))
        };
        let response = dns.query(transport, &reverse, RecordType::PTR);
        assert_eq!(answer_texts(&response), vec!["web.default.svc.cluster.local."]);

        // Unknown names in the cluster domain: NXDOMAIN with the SOA in the authority section.
        let response = dns.query(transport, "nope.default.svc.cluster.local.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain, "{transport:?}");
        assert!(response.answers.is_empty());
        let soa = response.authorities.first().expect("the SOA in the authority section");
        assert_eq!(soa.record_type(), RecordType::SOA);
        assert_eq!(soa.name.to_ascii(), "cluster.local.");

        // A name that exists without the type asked: NOERROR, no answers, SOA.
        let response = dns.query(transport, "web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.answers.is_empty());
        assert_eq!(response.authorities.len(), 1);

        let response = dns.query(transport, "dns-version.cluster.local.", RecordType::TXT);
        assert_eq!(answer_texts(&response), vec!["1.1.0"]);

        // The lab has no internet: without --upstream, other names are refused.
        let response = dns.query(transport, "example.com.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::Refused, "{transport:?}");
    }

    // Deleting the Service removes its names.
    let (code, body) = api.json("DELETE", "/api/v1/namespaces/default/services/web", None);
    assert_eq!(code, 200, "{body}");
    eventually_nxdomain(&dns, "web.default.svc.cluster.local.");
    eventually("the SRV record to go", UPDATE_WAIT, || {
        let response =
            dns.query(Transport::Tcp, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV);
        (response.metadata.response_code != ResponseCode::NXDomain)
            .then(|| format!("{:?}", answer_texts(&response)))
    });
    assert!(dns.terminate().success(), "SIGTERM stops weir dns cleanly");
}

#[test]
fn dns_headless_services_follow_their_endpoint_slices() {
    let dir = TempDir::new("dns-api");
    let api = ApiServer::start(dir.path());
    // Started first: everything below arrives through the watches.
    let dns = DnsServer::start(&api, &[]);
    eventually_nxdomain(&dns, "db.default.svc.cluster.local.");

    // Without a selector the slices are ours to write.
    service(
        &api,
        json!({"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [
            {"name": "pg", "port": 5432}
        ]}}),
    );
    let slice = endpoint_slice(
        &api,
        json!({
            "metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.3.7"], "conditions": {"ready": false}}
            ]
        }),
    );
    eventually_answers(
        &dns,
        "db.default.svc.cluster.local.",
        RecordType::A,
        &["10.244.1.5", "10.244.2.6"],
    );
    for transport in BOTH {
        let response = dns.query(transport, "db-0.db.default.svc.cluster.local.", RecordType::A);
        assert_eq!(answer_texts(&response), vec!["10.244.1.5"], "{transport:?}");
        let response =
            dns.query(transport, "10-244-2-6.db.default.svc.cluster.local.", RecordType::A);
        assert_eq!(answer_texts(&response), vec!["10.244.2.6"], "{transport:?}");
        let response =
            dns.query(transport, "_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            answer_texts(&response),
            vec![
                "0 100 15432 10-244-2-6.db.default.svc.cluster.local.",
                "0 100 15432 db-0.db.default.svc.cluster.local.",
            ]
        );
        let response = dns.query(transport, "5.1.244.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(answer_texts(&response), vec!["db-0.db.default.svc.cluster.local."]);
    }

    // An endpoint changes: the not-ready one becomes ready, db-0 leaves.
    let mut changed = slice.clone();
    changed["endpoints"] = json!([
        {"addresses": ["10.244.2.6"], "conditions": {"ready": true}},
        {"addresses": ["10.244.3.7"], "conditions": {"ready": true}}
    ]);
    let (code, body) = api.json(
        "PUT",
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/db-1",
        Some(&changed),
    );
    assert_eq!(code, 200, "{body}");
    eventually_answers(
        &dns,
        "db.default.svc.cluster.local.",
        RecordType::A,
        &["10.244.2.6", "10.244.3.7"],
    );
    eventually_nxdomain(&dns, "db-0.db.default.svc.cluster.local.");

    // The slice goes: the headless name has no addresses left.
    let (code, body) = api.json(
        "DELETE",
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/db-1",
        None,
    );
    assert_eq!(code, 200, "{body}");
    eventually_nxdomain(&dns, "db.default.svc.cluster.local.");
}

#[test]
fn dns_pods_get_records_and_selector_services_follow_them() {
    let dir = TempDir::new("dns-api");
    let api = ApiServer::start(dir.path());
    let dns = DnsServer::start(&api, &[]);
    // A headless Service with a selector: the API server's EndpointSlice controller fills it.
    service(
        &api,
        json!({"metadata": {"name": "cache"}, "spec": {"clusterIP": "None",
            "selector": {"app": "cache"}, "ports": [{"name": "redis", "port": 6379}]}}),
    );
    create(
        &api,
        "/api/v1/namespaces/default/pods",
        ("v1", "Pod"),
        json!({"metadata": {"name": "cache-a", "labels": {"app": "cache"}},
               "spec": {"hostname": "cache-a", "subdomain": "cache",
                        "containers": [{"name": "c", "image": "busybox"}]}}),
    );
    let status = json!({"status": {"phase": "Running", "podIP": "10.244.1.20",
        "podIPs": [{"ip": "10.244.1.20"}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    let (code, body) =
        api.json("PATCH", "/api/v1/namespaces/default/pods/cache-a/status", Some(&status));
    assert_eq!(code, 200, "{body}");

    eventually_answers(
        &dns,
        "10-244-1-20.default.pod.cluster.local.",
        RecordType::A,
        &["10.244.1.20"],
    );
    eventually_answers(&dns, "cache.default.svc.cluster.local.", RecordType::A, &["10.244.1.20"]);
    eventually_answers(
        &dns,
        "cache-a.cache.default.svc.cluster.local.",
        RecordType::A,
        &["10.244.1.20"],
    );
    let response =
        dns.query(Transport::Tcp, "_redis._tcp.cache.default.svc.cluster.local.", RecordType::SRV);
    assert_eq!(response.answers.len(), 1, "{:?}", answer_texts(&response));

    // The Pod goes: its names go.
    let (code, body) =
        api.json("DELETE", "/api/v1/namespaces/default/pods/cache-a?gracePeriodSeconds=0", None);
    assert_eq!(code, 200, "{body}");
    eventually_nxdomain(&dns, "10-244-1-20.default.pod.cluster.local.");
    eventually_nxdomain(&dns, "cache-a.cache.default.svc.cluster.local.");
}

#[test]
fn dns_forwards_other_names_upstream_and_follows_external_names() {
    let dir = TempDir::new("dns-api");
    let api = ApiServer::start(dir.path());
    let created =
        service(&api, json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}));
    let cluster_ip = created["spec"]["clusterIP"].as_str().expect("a ClusterIP").to_string();
    service(
        &api,
        json!({"metadata": {"name": "outside"}, "spec": {"type": "ExternalName",
            "externalName": "web.default.svc.upstream.test"}}),
    );
    // 100 addresses do not fit in one UDP answer (1232 bytes): the forwarder must ask again
    // over TCP.
    service(&api, json!({"metadata": {"name": "big"}, "spec": {"clusterIP": "None"}}));
    let endpoints: Vec<Value> = (1..=100)
        .map(|i| json!({"addresses": [format!("10.244.7.{i}")], "conditions": {"ready": true}}))
        .collect();
    endpoint_slice(
        &api,
        json!({"metadata": {"name": "big-1", "labels": {"kubernetes.io/service-name": "big"}},
               "addressType": "IPv4", "endpoints": endpoints}),
    );
    // The "upstream": another weir dns serving the same cluster under another domain.
    let upstream = DnsServer::start(&api, &["--cluster-domain", "upstream.test"]);
    let upstream_addr = upstream.addr.to_string();
    let dns = DnsServer::start(&api, &["--upstream", &upstream_addr]);

    for transport in BOTH {
        let response = dns.query(transport, "web.default.svc.upstream.test.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{transport:?}");
        assert!(!response.metadata.authoritative, "forwarded answers are not authoritative");
        assert!(response.metadata.recursion_available);
        assert_eq!(answer_texts(&response), vec![cluster_ip.clone()], "{transport:?}");

        // The upstream's NXDOMAIN comes back as it is.
        let response = dns.query(transport, "nope.default.svc.upstream.test.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain, "{transport:?}");

        // ExternalName: the CNAME, then its target's records from the upstream.
        let response = dns.query(transport, "outside.default.svc.cluster.local.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            answer_texts(&response),
            vec![cluster_ip.clone(), "web.default.svc.upstream.test.".to_string()],
            "{transport:?}"
        );
    }

    let response = dns.query(Transport::Tcp, "big.default.svc.upstream.test.", RecordType::A);
    assert_eq!(response.answers.len(), 100, "all addresses, fetched upstream over TCP");

    // The upstream stops answering: SERVFAIL, not a hang.
    drop(upstream);
    let response = dns.query(Transport::Udp, "web.default.svc.upstream.test.", RecordType::A);
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn dns_bad_flags_exit_64_with_a_message() {
    let dir = TempDir::new("dns-bad");
    let missing = dir.path().join("missing.kubeconfig");
    let cases: [(&[&str], &str); 3] = [
        (&["--cluster-domain", "bad..domain"], "is not a domain name"),
        (&["--listen", "127.0.0.1:0", "--kubeconfig", missing.to_str().unwrap()], "kubeconfig"),
        (&["--listen", "127.0.0.1:5353", "--upstream", "127.0.0.1:5353"], "loop"),
    ];
    for (args, message) in cases {
        let out = Command::new(weir_binary()).arg("dns").args(args).output().expect("weir dns");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let out = Command::new(weir_binary())
        .args(["dns", "--upstream", "not-an-address"])
        .output()
        .expect("weir dns");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an IP address"));
}
