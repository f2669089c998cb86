//! Policy visibility: flow events from the policy programs' ring buffer reach `weir flows`
//! subscribers on the agent's unix socket, named; drops are counted per policy and direction;
//! `weir policy trace --live` reads a node's maps the way the programs do and agrees with the
//! model, and reports a corrupted map entry as a disagreement.
//!
//! `live_check_agrees_with_the_model_on_every_cell` needs no privileges (it reads the lowered
//! map contents in memory); the others load eBPF (root).
use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use weir_common::policy::{
    Addr, DIR_EGRESS, DIR_INGRESS, EP_INGRESS_ISOLATED, EndpointPolicy, FLOWS_MAP,
    POLICY_ENDPOINTS_MAP, v4_mapped,
};
use weir_policy::{Cluster, Compiled, Compiler, Endpoint, ObjectRef, Protocol, Side, trace};
use weir_proxy::policy::{
    DatapathPolicy, Lowering, PolicyMaps, PolicyNames,
    drops::{drops_metrics, read_drops_pinned},
    flows::{self, FlowClient, FlowMessage, FlowReason, FlowRequest, FlowVerdict},
    live::{PinnedPolicyMaps, PolicyMapsView, disagreement, evaluate},
};
use weir_tests::{
    agent::AgentProcess,
    apiserver::{ApiServer, TempDir, weir_binary},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    packet::Ipv4Packet,
    policy_cases::{
        NAMESPACES, NODES, PODS, TruthTable, cases, node_ip, node_ip6, pod_ip, pod_ip6, pod_node,
        policy,
    },
    privileged::require_root,
    process::code_and_text,
    wait::eventually,
};

/// x/a takes TCP/80 from x/b only.
fn a_from_b() -> Vec<NetworkPolicy> {
    vec![policy(
        "x",
        "a-from-b",
        serde_json::json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": 80}]}]}),
    )]
}

fn compile(table: &TruthTable, policies: &[NetworkPolicy], node: Option<&str>) -> Compiled {
    let cluster = Cluster::from_k8s(&table.namespaces, &table.pods, policies, &table.nodes);
    Compiler::default().compile(&cluster, node)
}

/// Every (namespace, pod) of the table with its address and node index.
/// The pods with their address of one family (the table's pods are dual-stack).
fn pods(ipv6: bool) -> Vec<(ObjectRef, IpAddr, usize)> {
    let mut out = Vec::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for (p, pod) in PODS.iter().enumerate() {
            let ip = if ipv6 { IpAddr::V6(pod_ip6(n, p)) } else { IpAddr::V4(pod_ip(n, p)) };
            out.push((ObjectRef::new(*ns, *pod), ip, pod_node(p)));
        }
    }
    out
}

/// Checks every pod-to-pod cell's enforced sides on `node` against `maps`; returns the
/// disagreements.
fn live_disagreements(
    model: &Compiled,
    maps: &dyn PolicyMapsView,
    node: usize,
    name: &str,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (src, src_ip, src_node) in pods(false).into_iter().chain(pods(true)) {
        for (dst, dst_ip, dst_node) in pods(src_ip.is_ipv6()) {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                for port in [80, 81] {
                    // Over IPv6 the pods are named by their IPv6 addresses (a pod alone
                    // stands for its IPv4 address in `trace`).
                    let (from, to) = if src_ip.is_ipv6() {
                        (Endpoint::Ip(src_ip), Endpoint::Ip(dst_ip))
                    } else {
                        (Endpoint::Pod(src.clone()), Endpoint::Pod(dst.clone()))
                    };
                    let verdict = trace(model, &from, &to, protocol, port).unwrap();
                    let sides = [
                        (src_node, DIR_EGRESS, &verdict.egress, src_ip, dst_ip),
                        (dst_node, DIR_INGRESS, &verdict.ingress, dst_ip, src_ip),
                    ];
                    for (on, direction, side, endpoint, peer) in sides {
                        if on != node {
                            continue;
                        }
                        let live =
                            evaluate(maps, direction, endpoint, peer, protocol.number(), port)
                                .unwrap();
                        if let Some(why) = disagreement(side, &live, endpoint, peer, direction) {
                            wrong.push(format!("{name}: {src} -> {dst} {protocol}/{port}: {why}"));
                        }
                    }
                }
            }
        }
    }
    wrong
}

