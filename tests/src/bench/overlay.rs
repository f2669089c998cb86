//! `cargo xtask bench overlay`: pod-to-pod across two lab nodes with VXLAN and with native
//! routing, against two bare namespaces joined by a veth pair (the limit): TCP throughput
//! (iperf3, 3 s per sample) and request/response latency (weir-probe tcp-rr, one connection).
//! Plus the time from `kubectl apply` of a 3-replica Deployment and its Service to all pods
//! Ready and every one of them answering through the ClusterIP (measured in the VXLAN lab,
//! reported against the same in the native lab).
//!
//! Five paths: `bare` (the veth pair), `native` and `vxlan` (the labs), and the labs' shape
//! of path, pod -> node -> underlay bridge -> node -> pod, with no weir at all (`RoutedPath`):
//! `routed` (the nodes route each other's pod range via the underlay, as the native lab) and
//! `kernel-vxlan` (the nodes reach each other's pods through kernel VXLAN devices set up as
//! weir's agent sets up its own, as the VXLAN lab). Rounds rotate the order of the five paths.
//!
//! Five reports: `overlay-native` (native routing vs the bare veth pair: the issue's goal),
//! `overlay-native-routed` (native routing vs `routed`: what weir itself costs),
//! `overlay-vxlan` (VXLAN vs native routing), `overlay-vxlan-routed` (VXLAN vs `kernel-vxlan`:
//! what weir costs on VXLAN) and `overlay-kernel-vxlan` (`kernel-vxlan` vs `routed`: what the
//! kernel's VXLAN itself costs against plain routing, the ceiling of the VXLAN lab against the
//! native one).
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    bench::{Figures, Report, Sides, compare},
    echo::EchoServer,
    lab::Lab,
    netns::{Netns, Veth},
    probe,
    process::{command_at, command_in},
    routed,
};
use weir_proxy::routing::{
    model::VXLAN_OVERHEAD,
    reconcile::{VXLAN_PORT, VXLAN_VNI},
};

const IPERF_PORT: &str = "5201";
const ECHO_PORT: u16 = 8080;
const RR_COUNT: &str = "2000";

/// A client namespace and a server namespace that can reach each other.
struct PodPair {
    client: Netns,
    server: Netns,
    server_ip: Ipv4Addr,
}

pub fn run(rounds: u32) -> Result<Vec<Report>> {
    let (bare_a, bare_b) = (Netns::new("bench-a")?, Netns::new("bench-b")?);
    let veth = Veth::between(&bare_a, &bare_b)?;
    bare_a.ip(&["addr", "add", "10.99.0.1/24", "dev", &veth.a])?;
    bare_b.ip(&["addr", "add", "10.99.0.2/24", "dev", &veth.b])?;
    let bare_ip = Ipv4Addr::new(10, 99, 0, 2);
    let bare = PodPair { client: bare_a, server: bare_b, server_ip: bare_ip };

    let vxlan_lab = Lab::up(2, "ebpf", "vxlan");
    let native_lab = Lab::up(2, "ebpf", "native");
    let vxlan = lab_pair(&vxlan_lab)?;
    let native = lab_pair(&native_lab)?;

    let routed = RoutedPath::new(Encap::None)?;
    let kernel_vxlan = RoutedPath::new(Encap::Vxlan)?;

    let (mut bare_rounds, mut native_rounds, mut vxlan_rounds) = (vec![], vec![], vec![]);
    let (mut routed_rounds, mut kernel_vxlan_rounds) = (vec![], vec![]);
    for round in 0..rounds {
        for which in 0..5 {
            match (round + which) % 5 {
                0 => bare_rounds.push(measure(&bare).context("bare veth")?),
                1 => native_rounds.push(measure(&native).context("native routing")?),
                2 => routed_rounds.push(measure(&routed.pair).context("kernel routing")?),
                3 => kernel_vxlan_rounds
                    .push(measure(&kernel_vxlan.pair).context("kernel vxlan routing")?),
                _ => vxlan_rounds.push(measure(&vxlan).context("vxlan")?),
            }
        }
        let tag = format!("r{round}");
        let vx = deploy_ready_ms(&vxlan_lab, &vxlan, &tag).context("deploy, vxlan lab")?;
        let na = deploy_ready_ms(&native_lab, &native, &tag).context("deploy, native lab")?;
        vxlan_rounds.last_mut().expect("measured").insert("deploy_ready_ms", vx);
        native_rounds.last_mut().expect("measured").insert("deploy_ready_ms", na);
    }
    // The kernel-only paths have no deploy figure: the labs' are left out against them.
    let without_deploy = |rounds: &[Figures]| -> Vec<Figures> {
        let mut rounds = rounds.to_vec();
        for figures in &mut rounds {
            figures.remove("deploy_ready_ms");
        }
        rounds
    };
    let native_only = without_deploy(&native_rounds);
    let vxlan_only = without_deploy(&vxlan_rounds);
    let unit = "Gbit/s, microseconds, milliseconds";
    Ok(vec![
        compare(
            "overlay-native",
            Sides {
                candidate_label: "pod to pod across nodes, native routing",
                baseline_label: "two namespaces on a veth pair",
                unit,
            },
            &native_only,
            &bare_rounds,
        )?,
        compare(
            "overlay-native-routed",
            Sides {
                candidate_label: "pod to pod across nodes, native routing",
                baseline_label: "the lab's shape routed by the kernel alone, no weir",
                unit,
            },
            &native_only,
            &routed_rounds,
        )?,
        compare(
            "overlay-vxlan",
            Sides {
                candidate_label: "pod to pod across nodes, VXLAN",
                baseline_label: "pod to pod across nodes, native routing",
                unit,
            },
            &vxlan_rounds,
            &native_rounds,
        )?,
        compare(
            "overlay-vxlan-routed",
            Sides {
                candidate_label: "pod to pod across nodes, VXLAN",
                baseline_label: "the lab's shape through kernel VXLAN devices alone, no weir",
                unit,
            },
            &vxlan_only,
            &kernel_vxlan_rounds,
        )?,
        compare(
            "overlay-kernel-vxlan",
            Sides {
                candidate_label: "the lab's shape through kernel VXLAN devices alone, no weir",
                baseline_label: "the lab's shape routed by the kernel alone, no weir",
                unit,
            },
            &kernel_vxlan_rounds,
            &routed_rounds,
        )?,
    ])
}

