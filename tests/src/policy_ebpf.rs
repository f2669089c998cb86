//! The eBPF policy programs (`tc_pol_egress`, `tc_pol_ingress`) run with BPF_PROG_TEST_RUN on
//! the truth table: maps written as each node's agent would, one packet per cell. Shared by the
//! eBPF differential test (netpol_ebpf) and the eBPF/nftables/oracle differential (netpol_nft).
use std::net::IpAddr;

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_common::proto;
use weir_policy::{Cluster, Compiler};
use weir_proxy::{
    policy::{DatapathPolicy, Lowering, PolicyMaps},
    programs::{self, LoadOptions, TC_POLICY_EGRESS, TC_POLICY_INGRESS},
};

use crate::{
    bpffs::TestPinDir,
    packet::{Ipv4Packet, Ipv6Packet},
    policy_cases::{
        NAMESPACES, NODES, PODS, TruthTable, node_ip, node_ip6, pod_ip, pod_ip6, pod_node,
    },
    policy_oracle::Party,
    privileged::require_root,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Weir's eBPF object loaded with its policy maps in a test pin directory.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: PolicyMaps,
    pub compiler: Compiler,
    pub lowering: Lowering,
    state: DatapathPolicy,
    next_sport: u16,
    _pins: TestPinDir,
}

impl Default for Datapath {
    fn default() -> Self {
        Self::new()
    }
}

impl Datapath {
    /// Loads the programs (root required; panics with what failed otherwise).
    pub fn new() -> Self {
        require_root();
        let pins = TestPinDir::new("netpol").unwrap();
        let mut loaded =
            programs::load(&LoadOptions::new(pins.path())).expect("load weir's eBPF object");
        let maps = PolicyMaps::take(&mut loaded.ebpf).expect("policy maps");
        Self {
            ebpf: loaded.ebpf,
            maps,
            compiler: Compiler::default(),
            lowering: Lowering::default(),
            state: DatapathPolicy::default(),
            next_sport: 20000,
            _pins: pins,
        }
    }

    /// Programs the maps as node `node`'s agent would; returns the number of map writes.
    pub fn program(
        &mut self,
        table: &TruthTable,
        policies: &[NetworkPolicy],
        node: usize,
    ) -> usize {
        let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, policies, &table.nodes);
        let compiled = self.compiler.compile(&cluster, Some(NODES[node]));
        let host = [IpAddr::V4(node_ip(node)), IpAddr::V6(node_ip6(node))];
        let new = self.lowering.lower(&compiled, &host);
        let writes = self.maps.apply(&self.state, &new).expect("write policy maps");
        self.state = new;
        writes
    }

    pub fn sport(&mut self) -> u16 {
        self.next_sport = if self.next_sport >= 60000 { 20000 } else { self.next_sport + 1 };
        self.next_sport
    }

    pub fn run(&self, program: &'static str, packet: &[u8]) -> u32 {
        let program = programs::classifier_ref(&self.ebpf, program).expect("program loaded");
        let mut out = vec![0u8; packet.len() + 64];
        program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN")
            .return_value
    }

    pub fn allows(&self, program: &'static str, packet: &[u8]) -> bool {
        match self.run(program, packet) {
            TC_ACT_OK => true,
            TC_ACT_SHOT => false,
            other => panic!("{program} returned {other}"),
        }
    }

    /// The combined verdict of each cell (source, destination, protocol number, port): the
    /// egress program with the source node's maps for a source pod, and the ingress program
    /// with the destination node's maps for a destination pod, the maps written node by node
    /// as that node's agent would. Every cell's packet has its own source port.
    pub fn verdicts(
        &mut self,
        table: &TruthTable,
        policies: &[NetworkPolicy],
        cells: &[(&Party, &Party, u8, u16)],
    ) -> Vec<bool> {
        self.verdicts_in(false, table, policies, cells)
    }

    /// [`Self::verdicts`] with IPv6 packets (pods at their IPv6 addresses) when `ipv6`.
    pub fn verdicts_in(
        &mut self,
        ipv6: bool,
        table: &TruthTable,
        policies: &[NetworkPolicy],
        cells: &[(&Party, &Party, u8, u16)],
    ) -> Vec<bool> {
        let sports: Vec<u16> = cells.iter().map(|_| self.sport()).collect();
        let mut allowed = vec![true; cells.len()];
        for node in 0..NODES.len() {
            self.program(table, policies, node);
            for (i, (src, dst, protocol, port)) in cells.iter().enumerate() {
                let (src_ip, src_node) = locate_in(src, ipv6);
                let (dst_ip, dst_node) = locate_in(dst, ipv6);
                let pkt = packet(src_ip, sports[i], dst_ip, *port, *protocol);
                if src_node == Some(node) {
                    allowed[i] &= self.allows(TC_POLICY_EGRESS, &pkt);
                }
                if dst_node == Some(node) {
                    allowed[i] &= self.allows(TC_POLICY_INGRESS, &pkt);
                }
            }
        }
        allowed
    }
}

/// A TCP, UDP or SCTP packet (UDP-shaped ports) of the given 5-tuple, of either family.
pub fn packet(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, protocol: u8) -> Vec<u8> {
    let (src, dst) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => (src, dst),
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            return Ipv6Packet::new(src, sport, dst, dport, protocol).build();
        }
        _ => panic!("a packet from {src} to {dst} mixes families"),
    };
    let mut p = Ipv4Packet::udp(src, sport, dst, dport);
    match protocol {
        proto::TCP => p = Ipv4Packet::tcp(src, sport, dst, dport),
        proto::SCTP => p.proto = proto::SCTP,
        _ => {}
    }
    p.build()
}

/// (IPv4 address, node of the pod) of a party; `None` node for non-pods.
pub fn locate(party: &Party) -> (IpAddr, Option<usize>) {
    locate_in(party, false)
}

/// (address of the family, node of the pod) of a party: a pod's IPv6 address when `ipv6`.
pub fn locate_in(party: &Party, ipv6: bool) -> (IpAddr, Option<usize>) {
    match party {
        Party::Pod(ns, name) => {
            let n = NAMESPACES.iter().position(|x| x == ns).unwrap();
            let p = PODS.iter().position(|x| x == name).unwrap();
            let ip = if ipv6 { IpAddr::V6(pod_ip6(n, p)) } else { IpAddr::V4(pod_ip(n, p)) };
            (ip, Some(pod_node(p)))
        }
        Party::Addr { ip, .. } => {
            assert_eq!(ip.is_ipv6(), ipv6, "{ip} is not of the family asked for");
            (*ip, None)
        }
    }
}