/// The live evaluation of the lowered maps agrees with the model on every cell of every fixed
/// case, on both nodes (each side checked on its pod's node, as `--live` does), over IPv4 and
/// over IPv6.
#[test]
fn live_check_agrees_with_the_model_on_every_cell() {
    let table = TruthTable::new();
    let mut wrong = Vec::new();
    for case in cases() {
        let model = compile(&table, &case.policies, None);
        for (node, name) in NODES.iter().enumerate() {
            let compiled = compile(&table, &case.policies, Some(name));
            let host = [IpAddr::V4(node_ip(node)), IpAddr::V6(node_ip6(node))];
            let maps: DatapathPolicy = Lowering::default().lower(&compiled, &host);
            wrong.extend(live_disagreements(&model, &maps, node, case.name));
        }
    }
    let shown = &wrong[..wrong.len().min(20)];
    assert!(wrong.is_empty(), "{} disagreements:\n{}", wrong.len(), shown.join("\n"));
}

/// The object loaded into a unique pin directory, node-1's policy for `policies` written.
struct Node {
    ebpf: Ebpf,
    compiled: Compiled,
    lowering: Lowering,
    pins: TestPinDir,
}

impl Node {
    fn new(policies: &[NetworkPolicy]) -> Self {
        require_root();
        let pins = TestPinDir::new("polvis").unwrap();
        let mut loaded =
            weir_proxy::programs::load(&weir_proxy::programs::LoadOptions::new(pins.path()))
                .expect("load weir's eBPF object");
        let mut maps = PolicyMaps::take(&mut loaded.ebpf).expect("policy maps");
        // The maps stay pinned (and referenced by the programs) after this handle is gone.
        let compiled = compile(&TruthTable::new(), policies, Some(NODES[0]));
        let mut lowering = Lowering::default();
        let desired = lowering.lower(&compiled, &[IpAddr::V4(node_ip(0))]);
        maps.apply(&DatapathPolicy::default(), &desired).expect("write policy maps");
        Self { ebpf: loaded.ebpf, compiled, lowering, pins }
    }

    fn run(&self, program: &'static str, src: Ipv4Addr, sport: u16, dst: Ipv4Addr) -> bool {
        run(&self.ebpf, program, src, sport, dst)
    }
}

/// Runs `program` of `ebpf` on a TCP packet to port 80; true when it passes.
fn run(ebpf: &Ebpf, program: &'static str, src: Ipv4Addr, sport: u16, dst: Ipv4Addr) -> bool {
    let program = weir_proxy::programs::classifier_ref(ebpf, program).expect("program loaded");
    let packet = Ipv4Packet::tcp(src, sport, dst, 80).build();
    let mut out = vec![0u8; packet.len() + 64];
    let verdict = program
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN")
        .return_value;
    verdict == 0
}

/// The real agent owns its pinned flow ring buffer: a drop reported by a program sharing its
/// pinned maps reaches a subscriber of the agent's `--flows-socket`, and /metrics counts it
/// per policy (by id: no policy loop names it in this test).
#[test]
fn the_agent_serves_its_flows_and_per_policy_drop_metrics() {
    require_root();
    let data = TempDir::new("polvis-api");
    let api = ApiServer::start(data.path());
    let pins = TestPinDir::new("polvis-agent").unwrap();
    let cgroup = TestCgroup::new("polvis").unwrap();
    let agent = AgentProcess::start(&api, &pins, &cgroup);
    let mut client =
        FlowClient::connect(&agent.flows_socket, &FlowRequest::default()).expect("subscribe");
    client.set_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(client.node.as_deref(), Some("node-a"));

    // The same object loaded on the agent's pin directory shares its maps, ring included.
    let mut loaded =
        weir_proxy::programs::load(&weir_proxy::programs::LoadOptions::new(pins.path()))
            .expect("load weir's eBPF object");
    let mut maps = PolicyMaps::take(&mut loaded.ebpf).expect("policy maps");
    let pod = Ipv4Addr::new(10, 244, 9, 9);
    let mut isolated = DatapathPolicy::default();
    isolated.endpoints.insert(
        v4_mapped(pod.octets()),
        EndpointPolicy {
            flags: EP_INGRESS_ISOLATED,
            identity: 300,
            ingress_policy: 7,
            egress_policy: 0,
            rules_key: v4_mapped(pod.octets()),
        },
    );
    maps.apply(&DatapathPolicy::default(), &isolated).expect("write an endpoint");
    assert!(!run(&loaded.ebpf, weir_proxy::programs::TC_POLICY_INGRESS, XA, 40100, pod));
    let record = match client.next_message().expect("a flow from the agent") {
        FlowMessage::Flow(record) => record,
        other => panic!("expected a flow, got {other:?}"),
    };
    assert_eq!((record.verdict, record.reason), (FlowVerdict::Dropped, FlowReason::DefaultDeny));
    assert_eq!(
        (record.source.ip, record.destination.ip, record.id),
        (IpAddr::V4(XA), IpAddr::V4(pod), 7)
    );
    assert_eq!(record.node.as_deref(), Some("node-a"));
    let (code, metrics) = agent.get(agent.metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("weir_policy_drops_total{policy=\"id:7\",direction=\"ingress\"} 1"),
        "{metrics}"
    );
    maps.apply(&isolated, &DatapathPolicy::default()).expect("remove the endpoint");
}

