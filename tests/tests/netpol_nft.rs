//! NetworkPolicy in nftables (proxy/src/policy/nft) on real connections: the truth table as
//! network namespaces (tests/src/policy_net.rs), each node namespace enforcing its pods'
//! compiled policy with an `NftPolicy` table, every fixed case of policy_cases.rs probed with
//! real TCP and UDP requests on every cell, over IPv4 and over IPv6, and checked against the
//! independent oracle (zero wrong cells after one retry). The differential test of issue 7:
//! random policies (the seeded generator) and random cells of both families, where the eBPF
//! programs' verdict (BPF_PROG_TEST_RUN),
//! the nftables verdict (real packets) and the oracle must all agree. Plus: unknown pods
//! dropped while policies exist, drops counted per policy, a reopened table. Privileged.
use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_common::proto;
use weir_policy::{Cluster, Compiler, Direction, Endpoint, ObjectRef, Protocol, trace};
use weir_proxy::policy::{
    PolicyDatapath, PolicyNode,
    nft::{
        NftPolicy, inspect,
        live::{TableView, disagreement, evaluate},
        plan,
    },
};
use weir_tests::{
    agent::relayed_kubeconfig,
    apiserver::{ApiServer, TempDir, weir_binary},
    names,
    policy_cases::{
        NAMESPACES, NODES, PODS, Rng, TruthTable, cases, node_ip, node_ip6, pod_ip, pod_ip6,
        pod_node, random_policies,
    },
    policy_ebpf::Datapath,
    policy_net::{Cell, PolicyNet, ProbeProtocol},
    policy_oracle::{Oracle, Party},
    privileged::require_root,
    process::{code_and_text, command_in},
};

const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
const RETRY_TIMEOUT: Duration = Duration::from_secs(2);

/// The truth-table namespaces with an nftables policy table in each node.
struct NftCluster {
    tables: Vec<NftPolicy>,
    compilers: Vec<Compiler>,
    net: PolicyNet,
}

impl NftCluster {
    fn new() -> Self {
        require_root();
        let net = PolicyNet::new().expect("build the truth-table namespaces");
        let tables = net
            .nodes
            .iter()
            .map(|node| {
                let name = names::unique("pol");
                node.run(|| NftPolicy::open(&name)).unwrap().expect("open the policy table")
            })
            .collect();
        Self { tables, compilers: vec![Compiler::default(), Compiler::default()], net }
    }

    /// Programs every node as its agent would (`deny_unknown` while policies exist); returns
    /// the ops written.
    fn program(&mut self, table: &TruthTable, policies: &[NetworkPolicy]) -> usize {
        let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, policies, &table.nodes);
        let mut ops = 0;
        for (node, name) in NODES.iter().enumerate() {
            let compiled = self.compilers[node].compile(&cluster, Some(name));
            let node_info = PolicyNode {
                host_addresses: vec![node_ip(node).into(), node_ip6(node).into()],
                pod_cidrs: PolicyNet::pod_cidrs(node),
                deny_unknown: !policies.is_empty(),
            };
            ops += self.tables[node].apply(&compiled, &node_info).expect("apply policy").ops;
        }
        ops
    }

    /// Probes `cells`; returns what passed, retrying once (longer) the cells that disagree
    /// with `expected`.
    fn probe(&self, cells: &[Cell], expected: &[bool]) -> Vec<bool> {
        let mut passed = self.net.probe_all(cells, PROBE_TIMEOUT);
        let again: Vec<usize> = (0..cells.len()).filter(|i| passed[*i] != expected[*i]).collect();
        if !again.is_empty() {
            let retry: Vec<Cell> = again.iter().map(|i| cells[*i].clone()).collect();
            for (i, ok) in again.iter().zip(self.net.probe_all(&retry, RETRY_TIMEOUT)) {
                passed[*i] = ok;
            }
        }
        passed
    }
}

