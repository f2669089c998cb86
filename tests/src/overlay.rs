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
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

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
    pub pins: TestPinDir,
    pub cgroup: TestCgroup,
    pub kubeconfig: PathBuf,
    pub state_file: PathBuf,
    pub nat_table: String,
    pub pod_ip: Option<Ipv4Addr>,
    extra_args: Vec<String>,
}

pub struct Cluster {
    /// Dropped last: everything else lives inside or hangs off it.
    pub nodes: Vec<ClusterNode>,
    pub api: ApiServer,
    pub underlay: Netns,
    pub gateway: Ipv4Addr,
    _data: TempDir,
}

impl Cluster {
    /// Underlay, API server, two registered nodes (`node-a`, `node-b`) with eth0 on the
    /// bridge, each running `weir agent --overlay <overlay> --masquerade true` and holding one
    /// pod wired by weir-cni. `net` picks the underlay subnet 10.<net>.0.0/24.
    pub fn new(overlay: &str, net: u8) -> Result<Cluster> {
        let underlay = Netns::new("underlay")?;
        let bridge = names::interface('u');
        underlay.ip(&["link", "add", &bridge, "type", "bridge"])?;
        let gateway = Ipv4Addr::new(10, net, 0, 1);
        underlay.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        underlay.ip(&["link", "set", &bridge, "up"])?;

        let data = TempDir::new("overlay-api");
        let listen = format!("{gateway}:0");
        let api = ApiServer::start_in(Some(&underlay), data.path(), &["--listen", &listen]);
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
            underlay.ip(&["link", "set", &veth.b, "master", &bridge])?;

            // The serving certificate names localhost; the agents reach the server by address.
            let mut kubeconfig = admin.clone();
            kubeconfig["clusters"][0]["cluster"]["tls-server-name"] = json!("localhost");
            let kubeconfig_path = node.data_dir.path().join("kubeconfig");
            std::fs::write(&kubeconfig_path, kubeconfig.to_string())?;

            let body = json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": address.to_string()},
                                         {"type": "Hostname", "address": name}]}});
            let (code, created) =
                underlay.run(|| api.json("POST", "/api/v1/nodes", Some(&body)))?;
            ensure!(code == 201, "creating Node {name}: {code} {created}");

            let state_file = node.data_dir.path().join("node-state.json");
            let nat_table = names::unique("nat");
            let extra_args = vec![
                "--overlay".into(),
                overlay.into(),
                "--cluster-cidr".into(),
                CLUSTER_CIDR.into(),
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
                pins: TestPinDir::new(&format!("ovl-{i}"))?,
                cgroup: TestCgroup::new(&format!("ovl-{i}"))?,
                kubeconfig: kubeconfig_path,
                state_file,
                nat_table,
                agent: None,
                pod: None,
                pod_ip: None,
                extra_args,
            });
        }
        let mut cluster = Cluster { nodes, api, underlay, gateway, _data: data };
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
        eventually("the agent writing the node state file", WAIT, || {
            let text = std::fs::read_to_string(&state_file).unwrap_or_default();
            (!text.contains("podCIDRs\":[\"10.244.")).then_some(text)
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
        self.nodes[i].pod = Some(pod);
        self.nodes[i].pod_ip = Some(ip);
        Ok(())
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

    /// `ip -4 route show proto 87` on node `i`.
    pub fn weir_routes(&self, i: usize) -> String {
        self.nodes[i].cni.ns.ip(&["-4", "route", "show", "proto", "87"]).unwrap_or_default()
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

/// The behaviour both overlays must show, in order: pod-to-pod TCP both ways with the pods'
/// own addresses; masquerade to an underlay address; routes repaired after a manual delete;
/// connections surviving agent crashes and restarts with nothing rewritten; a deleted Node's
/// route removed from the other node. `check_overlay` runs overlay-specific checks on a
/// ready cluster (device, neighbours, MTU).
pub fn scenario(overlay: &str, net: u8, check_overlay: impl Fn(&Cluster)) {
    let mut cluster = Cluster::new(overlay, net).expect("building the two-node cluster");
    let (ip_a, ip_b) = (cluster.pod_ip(0), cluster.pod_ip(1));
    let cidr_b = format!("{}.{}.{}.0/24", ip_b.octets()[0], ip_b.octets()[1], ip_b.octets()[2]);

    // Pod A <-> pod B by IP, in both directions, without NAT between pods.
    let _server_b = crate::echo::EchoServer::tcp(cluster.pod(1), (ip_b, 8080).into()).unwrap();
    let _server_a = crate::echo::EchoServer::tcp(cluster.pod(0), (ip_a, 8080).into()).unwrap();
    eventually("pod A reaching pod B", WAIT, || {
        echo(cluster.pod(0), &format!("{ip_b}:8080")).err()
    });
    let reply = echo(cluster.pod(0), &format!("{ip_b}:8080")).unwrap();
    let (_, peer) = crate::echo::parse_reply(&reply).unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(ip_a), "pod B sees pod A's own address: {reply}");
    echo(cluster.pod(1), &format!("{ip_a}:8080")).expect("pod B reaching pod A");
    assert!(cluster.weir_routes(0).contains(&cidr_b), "{}", cluster.weir_routes(0));
    check_overlay(&cluster);

    // Masquerade: a pod reaching an underlay address is seen with its node's address.
    let gateway = cluster.gateway;
    let _outside = crate::echo::EchoServer::tcp(&cluster.underlay, (gateway, 9000).into()).unwrap();
    let reply = echo(cluster.pod(0), &format!("{gateway}:9000")).expect("pod A to the underlay");
    let (_, peer) = crate::echo::parse_reply(&reply).unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(cluster.nodes[0].address), "masqueraded: {reply}");
    let table = cluster.nodes[0].cni.ns.name().to_string();
    let nft = std::process::Command::new("ip")
        .args(["netns", "exec", &table, "nft", "list", "table", "ip", &cluster.nodes[0].nat_table])
        .output()
        .unwrap();
    let ruleset = String::from_utf8_lossy(&nft.stdout);
    assert!(
        ruleset.contains(&format!("ip saddr {CLUSTER_CIDR} ip daddr != {CLUSTER_CIDR} masquerade")),
        "{ruleset} {}",
        String::from_utf8_lossy(&nft.stderr)
    );

    // A route removed by hand comes back at the next resync.
    let routes = cluster.weir_routes(0);
    cluster.nodes[0].cni.ns.ip(&["route", "del", &cidr_b, "proto", "87"]).unwrap();
    eventually("the deleted route being repaired", WAIT, || {
        let now = cluster.weir_routes(0);
        (now != routes).then_some(now)
    });

    // Agent restarts: a held connection keeps working, new ones too, and nothing is rewritten.
    let mut session = crate::probe::Session::open(cluster.pod(0), None, &format!("{ip_b}:8080"));
    assert_eq!(session.ping()["ok"], true);
    for i in 0..2 {
        cluster.nodes[i].agent.as_mut().unwrap().kill();
    }
    assert_eq!(session.ping()["ok"], true, "a connection while no agent runs");
    echo(cluster.pod(0), &format!("{ip_b}:8080")).expect("a new connection while no agent runs");
    for i in 0..2 {
        cluster.start_agent(i);
    }
    assert_eq!(cluster.weir_routes(0), routes, "a restarted agent adopts its routes");
    assert_eq!(session.ping()["ok"], true, "the held connection after the restart");
    echo(cluster.pod(1), &format!("{ip_a}:8080")).expect("a new connection after the restart");
    cluster.nodes[0].agent.as_mut().unwrap().terminate();
    assert_eq!(cluster.weir_routes(0), routes, "a clean shutdown leaves the routes");
    assert_eq!(session.ping()["ok"], true, "the held connection after a clean shutdown");
    cluster.start_agent(0);

    // A Node deleted from the API loses its route (and overlay entries) on the other node.
    let (code, body) = cluster.api("DELETE", "/api/v1/nodes/node-b", None);
    assert_eq!(code, 200, "{body}");
    eventually("node B's route leaving node A", WAIT, || {
        let now = cluster.weir_routes(0);
        now.contains(&cidr_b).then_some(now)
    });
    let neighbours = cluster.nodes[0].cni.ns.ip(&["neigh", "show", "nud", "permanent"]).unwrap();
    assert!(!neighbours.contains("weir.vxlan"), "{neighbours}");
    let fdb = cluster.nodes[0]
        .cni
        .ns
        .ip(&["-d", "link", "show"])
        .map(|_| {
            std::process::Command::new("bridge")
                .args(["-n", cluster.nodes[0].cni.ns.name(), "fdb", "show"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        })
        .unwrap();
    assert!(!fdb.contains(&cluster.nodes[1].address.to_string()), "{fdb}");
    assert!(echo(cluster.pod(0), &format!("{ip_b}:8080")).is_err(), "no route, no traffic");
}