const XA: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const XB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const XC: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);

/// A drop and an allowed flow run through the ingress program; a subscriber of the agent's
/// flow socket asking for x/a's drops gets the drop, named (pods, policy, node); the real
/// `weir flows` prints it as a text line; the drop is counted against x/a-from-b ingress.
#[test]
fn flows_reach_subscribers_named_and_drops_are_counted_per_policy() {
    let mut node = Node::new(&a_from_b());
    let names = Arc::new(PolicyNames::new(&node.compiled, &node.lowering));
    let ring: RingBuf<MapData> =
        RingBuf::try_from(node.ebpf.take_map(FLOWS_MAP).expect("flow ring")).unwrap();
    let dir = TempDir::new("flows");
    let socket = dir.path().join("flows.sock");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let tasks = runtime
        .block_on(async {
            flows::start(
                flows::FlowSource::Ring(ring),
                names.clone(),
                Some(NODES[0].into()),
                &socket,
            )
        })
        .expect("serve flows");

    let request = FlowRequest { pod: Some("x/a".into()), verdict: Some(FlowVerdict::Dropped) };
    let mut client = FlowClient::connect(&socket, &request).expect("subscribe");
    client.set_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(client.node.as_deref(), Some(NODES[0]));
    // Allowed (filtered out by the request), then dropped.
    assert!(node.run(weir_proxy::programs::TC_POLICY_INGRESS, XB, 40001, XA));
    assert!(!node.run(weir_proxy::programs::TC_POLICY_INGRESS, XC, 40002, XA));
    let record = match client.next_message().expect("a flow") {
        FlowMessage::Flow(record) => record,
        other => panic!("expected a flow, got {other:?}"),
    };
    assert_eq!(record.verdict, FlowVerdict::Dropped);
    assert_eq!(record.reason, FlowReason::DefaultDeny);
    assert_eq!(record.source.pod.as_deref(), Some("x/c"));
    assert_eq!((record.source.ip, record.source.port), (IpAddr::V4(XC), Some(40002)));
    assert_eq!(record.destination.pod.as_deref(), Some("x/a"));
    assert_eq!(record.policy.as_deref(), Some("x/a-from-b"));
    assert_eq!(record.node.as_deref(), Some(NODES[0]));
    let text = record.to_text();
    assert!(
        text.ends_with(
            "x/c 10.244.0.12:40002 -> x/a 10.244.0.10:80 TCP ingress DROPPED default-deny \
             (NetworkPolicy x/a-from-b)"
        ),
        "{text}"
    );

    // The real CLI: subscribed once it is running; drops are sent until it has printed one.
    let mut cli = Command::new(weir_binary())
        .args(["flows", "--pod", "x/a", "--verdict", "dropped", "--count", "1", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weir flows");
    let mut sport = 41000;
    eventually("weir flows printing a drop", Duration::from_secs(20), || {
        sport += 1;
        node.run(weir_proxy::programs::TC_POLICY_INGRESS, XC, sport, XA);
        match cli.try_wait().unwrap() {
            Some(_) => None,
            None => Some("still running".into()),
        }
    });
    let output = cli.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("x/c 10.244.0.12:")
            && stdout.contains("DROPPED default-deny (NetworkPolicy x/a-from-b)"),
        "{stdout}"
    );

    // Per-policy counters: every drop of x/a's ingress is counted against x/a-from-b.
    let drops = read_drops_pinned(node.pins.path()).expect("read drops");
    let total: u64 = drops.iter().map(|(_, n)| n).sum();
    assert!(total >= 2, "{drops:?}");
    let metrics = drops_metrics(&drops, names.as_ref());
    assert!(
        metrics.contains(&format!(
            "weir_policy_drops_total{{policy=\"x/a-from-b\",direction=\"ingress\"}} {total}\n"
        )),
        "{metrics}"
    );
    for task in tasks {
        task.abort();
    }
    drop(runtime);

    // No agent: a clear error naming the socket.
    let missing = dir.path().join("none.sock");
    let output =
        Command::new(weir_binary()).arg("flows").arg("--socket").arg(&missing).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("none.sock") && stderr.contains("weir agent"), "{stderr}");
}

