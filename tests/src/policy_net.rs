//! The truth table (policy_cases.rs) as real network namespaces: two node namespaces routed to
//! each other, a pod namespace per pod behind its node (x/a, x/b, y/a, ... on node-1; the c
//! pods on node-2), wired like weir-cni does (a /32, a link-local gateway, a host route), and an
//! outside namespace with the truth table's external address behind node-1. Every pod, the
//! outside address and each node's address run TCP and UDP echo servers on the truth table's
//! ports, so [`PolicyNet::probe`] can try every cell with real connections. A policy datapath
//! under test is programmed inside the node namespaces ([`PolicyNet::nodes`]). Everything is
//! removed on drop.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use weir_policy::Cidr;

use crate::{
    echo::EchoServer,
    netns::{Netns, Veth},
    policy_cases::{EXTERNAL, NAMESPACES, NODES, PODS, PORTS, node_ip, pod_ip, pod_node},
    policy_oracle::Party,
};

const GATEWAY: &str = "169.254.1.1";
/// The node-to-node link: node-1 .1, node-2 .2.
const TRUNK: [&str; 2] = ["169.254.2.1", "169.254.2.2"];
/// The outside link: node-1 .1, outside .2.
const OUTSIDE_LINK: [&str; 2] = ["169.254.3.1", "169.254.3.2"];

/// A protocol the probes speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeProtocol {
    Tcp,
    Udp,
}

impl ProbeProtocol {
    pub const ALL: [Self; 2] = [Self::Tcp, Self::Udp];

    /// The name NetworkPolicy (and the oracle) use.
    pub fn k8s_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// One probe: from a party to another on (protocol, port).
#[derive(Clone, Debug)]
pub struct Cell {
    pub src: Party,
    pub dst: Party,
    pub protocol: ProbeProtocol,
    pub port: u16,
}

/// The namespaces of the truth table. Field order is drop order: servers stop first.
pub struct PolicyNet {
    _servers: Vec<EchoServer>,
    /// (namespace index, pod index) -> pod namespace.
    pods: Vec<((usize, usize), Netns)>,
    outside: Netns,
    /// node-1, node-2.
    pub nodes: [Netns; 2],
}

/// (cell index, source address, destination address, cell)
type Probe<'a> = (usize, Ipv4Addr, Ipv4Addr, &'a Cell);

/// UDP probes bind a source port never used before in this process, so a conntrack entry left
/// by an earlier allowed probe can never make a later one look like a reply.
static NEXT_UDP_PORT: AtomicU16 = AtomicU16::new(20000);

