//! `cargo xtask bench lb`: connect/request/close rate through a ClusterIP served by the
//! socket-level load balancer, at N = 1, 1k, 10k and 100k services (4 endpoints each), against
//! two baselines, each its own report:
//! - `lb`: the same connections made straight to the pod IP by a process outside the load
//!   balancer's cgroup (no program on its path at all: the physical limit);
//! - `lb-nftables`: the same connections through the same ClusterIP served by the nftables
//!   dataplane (kube-proxy's nftables mode's shape), programmed with the same N services in a
//!   twin client namespace of its own, so that neither side's packets meet the other's hooks
//!   or conntrack.
//!
//! Each N is its own phase: fresh datapaths are loaded and programmed with N - 1 filler
//! services plus the measured one, then candidate and baseline alternate for the given rounds
//! (first against direct, then against nftables). Figures are `conn_per_s_n<N>`. The ratios
//! between phases (at 100k over at 1, per dataplane) are printed at the end.
//!
//! Each phase also prints the programming figures of both dataplanes (no API server: planner
//! and map or netlink writes): the load of N services, and one service changed with N in
//! place, planned per service ([`ServiceIndex`] + `plan_changed`) and by a full diff.
//! `weir-bench lb-programming [--sizes N,...]` prints only those.
//!
//! `weir-bench lb` then runs [`super::lb_agent`] at 10,000 services (the agent's RSS and
//! event-to-datapath latency), unless `--sizes` limited the run.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use weir_proxy::{
    apply::{ebpf::MapWriter, nft::NftDataplane, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceIndex, ServiceState},
    programs::{self, LoadOptions, MapSizes},
};

use super::{FigureReport, Figures, Report, Sides, figure, interleave};
use crate::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    dataplane::table_name,
    netns::Netns,
    privileged::require_root,
    probe,
    topology::{BACKEND_PORT, ServiceNet},
};

const CONNECTIONS: u32 = 5_000;
const ENDPOINTS_PER_SERVICE: u32 = 4;
/// Single-service changes measured per phase and way of planning (the median is reported);
/// even, so that the last one restores the state the connections are measured against.
const CHANGES: usize = 20;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// One report's figures over all phases.
type Phases = BTreeMap<&'static str, FigureReport>;

/// The service counts measured when none are given.
pub const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];

/// Runs every phase in `sizes`; returns the `lb` report (socket LB against direct) and the
/// `lb-nftables` one (socket LB against the nftables dataplane).
pub fn run(sizes: &[u32], rounds: u32) -> Result<Vec<Report>> {
    require_root();
    // Two twin networks: the socket LB's client and the nftables table's client each have
    // their own namespace and echo servers.
    let net = ServiceNet::serial("benchlb", 207, 1)?;
    let nft_net = ServiceNet::serial("benchlbn", 208, 1)?;
    for client in [&net.client, &nft_net.client] {
        // Tens of thousands of short connections from one address to one backend port: reuse
        // TIME_WAIT ports and widen the ephemeral range, in the clients' own namespaces only.
        client.run(|| -> std::io::Result<()> {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
        })??;
    }
    let (mut direct, mut nft) = (BTreeMap::new(), BTreeMap::new());
    for &n in sizes {
        ensure!(n >= 1, "a phase needs at least the measured service (got n = 0)");
        let (against_direct, against_nft) = phase(&net, &nft_net, n, rounds)?;
        direct.extend(against_direct.figures);
        nft.extend(against_nft.figures);
    }
    // Ours at the largest N over ours at the smallest: raw, and normalised by each phase's
    // baseline. Phases run minutes apart and the client's TIME_WAIT table fills as they go
    // (hundreds of thousands of connections from one address to one port), which slows every
    // side alike; the normalised ratio cancels that drift.
    let cross = |figures: &Phases, side: fn(&FigureReport) -> f64| {
        let (first, last) = (sizes.iter().min()?, sizes.iter().max()?);
        let figure = |n: u32| figures.get(figure_name(n)).map(side);
        Some((*first, *last, figure(*last)? / figure(*first)?))
    };
    let summaries = [
        ("socket LB", cross(&direct, |f| f.candidate_median)),
        ("socket LB, normalised by direct", cross(&direct, |f| f.ratio_median)),
        ("nftables", cross(&nft, |f| f.baseline_median)),
    ];
    for (what, summary) in summaries {
        if let Some((first, last, ratio)) = summary {
            println!("bench lb: {what}: at {last} services / at {first}: {ratio:.3}x");
        }
    }
    let report = |name: &str, baseline: &str, figures| Report {
        name: name.into(),
        candidate: "socket LB through the ClusterIP".into(),
        baseline: baseline.into(),
        unit: "TCP connect+request+close per second".into(),
        rounds,
        figures,
    };
    Ok(vec![
        report("lb", "direct to the pod IP, no program", direct),
        report("lb-nftables", "nftables dataplane through the ClusterIP", nft),
    ])
}

