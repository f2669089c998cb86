//! A two-node mini cluster for the node-to-node networking tests (`overlay_*`), made only of
//! test namespaces:
//!
//! ```text
//!  underlay ns: bridge 10.<net>.0.1/24, weir apiserver on 10.<net>.0.1
//!    |-- veth -- node A ns: eth0 10.<net>.0.11/24, weir agent --overlay ..., pod A (weir-cni)
//!    '-- veth -- node B ns: eth0 10.<net>.0.12/24, weir agent --overlay ..., pod B (weir-cni)
//! ```
//!
//! Node objects are registered with their InternalIP; the API server's node IPAM controller
//! gives them pod CIDRs from 10.244.0.0/16. Agents write the node state file weir-cni reads
//! (pod CIDR and MTU). Everything goes away on drop (processes killed, namespaces deleted).
//!
//! A dual-stack cluster ([`Cluster::dual_stack`]) adds IPv6 everywhere: the bridge gets
//! fd00:<net>::1/64 and each eth0 fd00:<net>::11 or ::12/64 (without duplicate address
//! detection), Nodes get an IPv6 InternalIP and an IPv6 pod CIDR (/64s of fd00:10:244::/56),
//! the agents masquerade both families, and weir-cni gives each pod an address of each.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::{
    agent::{AgentOptions, AgentProcess},
    apiserver::{ApiServer, TempDir},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    cni::{self, Attachment},
    names,
    netns::{Netns, Veth},
    probe,
    wait::eventually,
};

/// The pod network the API server hands node CIDRs from (its default).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The IPv6 pod network of a dual-stack cluster (each node gets a /64).
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
/// How long routing changes may take to show.
pub const WAIT: Duration = Duration::from_secs(20);

/// One node: its namespace (a CNI test node), address, agent and pod.
pub struct ClusterNode {
    /// First, so it is killed before its namespace goes.
    pub agent: Option<AgentProcess>,
    pub pod: Option<Netns>,
    pub name: String,
    pub cni: cni::Node,
    pub address: Ipv4Addr,
    /// The node's IPv6 underlay address (dual stack only).
    pub address_v6: Option<Ipv6Addr>,
    pub pins: TestPinDir,
    pub cgroup: TestCgroup,
    pub kubeconfig: PathBuf,
    pub state_file: PathBuf,
    pub nat_table: String,
    pub pod_ip: Option<Ipv4Addr>,
    pub pod_ip_v6: Option<Ipv6Addr>,
    extra_args: Vec<String>,
}

pub struct Cluster {
    /// Dropped last: everything else lives inside or hangs off it.
    pub nodes: Vec<ClusterNode>,
    pub api: ApiServer,
    pub underlay: Netns,
    pub gateway: Ipv4Addr,
    /// The bridge's IPv6 address (dual stack only).
    pub gateway_v6: Option<Ipv6Addr>,
    _data: TempDir,
}

impl Cluster {
    /// Underlay, API server, two registered nodes (`node-a`, `node-b`) with eth0 on the
    /// bridge, each running `weir agent --overlay <overlay> --masquerade true` and holding one
    /// pod wired by weir-cni. `net` picks the underlay subnet 10.<net>.0.0/24.
    pub fn new(overlay: &str, net: u8) -> Result<Cluster> {
        Self::build(overlay, net, false)
    }

    /// [`Cluster::new`] with IPv6 too (see the module docs): underlay addresses, InternalIPs,
    /// pod CIDRs and pod addresses of both families.
    pub fn dual_stack(overlay: &str, net: u8) -> Result<Cluster> {
        Self::build(overlay, net, true)
    }