fn expected(table: &TruthTable, policies: &[NetworkPolicy], cells: &[Cell]) -> Vec<bool> {
    let oracle = Oracle { namespaces: &table.namespaces, pods: &table.pods, policies };
    cells
        .iter()
        .map(|c| oracle.allowed_in(c.ipv6, &c.src, &c.dst, c.protocol.k8s_name(), c.port))
        .collect()
}

fn describe(cell: &Cell) -> String {
    let party = |p: &Party| match p {
        Party::Pod(ns, name) => format!("{ns}/{name}"),
        Party::Addr { ip, .. } => ip.to_string(),
    };
    format!(
        "{} -> {} {}/{} ({})",
        party(&cell.src),
        party(&cell.dst),
        cell.protocol.k8s_name(),
        cell.port,
        if cell.ipv6 { "IPv6" } else { "IPv4" }
    )
}

fn assert_none_wrong(wrong: &[String], cells: usize) {
    let shown = &wrong[..wrong.len().min(40)];
    assert!(wrong.is_empty(), "{} of {cells} cells wrong:\n{}", wrong.len(), shown.join("\n"));
}

#[test]
fn fixed_cases_agree_with_the_oracle_on_real_connections() {
    let mut cluster = NftCluster::new();
    let table = TruthTable::new();
    let cells = [PolicyNet::cells_of(false), PolicyNet::cells_of(true)].concat();
    let (mut wrong, mut probed, mut denied) = (Vec::new(), 0, 0);
    for case in cases() {
        cluster.program(&table, &case.policies);
        let want = expected(&table, &case.policies, &cells);
        let got = cluster.probe(&cells, &want);
        probed += cells.len();
        denied += want.iter().filter(|w| !**w).count();
        for ((cell, want), got) in cells.iter().zip(&want).zip(&got) {
            if want != got {
                wrong.push(format!(
                    "{}: {}: oracle {want}, nftables {got}",
                    case.name,
                    describe(cell)
                ));
            }
        }
    }
    eprintln!("{} cases, {probed} cells, {denied} denied by the oracle", cases().len());
    assert!(denied > probed / 10, "the cases deny something");
    assert_none_wrong(&wrong, probed);
}

/// x/a takes connections from x/b only, over both families: other pods are dropped, the drops
/// are counted on the counter of the policy isolating x/a, x/a's replies pass (its egress is
/// denied too), and the node reaches its pod; the kernel holds the tuples the planner wrote.
#[test]
fn drops_are_counted_per_policy_and_replies_pass() {
    let mut cluster = NftCluster::new();
    let table = TruthTable::new();
    let policies = [weir_tests::policy_cases::a_only_from_b()];
    cluster.program(&table, &policies);
    let (a, b, c) = (pod("x", "a"), pod("x", "b"), pod("x", "c"));
    for ipv6 in [false, true] {
        let ip = if ipv6 { node_ip6(0).into() } else { node_ip(0).into() };
        let node1 = Party::Addr { ip, node: Some(NODES[0].into()) };
        let cells = [
            tcp(&b, &a, ipv6), // allowed; the reply leaves x/a although its egress is isolated
            tcp(&c, &a, ipv6), // from node-2: dropped at node-1's ingress of x/a
            tcp(&a, &b, ipv6), // x/a's egress: dropped
            tcp(&node1, &a, ipv6), // its node
        ];
        let got = cluster.probe(&cells, &[true, false, false, true]);
        assert_eq!(got, [true, false, false, true], "IPv6: {ipv6}");
    }
    let counters = cluster.tables[0].drop_counters().unwrap();
    // Per direction: x/c -> x/a and x/a -> x/b, once per family.
    for counter in ["drop-ingress-x/a", "drop-egress-x/a"] {
        assert!(counters.get(counter).is_some_and(|n| *n >= 2), "{counters:?}");
    }
    assert_eq!(counters.get(plan::DROP_UNKNOWN), Some(&0), "{counters:?}");
    let tuples = cluster.tables[0].allow_tuples().unwrap();
    // x/b (identity peer) and node-1 (its node), any protocol and port, per family.
    for (allow, egress) in
        [(plan::INGRESS_ALLOW, plan::EGRESS_ALLOW), (plan::INGRESS_ALLOW6, plan::EGRESS_ALLOW6)]
    {
        assert_eq!(tuples[allow].len(), 2, "{tuples:?}");
        assert!(tuples[egress].is_empty(), "{tuples:?}");
    }
}

