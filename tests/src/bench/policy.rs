//! `cargo xtask bench policy`: NetworkPolicy enforcement cost and programming time, at N = 0,
//! 10, 100, 1k and 10k rules selecting one server pod, for the eBPF and nftables backends.
//!
//! Topology (one copy per side, so no side ever sees another's programs or tables): a client
//! pod namespace and a server pod namespace behind a node namespace on routed veths, wired as
//! weir-cni wires pods (`crate::routed`). Sides:
//! - `ebpf`: `tc_pol_egress`/`tc_pol_ingress` on both node-side veths, maps written through
//!   [`PolicyDatapath::apply`];
//! - `nftables`: the nftables policy backend in the node namespace, through the same trait
//!   (`NftPolicy`, a uniquely named table);
//! - `none` (the baseline): the same topology with no program and no table.
//!
//! The N rules are N NetworkPolicies selecting the server pod, one ingress rule each. The rule
//! that lets the client in (its identity, TCP 8080) is named to sort last; the N - 1 others
//! cycle through an ipBlock /32 elsewhere, another pod's identity (pods of another node) and the
//! client's identity on another port. The client is not isolated.
//!
//! Per N: the policy is compiled once in full (timed, the reference compiler) and loaded into an
//! incremental compiler object by object (timed, as the agent's watchers feed it); then per
//! backend and repetition the datapath is emptied (untimed), programmed from empty to N
//! (timed), given one more rule (an ipBlock policy) and that rule removed again, each the
//! agent's way: one change to the incremental compiler, its delta to `apply_delta` (timed whole
//! and in its compile and datapath parts). Before measuring, the allowed connection
//! is checked to work and, for N > 0, a connection to the server's port 8081 (also listening)
//! to be dropped on every policy side: the benchmark cannot measure a datapath that does not
//! enforce. Then, rounds rotating the order of the sides: `conn_per_s_n<N>` (sequential TCP
//! connect + one request/response + close, `weir-probe tcp-spread`) and `rr_per_s_n<N>` /
//! `rr_p50_us_n<N>` (request/responses on one connection, `weir-probe tcp-rr`). Reports: each
//! backend against the baseline (`policy-ebpf`, `policy-nftables`) and eBPF against nftables
//! (`policy-ebpf-vs-nftables`, the same rounds); a table of connection rates per N with each
//! backend's rate at N over its rate at the first N.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use serde_json::{Value, json};
use weir_policy::{Change, Cidr, Cluster, Compiled, Compiler, IncrementalCompiler};
use weir_proxy::{
    policy::{
        EbpfPolicy, IncrementalLowering, PolicyDatapath, PolicyMaps, PolicyNode, SharedPolicyNames,
        nft::{NftPolicy, incremental::IncrementalDesired},
    },
    programs::{self, LoadOptions},
};

use super::{FigureReport, Figures, Report, Sides, compare, figure, median};
use crate::{
    bpffs::TestPinDir,
    echo::EchoServer,
    netns::{Netns, Veth},
    policy_cases::policy,
    privileged::require_root,
    probe, routed,
};

pub const NAMESPACE: &str = "bench";
pub const NODE: &str = "bench-node";
const OTHER_NODE: &str = "other-node";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const OTHER_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const POD_CIDR: &str = "10.244.0.0/24";
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
/// The port the allowed rule opens.
pub const PORT: u16 = 8080;
/// A port the server also listens on that no rule opens.
pub const DENIED_PORT: u16 = 8081;
/// How long a connection may take before the enforcement check calls it dropped.
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rule counts, one phase each.
    pub sizes: Vec<u32>,
    /// Sequential connections per sample.
    pub connections: u32,
    /// Request/responses per sample.
    pub requests: u32,
    /// Rounds of samples per phase (each round measures every side once).
    pub rounds: u32,
    /// Programming repetitions per phase and backend.
    pub programming_reps: u32,
}