    fn build(overlay: &str, net: u8, dual_stack: bool) -> Result<Cluster> {
        let underlay = Netns::new("underlay")?;
        let bridge = names::interface('u');
        underlay.ip(&["link", "add", &bridge, "type", "bridge"])?;
        let gateway = Ipv4Addr::new(10, net, 0, 1);
        underlay.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        let v6 = |host: u16| Ipv6Addr::new(0xfd00, u16::from(net), 0, 0, 0, 0, 0, host);
        let gateway_v6 = dual_stack.then(|| v6(1));
        if let Some(gw) = gateway_v6 {
            underlay.ip(&["addr", "add", &format!("{gw}/64"), "dev", &bridge, "nodad"])?;
        }
        underlay.ip(&["link", "set", &bridge, "up"])?;

        let data = TempDir::new("overlay-api");
        let listen = format!("{gateway}:0");
        let cluster_cidr = if dual_stack {
            format!("{CLUSTER_CIDR},{CLUSTER_CIDR_V6}")
        } else {
            CLUSTER_CIDR.to_string()
        };
        let api = ApiServer::start_in(
            Some(&underlay),
            data.path(),
            &["--listen", &listen, "--cluster-cidr", &cluster_cidr],
        );
        let admin: Value = serde_json::from_str(&std::fs::read_to_string(&api.kubeconfig)?)?;

        let mut nodes = Vec::new();
        for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
            let node = cni::Node::new()?;
            let veth = Veth::between(&node.ns, &underlay)?;
            node.ns.ip(&["link", "set", &veth.a, "down"])?;
            node.ns.ip(&["link", "set", &veth.a, "name", "eth0"])?;
            node.ns.ip(&["link", "set", "eth0", "up"])?;
            let address = Ipv4Addr::new(10, net, 0, 11 + i as u8);
            node.ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            let address_v6 = dual_stack.then(|| v6(0x11 + i as u16));
            if let Some(ip) = address_v6 {
                node.ns.ip(&["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"])?;
            }
            underlay.ip(&["link", "set", &veth.b, "master", &bridge])?;

            // The serving certificate names localhost; the agents reach the server by address.
            let mut kubeconfig = admin.clone();
            kubeconfig["clusters"][0]["cluster"]["tls-server-name"] = json!("localhost");
            let kubeconfig_path = node.data_dir.path().join("kubeconfig");
            std::fs::write(&kubeconfig_path, kubeconfig.to_string())?;

            let mut addresses = vec![json!({"type": "InternalIP", "address": address})];
            addresses.extend(address_v6.map(|ip| json!({"type": "InternalIP", "address": ip})));
            addresses.push(json!({"type": "Hostname", "address": name}));
            let body = json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name}, "status": {"addresses": addresses}});
            let (code, created) =
                underlay.run(|| api.json("POST", "/api/v1/nodes", Some(&body)))?;
            ensure!(code == 201, "creating Node {name}: {code} {created}");

            let state_file = node.data_dir.path().join("node-state.json");
            let nat_table = names::unique("nat");
            let extra_args = vec![
                "--overlay".into(),
                overlay.into(),
                "--cluster-cidr".into(),
                cluster_cidr.clone(),
                "--masquerade".into(),
                "true".into(),
                "--nft-table-nat".into(),
                nat_table.clone(),
                "--node-state-file".into(),
                state_file.display().to_string(),
                "--routing-resync-seconds".into(),
                "2".into(),
            ];
            nodes.push(ClusterNode {
                name: name.into(),
                cni: node,
                address,
                address_v6,
                pins: TestPinDir::new(&format!("ovl-{i}"))?,
                cgroup: TestCgroup::new(&format!("ovl-{i}"))?,
                kubeconfig: kubeconfig_path,
                state_file,
                nat_table,
                agent: None,
                pod: None,
                pod_ip: None,
                pod_ip_v6: None,
                extra_args,
            });
        }
        let mut cluster = Cluster { nodes, api, underlay, gateway, gateway_v6, _data: data };
        for i in 0..cluster.nodes.len() {
            cluster.start_agent(i);
        }
        for i in 0..cluster.nodes.len() {
            cluster.add_pod(i)?;
        }
        Ok(cluster)
    }

    /// Starts node `i`'s agent and waits until its routing is ready.
    pub fn start_agent(&mut self, i: usize) {
        let node = &self.nodes[i];
        let options = AgentOptions {
            kubeconfig: &node.kubeconfig,
            node_name: &node.name,
            netns: Some(&node.cni.ns),
            extra_args: node.extra_args.clone(),
            wait_for: Some("weir agent: routing"),
        };
        let agent = AgentProcess::start_with(&options, &node.pins, &node.cgroup);
        self.nodes[i].agent = Some(agent);
    }

    /// Packets node `i`'s own IP stack forwarded so far (IPv4 and IPv6 together).
    pub fn forwarded(&self, i: usize) -> u64 {
        let ns = self.nodes[i].cni.ns.name();
        let read = |file: &str| {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "cat", file])
                .output()
                .expect("reading the node's IP counters");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // /proc/net/snmp: a line of IPv4 field names, then one of values.
        let snmp = read("/proc/net/snmp");
        let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip_lines.next().unwrap_or(""), ip_lines.next().unwrap_or(""));
        let v4 = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "ForwDatagrams")
            .and_then(|(_, value)| value.parse::<u64>().ok())
            .expect("IPv4 ForwDatagrams in /proc/net/snmp");
        let v6 = read("/proc/net/snmp6")
            .lines()
            .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        v4 + v6
    }

    /// The pod MTU node `i`'s agent announced.
    pub fn announced_mtu(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref()?.lines.iter().find_map(|line| {
            line.strip_prefix("weir agent: routing")?
                .split("pod MTU ")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
    }

    /// A pod on node `i`, wired by weir-cni from the node state file the agent wrote.
    fn add_pod(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let state_file = node.state_file.clone();
        let dual_stack = self.gateway_v6.is_some();
        eventually("the agent writing the node state file", WAIT, || {
            let text = std::fs::read_to_string(&state_file).unwrap_or_default();
            let ready = text.contains("podCIDRs\":[\"10.244.")
                && (!dual_stack || text.contains("\"fd00:10:244:"));
            (!ready).then_some(text)
        });
        let pod = Netns::new(&format!("pod{i}"))?;
        let config = json!({
            "cniVersion": "1.0.0", "name": "overlay", "type": "weir-cni",
            "bpffsDir": node.pins.path(),
            "ipam": {"dataDir": node.cni.data_dir.path(), "nodeStateFile": state_file},
        });
        let result = node
            .cni
            .weir("ADD", Some(&Attachment::new(format!("pod{i}"), &pod)), &config)?
            .result()?;
        let ip: Ipv4Addr =
            cni::result_ip(&result, false).context("no IPv4 address in the ADD result")?.parse()?;
        let ip_v6: Option<Ipv6Addr> = match dual_stack {
            true => Some(
                cni::result_ip(&result, true)
                    .with_context(|| format!("no IPv6 address in the ADD result {result}"))?
                    .parse()?,
            ),
            false => None,
        };
        self.nodes[i].pod = Some(pod);
        self.nodes[i].pod_ip = Some(ip);
        self.nodes[i].pod_ip_v6 = ip_v6;
        Ok(())
    }

    /// Pod `i`'s addresses, IPv4 first.
    pub fn pod_ips(&self, i: usize) -> Vec<IpAddr> {
        let node = &self.nodes[i];
        node.pod_ip.map(IpAddr::V4).into_iter().chain(node.pod_ip_v6.map(IpAddr::V6)).collect()
    }

    /// Node `i`'s underlay addresses, IPv4 first.
    pub fn node_addresses(&self, i: usize) -> Vec<IpAddr> {
        let node = &self.nodes[i];
        std::iter::once(IpAddr::V4(node.address)).chain(node.address_v6.map(IpAddr::V6)).collect()
    }

    /// The underlay bridge's addresses (outside the cluster network), IPv4 first.
    pub fn gateways(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.gateway)).chain(self.gateway_v6.map(IpAddr::V6)).collect()
    }

    /// Node `i`'s `spec.podCIDRs` as the API server holds them.
    pub fn pod_cidrs(&self, i: usize) -> Vec<String> {
        let (code, node) = self.api("GET", &format!("/api/v1/nodes/{}", self.nodes[i].name), None);
        assert_eq!(code, 200, "{node}");
        let cidrs = node["spec"]["podCIDRs"].as_array().cloned().unwrap_or_default();
        cidrs.iter().filter_map(|c| c.as_str().map(String::from)).collect()
    }

    pub fn pod(&self, i: usize) -> &Netns {
        self.nodes[i].pod.as_ref().expect("pod")
    }

    pub fn pod_ip(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].pod_ip.expect("pod ip")
    }

    /// A JSON request to the API server (from the underlay, where it listens).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.underlay.run(|| self.api.json(method, path, body)).expect("entering the underlay")
    }

    /// `ip -4 route show proto 87` and `ip -6 route show proto 87` on node `i`.
    pub fn weir_routes(&self, i: usize) -> String {
        let ns = &self.nodes[i].cni.ns;
        ["-4", "-6"]
            .map(|family| ns.ip(&[family, "route", "show", "proto", "87"]).unwrap_or_default())
            .concat()
    }
}

