//! NetworkPolicy through the real `weir agent` (eBPF): a node namespace where the agent runs
//! (reaching weir's API server through a relay) and pods wired by the real weir-cni, objects
//! made through the API. Policies are enforced on real TCP connections, follow updates and
//! deletion, leave unselected pods alone; and there is no window: a pod created under a
//! default-deny policy is never reachable from a peer the policy does not allow, from before
//! its CNI ADD until after its policy is written, also when the agent is down while the pod
//! starts. weir-cni attaches the pinned programs at ADD and rolls ADD back when it cannot.
//! Dual-stack pods: the same over IPv6 (neighbour discovery keeps working under default deny),
//! on the eBPF and the nftables dataplane.
//! Privileged.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_cni_plugin::{bpf, policy::SLOTS, wiring::host_ifname};
use weir_proxy::{
    policy::{
        PolicyPrograms,
        flows::{
            FlowClient, FlowDirection, FlowMessage, FlowReason, FlowRecord, FlowRequest,
            FlowVerdict,
        },
    },
    programs::{self, LoadOptions},
};
use weir_tests::{
    agent::{AgentOptions, AgentProcess, relayed_kubeconfig},
    apiserver::{ApiServer, TempDir},
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    cni::{self, Attachment},
    dataplane::Dataplane,
    echo::{EchoServer, tcp_echo_works},
    names,
    netns::Netns,
    privileged::require_root,
    relay::Relay,
    wait::eventually,
};

const NODE: &str = "node-a";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 209, 0, 1);
const POD_CIDR: &str = "10.209.1.0/24";
const POD6_CIDR: &str = "fd00:209:1::/120";
const NS: &str = "np";
const WAIT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
const POLICIES: &str = "/apis/networking.k8s.io/v1/namespaces/np/networkpolicies";

fn pod_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 209, 1, last)
}

fn pod_ip6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x209, 1, 0, 0, 0, 0, u16::from(last))
}

/// A pod: its namespace (with an echo server on port 80) wired by weir-cni.
struct Pod {
    name: String,
    ip: Ipv4Addr,
    /// The pod's IPv6 address when it is dual-stack.
    ip6: Option<Ipv6Addr>,
    container_id: String,
    ns: Netns,
    _echo: EchoServer,
}

/// The API server, the node namespace and what an agent there needs.
struct TestNode {
    api: ApiServer,
    node: cni::Node,
    pins: TestPinDir,
    cgroup: TestCgroup,
    kubeconfig: PathBuf,
    _relay: Relay,
    _data: TempDir,
}

