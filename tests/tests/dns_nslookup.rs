//! A real stub resolver against `weir dns`: busybox `nslookup` (the tool lab pods have) in a
//! test network namespace. busybox only asks port 53, so a relay thread owns a UDP socket on
//! 127.0.0.1:53 inside the namespace and passes each datagram to `weir dns` on its loopback
//! port in the test's namespace and the answer back; the answers themselves are weir's.
use std::{
    net::{SocketAddr, UdpSocket},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde_json::json;
use weir_tests::{
    apiserver::{ApiServer, TempDir},
    dns::DnsServer,
    netns::Netns,
    privileged::require_root,
    process::command_in,
};

/// Relays UDP datagrams from a socket inside a namespace to a server outside it; stopped and
/// joined on drop.
struct UdpRelay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpRelay {
    fn start(inside: UdpSocket, server: SocketAddr) -> UdpRelay {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                inside.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
                let mut buf = vec![0u8; 65_535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, client)) = inside.recv_from(&mut buf) else { continue };
                    let upstream = UdpSocket::bind("127.0.0.1:0").expect("relay socket");
                    upstream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                    if upstream.send_to(&buf[..len], server).is_err() {
                        continue;
                    }
                    if let Ok(n) = upstream.recv(&mut buf) {
                        let _ = inside.send_to(&buf[..n], client);
                    }
                }
            }
        });
        UdpRelay { stop, thread: Some(thread) }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn nslookup(ns: &Netns, args: &[&str]) -> Output {
    command_in(ns, None, "busybox")
        .expect("a command in the namespace")
        .arg("nslookup")
        .args(args)
        .arg("127.0.0.1")
        .output()
        .expect("busybox is missing: run `cargo xtask setup`")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn dns_busybox_nslookup_resolves_services_and_reports_unknown_names() {
    require_root();
    let dir = TempDir::new("dns-api");
    let api = ApiServer::start(dir.path());
    let body = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80}]}});
    let (code, created) = api.json("POST", "/api/v1/namespaces/default/services", Some(&body));
    assert_eq!(code, 201, "{created}");
    let cluster_ip = created["spec"]["clusterIP"].as_str().expect("a ClusterIP").to_string();
    let dns = DnsServer::start(&api, &[]);

    let ns = Netns::new("dns").expect("a test namespace");
    let inside = ns
        .run(|| UdpSocket::bind("127.0.0.1:53"))
        .expect("entering the namespace")
        .expect("binding 127.0.0.1:53 in the namespace");
    let _relay = UdpRelay::start(inside, dns.addr);

    let out = nslookup(&ns, &["web.default.svc.cluster.local"]);
    assert!(out.status.success(), "{}", text(&out));
    let output = text(&out);
    assert!(output.contains(&format!("Address: {cluster_ip}")), "{output}");

    let out = nslookup(&ns, &["-type=srv", "_http._tcp.web.default.svc.cluster.local"]);
    let output = text(&out);
    assert!(out.status.success(), "{output}");
    assert!(output.contains("80 web.default.svc.cluster.local"), "{output}");

    let out = nslookup(&ns, &["nope.default.svc.cluster.local"]);
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(output.contains("NXDOMAIN"), "{output}");

    let out = nslookup(&ns, &["example.com"]);
    let output = text(&out);
    assert!(!out.status.success(), "{output}");
    assert!(output.contains("REFUSED"), "{output}");
}