/// How [`RoutedPath`]'s nodes carry pod traffic between them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encap {
    /// Plain routes: each node routes the other's pod range via the other's underlay address.
    None,
    /// A kernel VXLAN device on each node, set up as weir's agent sets up `weir.vxlan`.
    Vxlan,
}

/// The VXLAN device of a [`RoutedPath`] node (each node is its own uniquely named namespace).
const VXLAN_DEVICE: &str = "vxlan0";

/// The lab's path without weir: a client pod behind node A, a server pod behind node B, the
/// nodes' eth0 on one bridge in an underlay namespace, plain kernel forwarding (no program,
/// no table). With [`Encap::None`] each node routes the other's pod range via the other's
/// underlay address (the native lab's shape); with [`Encap::Vxlan`] through a kernel VXLAN
/// device made as weir's agent makes `weir.vxlan` (proxy/src/routing/reconcile.rs: its VNI and
/// port, `local` the node's underlay address on `dev` eth0, learning off, MTU 50 below the
/// uplink's; the other node's pod range routed on-link via that node's VTEP address, a
/// permanent neighbour for it and a forwarding entry of its MAC to that node's underlay
/// address) with the pod veths at that lowered MTU as weir-cni sets them (the VXLAN lab's
/// shape). Between such a path and the matching lab, only what weir adds to the path differs.
struct RoutedPath {
    pair: PodPair,
    // Nodes and underlay live as long as the pair (their links go with them).
    _namespaces: Vec<Netns>,
}