/// While policies exist, a pod in the node's pod ranges that the compiled policy does not know
/// yet is dropped both ways (and counted); once known, its policy applies.
#[test]
fn unknown_pods_are_dropped_while_policies_exist() {
    let mut cluster = NftCluster::new();
    let full = TruthTable::new();
    // The cluster as the agent sees it before x/b's pod object arrives.
    let mut early = TruthTable::new();
    early.pods.retain(|p| {
        !(p.metadata.namespace.as_deref() == Some("x") && p.metadata.name.as_deref() == Some("b"))
    });
    let policies = [weir_tests::policy_cases::policy(
        "y",
        "deny",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )];
    let (a, b) = (pod("x", "a"), pod("x", "b"));
    // What a node runtime asks before starting x/b's containers (x/b runs on node-1).
    let b_ready = |cluster: &NftCluster| {
        let table = cluster.tables[0].table().to_string();
        let ips = [IpAddr::from(pod_ip(0, 1)), IpAddr::from(pod_ip6(0, 1))];
        cluster.net.nodes[0].run(|| inspect::endpoints_written(&table, &ips)).unwrap().unwrap()
    };
    assert!(b_ready(&cluster), "an empty table drops nothing: ready");
    cluster.program(&early, &policies);
    assert!(!b_ready(&cluster), "policies exist and x/b has no entry yet");
    let cells = [tcp(&a, &b, false), tcp(&b, &a, false), tcp(&a, &b, true), tcp(&b, &a, true)];
    let (all_dropped, all_pass) = ([false; 4], [true; 4]);
    assert_eq!(cluster.probe(&cells, &all_dropped), all_dropped, "x/b is unknown");
    let counters = cluster.tables[0].drop_counters().unwrap();
    assert!(counters[plan::DROP_UNKNOWN] >= 4, "{counters:?}");
    cluster.program(&full, &policies);
    assert!(b_ready(&cluster), "x/b's entry is written");
    assert_eq!(cluster.probe(&cells, &all_pass), all_pass, "x/b is known");
    // Without policies the flag is off: unknown pods pass.
    cluster.program(&early, &[]);
    assert!(b_ready(&cluster), "no policy: nothing to wait for");
    assert_eq!(cluster.probe(&cells, &all_pass), all_pass, "no policy, no flag");
    let missing = names::unique("nopol");
    let ips = [IpAddr::from(pod_ip(0, 1))];
    let no_table = cluster.net.nodes[0].run(|| inspect::endpoints_written(&missing, &ips));
    assert!(no_table.unwrap().unwrap(), "no table: ready");
}

/// Reopening an existing table keeps enforcing it until the first apply, which converges.
#[test]
fn a_reopened_table_keeps_enforcing_and_converges() {
    let mut cluster = NftCluster::new();
    let table = TruthTable::new();
    let deny = [weir_tests::policy_cases::policy(
        "x",
        "deny",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )];
    cluster.program(&table, &deny);
    let cells = [tcp(&pod("y", "a"), &pod("x", "a"), false)];
    assert_eq!(cluster.probe(&cells, &[false]), [false]);
    // A restarted agent: the same table opened again, before any apply.
    let name = cluster.tables[0].table().to_string();
    cluster.tables[0] = cluster.net.nodes[0].run(|| NftPolicy::open(&name)).unwrap().unwrap();
    assert_eq!(cluster.probe(&cells, &[false]), [false], "still enforced after reopening");
    let ops = cluster.program(&table, &[]);
    assert!(ops > 0);
    assert_eq!(cluster.probe(&cells, &[true]), [true], "converged to no policy");
    let counters = cluster.tables[0].drop_counters().unwrap();
    assert_eq!(counters.keys().collect::<Vec<_>>(), [plan::DROP_UNKNOWN], "stale counters gone");
}

