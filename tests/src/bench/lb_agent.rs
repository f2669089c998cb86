//! `weir-bench lb-agent [--sizes N]`: the real `weir agent` process against the embedded API
//! server (as the lb_agent test runs it), on both dataplanes, with N services (default 10,000)
//! of 4 endpoints each created through the API.
//!
//! Per dataplane:
//! - `rss_mib`: the agent's resident memory after its first sync, and again after the changes;
//! - endpoint changes: [`CHANGES`] EndpointSlice patches, one service each, [`PAUSE`] apart,
//!   each adding a fifth endpoint (eBPF) or, against the same objects, taking it away again
//!   (nftables, run second). Two latencies:
//!   - event -> datapath (the figure): from the agent receiving the watch event to the
//!     datapath written, read from the agent's `weir_event_to_datapath_seconds` histogram
//!     (the difference over the changes, so the first sync is not counted); p50 and p99 are
//!     the bucket bounds they fall in;
//!   - API write -> map (eBPF only): from sending the PATCH to the service's master entry in
//!     the pinned map showing 5 slots, polled; this adds the API server's write and watch
//!     fan-out and the agent's decoding to the figure above.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weir_common::lb::ServiceKey;
use weir_proxy::maps::ServiceMaps;

use super::apiserver::{ms, percentile, rss_mib};
use crate::{
    agent::{AgentProcess, AgentSetup},
    apiserver::{ApiServer, TempDir, http_request},
    dataplane::Dataplane,
    netns::Netns,
    privileged::require_root,
};

const ENDPOINTS_PER_SERVICE: u32 = 4;
const CHANGES: usize = 200;
/// Between two changes, so that each is its own sync (changes arriving together are applied
/// together, which would hide the per-change latency).
const PAUSE: Duration = Duration::from_millis(20);
const CLIENTS: usize = 8;
/// How long one change may take to show in the map before the bench fails.
const CHANGE_WAIT: Duration = Duration::from_secs(10);
const HISTOGRAM: &str = "weir_event_to_datapath_seconds";

/// `weir-bench lb-agent`: prints the figures for each dataplane.
pub fn run(services: u32) -> Result<()> {
    require_root();
    ensure!(
        services as usize >= CHANGES,
        "lb-agent needs at least {CHANGES} services (each change is to another one)"
    );
    let data = TempDir::new("bench-agent-api");
    let api = ApiServer::start_with(
        data.path(),
        &["--disable-controllers", "--max-requests-inflight", "1000"],
    );
    let started = Instant::now();
    let vips = create_services(&api, services)?;
    println!(
        "bench lb-agent: created {services} services and their EndpointSlices ({} endpoints) \
         in {:.1} s",
        services * ENDPOINTS_PER_SERVICE,
        started.elapsed().as_secs_f64()
    );
    // The eBPF agent's changes add a fifth endpoint; the nftables agent's, against the same
    // API objects, take it away again.
    for (dataplane, endpoints) in [(Dataplane::Ebpf, 5), (Dataplane::Nftables, 4)] {
        let client = Netns::new("benchagent")?;
        let setup = AgentSetup::new(dataplane, &client, &api, "benchagent");
        let started = Instant::now();
        let agent = AgentProcess::start_on(&api, &setup);
        let first_sync = started.elapsed();
        let pid = agent.pid().context("agent pid")?;
        let rss_loaded = rss_mib(pid)?;
        let before = histogram(&agent)?;
        let maps = match &setup {
            AgentSetup::Ebpf { pins, .. } => Some(ServiceMaps::open_pinned(pins.path())?),
            AgentSetup::Nftables { .. } => None,
        };
        let mut api_to_map = Vec::new();
        for change in 0..CHANGES {
            // Spread over the services, never the same one twice.
            let index = (change as u32 * 7_919) % services;
            let elapsed = change_endpoints(&api, index, endpoints, &vips, maps.as_ref())?;
            api_to_map.extend(elapsed.map(ms));
            std::thread::sleep(PAUSE);
        }
        // The last changes reach the agent's histogram after its sync.
        let deadline = Instant::now() + CHANGE_WAIT;
        let after = loop {
            let after = histogram(&agent)?;
            if after.count >= before.count + CHANGES as u64 || Instant::now() > deadline {
                break after;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let rss_changed = rss_mib(pid)?;
        let samples = after.count - before.count;
        ensure!(samples > 0, "the agent recorded no change (histogram {HISTOGRAM})");
        let (p50, p99) = (after.quantile(&before, 0.5), after.quantile(&before, 0.99));
        println!(
            "bench lb-agent: {} n={services} ({} endpoints): first sync {:.0} ms after start; \
             RSS {rss_loaded:.1} MiB loaded, {rss_changed:.1} MiB after {CHANGES} changes; \
             event -> datapath over {samples} syncs: p50 <= {}, p99 <= {} (mean {:.3} ms)",
            dataplane.flag(),
            services * ENDPOINTS_PER_SERVICE,
            ms(first_sync),
            bound(p50),
            bound(p99),
            (after.sum - before.sum) / samples as f64 * 1e3,
        );
        if !api_to_map.is_empty() {
            api_to_map.sort_by(f64::total_cmp);
            println!(
                "bench lb-agent: {} API write -> map entry: p50 {:.2} ms, p99 {:.2} ms, max \
                 {:.2} ms ({} changes)",
                dataplane.flag(),
                percentile(&api_to_map, 50.0),
                percentile(&api_to_map, 99.0),
                api_to_map.last().copied().unwrap_or_default(),
                api_to_map.len()
            );
        }
    }
    Ok(())
}

fn bound(seconds: Option<f64>) -> String {
    seconds.map_or("> 5 s".to_string(), |s| format!("{:.2} ms", s * 1e3))
}

/// Creates `services` selector-less services `bench-<i>` and their slices (4 ready endpoints
/// each) from [`CLIENTS`] threads on the API server's plain-HTTP listener; returns each
/// service's cluster IP.
fn create_services(api: &ApiServer, services: u32) -> Result<Vec<Ipv4Addr>> {
    let addr = api.insecure_addr.context("the API server's insecure listener")?;
    let token = api.token("admin");
    let mut vips = vec![Ipv4Addr::UNSPECIFIED; services as usize];
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let token = token.clone();
                scope.spawn(move || -> Result<Vec<(usize, Ipv4Addr)>> {
                    let mut out = Vec::new();
                    for i in (client..services as usize).step_by(CLIENTS) {
                        let service = json!({"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": format!("bench-{i}"), "namespace": "default"},
                            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
                        let created =
                            post(addr, &token, "/api/v1/namespaces/default/services", &service)?;
                        let vip = created["spec"]["clusterIP"]
                            .as_str()
                            .and_then(|ip| ip.parse().ok())
                            .with_context(|| format!("no IPv4 clusterIP in {created}"))?;
                        out.push((i, vip));
                        let slice = slice(i as u32, ENDPOINTS_PER_SERVICE);
                        post(addr, &token, SLICES, &slice)?;
                    }
                    Ok(out)
                })
            })
            .collect();
        for handle in handles {
            for (i, vip) in handle.join().expect("client thread")? {
                vips[i] = vip;
            }
        }
        Ok(())
    })?;
    Ok(vips)
}

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// A POST that must answer 201; returns the created object.
pub(crate) fn post(addr: SocketAddr, token: &str, path: &str, body: &Value) -> Result<Value> {
    let response = http_request(
        addr,
        "POST",
        path,
        Some(token),
        "application/json",
        body.to_string().as_bytes(),
    );
    ensure!(
        response.status == 201,
        "POST {path} answered {}: {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    );
    Ok(serde_json::from_slice(&response.body)?)
}

/// The ready endpoints of service `i`: addresses in 10.128.0.0/9 nothing connects to.
fn endpoints(i: u32, count: u32) -> Vec<Value> {
    (0..count)
        .map(|e| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 8 + e);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
        })
        .collect()
}

