//! `cargo xtask bench apiserver`: the embedded control plane with its embedded store
//! (candidate) against the same server on a real etcd (baseline, Debian's etcd-server on
//! loopback ports), interleaved round by round, each round on a fresh data dir.
//!
//! Per round and side (controllers off, requests on the plain-HTTP loopback listener):
//! - `create_per_s`, `create_p50_ms`, `create_p99_ms`: 10,000 Pod creates from 8 client
//!   threads, one connection per request.
//! - `list_ms`: one list of all 10,000 Pods (JSON, whole body read).
//! - `fanout_p50_ms`, `fanout_p99_ms`: 100 open watches; 10 Pod patches, 100 ms apart; the time
//!   from sending a patch to each watcher reading its event (1,000 samples).
//! - `rss_mib`: the server's resident memory after all of the above.
//!
//! The goals: list of 10k Pods under 100 ms, fan-out p99 under 10 ms, RSS under
//! 200 MiB at 10k Pods.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::{Figures, Report, Sides, interleave};
use crate::apiserver::{ApiServer, EtcdServer, TempDir, WatchStream, http_request};

const PODS: usize = 10_000;
const CLIENTS: usize = 8;
const WATCHERS: usize = 100;
const CHANGES: usize = 10;

/// The `p`th percentile (nearest rank) of `sorted`.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resident memory of process `pid`, in MiB.
pub(crate) fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