/// `conn_per_s_n<N>`.
fn figure_name(n: u32) -> &'static str {
    figure("conn_per_s", n)
}

fn phase(net: &ServiceNet, nft_net: &ServiceNet, n: u32, rounds: u32) -> Result<(Report, Report)> {
    let backend = net.backends[0];
    let pins = TestPinDir::new("benchlb")?;
    let cgroup = TestCgroup::new("benchlb")?;
    let (mut loaded, programming) = ebpf_programming(&pins, n, backend)?;
    programming.print("ebpf");
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None)?;
    // The nftables table stays in the twin client's namespace for this phase's rounds.
    let (nft_table, nft_programming) =
        nft_programming_in(&nft_net.client, &table_name("benchlb"), n, nft_net.backends[0])?;
    nft_programming.print("nftables");

    let vip = format!("{VIP}:80");
    let direct = format!("{backend}:{BACKEND_PORT}");
    let measure = |client: &Netns, cgroup: Option<&TestCgroup>, target: &str| -> Result<Figures> {
        let result = probe::spread(client, cgroup, target, CONNECTIONS);
        ensure!(result["ok"] == true, "connections failed: {result}");
        // The probe's own clock: starting a process and moving it into a cgroup (an RCU wait
        // of several ms, paid by the socket LB's side only) are not the path being measured.
        let elapsed_us = result["elapsed_us"].as_f64().context("tcp-spread without elapsed_us")?;
        Ok(Figures::from([(figure_name(n), f64::from(CONNECTIONS) / (elapsed_us / 1e6))]))
    };
    let socket_lb = || measure(&net.client, Some(&cgroup), &vip);
    let against_direct = interleave(
        "lb",
        Sides { candidate_label: "vip", baseline_label: "direct", unit: "conn/s" },
        rounds,
        socket_lb,
        || measure(&net.client, None, &direct),
    )?;
    let against_nft = interleave(
        "lb-nftables",
        Sides { candidate_label: "socket LB", baseline_label: "nftables", unit: "conn/s" },
        rounds,
        socket_lb,
        || measure(&nft_net.client, None, &vip),
    );
    nft_table.remove_table()?;
    Ok((against_direct, against_nft?))
}

/// The measured service (VIP:80 -> the echo backend) and `n - 1` fillers with
/// [`ENDPOINTS_PER_SERVICE`] endpoints each on addresses nothing connects to.
fn desired(n: u32, backend: Ipv4Addr) -> ServiceState {
    let mut state = ServiceState::default();
    let mut add = |address: Ipv4Addr, backends: Vec<std::net::SocketAddr>| {
        state.frontends.insert(
            Frontend { address: IpAddr::V4(address), port: 80, protocol: Protocol::Tcp },
            FrontendState::cluster_ip(format!("bench/{address}"), backends),
        );
    };
    add(VIP, vec![(backend, BACKEND_PORT).into()]);
    for i in 1..n {
        // Fillers live in 10.100.0.0/14 (VIPs) and 10.128.0.0/9 (endpoints).
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let endpoints = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let ip = Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS_PER_SERVICE + e,
                );
                (ip, 8080).into()
            })
            .collect();
        add(vip, endpoints);
    }
    state
}

/// Loads the eBPF datapath with `n` services (maps sized for them) and measures programming.
fn ebpf_programming(
    pins: &TestPinDir,
    n: u32,
    backend: Ipv4Addr,
) -> Result<(programs::Loaded, Programming)> {
    let slots = n * (1 + ENDPOINTS_PER_SERVICE) + 16;
    let sizes = MapSizes {
        services: slots,
        backends: n * ENDPOINTS_PER_SERVICE + 16,
        rev_nat: n + 16,
        ..MapSizes::default()
    };
    let mut loaded = programs::load(&LoadOptions { sizes, ..LoadOptions::new(pins.path()) })?;
    let writer = std::cell::RefCell::new(MapWriter::new(ServiceMaps::take(&mut loaded.ebpf)?));
    let planner = std::cell::RefCell::new(ServicePlanner::new());
    let programming = measure_programming(
        n,
        backend,
        |state| {
            let plan = planner.borrow_mut().plan(state);
            writer.borrow_mut().execute(&plan)?;
            Ok(plan.len())
        },
        |state, changed| {
            let plan = planner.borrow_mut().plan_changed(state, changed);
            writer.borrow_mut().execute(&plan)?;
            Ok(plan.len())
        },
    )?;
    Ok((loaded, programming))
}

/// How long programming `n` services took on one dataplane: the load from empty, and one
/// endpoint added to (or removed from) one service with `n` in place, planned per service
/// (the change's frontends only) and by a full diff of the whole state.
#[derive(Clone, Copy, Debug)]
pub struct Programming {
    pub n: u32,
    pub load: Duration,
    pub load_ops: usize,
    /// Median of [`CHANGES`] changes; `None` with no filler service to change (n = 1).
    pub change: Option<Duration>,
    pub change_full_diff: Option<Duration>,
    pub change_ops: usize,
}