impl RoutedPath {
    fn new(encap: Encap) -> Result<Self> {
        let underlay = Netns::new("bench-ul")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let (client_ip, server_ip) = (Ipv4Addr::new(10, 98, 1, 10), Ipv4Addr::new(10, 98, 2, 10));
        let uplink_mtu = 1500;
        let pod_mtu = match encap {
            Encap::None => uplink_mtu,
            Encap::Vxlan => uplink_mtu - VXLAN_OVERHEAD,
        }
        .to_string();
        let mut namespaces = Vec::new();
        let mut pods = Vec::new();
        for (i, pod_ip) in [(1u8, client_ip), (2u8, server_ip)] {
            let node = routed::node(&format!("bench-n{i}"), Ipv4Addr::new(10, 97, 1, i))?;
            let eth0 = Veth::between(&node, &underlay)?;
            let underlay_ip = format!("10.97.0.{i}");
            node.ip(&["addr", "add", &format!("{underlay_ip}/24"), "dev", &eth0.a])?;
            underlay.ip(&["link", "set", &eth0.b, "master", "br0"])?;
            let (pod, veth) =
                routed::pod(&node, Ipv4Addr::new(10, 97, 1, i), &format!("bench-p{i}"), pod_ip)?;
            // weir-cni gives both ends of a pod's veth the node's pod MTU.
            pod.ip(&["link", "set", &veth.a, "mtu", &pod_mtu])?;
            node.ip(&["link", "set", &veth.b, "mtu", &pod_mtu])?;
            if encap == Encap::Vxlan {
                let (mac, vni, port, uplink) = (vtep_mac(i), VXLAN_VNI, VXLAN_PORT, &eth0.a);
                node.ip(&words(&format!(
                    "link add {VXLAN_DEVICE} mtu {pod_mtu} address {mac} type vxlan id {vni} \
                     local {underlay_ip} dev {uplink} dstport {port} nolearning"
                )))?;
                node.ip(&["link", "set", VXLAN_DEVICE, "up"])?;
                // As the agent: the device holds its own pod range's network address.
                node.ip(&["addr", "add", &format!("10.98.{i}.0/32"), "dev", VXLAN_DEVICE])?;
            }
            pods.push(pod);
            namespaces.push(node);
        }
        for (i, node) in (1u8..).zip(&namespaces) {
            let other = 3 - i;
            let (remote_pods, remote_underlay) =
                (format!("10.98.{other}.0/24"), format!("10.97.0.{other}"));
            match encap {
                Encap::None => {
                    node.ip(&["route", "add", &remote_pods, "via", &remote_underlay])?;
                }
                Encap::Vxlan => {
                    // The remote VTEP: its address is the remote pod range's network address.
                    let (mac, vtep) = (vtep_mac(other), format!("10.98.{other}.0"));
                    bridge(
                        node,
                        &format!(
                            "fdb replace {mac} dev {VXLAN_DEVICE} dst {remote_underlay} \
                             self permanent"
                        ),
                    )?;
                    node.ip(&words(&format!(
                        "neigh replace {vtep} lladdr {mac} dev {VXLAN_DEVICE} nud permanent"
                    )))?;
                    node.ip(&words(&format!(
                        "route add {remote_pods} via {vtep} dev {VXLAN_DEVICE} onlink"
                    )))?;
                }
            }
        }
        namespaces.push(underlay);
        let server = pods.pop().expect("two pods");
        let client = pods.pop().expect("two pods");
        Ok(Self { pair: PodPair { client, server, server_ip }, _namespaces: namespaces })
    }
}

/// Node `i`'s VTEP MAC (the agent leaves it to the kernel and publishes it; here it is known).
fn vtep_mac(i: u8) -> String {
    format!("02:00:00:00:00:{i:02x}")
}

/// `line` split at whitespace (no argument of the commands here holds a space).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Runs `bridge -n <ns> <line>`.
fn bridge(ns: &Netns, line: &str) -> Result<()> {
    let out = std::process::Command::new("bridge")
        .args(["-n", ns.name()])
        .args(words(line))
        .output()
        .context("running bridge (iproute2)")?;
    ensure!(
        out.status.success(),
        "bridge {line} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A server pod on the first node and a client pod on the second, found by their addresses.
fn lab_pair(lab: &Lab) -> Result<PodPair> {
    for (name, node) in [("bench-server", 1), ("bench-client", 2)] {
        lab.apply(&format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}"}},
            "spec":{{"nodeName":"{}","containers":[{{"name":"c","image":"busybox","command":["sleep","86400"]}}]}}}}"#,
            lab.node_name(node)
        ));
    }
    lab.wait_ready("pod/bench-server");
    lab.wait_ready("pod/bench-client");
    let server_ip: Ipv4Addr = pod_ip(lab, "bench-server")?;
    let server = pod_netns(&lab.node_netns(1), server_ip)?;
    let client = pod_netns(&lab.node_netns(2), pod_ip(lab, "bench-client")?)?;
    Ok(PodPair { client, server, server_ip })
}

fn pod_ip(lab: &Lab, pod: &str) -> Result<Ipv4Addr> {
    let ip = lab.kubectl.ok(&["get", "pod", pod, "-o", "jsonpath={.status.podIP}"]);
    ip.trim().parse().with_context(|| format!("pod {pod} has no IPv4 address ({ip:?})"))
}

/// The pod namespace under `node_netns` that holds `ip`.
fn pod_netns(node_netns: &str, ip: Ipv4Addr) -> Result<Netns> {
    let prefix = format!("{node_netns}.");
    for entry in std::fs::read_dir("/run/netns")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let ns = Netns::borrow(&name)?;
        if ns.ip(&["-o", "addr", "show"])?.contains(&format!(" {ip}/")) {
            return Ok(ns);
        }
    }
    bail!("no namespace under {node_netns} holds {ip}")
}