fn measure(server: &ApiServer) -> Result<Figures> {
    let addr = server.insecure_addr.context("insecure listener")?;
    let token = server.token("admin");
    // Creates.
    let started = Instant::now();
    let mut latencies: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let token = token.clone();
                scope.spawn(move || -> Result<Vec<f64>> {
                    let mut out = Vec::new();
                    for i in (client..PODS).step_by(CLIENTS) {
                        let pod = json!({"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": format!("bench-{i}"), "labels": {"app": "bench"}},
                            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}});
                        let body = pod.to_string();
                        let t = Instant::now();
                        let resp = http_request(
                            addr,
                            "POST",
                            "/api/v1/namespaces/default/pods",
                            Some(&token),
                            "application/json",
                            body.as_bytes(),
                        );
                        out.push(ms(t.elapsed()));
                        ensure!(resp.status == 201, "create answered {}", resp.status);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let create_secs = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    // List.
    let t = Instant::now();
    let resp = http_request(addr, "GET", "/api/v1/namespaces/default/pods", Some(&token), "", b"");
    let list_ms = ms(t.elapsed());
    ensure!(resp.status == 200, "list answered {}", resp.status);
    let list: serde_json::Value = serde_json::from_slice(&resp.body)?;
    let listed = list["items"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(listed == PODS, "list returned {listed} Pods, not {PODS}");
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_string();
    // Watch fan-out.
    let path = format!("/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}");
    let watches: Vec<WatchStream> =
        (0..WATCHERS).map(|_| WatchStream::open(server, &path)).collect();
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let mut fanout: Vec<f64> = std::thread::scope(|scope| -> Result<Vec<f64>> {
        let readers: Vec<_> = watches
            .into_iter()
            .map(|mut watch| {
                let sent = sent.clone();
                scope.spawn(move || {
                    (0..CHANGES)
                        .map(|n| {
                            let _ = watch.next_event();
                            let received = Instant::now();
                            let at = sent.lock().expect("lock")[n];
                            ms(received.saturating_duration_since(at))
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        for n in 0..CHANGES {
            std::thread::sleep(Duration::from_millis(100));
            let patch = json!({"metadata": {"labels": {"change": n.to_string()}}}).to_string();
            sent.lock().expect("lock").push(Instant::now());
            let resp = http_request(
                addr,
                "PATCH",
                "/api/v1/namespaces/default/pods/bench-0",
                Some(&token),
                "application/merge-patch+json",
                patch.as_bytes(),
            );
            ensure!(resp.status == 200, "patch answered {}", resp.status);
        }
        Ok(readers.into_iter().flat_map(|h| h.join().expect("watch reader")).collect())
    })?;
    fanout.sort_by(f64::total_cmp);
    let rss = rss_mib(server.pid().context("server pid")?)?;
    Ok(Figures::from([
        ("create_per_s", PODS as f64 / create_secs),
        ("create_p50_ms", percentile(&latencies, 50.0)),
        ("create_p99_ms", percentile(&latencies, 99.0)),
        ("list_ms", list_ms),
        ("fanout_p50_ms", percentile(&fanout, 50.0)),
        ("fanout_p99_ms", percentile(&fanout, 99.0)),
        ("rss_mib", rss),
    ]))
}

const SERVER_ARGS: &[&str] = &["--disable-controllers", "--max-requests-inflight", "1000"];

pub fn run(rounds: u32) -> Result<Report> {
    let embedded = || -> Result<Figures> {
        let dir = TempDir::new("bench-api");
        let server = ApiServer::start_with(dir.path(), SERVER_ARGS);
        measure(&server)
    };
    let etcd = || -> Result<Figures> {
        let dir = TempDir::new("bench-api-etcd");
        let etcd = EtcdServer::start();
        let mut args = SERVER_ARGS.to_vec();
        args.extend(["--etcd-endpoints", etcd.endpoint.as_str()]);
        let server = ApiServer::start_with(dir.path(), &args);
        measure(&server)
    };
    let report = interleave(
        "apiserver",
        Sides {
            candidate_label: "embedded store",
            baseline_label: "etcd",
            unit: "see figure names",
        },
        rounds,
        embedded,
        etcd,
    )?;
    Ok(report)
}

/// Services per block of [`service_creates`].
const CREATE_BLOCK: usize = 500;

/// `weir-bench service-creates [--sizes N]`: N Service creates in a row from one client
/// (controllers on, as a lab runs), timed per block of 500, to show whether a create costs
/// more as Services accumulate. Each Service has a selector (so allocation and the endpoints
/// controller both work) in namespace default; every tenth is a NodePort and gets a Pod
/// that it selects. Prints one line per block and the server's RSS at the end.
pub fn service_creates(count: usize) -> Result<()> {
    let dir = TempDir::new("bench-service-creates");
    let server = ApiServer::start(dir.path());
    let addr = server.insecure_addr.context("insecure listener")?;
    let token = server.token("admin");
    let post = |path: &str, body: serde_json::Value| -> Result<()> {
        super::lb_agent::post(addr, &token, path, &body).map(drop)
    };
    let mut block_started = Instant::now();
    let started = block_started;
    let mut first_block = None;
    for i in 0..count {
        post(
            "/api/v1/namespaces/default/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s-{i}")},
                   "spec": {"type": if i % 10 == 0 { "NodePort" } else { "ClusterIP" },
                            "selector": {"app": format!("a-{i}")},
                            "ports": [{"port": 80, "protocol": "TCP"}]}}),
        )?;
        if i % 10 == 0 {
            post(
                "/api/v1/namespaces/default/pods",
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": format!("p-{i}"), "labels": {"app": format!("a-{i}")}},
                       "spec": {"containers": [{"name": "c", "image": "x"}]}}),
            )?;
        }
        if (i + 1) % CREATE_BLOCK == 0 || i + 1 == count {
            let took = block_started.elapsed();
            let n = i % CREATE_BLOCK + 1;
            let per = ms(took) / n as f64;
            let ratio = *first_block.get_or_insert(per);
            println!(
                "service-creates: {:>6}-{:<6} {:>8.2} s  {:>6.2} ms/create  x{:.2} of the first block",
                i + 1 - n,
                i + 1,
                took.as_secs_f64(),
                per,
                per / ratio
            );
            block_started = Instant::now();
        }
    }
    println!(
        "service-creates: {count} in {:.1} s; server RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib(server.pid().context("server pid")?)?
    );
    Ok(())
}