impl Options {
    pub fn full(rounds: u32) -> Self {
        Self {
            sizes: vec![0, 10, 100, 1_000, 10_000],
            connections: 2_000,
            requests: 5_000,
            rounds,
            programming_reps: 3,
        }
    }

    /// A few N and short samples: checks the whole path in seconds (the smoke test).
    pub fn quick() -> Self {
        Self {
            sizes: vec![0, 100],
            connections: 100,
            requests: 200,
            rounds: 1,
            programming_reps: 1,
        }
    }
}

/// What one run gives: rate reports (one per policy backend, against no datapath) and the
/// programming times per backend as JSON (`backend -> figure -> [samples]` and medians).
pub struct Outcome {
    pub reports: Vec<Report>,
    pub programming: Value,
}

/// The cluster objects for `n` rules selecting the server pod (plus one more ipBlock rule when
/// `one_more`).
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    pub nodes: Vec<Node>,
}

impl Objects {
    pub fn new(n: u32, one_more: bool) -> Self {
        let namespaces = vec![from(json!({"metadata": {"name": NAMESPACE, "labels": {
            "kubernetes.io/metadata.name": NAMESPACE}}}))];
        let mut pods = vec![
            pod("server", "server", NODE, SERVER_IP),
            pod("client", "client", NODE, CLIENT_IP),
        ];
        let mut policies = Vec::new();
        if n > 0 {
            policies.push(ingress_policy(
                "zz-allow-client",
                json!({"podSelector": {"matchLabels": {"app": "client"}}}),
                PORT,
            ));
        }
        for i in 1..n {
            let (peer, port) = match i % 3 {
                0 => (json!({"ipBlock": {"cidr": format!("{}/32", filler_cidr(i))}}), PORT),
                1 => {
                    pods.push(pod(
                        &format!("peer-{i}"),
                        &format!("peer-{i}"),
                        OTHER_NODE,
                        peer_ip(i),
                    ));
                    (json!({"podSelector": {"matchLabels": {"app": format!("peer-{i}")}}}), PORT)
                }
                _ => (json!({"podSelector": {"matchLabels": {"app": "client"}}}), other_port(i)),
            };
            policies.push(ingress_policy(&format!("filler-{i:05}"), peer, port));
        }
        if one_more {
            policies.push(Self::one_more(n));
        }
        let nodes = [(NODE, NODE_IP, Some(POD_CIDR)), (OTHER_NODE, OTHER_NODE_IP, None)]
            .into_iter()
            .map(|(name, ip, cidr)| {
                from(json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}))
            })
            .collect();
        Self { namespaces, pods, policies, nodes }
    }

    /// The policy "+1 rule" adds to `n` rules: one more ipBlock ingress rule for the server.
    pub fn one_more(n: u32) -> NetworkPolicy {
        let cidr = format!("{}/32", filler_cidr(n.max(1) + 20_000));
        ingress_policy("one-more", json!({"ipBlock": {"cidr": cidr}}), PORT)
    }

    /// The objects as the agent's watchers hand them to its incremental compiler.
    pub fn changes(&self) -> Vec<Change> {
        let namespaces = self.namespaces.iter().filter_map(|o| Change::namespace(o, false));
        let pods = self.pods.iter().filter_map(|o| Change::pod(o, false));
        let policies = self.policies.iter().filter_map(|o| Change::policy(o, false));
        let nodes = self.nodes.iter().filter_map(|o| Change::node(o, false));
        namespaces.chain(nodes).chain(pods).chain(policies).collect()
    }

    pub fn cluster(&self) -> Cluster {
        Cluster::from_k8s(&self.namespaces, &self.pods, &self.policies, &self.nodes)
    }
}

fn filler_cidr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i)
}

fn peer_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i)
}

fn other_port(i: u32) -> u16 {
    10_000 + u16::try_from(i % 50_000).expect("below 50,000")
}

fn from<T: k8s_openapi::serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("benchmark objects match the Kubernetes types")
}

