//! The truth table (policy_cases.rs) as real network namespaces: two node namespaces routed to
//! each other, a pod namespace per pod behind its node (x/a, x/b, y/a, ... on node-1; the c
//! pods on node-2), wired like weir-cni does (a /32 and a /128, a link-local gateway per
//! family, host routes), and an outside namespace with the truth table's external addresses
//! behind node-1. Everything is dual-stack. Every pod, the outside addresses and each node's
//! addresses run TCP and UDP echo servers on the truth table's ports, so
//! [`PolicyNet::probe_all`] can try every cell of either family with real connections. A policy datapath
//! under test is programmed inside the node namespaces ([`PolicyNet::nodes`]). Everything is
//! removed on drop.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use weir_policy::Cidr;

use crate::{
    echo::EchoServer,
    netns::{Netns, Veth},
    policy_cases::{
        EXTERNAL, EXTERNAL6, NAMESPACES, NODES, PODS, PORTS, node_ip, node_ip6, pod_ip, pod_ip6,
        pod_node,
    },
    policy_oracle::Party,
};

const GATEWAY: &str = "169.254.1.1";
const GATEWAY6: &str = "fe80::1";
/// The node-to-node link: node-1 .1, node-2 .2.
const TRUNK: [&str; 2] = ["169.254.2.1", "169.254.2.2"];
const TRUNK6: [&str; 2] = ["fd00:169:254:2::1", "fd00:169:254:2::2"];
/// The outside link: node-1 .1, outside .2.
const OUTSIDE_LINK: [&str; 2] = ["169.254.3.1", "169.254.3.2"];
const OUTSIDE_LINK6: [&str; 2] = ["fd00:169:254:3::1", "fd00:169:254:3::2"];

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

/// One probe: from a party to another on (protocol, port), over IPv6 when `ipv6` (pods use
/// their address of the family; an address party is of that family).
#[derive(Clone, Debug)]
pub struct Cell {
    pub src: Party,
    pub dst: Party,
    pub protocol: ProbeProtocol,
    pub port: u16,
    pub ipv6: bool,
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
type Probe<'a> = (usize, IpAddr, IpAddr, &'a Cell);

/// UDP probes bind a source port never used before in this process for their family (IPv4,
/// IPv6), so a conntrack entry left by an earlier allowed probe can never make a later one look
/// like a reply.
static NEXT_UDP_PORT: [AtomicU16; 2] =
    [AtomicU16::new(FIRST_UDP_PORT), AtomicU16::new(FIRST_UDP_PORT)];
const FIRST_UDP_PORT: u16 = 20000;
const LAST_UDP_PORT: u16 = 60000;