/// Random policy sets (seeds distinct from netpol_ebpf's) and random cells.
const DIFFERENTIAL_SEEDS: u64 = 40;
const CELLS_PER_SEED: usize = 48;

#[test]
fn random_policies_and_packets_ebpf_nftables_and_oracle_agree() {
    let mut cluster = NftCluster::new();
    let mut ebpf = Datapath::new();
    let table = TruthTable::new();
    let all = [PolicyNet::cells_of(false), PolicyNet::cells_of(true)].concat();
    let (mut wrong, mut probed, mut denied) = (Vec::new(), 0, 0);
    for seed in 0..DIFFERENTIAL_SEEDS {
        let mut rng = Rng::new(10_000 + seed);
        let policies = random_policies(&mut rng);
        let cells: Vec<Cell> =
            (0..CELLS_PER_SEED).map(|_| all[rng.below(all.len())].clone()).collect();
        cluster.program(&table, &policies);
        let want = expected(&table, &policies, &cells);
        let nft = cluster.probe(&cells, &want);
        // The eBPF verdicts per family, back in cell order.
        let mut bpf = vec![false; cells.len()];
        for ipv6 in [false, true] {
            let of_family: Vec<usize> =
                (0..cells.len()).filter(|i| cells[*i].ipv6 == ipv6).collect();
            let packets: Vec<_> = of_family
                .iter()
                .map(|i| {
                    let c = &cells[*i];
                    let protocol = match c.protocol {
                        ProbeProtocol::Tcp => proto::TCP,
                        ProbeProtocol::Udp => proto::UDP,
                    };
                    (&c.src, &c.dst, protocol, c.port)
                })
                .collect();
            let verdicts = ebpf.verdicts_in(ipv6, &table, &policies, &packets);
            for (i, verdict) in of_family.into_iter().zip(verdicts) {
                bpf[i] = verdict;
            }
        }
        probed += cells.len();
        denied += want.iter().filter(|w| !**w).count();
        for (i, cell) in cells.iter().enumerate() {
            if want[i] != nft[i] || want[i] != bpf[i] {
                wrong.push(format!(
                    "seed {}: {}: oracle {}, nftables {}, eBPF {}",
                    10_000 + seed,
                    describe(cell),
                    want[i],
                    nft[i],
                    bpf[i]
                ));
            }
        }
    }
    eprintln!("{DIFFERENTIAL_SEEDS} seeds, {probed} cells, {denied} denied by the oracle");
    assert!(denied > 0 && denied < probed, "the random policies allow and deny");
    assert_none_wrong(&wrong, probed);
}

fn pod(ns: &str, name: &str) -> Party {
    Party::Pod(ns.into(), name.into())
}

fn tcp(src: &Party, dst: &Party, ipv6: bool) -> Cell {
    Cell { src: src.clone(), dst: dst.clone(), protocol: ProbeProtocol::Tcp, port: 80, ipv6 }
}