impl PolicyNet {
    pub fn new() -> Result<Self> {
        let nodes = [Netns::new("node1")?, Netns::new("node2")?];
        for (i, node) in nodes.iter().enumerate() {
            node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
            node.ip(&["addr", "add", &format!("{}/32", node_ip(i)), "dev", "lo"])?;
        }
        let trunk = Veth::between(&nodes[0], &nodes[1])?;
        nodes[0].ip(&["addr", "add", &format!("{}/30", TRUNK[0]), "dev", &trunk.a])?;
        nodes[1].ip(&["addr", "add", &format!("{}/30", TRUNK[1]), "dev", &trunk.b])?;
        let outside = Netns::new("outside")?;
        let link = Veth::between(&nodes[0], &outside)?;
        nodes[0].ip(&["addr", "add", &format!("{}/30", OUTSIDE_LINK[0]), "dev", &link.a])?;
        outside.ip(&["addr", "add", &format!("{}/30", OUTSIDE_LINK[1]), "dev", &link.b])?;
        outside.ip(&["addr", "add", &format!("{EXTERNAL}/32"), "dev", "lo"])?;
        let external = EXTERNAL.to_string();
        outside.ip(&["route", "add", "default", "via", OUTSIDE_LINK[0], "src", &external])?;
        nodes[0].ip(&["route", "add", &format!("{EXTERNAL}/32"), "via", OUTSIDE_LINK[1]])?;
        nodes[1].ip(&["route", "add", &format!("{EXTERNAL}/32"), "via", TRUNK[0]])?;
        // Each node reaches the other's address (and pods, below) over the trunk, with its own
        // address as source.
        let (src0, src1) = (node_ip(0).to_string(), node_ip(1).to_string());
        nodes[0].ip(&[
            "route",
            "add",
            &format!("{}/32", node_ip(1)),
            "via",
            TRUNK[1],
            "src",
            &src0,
        ])?;
        nodes[1].ip(&[
            "route",
            "add",
            &format!("{}/32", node_ip(0)),
            "via",
            TRUNK[0],
            "src",
            &src1,
        ])?;
        let mut pods = Vec::new();
        for (n, namespace) in NAMESPACES.iter().enumerate() {
            for (p, name) in PODS.iter().enumerate() {
                let home = pod_node(p);
                let ip = pod_ip(n, p);
                let pod = Netns::new(&format!("pod-{namespace}{name}"))?;
                let veth = Veth::between(&pod, &nodes[home])?;
                pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", &veth.a])?;
                pod.ip(&["route", "add", GATEWAY, "dev", &veth.a, "scope", "link"])?;
                pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", &veth.a])?;
                let node = &nodes[home];
                node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth.b])?;
                let src = node_ip(home).to_string();
                node.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth.b, "src", &src])?;
                let other = &nodes[1 - home];
                let via = TRUNK[home];
                let other_src = node_ip(1 - home).to_string();
                other.ip(&["route", "add", &format!("{ip}/32"), "via", via, "src", &other_src])?;
                pods.push(((n, p), pod));
            }
        }
        let mut servers = Vec::new();
        let mut serve = |ns: &Netns, ip: Ipv4Addr| -> Result<()> {
            for port in PORTS {
                servers.push(EchoServer::tcp(ns, (ip, port).into())?);
                servers.push(EchoServer::udp(ns, (ip, port).into())?);
            }
            Ok(())
        };
        for ((n, p), pod) in &pods {
            serve(pod, pod_ip(*n, *p))?;
        }
        serve(&outside, EXTERNAL)?;
        for (i, node) in nodes.iter().enumerate() {
            serve(node, node_ip(i))?;
        }
        Ok(Self { _servers: servers, pods, outside, nodes })
    }

    /// The pod ranges of node `node` (`spec.podCIDRs`): the addresses of the pods the truth
    /// table places there.
    pub fn pod_cidrs(node: usize) -> Vec<Cidr> {
        let mut cidrs = Vec::new();
        for n in 0..NAMESPACES.len() {
            if node == 0 {
                cidrs.push(Cidr::new(pod_ip(n, 0).into(), 31).expect("valid prefix"));
            } else {
                cidrs.push(Cidr::host(pod_ip(n, 2).into()));
            }
        }
        cidrs
    }

    /// The namespace a party's connections start from, and its address.
    fn locate(&self, party: &Party) -> (&Netns, Ipv4Addr) {
        match party {
            Party::Pod(ns, name) => {
                let n = NAMESPACES.iter().position(|x| x == ns).expect("truth-table namespace");
                let p = PODS.iter().position(|x| x == name).expect("truth-table pod");
                let pod = &self.pods.iter().find(|(at, _)| *at == (n, p)).expect("pod netns").1;
                (pod, pod_ip(n, p))
            }
            Party::Addr { node: Some(node), .. } => {
                let i = NODES.iter().position(|x| x == node).expect("truth-table node");
                (&self.nodes[i], node_ip(i))
            }
            Party::Addr { .. } => (&self.outside, EXTERNAL),
        }
    }

    /// Every cell of the truth table this topology can probe: pairs with at least one pod
    /// (a pod's connection to itself never leaves it, so no datapath outside the pod sees
    /// it), both protocols, both ports.
    pub fn cells() -> Vec<Cell> {
        let mut cells = Vec::new();
        for (src, dst) in crate::policy_cases::TruthTable::pairs() {
            if src == dst {
                continue;
            }
            for protocol in ProbeProtocol::ALL {
                for port in PORTS {
                    cells.push(Cell { src: src.clone(), dst: dst.clone(), protocol, port });
                }
            }
        }
        cells
    }

    /// Probes every cell at once (a thread per probe, grouped by source namespace): whether a
    /// request got its echo within `timeout`.
    pub fn probe_all(&self, cells: &[Cell], timeout: Duration) -> Vec<bool> {
        let mut results = vec![false; cells.len()];
        let mut by_source: Vec<(&Netns, Vec<Probe>)> = Vec::new();
        for (index, cell) in cells.iter().enumerate() {
            let (ns, src) = self.locate(&cell.src);
            let (_, dst) = self.locate(&cell.dst);
            match by_source.iter_mut().find(|(n, _)| n.name() == ns.name()) {
                Some((_, list)) => list.push((index, src, dst, cell)),
                None => by_source.push((ns, vec![(index, src, dst, cell)])),
            }
        }
        let outcomes: Vec<(usize, bool)> = std::thread::scope(|scope| {
            let handles: Vec<_> = by_source
                .into_iter()
                .map(|(ns, list)| {
                    scope.spawn(move || {
                        // Threads started inside the namespace thread inherit its namespace.
                        ns.run(|| {
                            std::thread::scope(|inner| {
                                let probes: Vec<_> = list
                                    .iter()
                                    .map(|(index, src, dst, cell)| {
                                        inner.spawn(move || {
                                            (
                                                *index,
                                                probe(
                                                    *src,
                                                    *dst,
                                                    cell.protocol,
                                                    cell.port,
                                                    timeout,
                                                ),
                                            )
                                        })
                                    })
                                    .collect();
                                probes
                                    .into_iter()
                                    .map(|p| p.join().expect("probe thread"))
                                    .collect::<Vec<_>>()
                            })
                        })
                        .expect("enter the source namespace")
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("source thread")).collect()
        });
        for (index, ok) in outcomes {
            results[index] = ok;
        }
        results
    }
}

/// One request from `src` to `dst`:`port`; true when its echo came back within `timeout`.
/// Runs in the source's namespace.
fn probe(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: ProbeProtocol,
    port: u16,
    timeout: Duration,
) -> bool {
    let attempt = || -> Result<String> {
        match protocol {
            ProbeProtocol::Tcp => {
                let mut stream =
                    TcpStream::connect_timeout(&SocketAddr::from((dst, port)), timeout)
                        .context("connect")?;
                stream.set_read_timeout(Some(timeout))?;
                stream.write_all(b"ping\n")?;
                let mut reply = String::new();
                BufReader::new(&stream).read_line(&mut reply)?;
                Ok(reply)
            }
            ProbeProtocol::Udp => {
                let sport = NEXT_UDP_PORT.fetch_add(1, Ordering::Relaxed);
                anyhow::ensure!(sport < 60000, "out of unused UDP source ports");
                let socket = UdpSocket::bind((src, sport)).context("bind")?;
                socket.set_read_timeout(Some(timeout))?;
                socket.send_to(b"ping\n", (dst, port))?;
                let mut buf = [0u8; 256];
                let (n, _) = socket.recv_from(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
        }
    };
    attempt().is_ok_and(|reply| reply.starts_with("pong"))
}