impl TestNode {
    fn new(role: &str) -> Self {
        require_root();
        let data = TempDir::new(role);
        let api = ApiServer::start_with(data.path(), &["--disable-controllers"]);
        let node = cni::Node::new().expect("node namespace");
        node.ns.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]).unwrap();
        let (relay, kubeconfig) = relayed_kubeconfig(&api, &node.ns, role);
        let this = Self {
            api,
            node,
            pins: TestPinDir::new(role).expect("pin dir"),
            cgroup: TestCgroup::new(role).expect("cgroup"),
            kubeconfig,
            _relay: relay,
            _data: data,
        };
        this.create(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NS, "labels": {"team": "np"}}}),
        );
        this.create(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}}),
        );
        this.patch(
            &format!("/api/v1/nodes/{NODE}/status"),
            json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}]}}),
        );
        this
    }

    fn create(&self, path: &str, body: Value) {
        let (code, reply) = self.api.json("POST", path, Some(&body));
        assert_eq!(code, 201, "POST {path}: {reply}");
    }

    fn patch(&self, path: &str, body: Value) {
        let (code, reply) = self.api.json("PATCH", path, Some(&body));
        assert_eq!(code, 200, "PATCH {path}: {reply}");
    }

    fn start_agent(&self) -> AgentProcess {
        self.start_agent_on(Dataplane::Ebpf)
    }

    /// The agent on `dataplane`; nftables tables go with the node namespace.
    fn start_agent_on(&self, dataplane: Dataplane) -> AgentProcess {
        let mut extra_args = vec!["--node-address".into(), NODE_IP.to_string()];
        if dataplane == Dataplane::Nftables {
            extra_args.extend(["--dataplane".into(), "nftables".into()]);
            extra_args.extend(["--nft-table".into(), names::unique("np-svc")]);
            extra_args.extend(["--nft-policy-table".into(), names::unique("np-pol")]);
        }
        let options = AgentOptions {
            kubeconfig: &self.kubeconfig,
            node_name: NODE,
            netns: Some(&self.node.ns),
            extra_args,
            wait_for: Some("weir agent: first policy sync done"),
        };
        AgentProcess::start_with(&options, &self.pins, &self.cgroup)
    }

    /// The Pod object (on this node, no address yet).
    fn create_pod(&self, name: &str, labels: Value) {
        self.create(
            &format!("/api/v1/namespaces/{NS}/pods"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "echo",
                    "ports": [{"containerPort": 80, "name": "http"}]}]}}),
        );
    }

    /// The pod's namespace with its echo server listening, then weir-cni ADD (address `ip`).
    fn wire(&self, name: &str, ip: Ipv4Addr) -> Pod {
        self.wire_with(name, ip, None)
    }

    /// [`Self::wire`], dual-stack when `ip6` is given (the echo server then listens on both).
    fn wire_with(&self, name: &str, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Pod {
        let ns = Netns::new(name).expect("pod namespace");
        let any: IpAddr = if ip6.is_some() { Ipv6Addr::UNSPECIFIED.into() } else { [0; 4].into() };
        let echo = EchoServer::tcp(&ns, SocketAddr::new(any, 80)).expect("echo");
        let container_id = format!("{name}-{}", std::process::id());
        let config = self.cni_config_with(ip, ip6);
        let result =
            self.node.weir("ADD", Some(&Attachment::new(&container_id, &ns)), &config).unwrap();
        result.result().expect("weir-cni ADD");
        Pod { name: name.into(), ip, ip6, container_id, ns, _echo: echo }
    }

    fn cni_config(&self, ip: Ipv4Addr) -> Value {
        self.cni_config_with(ip, None)
    }

    fn cni_config_with(&self, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Value {
        let range = |subnet: &str, ip: String| json!([{"subnet": subnet, "rangeStart": ip, "rangeEnd": ip}]);
        let mut ranges = vec![range(POD_CIDR, ip.to_string())];
        ranges.extend(ip6.map(|ip6| range(POD6_CIDR, ip6.to_string())));
        json!({
            "cniVersion": "1.0.0",
            "name": "np",
            "type": "weir-cni",
            "bpffsDir": self.pins.path(),
            "ipam": {"ranges": ranges, "dataDir": self.node.data_dir.path()},
        })
    }

    /// What kubelet does after ADD: the pod's addresses in its status.
    fn report_ip(&self, pod: &Pod) {
        let ip = pod.ip.to_string();
        let mut ips = vec![json!({"ip": ip})];
        ips.extend(pod.ip6.map(|ip6| json!({"ip": ip6.to_string()})));
        self.patch(
            &format!("/api/v1/namespaces/{NS}/pods/{}/status", pod.name),
            json!({"status": {"phase": "Running", "podIP": ip, "podIPs": ips}}),
        );
    }

    /// A pod made, wired and reported.
    fn pod(&self, name: &str, labels: Value, ip: Ipv4Addr) -> Pod {
        self.create_pod(name, labels);
        let pod = self.wire(name, ip);
        self.report_ip(&pod);
        pod
    }

    fn can_connect(&self, from: &Netns, to: &Pod) -> bool {
        tcp_echo_works(from, SocketAddr::from((to.ip, 80)), CONNECT_TIMEOUT)
    }

    /// Over IPv6, to the pod's IPv6 address.
    fn can_connect6(&self, from: &Netns, to: &Pod) -> bool {
        let ip6 = to.ip6.expect("a dual-stack pod");
        tcp_echo_works(from, SocketAddr::from((ip6, 80)), CONNECT_TIMEOUT)
    }

    /// The policy programs' ids on a pod's host veth: (egress hook, ingress hook).
    fn attached(&self, pod: &Pod) -> Vec<Vec<u32>> {
        let name = host_ifname(&pod.container_id, "eth0");
        self.node
            .ns
            .run(move || {
                let c_name = std::ffi::CString::new(name).unwrap();
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
                assert_ne!(ifindex, 0, "host veth missing");
                SLOTS
                    .iter()
                    .map(|slot| weir_cni_plugin::policy::attached_ids(ifindex, *slot).unwrap())
                    .collect::<Vec<_>>()
            })
            .unwrap()
    }

    /// The ids of the programs the agent pinned (egress, ingress).
    fn pinned_ids(&self) -> Vec<Vec<u32>> {
        weir_cni_plugin::policy::open_pinned(self.pins.path())
            .unwrap()
            .iter()
            .map(|p| vec![p.id])
            .collect()
    }
}

fn allow_ingress(name: &str, selector: Value, from: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": from}}], "ports": [{"port": 80}]}]}})
}

/// Connects from `from` to `to`:80 again and again (bounded), counting successes, until
/// stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u32, u32)>>,
}

