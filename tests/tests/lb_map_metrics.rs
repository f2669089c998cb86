//! Map occupancy in `weir agent`'s /metrics: the real agent with small maps
//! (`--bpf-*-map-max`) against weir's API server. `weir_bpf_map_capacity` is each map's size as
//! loaded and `weir_bpf_map_entries` the entries it holds (exact counts for the maps the agent
//! writes; the socket load balancer's reverse map fills with connections). Services that do not
//! fit the service map make the sync fail and count in `weir_bpf_map_full_total` for that map,
//! while the services already programmed keep answering; once the overflow is gone the agent
//! recovers. With the nftables dataplane there are no eBPF map metrics.
use std::{net::Ipv4Addr, time::Duration};

use serde_json::Value;
use weir_common::{conntrack, lb, sock};
use weir_proxy::programs::MapSizes;
use weir_tests::{
    agent::{
        AgentOptions, AgentProcess, AgentSetup, SLICES, create_endpoint_slice, create_service,
    },
    apiserver::{ApiServer, TempDir},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    dataplane::Dataplane,
    privileged::require_root,
    probe::spread,
    topology::ServiceNet,
    wait::eventually,
};

/// Small maps (1,024 entries is the least a flag accepts), each flag's size distinct so that
/// each shows where it applies.
const SIZES: MapSizes = MapSizes {
    services: 1024,
    backends: 1024,
    rev_nat: 1024,
    conntrack: 2048,
    socket_rev_nat: 4096,
};
/// Longer than the agent's map counting period (5 s) plus a sync.
const WAIT: Duration = Duration::from_secs(20);
/// Endpoints of each of the two big services: their slots (one entry each, plus a master)
/// fit the service map once, not twice; their backends (shared) fit the backend map.
const BIG: u32 = 600;

#[test]
fn lb_map_metrics_show_capacity_entries_and_a_full_service_map() {
    require_root();
    let net = ServiceNet::new("mapmet", 218, 2).unwrap();
    let (a, b) = (net.backends[0], net.backends[1]);
    let data = TempDir::new("mapmet-api");
    let api = ApiServer::start(data.path());
    let pins = TestPinDir::new("mapmet").unwrap();
    let cgroup = TestCgroup::new("mapmet").unwrap();

    let vip = create_service(&api, "web");
    create_endpoint_slice(&api, "web", &[a, b]);
    let vip2 = create_service(&api, "web2");
    create_endpoint_slice(&api, "web2", &[a, b]);
    assert_only_kubernetes_besides(&api, &["web", "web2"]);

    let flags = [
        ("--bpf-lb-map-max", SIZES.services),
        ("--bpf-ct-map-max", SIZES.conntrack),
        ("--bpf-sock-rev-map-max", SIZES.socket_rev_nat),
    ];
    let options = AgentOptions {
        kubeconfig: &api.kubeconfig,
        node_name: "node-a",
        netns: None,
        extra_args: flags.iter().flat_map(|(f, v)| [f.to_string(), v.to_string()]).collect(),
        wait_for: None,
    };
    let agent = AgentProcess::start_with(&options, &pins, &cgroup);

    // Capacities as loaded; entries: `kubernetes` (no endpoints: a master entry and its
    // reverse NAT), web and web2 (a master and two slots each, the two backends shared).
    let mut wanted = entries(7, 2, 3);
    wanted.extend([(conntrack::CT4_MAP, 0), (conntrack::CT6_MAP, 0)]);
    wanted.extend([(sock::SOCK_REV4_MAP, 0), (sock::SOCK_REV6_MAP, 0)]);
    eventually("exact entry counts of every sized map", WAIT, || entries_are(&agent, &wanted));
    let metrics = scrape(&agent);
    for (map, capacity) in SIZES.per_map() {
        let got = sample(&metrics, "weir_bpf_map_capacity", map);
        assert_eq!(got, Some(u64::from(capacity)), "capacity of {map}: {metrics}");
        let full = sample(&metrics, "weir_bpf_map_full_total", map);
        assert_eq!(full, Some(0), "full counter of {map}: {metrics}");
    }

    // Connections through the socket load balancer leave reverse entries (socket, backend).
    let result = spread(&net.client, Some(&cgroup), &format!("{vip}:80"), 20);
    assert_eq!(result["ok"], true, "{result}");
    eventually("socket reverse entries counted", WAIT, || {
        let metrics = scrape(&agent);
        match sample(&metrics, "weir_bpf_map_entries", sock::SOCK_REV4_MAP) {
            Some(n) if n > 0 => None,
            other => Some(format!("{other:?}")),
        }
    });

    // Two services of BIG endpoints: the first fits, the second does not.
    let fake: Vec<Ipv4Addr> =
        (0..BIG).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 218, 16, 0)) + i)).collect();
    for name in ["big1", "big2"] {
        create_service(&api, name);
        create_endpoint_slice(&api, name, &fake);
    }
    eventually("the full service map counted", WAIT, || {
        let metrics = scrape(&agent);
        match sample(&metrics, "weir_bpf_map_full_total", lb::SERVICE_MAP) {
            Some(n) if n > 0 => None,
            other => Some(format!("{other:?}: {metrics}")),
        }
    });
    let metrics = scrape(&agent);
    for (map, _) in SIZES.per_map().into_iter().filter(|(map, _)| *map != lb::SERVICE_MAP) {
        let full = sample(&metrics, "weir_bpf_map_full_total", map);
        assert_eq!(full, Some(0), "only the service map is full, not {map}: {metrics}");
    }
    let held = sample(&metrics, "weir_bpf_map_entries", lb::SERVICE_MAP).unwrap();
    assert!(held <= u64::from(SIZES.services), "{held} entries: {metrics}");
    for target in [&vip, &vip2] {
        let result = spread(&net.client, Some(&cgroup), &format!("{target}:80"), 20);
        assert_eq!(result["ok"], true, "{target} still answers: {result}");
        assert_eq!(result["backends"].as_object().map(|b| b.len()), Some(2), "{result}");
    }

    // Without big2 everything fits again: web, web2, big1 (a master and BIG slots) and
    // `kubernetes`; big1's backends and big2's were the same.
    let (code, body) = api.json("DELETE", "/api/v1/namespaces/default/services/big2", None);
    assert_eq!(code, 200, "{body}");
    let big = u64::from(BIG);
    let wanted = entries(7 + 1 + big, 2 + big, 4);
    eventually("the agent recovering from the full map", WAIT, || entries_are(&agent, &wanted));
    assert_eq!(agent.get(agent.health, "/healthz").0, 200);
}