fn pod(name: &str, app: &str, node: &str, ip: Ipv4Addr) -> Pod {
    from(json!({
        "metadata": {"namespace": NAMESPACE, "name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
    }))
}

fn ingress_policy(name: &str, peer: Value, port: u16) -> NetworkPolicy {
    policy(
        NAMESPACE,
        name,
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [peer], "ports": [{"protocol": "TCP", "port": port}]}]}),
    )
}

/// What the datapath is told about the node for `n` rules.
pub fn policy_node(n: u32) -> PolicyNode {
    PolicyNode {
        host_addresses: vec![IpAddr::V4(NODE_IP)],
        pod_cidrs: vec![POD_CIDR.parse::<Cidr>().expect("a valid CIDR")],
        deny_unknown: n > 0,
    }
}

/// One side's copy of the topology.
struct PodNet {
    node: Netns,
    client: Netns,
    server: Netns,
    client_veth: Veth,
    server_veth: Veth,
}

impl PodNet {
    fn new(side: &str) -> Result<Self> {
        let node = routed::node(&format!("pol{side}n"), NODE_IP)?;
        let (client, client_veth) = routed::pod(&node, NODE_IP, &format!("pol{side}c"), CLIENT_IP)?;
        let (server, server_veth) = routed::pod(&node, NODE_IP, &format!("pol{side}s"), SERVER_IP)?;
        // Tens of thousands of short connections from one address to one port: reuse TIME_WAIT
        // ports and widen the ephemeral range, in the client's own namespace only.
        client.run(|| -> std::io::Result<()> {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
        })??;
        Ok(Self { node, client, server, client_veth, server_veth })
    }

    /// Echo servers on both ports (started per use: test echo servers have a bounded life),
    /// serving one connection at a time (the probes connect one after the other).
    fn servers(&self) -> Result<[EchoServer; 2]> {
        Ok([
            EchoServer::tcp_serial(&self.server, (SERVER_IP, PORT).into())?,
            EchoServer::tcp_serial(&self.server, (SERVER_IP, DENIED_PORT).into())?,
        ])
    }
}

/// A policy backend under test: its topology and its datapath.
struct Backend {
    label: &'static str,
    net: PodNet,
    datapath: Box<dyn PolicyDatapath>,
}

/// Where the eBPF programs and maps live while the run lasts (dropped after the backend).
struct EbpfSide {
    backend: Backend,
    _loaded: programs::Loaded,
    _pins: TestPinDir,
}

fn ebpf_side() -> Result<EbpfSide> {
    let net = PodNet::new("e")?;
    let pins = TestPinDir::new("benchpol")?;
    let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
    let maps = PolicyMaps::take(&mut loaded.ebpf)?;
    for veth in [&net.client_veth.b, &net.server_veth.b] {
        routed::attach_policy(&mut loaded.ebpf, &net.node, veth)?;
    }
    let datapath = EbpfPolicy::adopt(maps, SharedPolicyNames::default())?;
    let backend = Backend { label: "ebpf", net, datapath: Box::new(datapath) };
    Ok(EbpfSide { backend, _loaded: loaded, _pins: pins })
}

/// The nftables policy backend: a uniquely named table in the side's node namespace (it goes
/// with the namespace).
fn nft_side() -> Result<Backend> {
    let net = PodNet::new("f")?;
    let table = crate::names::unique("pol");
    let datapath = net.node.run(move || NftPolicy::open(&table))??;
    Ok(Backend { label: "nftables", net, datapath: Box::new(datapath) })
}