impl Prober {
    fn start(from: &Netns, to: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let ns = from.name().to_string();
        let thread = std::thread::spawn(move || {
            let from = Netns::borrow(&ns).unwrap();
            let started = Instant::now();
            let (mut attempts, mut successes) = (0, 0);
            while !stopping.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120)
            {
                attempts += 1;
                if tcp_echo_works(&from, SocketAddr::from((to, 80)), CONNECT_TIMEOUT) {
                    successes += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (attempts, successes)
        });
        Self { stop, thread: Some(thread) }
    }

    /// (attempts, successful connections).
    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn netpol_agent_enforces_policies_updates_and_deletions_on_real_pods() {
    let t = TestNode::new("npagent");
    // Pods made before the agent runs: the agent attaches the programs to their veths.
    let web = t.pod("web", json!({"app": "web"}), pod_ip(10));
    let client = t.pod("client", json!({"role": "client"}), pod_ip(11));
    let other = t.pod("other", json!({"role": "other"}), pod_ip(12));
    let free = t.pod("free", json!({"app": "free"}), pod_ip(13));
    let agent = t.start_agent();
    for pod in [&web, &client, &other, &free] {
        assert_eq!(t.attached(pod), t.pinned_ids(), "programs on {}'s veth", pod.name);
    }
    assert!(t.can_connect(&other.ns, &web), "no policy: everything passes");

    t.create(POLICIES, allow_ingress("web", json!({"app": "web"}), json!({"role": "client"})));
    eventually("only the client reaching web", WAIT, || {
        let (c, o) = (t.can_connect(&client.ns, &web), t.can_connect(&other.ns, &web));
        (!c || o).then(|| format!("client {c}, other {o}"))
    });
    assert!(t.can_connect(&other.ns, &free), "an unselected pod is not isolated");
    assert!(t.can_connect(&web.ns, &other), "web's egress is not isolated");
    assert!(t.can_connect(&t.node.ns, &web), "the node reaches its pod (probes)");
    let (_, metrics) = agent.get(agent.metrics, "/metrics");
    assert!(metrics.contains("weir_policy_endpoints 4"), "{metrics}");
    assert!(metrics.contains("weir_policy_policies 1"), "{metrics}");
    assert!(
        metrics.contains("weir_datapath_events_total{reason=\"drop_policy_ingress\"}"),
        "{metrics}"
    );

    // An update while traffic runs: the other pod in, the client out.
    t.patch(
        &format!("{POLICIES}/web"),
        allow_ingress("web", json!({"app": "web"}), json!({"role": "other"})),
    );
    eventually("the update reaching the datapath", WAIT, || {
        let (c, o) = (t.can_connect(&client.ns, &web), t.can_connect(&other.ns, &web));
        (c || !o).then(|| format!("client {c}, other {o}"))
    });

    // Deleted: nothing isolates web any more.
    let (code, reply) = t.api.json("DELETE", &format!("{POLICIES}/web"), None);
    assert_eq!(code, 200, "{reply}");
    eventually("web open again", WAIT, || {
        let (c, o) = (t.can_connect(&client.ns, &web), t.can_connect(&other.ns, &web));
        (!c || !o).then(|| format!("client {c}, other {o}"))
    });
}

#[test]
fn netpol_agent_no_window_at_pod_start_or_across_an_agent_restart() {
    let t = TestNode::new("npwindow");
    let client = t.pod("client", json!({"role": "client"}), pod_ip(11));
    let other = t.pod("other", json!({"role": "other"}), pod_ip(12));
    let mut agent = t.start_agent();
    t.create(POLICIES, allow_ingress("web", json!({"app": "web"}), json!({"role": "client"})));
    eventually("the policy programmed", WAIT, || {
        let (_, metrics) = agent.get(agent.metrics, "/metrics");
        (!metrics.contains("weir_policy_policies 1")).then_some(metrics)
    });

    // A new selected pod: probed by a peer the policy does not allow from before ADD on.
    t.create_pod("web-1", json!({"app": "web"}));
    let prober = Prober::start(&other.ns, pod_ip(20));
    std::thread::sleep(Duration::from_millis(300));
    let web1 = t.wire("web-1", pod_ip(20));
    // Before its policy is written the node already reaches it (readiness probes) ...
    eventually("the node reaching the new pod", WAIT, || {
        (!t.can_connect(&t.node.ns, &web1)).then(|| "not yet".to_string())
    });
    assert!(!t.can_connect(&client.ns, &web1), "no peer before the policy is written");
    // ... and once kubelet reports its address, the allowed peer does.
    t.report_ip(&web1);
    eventually("the allowed peer reaching the new pod", WAIT, || {
        (!t.can_connect(&client.ns, &web1)).then(|| "not yet".to_string())
    });
    std::thread::sleep(Duration::from_millis(500));
    let (attempts, successes) = prober.finish();
    assert_eq!(successes, 0, "the denied peer got through {successes} of {attempts} times");
    assert!(attempts >= 5, "only {attempts} probes");

    // The agent crashes; a pod starts while it is down: the previous agent's programs (pinned)
    // and maps keep it unreachable for denied peers.
    agent.kill();
    t.create_pod("web-2", json!({"app": "web"}));
    let prober = Prober::start(&other.ns, pod_ip(21));
    std::thread::sleep(Duration::from_millis(300));
    let web2 = t.wire("web-2", pod_ip(21));
    t.report_ip(&web2);
    eventually("the node reaching the pod made while the agent was down", WAIT, || {
        (!t.can_connect(&t.node.ns, &web2)).then(|| "not yet".to_string())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!t.can_connect(&client.ns, &web2), "nothing writes its policy while the agent is down");
    let _agent = t.start_agent();
    eventually("the allowed peer reaching the pod once the agent is back", WAIT, || {
        (!t.can_connect(&client.ns, &web2)).then(|| "not yet".to_string())
    });
    let (attempts, successes) = prober.finish();
    assert_eq!(successes, 0, "the denied peer got through {successes} of {attempts} times");
    assert!(attempts >= 5, "only {attempts} probes");
    assert!(t.can_connect(&client.ns, &web1), "web-1 kept its policy across the restart");
    assert!(!t.can_connect(&other.ns, &web1));

    // The new agent's programs replaced the old ones on every veth (attach first, then detach).
    for pod in [&client, &other, &web1, &web2] {
        assert_eq!(t.attached(pod), t.pinned_ids(), "programs on {}'s veth", pod.name);
    }
}

#[test]
fn netpol_cni_attaches_the_pinned_programs_at_add_and_rolls_back_when_it_cannot() {
    let t = TestNode::new("npcni");
    let loaded = programs::load(&LoadOptions::new(t.pins.path())).expect("load weir's object");
    let pinned = PolicyPrograms::pin(&loaded.ebpf, t.pins.path()).expect("pin the programs");
    let pod = t.wire("pod", pod_ip(30));
    let ids: Vec<Vec<u32>> = pinned.ids().into_iter().map(|id| vec![id]).collect();
    assert_eq!(t.attached(&pod), ids, "both programs on the new veth, once");

    // A pin that is not a program (here: a map) makes the attach, and so ADD, fail; nothing
    // is left behind.
    let bogus = t.pins.path().join(SLOTS[1].pin);
    std::fs::remove_file(&bogus).unwrap();
    let map = bpf::obj_get(&t.pins.path().join(weir_common::policy::POLICY_GLOBAL_MAP)).unwrap();
    bpf::obj_pin(map.as_fd(), &bogus).unwrap();
    let links_before = t.node.links().unwrap();
    let ns = Netns::new("badpod").unwrap();
    let failed = t
        .node
        .weir("ADD", Some(&Attachment::new("badpod", &ns)), &t.cni_config(pod_ip(31)))
        .unwrap();
    assert_eq!(failed.error_code().unwrap(), 5, "{}", failed.stdout);
    assert!(failed.stdout.contains("NetworkPolicy programs"), "{}", failed.stdout);
    assert_eq!(t.node.links().unwrap(), links_before, "the veth was removed");
    assert!(
        !t.node.reservations("np").unwrap().iter().any(|r| r.starts_with("badpod")),
        "the address was released"
    );
}

/// Dual-stack pods wired by weir-cni, the real agent: web takes connections on port 80 from the
/// client only and may open none itself. Over IPv6 the client connects (web's replies pass its
/// denied egress through conntrack), another pod is dropped, web cannot connect out; IPv4 is
/// enforced the same way alongside. weir-cni writes permanent neighbour entries for the
/// gateways and pods; web's are flushed under its denied egress, so its replies need neighbour
/// discovery, which must pass.
#[test]
fn netpol_agent_enforces_policies_over_ipv6_on_dual_stack_pods() {
    ipv6_policies(Dataplane::Ebpf);
}

/// [`netpol_agent_enforces_policies_over_ipv6_on_dual_stack_pods`] on the nftables dataplane.
#[test]
fn netpol_agent_enforces_policies_over_ipv6_on_dual_stack_pods_nftables() {
    ipv6_policies(Dataplane::Nftables);
}

fn ipv6_policies(dataplane: Dataplane) {
    let t = TestNode::new("np6");
    let pod = |name: &str, labels: Value, last: u8| {
        t.create_pod(name, labels);
        let pod = t.wire_with(name, pod_ip(last), Some(pod_ip6(last)));
        t.report_ip(&pod);
        pod
    };
    let web = pod("web", json!({"app": "web"}), 10);
    let client = pod("client", json!({"role": "client"}), 11);
    let other = pod("other", json!({"role": "other"}), 12);
    let agent = t.start_agent_on(dataplane);
    // `weir flows` subscribers: web's drops, and web's allowed flows.
    let subscribe = |verdict| {
        let request = FlowRequest { pod: Some(format!("{NS}/web")), verdict: Some(verdict) };
        let client = FlowClient::connect(&agent.flows_socket, &request).expect("subscribe");
        client.set_timeout(Some(Duration::from_secs(10))).unwrap();
        client
    };
    let (mut drops, mut allowed) =
        (subscribe(FlowVerdict::Dropped), subscribe(FlowVerdict::Allowed));
    assert!(t.can_connect6(&other.ns, &web), "no policy: IPv6 passes");

    let mut policy = allow_ingress("web", json!({"app": "web"}), json!({"role": "client"}));
    policy["spec"]["policyTypes"] = json!(["Ingress", "Egress"]);
    t.create(POLICIES, policy);
    eventually("only the client reaching web over IPv6", WAIT, || {
        let (c, o) = (t.can_connect6(&client.ns, &web), t.can_connect6(&other.ns, &web));
        (!c || o).then(|| format!("client {c}, other {o}"))
    });
    assert!(t.can_connect6(&other.ns, &client), "an unselected pod is not isolated");
    assert!(!t.can_connect6(&other.ns, &web), "another peer is dropped");
    assert!(!t.can_connect6(&web.ns, &client), "web's IPv6 egress is denied");
    assert!(t.can_connect(&client.ns, &web) && !t.can_connect(&other.ns, &web), "IPv4 alike");
    // The drops are counted per policy and direction, on either dataplane.
    let (_, metrics) = agent.get(agent.metrics, "/metrics");
    for direction in ["ingress", "egress"] {
        let line =
            format!("weir_policy_drops_total{{policy=\"np/web\",direction=\"{direction}\"}} ");
        let count = metrics.lines().find_map(|l| l.strip_prefix(&line)?.parse::<u64>().ok());
        assert!(count.is_some_and(|n| n > 0), "{direction} drops of np/web in:\n{metrics}");
        let reason = format!("weir_datapath_events_total{{reason=\"drop_policy_{direction}\"}} ");
        let total = metrics.lines().find_map(|l| l.strip_prefix(&reason)?.parse::<u64>().ok());
        assert!(total.is_some_and(|n| n > 0), "{reason}in:\n{metrics}");
    }
    // The flow viewer saw the decisions, named, on either dataplane.
    let web6 = IpAddr::V6(web.ip6.unwrap());
    let pod = |p: &Option<String>, name: &str| p.as_deref() == Some(&format!("{NS}/{name}")[..]);
    expect_flow(&mut drops, "other -> web dropped at web's ingress over IPv6", |r| {
        r.destination.ip == web6
            && r.direction == FlowDirection::Ingress
            && r.reason == FlowReason::DefaultDeny
            && r.policy.as_deref() == Some("np/web")
            && pod(&r.source.pod, "other")
            && pod(&r.destination.pod, "web")
            && r.destination.port == Some(80)
    });
    expect_flow(&mut drops, "web -> client dropped at web's egress", |r| {
        r.direction == FlowDirection::Egress
            && pod(&r.source.pod, "web")
            && pod(&r.destination.pod, "client")
            && r.policy.as_deref() == Some("np/web")
    });
    if dataplane == Dataplane::Nftables {
        // Operators read the table with `nft list`: it parses the IPv6 sets and rules.
        let text = t.node.ns.nft_ruleset();
        assert!(text.contains("ingress-allow6") && text.contains("icmpv6 type"), "{text}");
    }

    // Web forgets its neighbours: its replies wait for neighbour discovery, sent from its
    // global address under denied egress.
    web.ns.ip(&["-6", "neigh", "flush", "dev", "eth0", "nud", "all"]).unwrap();
    assert!(web.ns.ip(&["-6", "neigh", "show", "dev", "eth0"]).unwrap().trim().is_empty());
    assert!(t.can_connect6(&client.ns, &web), "the client connects, web's replies pass");
    expect_flow(&mut allowed, "client -> web allowed by a rule over IPv6", |r| {
        r.destination.ip == web6
            && r.direction == FlowDirection::Ingress
            && r.reason == FlowReason::Rule
            && pod(&r.source.pod, "client")
    });
    let learned = web.ns.ip(&["-6", "neigh", "show", "dev", "eth0"]).unwrap();
    assert!(
        !learned.trim().is_empty() && !learned.contains("PERMANENT"),
        "web resolved its gateway by neighbour discovery: {learned}"
    );

    // Deleted: web open again over IPv6.
    let (code, reply) = t.api.json("DELETE", &format!("{POLICIES}/web"), None);
    assert_eq!(code, 200, "{reply}");
    eventually("web open again over IPv6", WAIT, || {
        let (o, w) = (t.can_connect6(&other.ns, &web), t.can_connect6(&web.ns, &client));
        (!o || !w).then(|| format!("other {o}, web out {w}"))
    });
}

/// Reads `client` until a record matches (bounded: 1,000 records or a 10 s silence).
fn expect_flow(client: &mut FlowClient, what: &str, matches: impl Fn(&FlowRecord) -> bool) {
    let mut seen = Vec::new();
    for _ in 0..1000 {
        match client.next_message() {
            Ok(FlowMessage::Flow(record)) if matches(&record) => return,
            Ok(FlowMessage::Flow(record)) => seen.push(record.to_text()),
            Ok(other) => seen.push(format!("{other:?}")),
            Err(err) => panic!("no flow record of {what} ({err}); seen:\n{}", seen.join("\n")),
        }
    }
    panic!("no flow record of {what} in 1,000 records");
}