fn measure(pair: &PodPair) -> Result<Figures> {
    // Started per sample: a test echo server has a bounded life, shorter than a whole run.
    let _echo = EchoServer::tcp(&pair.server, (pair.server_ip, ECHO_PORT).into())?;
    let target = pair.server_ip.to_string();
    let mut server = command_in(&pair.server, None, "iperf3")?
        .args(["-s", "-1", "-p", IPERF_PORT, "-B", &target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (`cargo xtask setup` installs iperf3)")?;
    // iperf3 3.12 exits 0 with `{"error": "unable to connect to server: Connection refused"}`
    // when the server is not listening yet: retry on that too, not only on a failed exit.
    let mut bits = None;
    let mut last_error = String::from("iperf3 never ran");
    for _ in 0..50 {
        let out = command_in(&pair.client, None, "iperf3")?
            .args(["-c", &target, "-p", IPERF_PORT, "-t", "3", "-J"])
            .output()?;
        match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(report) => match report["end"]["sum_received"]["bits_per_second"].as_f64() {
                Some(value) if out.status.success() => {
                    bits = Some(value);
                    break;
                }
                _ => last_error = format!("iperf3: {}", report["error"]),
            },
            Err(err) => last_error = format!("iperf3 printed no JSON ({err})"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    let bits = bits.with_context(|| format!("iperf3 never measured: {last_error}"))?;
    let rr =
        probe::run(&pair.client, None, &["tcp-rr", &format!("{target}:{ECHO_PORT}"), RR_COUNT]);
    ensure!(rr["ok"] == true, "tcp-rr failed: {rr}");
    let mut figures = Figures::new();
    figures.insert("tcp_gbps", bits / 1e9);
    figures.insert("rr_p50_us", rr["p50_us"].as_f64().context("no p50")?);
    Ok(figures)
}

/// Milliseconds from `kubectl apply` of a 3-replica nginx Deployment and its Service until all
/// three pods are Ready and each has answered an HTTP GET through the ClusterIP from the
/// client pod. The Deployment is removed afterwards.
fn deploy_ready_ms(lab: &Lab, pair: &PodPair, tag: &str) -> Result<f64> {
    let name = format!("bench-{tag}");
    // Two YAML documents (JSON is YAML; the comment first makes kubectl read it as YAML):
    // kubectl's validation of a `kind: List` fails against weir's OpenAPI documents ("the
    // server could not find the requested resource").
    let manifest = format!(
        r#"# the Deployment and its Service
{{"apiVersion":"apps/v1","kind":"Deployment","metadata":{{"name":"{name}"}},"spec":{{"replicas":3,
          "selector":{{"matchLabels":{{"app":"{name}"}}}},
          "template":{{"metadata":{{"labels":{{"app":"{name}"}}}},"spec":{{"containers":[{{"name":"web","image":"nginx","ports":[{{"containerPort":80}}]}}]}}}}}}}}
---
{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}"}},"spec":{{"selector":{{"app":"{name}"}},"ports":[{{"port":80}}]}}}}"#
    );
    let started = Instant::now();
    lab.apply(&manifest);
    let cluster_ip = lab.kubectl.ok(&["get", "svc", &name, "-o", "jsonpath={.spec.clusterIP}"]);
    let procs = client_cgroup_procs(&pair.client)?;
    let mut answered = BTreeSet::new();
    let deadline = started + Duration::from_secs(60);
    while answered.len() < 3 {
        ensure!(Instant::now() < deadline, "{name}: only {answered:?} answered within 60 s");
        // weir-probe, not busybox wget: Debian's busybox-static wget segfaults when run
        // outside a lab pod's runtime (exit 139 even on loopback).
        let out =
            command_at(&pair.client.path(), Some(&procs), &probe::binary().to_string_lossy())?
                .args(["http", &format!("{cluster_ip}:80"), "--timeout-ms", "1000"])
                .output()?;
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let page = reply["reply"].as_str().unwrap_or_default();
        if let Some(pod) = page
            .split(|c: char| c.is_whitespace() || c == '<' || c == '>')
            .find(|w| w.starts_with(&name))
        {
            answered.insert(pod.to_string());
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let ready = lab.kubectl.ok(&[
        "get",
        "pods",
        "-l",
        &format!("app={name}"),
        "-o",
        "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    let took = started.elapsed().as_secs_f64() * 1e3;
    ensure!(ready.split_whitespace().filter(|s| *s == "True").count() == 3, "{name}: {ready}");
    lab.kubectl.ok(&["delete", "deployment,service", &name, "--wait=false"]);
    Ok(took)
}

/// cgroup.procs of the client pod's cgroup (the socket load balancer serves ClusterIPs to
/// processes in the node's cgroup tree), from the cgroup of a process already in the pod.
fn client_cgroup_procs(client: &Netns) -> Result<PathBuf> {
    let pids = crate::netns::ip(&["netns", "pids", client.name()])?;
    let pid = pids.split_whitespace().next().context("no process in the client pod")?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let relative = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("the client pod's process has no cgroup v2 membership")?;
    let root = weir_proxy::system::cgroup2_mount()?.context("no cgroup2 mount")?;
    Ok(root.join(relative.trim_start_matches('/')).join("cgroup.procs"))
}