pub fn run(options: &Options) -> Result<Outcome> {
    require_root();
    ensure!(options.rounds > 0 && options.programming_reps > 0, "rounds must be at least 1");
    let mut ebpf = ebpf_side()?;
    let mut nft = Some(nft_side()?);
    let baseline = PodNet::new("b")?;
    let mut compiler = Compiler::default();
    // side label -> figures per round
    let mut rounds: BTreeMap<&'static str, Vec<Figures>> = BTreeMap::new();
    let mut programming: BTreeMap<&'static str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for &n in &options.sizes {
        let objects = Objects::new(n, false);
        let started = Instant::now();
        compiler.compile(&objects.cluster(), Some(NODE));
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        // The agent's path: every object one change to the incremental compiler.
        let started = Instant::now();
        let mut incremental = IncrementalCompiler::new(Some(NODE));
        for change in objects.changes() {
            incremental.apply(change);
        }
        incremental.take_delta();
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        println!(
            "bench policy: n={n}: full compile {compile_ms:.1} ms, incremental compile of every \
             object {load_ms:.1} ms"
        );
        let mut backends: Vec<&mut Backend> = vec![&mut ebpf.backend];
        backends.extend(nft.as_mut());
        for backend in backends.iter_mut() {
            let figures = programming.entry(backend.label).or_default();
            figures.entry(format!("compile_ms_n{n}")).or_default().push(compile_ms);
            figures.entry(format!("load_ms_n{n}")).or_default().push(load_ms);
            for _ in 0..options.programming_reps {
                for (figure, value) in program(backend, n, &mut incremental)? {
                    figures.entry(format!("{figure}_n{n}")).or_default().push(value);
                }
            }
            check_enforced(backend, n)?;
        }
        for round in 0..options.rounds {
            let mut sides: Vec<(&'static str, &PodNet)> =
                backends.iter().map(|b| (b.label, &b.net)).collect();
            sides.push(("none", &baseline));
            let count = sides.len();
            sides.rotate_left(round as usize % count);
            for (label, net) in sides {
                let figures =
                    measure(net, n, options).with_context(|| format!("{label}, n={n}"))?;
                let per_round = rounds.entry(label).or_default();
                if per_round.len() <= round as usize {
                    per_round.push(Figures::new());
                }
                per_round[round as usize].extend(figures);
            }
        }
    }
    // Phases were measured round by round; the report pairs round r of every phase.
    let mut reports = Vec::new();
    let none = rounds.get("none").context("the baseline was measured")?;
    for backend in [Some(&ebpf.backend), nft.as_ref()].into_iter().flatten() {
        let label = backend.label;
        let report = compare(
            &format!("policy-{label}"),
            Sides {
                candidate_label: label,
                baseline_label: "no policy datapath",
                unit: "per second, microseconds",
            },
            &rounds[label],
            none,
        )?;
        summarise(&report, options);
        reports.push(report);
    }
    // The two backends against each other: the same rounds, measured back to back.
    if let Some(nft) = &nft {
        let report = compare(
            "policy-ebpf-vs-nftables",
            Sides {
                candidate_label: ebpf.backend.label,
                baseline_label: nft.label,
                unit: "per second, microseconds",
            },
            &rounds[ebpf.backend.label],
            &rounds[nft.label],
        )?;
        print_rates(&reports, &report, options);
        reports.push(report);
    }
    let programming = programming_json(&programming);
    print_programming(&programming, options);
    Ok(Outcome { reports, programming })
}