/// `trace --live` on nftables: every fixed case programmed into the node tables, each table
/// read back from the kernel (`TableView::read` in the node's namespace), and every pod-to-pod
/// cell's enforced sides (TCP and UDP, ports 80 and 81, IPv4 and IPv6) evaluated as the chains
/// do: the table agrees with the model's trace, drops included in the chain of the first
/// isolating policy.
#[test]
fn live_check_reads_the_tables_and_agrees_with_the_model() {
    let mut cluster = NftCluster::new();
    let table = TruthTable::new();
    let mut pods = Vec::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for (p, pod) in PODS.iter().enumerate() {
            for ip in [IpAddr::from(pod_ip(n, p)), IpAddr::from(pod_ip6(n, p))] {
                pods.push((ObjectRef::new(*ns, *pod), ip, pod_node(p)));
            }
        }
    }
    let (mut wrong, mut checked) = (Vec::new(), 0);
    for case in cases() {
        cluster.program(&table, &case.policies);
        let model = Compiler::default().compile(
            &Cluster::from_k8s(&table.namespaces, &table.pods, &case.policies, &table.nodes),
            None,
        );
        let views: Vec<TableView> = (0..NODES.len())
            .map(|i| {
                let name = cluster.tables[i].table().to_string();
                cluster.net.nodes[i].run(|| TableView::read(&name)).unwrap().unwrap()
            })
            .collect();
        for (src, src_ip, src_node) in &pods {
            for (dst, dst_ip, dst_node) in pods.iter().filter(|p| p.1.is_ipv6() == src_ip.is_ipv6())
            {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80, 81] {
                        // Over IPv6 the pods are named by their addresses (a pod alone stands
                        // for its IPv4 address in `trace`).
                        let (from, to) = if src_ip.is_ipv6() {
                            (Endpoint::Ip(*src_ip), Endpoint::Ip(*dst_ip))
                        } else {
                            (Endpoint::Pod(src.clone()), Endpoint::Pod(dst.clone()))
                        };
                        let verdict = trace(&model, &from, &to, protocol, port).unwrap();
                        for (node, direction, side, endpoint, peer) in [
                            (src_node, Direction::Egress, &verdict.egress, src_ip, dst_ip),
                            (dst_node, Direction::Ingress, &verdict.ingress, dst_ip, src_ip),
                        ] {
                            let live = evaluate(
                                &views[*node],
                                direction,
                                *endpoint,
                                *peer,
                                protocol.number(),
                                port,
                            );
                            checked += 1;
                            if let Some(why) = disagreement(side, &live, direction) {
                                wrong.push(format!(
                                    "{}: {src} ({src_ip}) -> {dst} {protocol}/{port}: {why}",
                                    case.name
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("{} cases, {checked} sides checked", cases().len());
    assert_none_wrong(&wrong, checked);
}

/// The real `weir policy trace --live --nft-table --node`, run in node-1's namespace against
/// objects in the API and node-1's table: agreement (exit 3 for a denied connection, the drop
/// chain named), and a deleted endpoint element reported as a disagreement (exit 4).
#[test]
fn trace_live_cli_reads_the_nftables_table() {
    let mut cluster = NftCluster::new();
    let table = TruthTable::new();
    let policies = [weir_tests::policy_cases::a_only_from_b()];
    cluster.program(&table, &policies);
    let dir = TempDir::new("polnft-trace");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    table.create_in(&server, &policies);
    let node = &cluster.net.nodes[0];
    let (_relay, kubeconfig) = relayed_kubeconfig(&server, node, "polnft-trace");
    let name = cluster.tables[0].table().to_string();
    let trace_live = |from: &str, to: &str| {
        let mut command = command_in(node, None, &weir_binary().to_string_lossy()).unwrap();
        command.args(["policy", "trace", "--kubeconfig"]).arg(&kubeconfig);
        command.args(["--from", from, "--to", to, "--port", "80", "--live"]);
        command.args(["--nft-table", &name, "--node", NODES[0]]);
        let out = command.env_remove("NODE_NAME").output().expect("run weir policy trace");
        code_and_text(&out)
    };
    let (code, text) = trace_live("x/b", "x/a");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("agrees (allowed by tuple 10.244.0.10 . "), "{text}");
    let (code, text) = trace_live("x/c", "x/a");
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("agrees (dropped in chain drop-ingress-x/a)"), "{text}");

    // x/a's endpoint element gone: the table lets x/c in, the model does not.
    let deleted = std::process::Command::new("ip")
        .args(["netns", "exec", node.name(), "nft", "delete", "element", "inet", &name])
        .args([plan::INGRESS_ENDPOINTS, "{ 10.244.0.10 }"])
        .output()
        .expect("run nft");
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let (code, text) = trace_live("x/c", "x/a");
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("DISAGREES: the model says: denied"), "{text}");
}