/// One TCP echo exchange from `from` to `target`: the server's reply, or why it failed.
pub fn echo(from: &Netns, target: &str) -> std::result::Result<String, String> {
    let out = probe::run(from, None, &["tcp", target, "--timeout-ms", "1000"]);
    match out["reply"].as_str() {
        Some(reply) if out["ok"] == true => Ok(reply.to_string()),
        _ => Err(out.to_string()),
    }
}

/// The behaviour both overlays must show, in order, for every address family of the cluster:
/// pod-to-pod TCP both ways with the pods' own addresses; masquerade to an underlay address;
/// routes repaired after a manual delete; connections surviving agent crashes and restarts with
/// nothing rewritten; a deleted Node's routes removed from the other node. `check_overlay` runs
/// overlay-specific checks on a ready cluster (device, neighbours, MTU).
pub fn scenario(overlay: &str, net: u8, check_overlay: impl Fn(&Cluster)) {
    let cluster = Cluster::new(overlay, net).expect("building the two-node cluster");
    run_scenario(cluster, check_overlay);
}

/// [`scenario`] on a dual-stack cluster: every step for IPv4 and for IPv6.
pub fn scenario_dual_stack(overlay: &str, net: u8, check_overlay: impl Fn(&Cluster)) {
    let cluster = Cluster::dual_stack(overlay, net).expect("building the dual-stack cluster");
    run_scenario(cluster, check_overlay);
}