/// Empties the datapath, programs the compiled state from empty, then adds one more rule and
/// removes it again the way the agent does: one watch event to the incremental compiler, its
/// delta to [`PolicyDatapath::apply_delta`]. Milliseconds (the whole path, and its compile and
/// datapath parts) and datapath operations of each step.
fn program(
    backend: &mut Backend,
    n: u32,
    compiler: &mut IncrementalCompiler,
) -> Result<Vec<(&'static str, f64)>> {
    let label = backend.label;
    let failed = |e: weir_proxy::policy::PolicyDatapathError| {
        anyhow::anyhow!("{label} datapath: applying {n} rules: {e}")
    };
    let ms = |since: Instant| since.elapsed().as_secs_f64() * 1e3;
    backend.datapath.apply(&Compiled::default(), &PolicyNode::default()).map_err(failed)?;
    let started = Instant::now();
    let programmed =
        backend.datapath.apply(compiler.compiled(), &policy_node(n)).map_err(failed)?;
    let program_ms = ms(started);
    // The backends' pure planning, run on shadow copies (untimed setup): the datapath time
    // minus this is the kernel writes (syscalls, netlink batch).
    let mut ebpf_plan = IncrementalLowering::default();
    let mut nft_plan = IncrementalDesired::default();
    let host = [IpAddr::V4(NODE_IP)];
    ebpf_plan.rebuild(compiler.compiled(), &host);
    nft_plan.rebuild(compiler.compiled(), &policy_node(n));
    let mut change = |deleted: bool, rules: u32| -> Result<[f64; 5]> {
        let started = Instant::now();
        let one_more = Change::policy(&Objects::one_more(n), deleted).context("a named policy")?;
        compiler.apply(one_more);
        let delta = compiler.take_delta();
        let compiled_at = Instant::now();
        let applied = backend
            .datapath
            .apply_delta(compiler.compiled(), &delta, &policy_node(rules))
            .map_err(failed)?;
        let total = ms(started);
        let datapath = ms(compiled_at);
        let planned_at = Instant::now();
        if label == "ebpf" {
            ebpf_plan.update(compiler.compiled(), &delta, &host);
        } else {
            nft_plan.update(compiler.compiled(), &delta, &policy_node(rules));
        }
        let plan = ms(planned_at);
        Ok([total, total - datapath, datapath, plan, applied.ops as f64])
    };
    let [add_ms, add_compile_ms, add_datapath_ms, add_plan_ms, add_ops] = change(false, n + 1)?;
    let [remove_ms, remove_compile_ms, remove_datapath_ms, remove_plan_ms, remove_ops] =
        change(true, n)?;
    Ok(vec![
        ("program_ms", program_ms),
        ("program_ops", programmed.ops as f64),
        ("add_one_ms", add_ms),
        ("add_one_compile_ms", add_compile_ms),
        ("add_one_datapath_ms", add_datapath_ms),
        ("add_one_plan_ms", add_plan_ms),
        ("add_one_ops", add_ops),
        ("remove_one_ms", remove_ms),
        ("remove_one_compile_ms", remove_compile_ms),
        ("remove_one_datapath_ms", remove_datapath_ms),
        ("remove_one_plan_ms", remove_plan_ms),
        ("remove_one_ops", remove_ops),
    ])
}

/// The allowed connection works; for n > 0, the server's other port is dropped.
fn check_enforced(backend: &Backend, n: u32) -> Result<()> {
    let _servers = backend.net.servers()?;
    let allowed = probe::run(&backend.net.client, None, &["tcp", &format!("{SERVER_IP}:{PORT}")]);
    ensure!(
        allowed["ok"] == true,
        "{} datapath, n={n}: the allowed connection failed: {allowed}",
        backend.label
    );
    let other = format!("{SERVER_IP}:{DENIED_PORT}");
    let timeout = DENIED_TIMEOUT.as_millis().to_string();
    let denied = probe::run(&backend.net.client, None, &["tcp", &other, "--timeout-ms", &timeout]);
    if n > 0 && denied["ok"] == true {
        bail!(
            "{} datapath, n={n}: port {DENIED_PORT} is open, the policy is not enforced",
            backend.label
        );
    }
    if n == 0 && denied["ok"] != true {
        bail!(
            "{} datapath, no policy: port {DENIED_PORT} does not answer: {denied}",
            backend.label
        );
    }
    Ok(())
}

fn measure(net: &PodNet, n: u32, options: &Options) -> Result<Figures> {
    let _servers = net.servers()?;
    let target = format!("{SERVER_IP}:{PORT}");
    let spread = probe::spread(&net.client, None, &target, options.connections);
    ensure!(spread["ok"] == true, "connections failed: {spread}");
    // The probe's own clock (first connect to last close), without the process's start.
    let conn_s = spread["elapsed_us"].as_f64().context("tcp-spread without elapsed_us")? / 1e6;
    let started = Instant::now();
    let requests = options.requests.to_string();
    let rr = probe::run(&net.client, None, &["tcp-rr", &target, &requests]);
    let rr_s = started.elapsed().as_secs_f64();
    ensure!(rr["ok"] == true, "tcp-rr failed: {rr}");
    Ok(Figures::from([
        (figure("conn_per_s", n), f64::from(options.connections) / conn_s),
        (figure("rr_per_s", n), f64::from(options.requests) / rr_s),
        (figure("rr_p50_us", n), rr["p50_us"].as_f64().context("tcp-rr without p50_us")?),
    ]))
}