/// `--live` on pinned maps: every cell of node-1 agrees; then a deleted endpoint entry and
/// an endpoint whose isolation flag was cleared are reported as disagreements.
#[test]
fn live_check_reads_pinned_maps_and_reports_corrupted_entries() {
    let node = Node::new(&a_from_b());
    let table = TruthTable::new();
    let model = compile(&table, &a_from_b(), None);
    let pinned = PinnedPolicyMaps::open(node.pins.path()).expect("open pinned maps");
    let wrong = live_disagreements(&model, &pinned, 0, "a-from-b");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let side = |from: Ipv4Addr, to: Ipv4Addr| {
        trace(
            &model,
            &Endpoint::Ip(IpAddr::V4(from)),
            &Endpoint::Ip(IpAddr::V4(to)),
            Protocol::Tcp,
            80,
        )
        .unwrap()
        .ingress
    };
    let check = |from: Ipv4Addr, to: Ipv4Addr, model: &Side| {
        let (from, to) = (IpAddr::V4(from), IpAddr::V4(to));
        let live = evaluate(&pinned, DIR_INGRESS, to, from, 6, 80).unwrap();
        disagreement(model, &live, to, from, DIR_INGRESS)
    };
    let b_to_a = side(XB, XA);
    assert!(matches!(b_to_a, Side::Allowed(_)), "{b_to_a:?}");
    let c_to_a = side(XC, XA);
    assert!(matches!(c_to_a, Side::Denied { .. }), "{c_to_a:?}");

    let mut endpoints = node.pins.open_hash::<Addr, EndpointPolicy>(POLICY_ENDPOINTS_MAP).unwrap();
    let entry = endpoints.get(&v4_mapped(XA.octets()), 0).unwrap();
    assert_ne!(entry.flags & EP_INGRESS_ISOLATED, 0);
    // The isolation flag cleared: x/c gets in although the model denies it.
    endpoints.insert(v4_mapped(XA.octets()), EndpointPolicy { flags: 0, ..entry }, 0).unwrap();
    let why = check(XC, XA, &c_to_a).expect("a disagreement");
    assert!(
        why.starts_with("the model denies it")
            && why.ends_with("10.244.0.10's ingress is not isolated"),
        "{why}"
    );
    // The entry deleted: no entry for the endpoint.
    endpoints.remove(&v4_mapped(XA.octets())).unwrap();
    let why = check(XB, XA, &b_to_a).expect("a disagreement");
    assert!(
        why.starts_with("the model allows it by NetworkPolicy x/a-from-b ingress rule 0")
            && why.contains("the maps have no entry for endpoint 10.244.0.10"),
        "{why}"
    );
}

/// The real `weir policy trace --live --pin-dir --node` against objects in the API and node-1's
/// pinned maps: agreement (exit 0 / 3), a side on another node not checked, a cleared
/// isolation flag reported as a disagreement (exit 4), and --live without maps refused (64).
#[test]
fn trace_live_cli_reports_agreement_and_disagreement() {
    let node = Node::new(&a_from_b());
    let dir = TempDir::new("polvis-trace");
    let server = ApiServer::start_with(dir.path(), &["--disable-controllers"]);
    TruthTable::new().create_in(&server, &a_from_b());
    let trace_live = |from: &str, to: &str, maps: bool| {
        let mut command = Command::new(weir_binary());
        command.args(["policy", "trace", "--kubeconfig"]).arg(&server.kubeconfig);
        command.args(["--from", from, "--to", to, "--port", "80", "--live"]);
        if maps {
            command.arg("--pin-dir").arg(node.pins.path()).args(["--node", NODES[0]]);
        }
        let out = command.env_remove("NODE_NAME").output().expect("run weir policy trace");
        code_and_text(&out)
    };

    let (code, text) = trace_live("x/b", "x/a", true);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("egress of the source: x/b on node node-1 ("), "{text}");
    assert!(text.contains("agrees (not isolated)"), "{text}");
    assert!(text.contains("ingress of the destination: x/a on node node-1 ("), "{text}");
    assert!(text.contains("agrees (allowed by rule id "), "{text}");

    let (code, text) = trace_live("x/c", "x/a", true);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("egress of the source: not checked: the pod runs on node node-2"),
        "{text}"
    );
    assert!(text.contains("agrees (dropped (counted against policy id "), "{text}");

    let mut endpoints = node.pins.open_hash::<Addr, EndpointPolicy>(POLICY_ENDPOINTS_MAP).unwrap();
    let entry = endpoints.get(&v4_mapped(XA.octets()), 0).unwrap();
    endpoints.insert(v4_mapped(XA.octets()), EndpointPolicy { flags: 0, ..entry }, 0).unwrap();
    let (code, text) = trace_live("x/c", "x/a", true);
    assert_eq!(code, Some(4), "{text}");
    assert!(
        text.contains("x/a on node node-1 (")
            && text.contains("DISAGREES: the model denies it")
            && text.contains("10.244.0.10's ingress is not isolated"),
        "{text}"
    );

    let (code, text) = trace_live("x/c", "x/a", false);
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains(
            "--live needs --pin-dir DIR or --nft-table [NAME] with --node NAME, or --lab NAME"
        ),
        "{text}"
    );
}