fn run_scenario(mut cluster: Cluster, check_overlay: impl Fn(&Cluster)) {
    let (ips_a, ips_b) = (cluster.pod_ips(0), cluster.pod_ips(1));
    let cidrs_b = cluster.pod_cidrs(1);
    assert_eq!(cidrs_b.len(), ips_b.len(), "a pod CIDR per family: {cidrs_b:?}");
    let target = |ip: IpAddr, port: u16| SocketAddr::new(ip, port).to_string();

    // Pod A <-> pod B by IP, in both directions, without NAT between pods.
    let mut _servers = Vec::new();
    for (&a, &b) in ips_a.iter().zip(&ips_b) {
        _servers.push(crate::echo::EchoServer::tcp(cluster.pod(1), (b, 8080).into()).unwrap());
        _servers.push(crate::echo::EchoServer::tcp(cluster.pod(0), (a, 8080).into()).unwrap());
        eventually(&format!("pod A reaching pod B at {b}"), WAIT, || {
            echo(cluster.pod(0), &target(b, 8080)).err()
        });
        let reply = echo(cluster.pod(0), &target(b, 8080)).unwrap();
        let (_, peer) = crate::echo::parse_reply(&reply).unwrap();
        assert_eq!(peer.ip(), a, "pod B sees pod A's own address: {reply}");
        echo(cluster.pod(1), &target(a, 8080)).expect("pod B reaching pod A");
    }
    for cidr in &cidrs_b {
        assert!(cluster.weir_routes(0).contains(cidr), "{cidr} in {}", cluster.weir_routes(0));
    }
    check_overlay(&cluster);

    // eBPF host routing: once both ends know each other (the exchanges above), pod-to-pod
    // traffic between the nodes is forwarded by weir's programs, never by either node's stack.
    let before = [cluster.forwarded(0), cluster.forwarded(1)];
    for (&a, &b) in ips_a.iter().zip(&ips_b) {
        for _ in 0..5 {
            echo(cluster.pod(0), &target(b, 8080)).expect("pod A reaching pod B");
            echo(cluster.pod(1), &target(a, 8080)).expect("pod B reaching pod A");
        }
    }
    let after = [cluster.forwarded(0), cluster.forwarded(1)];
    assert_eq!(after, before, "packets the nodes' stacks forwarded during 10 exchanges");

    // Masquerade: a pod reaching an underlay address is seen with its node's address.
    let node_a = cluster.node_addresses(0);
    for (gateway, node_address) in cluster.gateways().into_iter().zip(node_a) {
        let _outside =
            crate::echo::EchoServer::tcp(&cluster.underlay, (gateway, 9000).into()).unwrap();
        let reply = echo(cluster.pod(0), &target(gateway, 9000)).expect("pod A to the underlay");
        let (_, peer) = crate::echo::parse_reply(&reply).unwrap();
        assert_eq!(peer.ip(), node_address, "masqueraded: {reply}");
        let (family, cidr) =
            if gateway.is_ipv6() { ("ip6", CLUSTER_CIDR_V6) } else { ("ip", CLUSTER_CIDR) };
        let ns = cluster.nodes[0].cni.ns.name().to_string();
        let nft = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "list", "table", family])
            .arg(&cluster.nodes[0].nat_table)
            .output()
            .unwrap();
        let ruleset = String::from_utf8_lossy(&nft.stdout);
        assert!(
            ruleset.contains(&format!("{family} saddr {cidr} {family} daddr != {cidr} masquerade")),
            "{ruleset} {}",
            String::from_utf8_lossy(&nft.stderr)
        );
    }

    // A route removed by hand comes back at the next resync, whatever its family.
    let routes = cluster.weir_routes(0);
    for cidr in &cidrs_b {
        cluster.nodes[0].cni.ns.ip(&["route", "del", cidr, "proto", "87"]).unwrap();
    }
    eventually("the deleted routes being repaired", WAIT, || {
        let now = cluster.weir_routes(0);
        (now != routes).then_some(now)
    });

    // Agent restarts: held connections keep working, new ones too, and nothing is rewritten.
    let mut sessions: Vec<_> = ips_b
        .iter()
        .map(|&b| crate::probe::Session::open(cluster.pod(0), None, &target(b, 8080)))
        .collect();
    let ping_all = |sessions: &mut Vec<crate::probe::Session>, when: &str| {
        for session in sessions.iter_mut() {
            assert_eq!(session.ping()["ok"], true, "the held connection {when}");
        }
    };
    ping_all(&mut sessions, "before the restart");
    for i in 0..2 {
        cluster.nodes[i].agent.as_mut().unwrap().kill();
    }
    ping_all(&mut sessions, "while no agent runs");
    for &b in &ips_b {
        echo(cluster.pod(0), &target(b, 8080)).expect("a new connection while no agent runs");
    }
    for i in 0..2 {
        cluster.start_agent(i);
    }
    assert_eq!(cluster.weir_routes(0), routes, "a restarted agent adopts its routes");
    ping_all(&mut sessions, "after the restart");
    for &a in &ips_a {
        echo(cluster.pod(1), &target(a, 8080)).expect("a new connection after the restart");
    }
    cluster.nodes[0].agent.as_mut().unwrap().terminate();
    assert_eq!(cluster.weir_routes(0), routes, "a clean shutdown leaves the routes");
    ping_all(&mut sessions, "after a clean shutdown");
    cluster.start_agent(0);

    // A Node deleted from the API loses its routes (and overlay entries) on the other node.
    let (code, body) = cluster.api("DELETE", "/api/v1/nodes/node-b", None);
    assert_eq!(code, 200, "{body}");
    eventually("node B's routes leaving node A", WAIT, || {
        let now = cluster.weir_routes(0);
        cidrs_b.iter().any(|cidr| now.contains(cidr)).then_some(now)
    });
    let neighbours = cluster.nodes[0].cni.ns.ip(&["neigh", "show", "nud", "permanent"]).unwrap();
    assert!(!neighbours.contains("weir.vxlan"), "{neighbours}");
    let fdb = std::process::Command::new("bridge")
        .args(["-n", cluster.nodes[0].cni.ns.name(), "fdb", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!fdb.contains(&cluster.nodes[1].address.to_string()), "{fdb}");
    for &b in &ips_b {
        assert!(echo(cluster.pod(0), &target(b, 8080)).is_err(), "no route to {b}, no traffic");
    }
}