impl PolicyNet {
    pub fn new() -> Result<Self> {
        let nodes = [without_dad(Netns::new("node1")?)?, without_dad(Netns::new("node2")?)?];
        for (i, node) in nodes.iter().enumerate() {
            node.run(|| {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            })??;
            node.ip(&["addr", "add", &format!("{}/32", node_ip(i)), "dev", "lo"])?;
            node.ip(&["addr", "add", &format!("{}/128", node_ip6(i)), "dev", "lo"])?;
        }
        let trunk = Veth::between(&nodes[0], &nodes[1])?;
        nodes[0].ip(&["addr", "add", &format!("{}/30", TRUNK[0]), "dev", &trunk.a])?;
        nodes[1].ip(&["addr", "add", &format!("{}/30", TRUNK[1]), "dev", &trunk.b])?;
        add6(&nodes[0], &format!("{}/64", TRUNK6[0]), &trunk.a)?;
        add6(&nodes[1], &format!("{}/64", TRUNK6[1]), &trunk.b)?;
        let outside = without_dad(Netns::new("outside")?)?;
        let link = Veth::between(&nodes[0], &outside)?;
        nodes[0].ip(&["addr", "add", &format!("{}/30", OUTSIDE_LINK[0]), "dev", &link.a])?;
        outside.ip(&["addr", "add", &format!("{}/30", OUTSIDE_LINK[1]), "dev", &link.b])?;
        add6(&nodes[0], &format!("{}/64", OUTSIDE_LINK6[0]), &link.a)?;
        add6(&outside, &format!("{}/64", OUTSIDE_LINK6[1]), &link.b)?;
        outside.ip(&["addr", "add", &format!("{EXTERNAL}/32"), "dev", "lo"])?;
        outside.ip(&["addr", "add", &format!("{EXTERNAL6}/128"), "dev", "lo"])?;
        let (external, external6) = (EXTERNAL.to_string(), EXTERNAL6.to_string());
        outside.ip(&["route", "add", "default", "via", OUTSIDE_LINK[0], "src", &external])?;
        outside.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            OUTSIDE_LINK6[0],
            "src",
            &external6,
        ])?;
        nodes[0].ip(&["route", "add", &format!("{EXTERNAL}/32"), "via", OUTSIDE_LINK[1]])?;
        nodes[0].ip(&["route", "add", &format!("{EXTERNAL6}/128"), "via", OUTSIDE_LINK6[1]])?;
        nodes[1].ip(&["route", "add", &format!("{EXTERNAL}/32"), "via", TRUNK[0]])?;
        nodes[1].ip(&["route", "add", &format!("{EXTERNAL6}/128"), "via", TRUNK6[0]])?;
        // Each node reaches the other's addresses (and pods, below) over the trunk, with its
        // own address as source.
        for (this, other) in [(0, 1), (1, 0)] {
            let (to, via, src) = (node_ip(other), TRUNK[other], node_ip(this));
            nodes[this].ip(&[
                "route",
                "add",
                &format!("{to}/32"),
                "via",
                via,
                "src",
                &src.to_string(),
            ])?;
            let (to, via, src) = (node_ip6(other), TRUNK6[other], node_ip6(this));
            nodes[this].ip(&[
                "route",
                "add",
                &format!("{to}/128"),
                "via",
                via,
                "src",
                &src.to_string(),
            ])?;
        }
        let mut pods = Vec::new();
        for (n, namespace) in NAMESPACES.iter().enumerate() {
            for (p, name) in PODS.iter().enumerate() {
                let home = pod_node(p);
                let (ip, ip6) = (pod_ip(n, p), pod_ip6(n, p));
                let pod = without_dad(Netns::new(&format!("pod-{namespace}{name}"))?)?;
                let veth = Veth::between(&pod, &nodes[home])?;
                pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", &veth.a])?;
                pod.ip(&["route", "add", GATEWAY, "dev", &veth.a, "scope", "link"])?;
                pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", &veth.a])?;
                add6(&pod, &format!("{ip6}/128"), &veth.a)?;
                pod.ip(&["-6", "route", "add", "default", "via", GATEWAY6, "dev", &veth.a])?;
                let node = &nodes[home];
                node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth.b])?;
                add6(node, &format!("{GATEWAY6}/64"), &veth.b)?;
                let src = node_ip(home).to_string();
                node.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth.b, "src", &src])?;
                let src6 = node_ip6(home).to_string();
                node.ip(&["route", "add", &format!("{ip6}/128"), "dev", &veth.b, "src", &src6])?;
                let other = &nodes[1 - home];
                let other_src = node_ip(1 - home).to_string();
                let (via, via6) = (TRUNK[home], TRUNK6[home]);
                other.ip(&["route", "add", &format!("{ip}/32"), "via", via, "src", &other_src])?;
                let other_src6 = node_ip6(1 - home).to_string();
                other.ip(&[
                    "route",
                    "add",
                    &format!("{ip6}/128"),
                    "via",
                    via6,
                    "src",
                    &other_src6,
                ])?;
                pods.push(((n, p), pod));
            }
        }
        let mut servers = Vec::new();
        let mut serve = |ns: &Netns, ips: [IpAddr; 2]| -> Result<()> {
            for ip in ips {
                for port in PORTS {
                    servers.push(EchoServer::tcp(ns, (ip, port).into())?);
                    servers.push(EchoServer::udp(ns, (ip, port).into())?);
                }
            }
            Ok(())
        };
        for ((n, p), pod) in &pods {
            serve(pod, [pod_ip(*n, *p).into(), pod_ip6(*n, *p).into()])?;
        }
        serve(&outside, [EXTERNAL.into(), EXTERNAL6.into()])?;
        for (i, node) in nodes.iter().enumerate() {
            serve(node, [node_ip(i).into(), node_ip6(i).into()])?;
        }
        Ok(Self { _servers: servers, pods, outside, nodes })
    }

    /// The pod ranges of node `node` (`spec.podCIDRs`): the addresses of the pods the truth
    /// table places there, both families.
    pub fn pod_cidrs(node: usize) -> Vec<Cidr> {
        let mut cidrs = Vec::new();
        for n in 0..NAMESPACES.len() {
            if node == 0 {
                cidrs.push(Cidr::new(pod_ip(n, 0).into(), 31).expect("valid prefix"));
                cidrs.push(Cidr::new(pod_ip6(n, 0).into(), 127).expect("valid prefix"));
            } else {
                cidrs.push(Cidr::host(pod_ip(n, 2).into()));
                cidrs.push(Cidr::host(pod_ip6(n, 2).into()));
            }
        }
        cidrs
    }

    /// The namespace a party's connections start from, and its address of the family.
    fn locate(&self, party: &Party, ipv6: bool) -> (&Netns, IpAddr) {
        match party {
            Party::Pod(ns, name) => {
                let n = NAMESPACES.iter().position(|x| x == ns).expect("truth-table namespace");
                let p = PODS.iter().position(|x| x == name).expect("truth-table pod");
                let pod = &self.pods.iter().find(|(at, _)| *at == (n, p)).expect("pod netns").1;
                (pod, if ipv6 { pod_ip6(n, p).into() } else { pod_ip(n, p).into() })
            }
            Party::Addr { node: Some(node), ip } => {
                let i = NODES.iter().position(|x| x == node).expect("truth-table node");
                (&self.nodes[i], *ip)
            }
            Party::Addr { ip, .. } => (&self.outside, *ip),
        }
    }

    /// Every IPv4 cell of the truth table this topology can probe: pairs with at least one
    /// pod (a pod's connection to itself never leaves it, so no datapath outside the pod sees
    /// it), both protocols, both ports.
    pub fn cells() -> Vec<Cell> {
        Self::cells_of(false)
    }

    /// [`Self::cells`] of one family.
    pub fn cells_of(ipv6: bool) -> Vec<Cell> {
        let mut cells = Vec::new();
        for (src, dst) in crate::policy_cases::TruthTable::pairs_of(ipv6) {
            if src == dst {
                continue;
            }
            for protocol in ProbeProtocol::ALL {
                for port in PORTS {
                    let (src, dst) = (src.clone(), dst.clone());
                    cells.push(Cell { src, dst, protocol, port, ipv6 });
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
            let (ns, src) = self.locate(&cell.src, cell.ipv6);
            let (_, dst) = self.locate(&cell.dst, cell.ipv6);
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
fn probe(src: IpAddr, dst: IpAddr, protocol: ProbeProtocol, port: u16, timeout: Duration) -> bool {
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
                let sport =
                    NEXT_UDP_PORT[usize::from(src.is_ipv6())].fetch_add(1, Ordering::Relaxed);
                // A test bug, not a verdict: fail loudly rather than as a dropped probe.
                assert!(
                    sport <= LAST_UDP_PORT,
                    "out of unused UDP source ports: one test process may send at most {} UDP \
                     probes per family",
                    LAST_UDP_PORT - FIRST_UDP_PORT + 1
                );
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

/// Adds an IPv6 address without duplicate address detection (usable at once: the echo
/// servers bind to it right away).
fn add6(ns: &Netns, address: &str, dev: &str) -> Result<()> {
    ns.ip(&["addr", "add", address, "dev", dev, "nodad"])?;
    Ok(())
}

/// `ns` with duplicate address detection off for the interfaces made in it from now on: the
/// link-local addresses neighbour discovery speaks from are usable at once (with DAD, IPv6
/// probes of the first second or two find no neighbour).
fn without_dad(ns: Netns) -> Result<Netns> {
    ns.run(|| {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")?;
        }
        std::io::Result::Ok(())
    })??;
    Ok(ns)
}