fn slice(i: u32, count: u32) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("bench-{i}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("bench-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(i, count),
    })
}

/// Gives service `index` `count` endpoints through the API; with `maps`, waits until its
/// master entry counts `count` slots and returns the time from sending the patch.
fn change_endpoints(
    api: &ApiServer,
    index: u32,
    count: u16,
    vips: &[Ipv4Addr],
    maps: Option<&ServiceMaps>,
) -> Result<Option<Duration>> {
    let addr = api.insecure_addr.context("the API server's insecure listener")?;
    let patch = json!({"endpoints": endpoints(index, count.into())}).to_string();
    let path = format!("{SLICES}/bench-{index}-1");
    let token = api.token("admin");
    let sent = Instant::now();
    let response = http_request(
        addr,
        "PATCH",
        &path,
        Some(&token),
        "application/merge-patch+json",
        patch.as_bytes(),
    );
    ensure!(response.status == 200, "PATCH {path} answered {}", response.status);
    let Some(maps) = maps else { return Ok(None) };
    let key = ServiceKey::new(vips[index as usize].octets(), 80, weir_common::proto::TCP, 0);
    loop {
        if maps.v4.service_entry(key).is_some_and(|master| master.count == count) {
            return Ok(Some(sent.elapsed()));
        }
        if sent.elapsed() > CHANGE_WAIT {
            bail!(
                "service bench-{index} ({}) did not get its {count} endpoints in the map",
                IpAddr::V4(vips[index as usize])
            );
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The agent's event -> datapath histogram.
struct Histogram {
    /// (upper bound in seconds, cumulative count).
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Histogram {
    /// The bound of the first bucket holding quantile `q` of the observations made since
    /// `before`; `None` when it lies beyond the last finite bound.
    fn quantile(&self, before: &Histogram, q: f64) -> Option<f64> {
        let total = self.count - before.count;
        let rank = (q * total as f64).ceil() as u64;
        self.buckets
            .iter()
            .zip(&before.buckets)
            .find(|((_, now), (_, then))| now - then >= rank.max(1))
            .map(|((bound, _), _)| *bound)
    }
}

fn histogram(agent: &AgentProcess) -> Result<Histogram> {
    let (code, text) = agent.get(agent.metrics, "/metrics");
    ensure!(code == 200, "/metrics answered {code}");
    let mut histogram = Histogram { buckets: Vec::new(), count: 0, sum: 0.0 };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(HISTOGRAM) else { continue };
        let Some((name, value)) = rest.rsplit_once(' ') else { continue };
        if let Some(bound) = name.strip_prefix("_bucket{le=\"").and_then(|b| b.strip_suffix("\"}"))
            && let Ok(bound) = bound.parse::<f64>()
            && bound.is_finite()
        {
            histogram.buckets.push((bound, value.parse()?));
        } else if name == "_count" {
            histogram.count = value.parse()?;
        } else if name == "_sum" {
            histogram.sum = value.parse()?;
        }
    }
    ensure!(!histogram.buckets.is_empty(), "/metrics has no {HISTOGRAM}: {text}");
    Ok(histogram)
}