/// Prints the goals that compare phases: rate at the largest N over rate at 0, raw and
/// normalised by the baseline of each phase (drift of the machine cancels in the latter).
fn summarise(report: &Report, options: &Options) {
    let (Some(&first), Some(&last)) = (options.sizes.first(), options.sizes.last()) else {
        return;
    };
    for prefix in ["conn_per_s", "rr_per_s"] {
        let (Some(a), Some(b)) =
            (report.figures.get(figure(prefix, first)), report.figures.get(figure(prefix, last)))
        else {
            continue;
        };
        println!(
            "bench {}: {prefix} at n={last} / at n={first}: {:.3}x raw, {:.3}x against the \
             baseline of each phase (goal for eBPF at 10k: >= 0.97x)",
            report.name,
            b.candidate_median / a.candidate_median,
            b.ratio_median / a.ratio_median,
        );
    }
}

/// Connections per second per N: each backend and the baseline (medians), eBPF / nftables
/// (median of the per-round ratios) and each backend's rate at N over its rate at the first N
/// (raw, and against the baseline of each phase).
fn print_rates(against_none: &[Report], ebpf_vs_nft: &Report, options: &Options) {
    let Some(&first) = options.sizes.first() else { return };
    let backend = |label: &str| against_none.iter().find(|r| r.candidate == label);
    let (Some(ebpf), Some(nft)) = (backend(&ebpf_vs_nft.candidate), backend(&ebpf_vs_nft.baseline))
    else {
        return;
    };
    println!(
        "bench policy: new connections per second ({} rounds; ratios: median of per-round \
         ratios; N/{first}: raw and against the baseline of each phase)",
        ebpf_vs_nft.rounds
    );
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>13} {:>17} {:>17}",
        "rules", "eBPF", "nftables", "none", "eBPF/nftables", "eBPF N/first", "nftables N/first"
    );
    for &n in &options.sizes {
        let name = figure("conn_per_s", n);
        let (Some(e), Some(f), Some(versus)) =
            (ebpf.figures.get(name), nft.figures.get(name), ebpf_vs_nft.figures.get(name))
        else {
            continue;
        };
        let of_first = |report: &Report, r: &FigureReport| {
            report.figures.get(figure("conn_per_s", first)).map_or((f64::NAN, f64::NAN), |f0| {
                (r.candidate_median / f0.candidate_median, r.ratio_median / f0.ratio_median)
            })
        };
        let (e_raw, e_norm) = of_first(ebpf, e);
        let (f_raw, f_norm) = of_first(nft, f);
        println!(
            "{n:>7} {:>10.0} {:>10.0} {:>10.0} {:>12.3}x {:>7.3}x / {:>6.3}x {:>7.3}x / {:>6.3}x",
            e.candidate_median,
            f.candidate_median,
            e.baseline_median,
            versus.ratio_median,
            e_raw,
            e_norm,
            f_raw,
            f_norm,
        );
    }
}

fn programming_json(samples: &BTreeMap<&'static str, BTreeMap<String, Vec<f64>>>) -> Value {
    let backends: serde_json::Map<String, Value> = samples
        .iter()
        .map(|(backend, figures)| {
            let figures: serde_json::Map<String, Value> = figures
                .iter()
                .map(|(name, values)| {
                    (name.clone(), json!({"median": median(values), "samples": values}))
                })
                .collect();
            (backend.to_string(), Value::Object(figures))
        })
        .collect();
    json!({"name": "policy-programming", "unit": "milliseconds, datapath operations",
           "backends": backends})
}