#[test]
fn lb_map_metrics_are_absent_with_the_nftables_dataplane() {
    require_root();
    let net = ServiceNet::new("mapmetn", 218, 1).unwrap();
    let data = TempDir::new("mapmetn-api");
    let api = ApiServer::start(data.path());
    let setup = AgentSetup::new(Dataplane::Nftables, &net.client, &api, "mapmetn");
    let agent = AgentProcess::start_on(&api, &setup);
    let metrics = scrape(&agent);
    assert!(metrics.contains("weir_syncs_total"), "{metrics}");
    assert!(!metrics.contains("weir_bpf_map"), "no eBPF maps with nftables: {metrics}");
}

/// The entries wanted in the service maps: IPv4 as given, IPv6 empty.
fn entries(services: u64, backends: u64, rev_nat: u64) -> Vec<(&'static str, u64)> {
    vec![
        (lb::SERVICE_MAP, services),
        (lb::BACKEND_MAP, backends),
        (lb::REV_NAT_MAP, rev_nat),
        (lb::SERVICE6_MAP, 0),
        (lb::BACKEND6_MAP, 0),
        (lb::REV_NAT6_MAP, 0),
    ]
}

fn scrape(agent: &AgentProcess) -> String {
    let (code, metrics) = agent.get(agent.metrics, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    metrics
}

/// The value of `name{map="<map>"}`.
fn sample(metrics: &str, name: &str, map: &str) -> Option<u64> {
    let prefix = format!("{name}{{map=\"{map}\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

/// `None` when /metrics shows exactly the `wanted` entries; otherwise what differs.
fn entries_are(agent: &AgentProcess, wanted: &[(&str, u64)]) -> Option<String> {
    let metrics = scrape(agent);
    let wrong: Vec<String> = wanted
        .iter()
        .filter_map(|&(map, want)| {
            let got = sample(&metrics, "weir_bpf_map_entries", map);
            (got != Some(want)).then(|| format!("{map}: {got:?}, want {want}"))
        })
        .collect();
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// The exact counts above assume the API holds only `kubernetes` (which has no endpoints) and
/// `services`, one port each.
fn assert_only_kubernetes_besides(api: &ApiServer, services: &[&str]) {
    let (code, list) = api.json("GET", "/api/v1/services", None);
    assert_eq!(code, 200, "{list}");
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    let mut expected = [services, &["kubernetes"]].concat();
    expected.sort_unstable();
    assert_eq!(names, expected, "{list}");
    for service in list["items"].as_array().unwrap() {
        assert_eq!(service["spec"]["ports"].as_array().map(Vec::len), Some(1), "{service}");
    }
    let (code, slices) = api.json("GET", SLICES, None);
    assert_eq!(code, 200, "{slices}");
    let for_kubernetes = slices["items"].as_array().unwrap().iter().any(|slice: &Value| {
        slice["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
    });
    assert!(!for_kubernetes, "`kubernetes` has endpoints: {slices}");
}