impl Programming {
    pub fn print(&self, dataplane: &str) {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3))
        };
        println!(
            "bench lb: {dataplane} n={}: load {} operations in {:.1} ms; one endpoint added or \
             removed with n in place: {} operations in {} (full diff: {})",
            self.n,
            self.load_ops,
            self.load.as_secs_f64() * 1e3,
            self.change_ops,
            ms(self.change),
            ms(self.change_full_diff)
        );
    }
}

/// Loads `n` services with `full` (a full diff), then changes one filler service
/// [`CHANGES`] times each way: with `changed` (the frontends a per-service index reports)
/// and with `full`. The changes alternate adding and removing one endpoint, ending where
/// they started.
fn measure_programming(
    n: u32,
    backend: Ipv4Addr,
    mut full: impl FnMut(&ServiceState) -> Result<usize>,
    mut changed: impl FnMut(&ServiceState, &[Frontend]) -> Result<usize>,
) -> Result<Programming> {
    let state = desired(n, backend);
    let mut index = ServiceIndex::new();
    for (frontend, fs) in &state.frontends {
        let mut one = ServiceState::default();
        one.frontends.insert(*frontend, fs.clone());
        index.set_service(&fs.service, one);
    }
    let started = Instant::now();
    let load_ops = full(index.state())?;
    let load = started.elapsed();
    let mut programming =
        Programming { n, load, load_ops, change: None, change_full_diff: None, change_ops: 0 };
    // A filler in the middle (never the measured service).
    let Some((filler, filler_state)) = state
        .frontends
        .iter()
        .filter(|(f, _)| f.address != IpAddr::V4(VIP))
        .nth(usize::try_from(n / 2).unwrap_or(0).saturating_sub(1))
    else {
        return Ok(programming);
    };
    let variant = |extra: bool| {
        let mut one = ServiceState::default();
        let mut fs = filler_state.clone();
        if extra {
            fs.backends.push(([10, 127, 255, 254], 8080).into());
        }
        one.frontends.insert(*filler, fs);
        one
    };
    let mut per_service = Vec::new();
    for i in 0..CHANGES {
        let next = variant(i % 2 == 0);
        let started = Instant::now();
        let touched = index.set_service(&filler_state.service, next);
        programming.change_ops = programming.change_ops.max(changed(index.state(), &touched)?);
        per_service.push(started.elapsed());
    }
    let mut full_diff = Vec::new();
    for i in 0..CHANGES {
        index.set_service(&filler_state.service, variant(i % 2 == 0));
        let started = Instant::now();
        full(index.state())?;
        full_diff.push(started.elapsed());
    }
    programming.change = Some(median_duration(per_service));
    programming.change_full_diff = Some(median_duration(full_diff));
    Ok(programming)
}

fn median_duration(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Programs `n` services into a fresh nftables table in a fresh namespace (removed with it).
pub fn nft_programming(n: u32, backend: Ipv4Addr) -> Result<Programming> {
    require_root();
    let netns = Netns::new("benchnft")?;
    let (dataplane, programming) = nft_programming_in(&netns, &table_name("benchnft"), n, backend)?;
    dataplane.remove_table()?;
    Ok(programming)
}

/// Programs `n` services into the new nftables table `table` in `netns` and returns it, holding
/// them, with the programming figures. The caller removes the table.
fn nft_programming_in(
    netns: &Netns,
    table: &str,
    n: u32,
    backend: Ipv4Addr,
) -> Result<(NftDataplane, Programming)> {
    let dataplane = std::cell::RefCell::new(netns.run(|| NftDataplane::open(table))??);
    let programming = measure_programming(
        n,
        backend,
        |state| Ok(dataplane.borrow_mut().apply(state)?.ops),
        |state, changed| Ok(dataplane.borrow_mut().apply_changed(state, changed)?.ops),
    );
    let dataplane = dataplane.into_inner();
    match programming {
        Ok(programming) => Ok((dataplane, programming)),
        Err(err) => {
            if let Err(cleanup) = dataplane.remove_table() {
                eprintln!("warning: could not remove nftables table {table}: {cleanup}");
            }
            Err(err)
        }
    }
}

/// `weir-bench lb-programming`: only the programming figures, both dataplanes, at `sizes`.
pub fn programming_only(sizes: &[u32]) -> Result<()> {
    require_root();
    for &n in sizes {
        let pins = TestPinDir::new("benchlb")?;
        let (_loaded, ebpf) = ebpf_programming(&pins, n, Ipv4Addr::new(10, 0, 0, 2))?;
        ebpf.print("ebpf");
        nft_programming(n, Ipv4Addr::new(10, 0, 0, 2))?.print("nftables");
    }
    Ok(())
}