fn print_programming(programming: &Value, options: &Options) {
    println!("bench policy: programming (median of {} repetitions)", options.programming_reps);
    println!(
        "{:<10} {:>7} {:>11} {:>9} {:>12} {:>9} {:>11} {:>10} {:>11} {:>7} {:>7} {:>11}",
        "backend",
        "rules",
        "full comp.",
        "load ms",
        "program ms",
        "ops",
        "+1 rule ms",
        "(compile",
        "datapath)",
        "(plan)",
        "+1 ops",
        "-1 rule ms"
    );
    let Some(backends) = programming["backends"].as_object() else { return };
    for (backend, figures) in backends {
        for n in &options.sizes {
            let get =
                |name: &str| figures[format!("{name}_n{n}")]["median"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{backend:<10} {n:>7} {:>11.2} {:>9.1} {:>12.2} {:>9} {:>11.3} {:>10.3} {:>11.3} \
                 {:>7.3} {:>7} {:>11.3}",
                get("compile_ms"),
                get("load_ms"),
                get("program_ms"),
                get("program_ops"),
                get("add_one_ms"),
                get("add_one_compile_ms"),
                get("add_one_datapath_ms"),
                get("add_one_plan_ms"),
                get("add_one_ops"),
                get("remove_one_ms"),
            );
        }
    }
    println!(
        "goals: 1k rules programmed < 1 s; +1 rule < 10 ms at 10k, independent of N (+1 rule: \
         the agent's path, one watch event -> incremental compile -> apply_delta)"
    );
}

#[cfg(test)]
mod tests {
    use weir_policy::{Endpoint, PodRef, Protocol, trace};

    use super::*;

    fn verdict(compiled: &Compiled, port: u16) -> bool {
        let server = Endpoint::Pod(PodRef::new(NAMESPACE, "server"));
        let client = Endpoint::Pod(PodRef::new(NAMESPACE, "client"));
        trace(compiled, &client, &server, Protocol::Tcp, port).expect("both pods known").allowed
    }

    #[test]
    fn n_rules_isolate_the_server_and_only_the_last_lets_the_client_in() {
        for n in [0, 1, 10, 100] {
            let compiled =
                Compiler::default().compile(&Objects::new(n, false).cluster(), Some(NODE));
            assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
            let server = &compiled.endpoints[&PodRef::new(NAMESPACE, "server")];
            assert_eq!(server.ingress.isolated_by.len(), n as usize, "n={n}");
            assert_eq!(server.ingress.allow.len(), n as usize, "n={n}");
            let client = &compiled.endpoints[&PodRef::new(NAMESPACE, "client")];
            assert!(!client.ingress.is_isolated() && !client.egress.is_isolated());
            assert!(verdict(&compiled, PORT), "n={n}");
            assert_eq!(verdict(&compiled, DENIED_PORT), n == 0, "n={n}");
            if n > 0 {
                let origin = &server
                    .ingress
                    .allow
                    .iter()
                    .find(|a| {
                        a.matches(
                            compiled.pods[&PodRef::new(NAMESPACE, "client")].identity.unwrap(),
                            IpAddr::V4(CLIENT_IP),
                            Protocol::Tcp,
                            PORT,
                        )
                    })
                    .unwrap()
                    .origin;
                assert_eq!(origin.policy.name, "zz-allow-client");
            }
        }
    }

    #[test]
    fn one_more_is_one_more_rule() {
        let compiled = Compiler::default().compile(&Objects::new(100, true).cluster(), Some(NODE));
        let server = &compiled.endpoints[&PodRef::new(NAMESPACE, "server")];
        assert_eq!(server.ingress.allow.len(), 101);
        assert!(!verdict(&compiled, DENIED_PORT));
    }

    #[test]
    fn policy_node_denies_unknown_pods_only_under_policy() {
        assert!(!policy_node(0).deny_unknown);
        assert!(policy_node(10).deny_unknown);
        assert_eq!(policy_node(1).host_addresses, vec![IpAddr::V4(NODE_IP)]);
    }
}
