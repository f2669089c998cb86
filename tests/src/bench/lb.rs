//! `cargo xtask bench lb`: connect/request/close rate through a ClusterIP served by the
//! socket-level load balancer, at N = 1, 1k, 10k and 100k services (4 endpoints each), against
//! the same connections made straight to the pod IP by a process outside the load balancer's
//! cgroup (no program on its path at all: the physical limit).
//!
//! Each N is its own phase: a fresh datapath is loaded and programmed with N - 1 filler
//! services plus the measured one, then candidate and baseline alternate for the given rounds.
//! Figures are `conn_per_s_n<N>` (candidate: through the VIP; baseline: direct). The ratio
//! between phases (ours at 100k over ours at 1) is in the printed summary and the JSON's
//! `cross_phase` field.
//!
//! Each phase also prints the programming figures of both dataplanes (no API server: planner
//! and map or netlink writes): the load of N services, and one service changed with N in
//! place, planned per service ([`ServiceIndex`] + `plan_changed`) and by a full diff.
//! `weir-bench lb-programming [--sizes N,...]` prints only those.
//!
//! Not measured here: connection rates through the nftables dataplane (not yet anywhere), and
//! the agent's event-to-datapath latency and RSS (`weir-bench lb-agent`, [`super::lb_agent`]).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use weir_proxy::{
    apply::{ebpf::MapWriter, nft::NftDataplane, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceIndex, ServiceState},
    programs::{self, LoadOptions, MapSizes},
};

use super::{FigureReport, Figures, Report, Sides, interleave};
use crate::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    dataplane::table_name,
    netns::Netns,
    privileged::require_root,
    probe,
    topology::{BACKEND_PORT, ServiceNet},
};

const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];
const CONNECTIONS: u32 = 2_000;
const ENDPOINTS_PER_SERVICE: u32 = 4;
/// Single-service changes measured per phase and way of planning (the median is reported);
/// even, so that the last one restores the state the connections are measured against.
const CHANGES: usize = 20;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

pub fn run(rounds: u32) -> Result<Report> {
    require_root();
    let net = ServiceNet::new("benchlb", 207, 1)?;
    let backend = net.backends[0];
    // Tens of thousands of short connections from one address to one backend port: reuse
    // TIME_WAIT ports and widen the ephemeral range, in the client's own namespace only.
    net.client.run(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
    })??;
    let mut figures = BTreeMap::new();
    for n in SIZES {
        let phase = phase(&net, backend, n, rounds)?;
        figures.extend(phase.figures);
    }
    let rate = |n: u32| figures.get(figure_name(n)).map(|f: &FigureReport| f.candidate_median);
    let cross = match (rate(100_000), rate(1)) {
        (Some(big), Some(one)) => big / one,
        _ => f64::NAN,
    };
    println!("bench lb: ours at 100k services / ours at 1 service: {cross:.3}x");
    Ok(Report {
        name: "lb".into(),
        candidate: "socket LB through the ClusterIP".into(),
        baseline: "direct to the pod IP, no program".into(),
        unit: "TCP connect+request+close per second".into(),
        rounds,
        figures,
    })
}

fn figure_name(n: u32) -> &'static str {
    match n {
        1 => "conn_per_s_n1",
        1_000 => "conn_per_s_n1000",
        10_000 => "conn_per_s_n10000",
        _ => "conn_per_s_n100000",
    }
}

fn phase(net: &ServiceNet, backend: Ipv4Addr, n: u32, rounds: u32) -> Result<Report> {
    let pins = TestPinDir::new("benchlb")?;
    let cgroup = TestCgroup::new("benchlb")?;
    let (mut loaded, programming) = ebpf_programming(&pins, n, backend)?;
    programming.print("ebpf");
    nft_programming(n, backend)?.print("nftables");
    programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None)?;

    let vip = format!("{VIP}:80");
    let direct = format!("{backend}:{BACKEND_PORT}");
    let measure = |cgroup: Option<&TestCgroup>, target: &str| -> Result<Figures> {
        let started = Instant::now();
        let result = probe::spread(&net.client, cgroup, target, CONNECTIONS);
        let elapsed = started.elapsed().as_secs_f64();
        ensure!(result["ok"] == true, "connections failed: {result}");
        Ok(Figures::from([(figure_name(n), f64::from(CONNECTIONS) / elapsed)]))
    };
    interleave(
        "lb",
        Sides { candidate_label: "vip", baseline_label: "direct", unit: "conn/s" },
        rounds,
        || measure(Some(&cgroup), &vip),
        || measure(None, &direct),
    )
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
    let table = table_name("benchnft");
    let dataplane = std::cell::RefCell::new(netns.run(|| NftDataplane::open(&table))??);
    let programming = measure_programming(
        n,
        backend,
        |state| Ok(dataplane.borrow_mut().apply(state)?.ops),
        |state, changed| Ok(dataplane.borrow_mut().apply_changed(state, changed)?.ops),
    )?;
    dataplane.into_inner().remove_table()?;
    Ok(programming)
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
