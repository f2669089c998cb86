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
//! Not measured yet: the nftables backend (not built), programming times against nftables,
//! endpoint-change latency and agent RSS; docs/benchmarks.md says so.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{Result, ensure};
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::Planner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, LoadOptions, MapSizes},
};

use super::{FigureReport, Figures, Report, Sides, interleave};
use crate::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    privileged::require_root,
    probe,
    topology::{BACKEND_PORT, ServiceNet},
};

const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];
const CONNECTIONS: u32 = 2_000;
const ENDPOINTS_PER_SERVICE: u32 = 4;
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
    let slots = n * (1 + ENDPOINTS_PER_SERVICE) + 16;
    let sizes = MapSizes {
        services: slots,
        backends: n * ENDPOINTS_PER_SERVICE + 16,
        rev_nat: n + 16,
        ..MapSizes::default()
    };
    let mut loaded = programs::load(&LoadOptions { sizes, ..LoadOptions::new(pins.path()) })?;
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf)?);
    let started = Instant::now();
    let mut planner = Planner::new();
    let mut state = desired(n, backend);
    let plan = planner.plan(&state);
    writer.execute(&plan.ops)?;
    let load = started.elapsed();
    // One more endpoint for one filler service, with n services in place.
    // Fillers only: the measured service keeps its one real backend.
    let measured = IpAddr::V4(VIP);
    let mut fillers = state.frontends.iter_mut().filter(|(f, _)| f.address != measured);
    if let Some((_, filler)) = fillers.nth(usize::try_from(n / 2).unwrap_or(0)) {
        filler.backends.push(([10, 127, 255, 254], 8080).into());
    }
    let started = Instant::now();
    let change = planner.plan(&state);
    writer.execute(&change.ops)?;
    println!(
        "bench lb: n={n}: load {} map operations in {load:?}; one endpoint added with n in place: \
         {} operations in {:?}",
        plan.ops.len(),
        change.ops.len(),
        started.elapsed()
    );
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
