//! NodePort traffic from outside the node, per packet: an external client reaches
//! NODE_IP:nodePort; the node translates it to a pod behind the node, and the reply leaves the
//! uplink with the node port as its source again. Three namespaces: external client, node
//! (forwarding), pod. Both dataplanes: eBPF (the tc load balancer on the node's uplink, which
//! keeps the client address for a local pod) and nftables (the table in the node's namespace,
//! kube-proxy's semantics: `externalTrafficPolicy: Cluster` traffic is masqueraded, `Local`
//! traffic keeps the client's address). The same over IPv6 (the eBPF tc path's IPv6 half).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use weir_common::metrics::Counter;
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::{ServiceMaps, read_counters},
    model::{self, NodeContext},
    programs::{self, Attached, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    echo::EchoServer,
    netns::{Netns, Veth},
    privileged::require_root,
    probe, sctp,
};

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(10, 206, 0, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 206, 0, 2);
const NODE_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 206, 1, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 206, 1, 2);
const NODE_PORT: u16 = 30080;

fn objects() -> (Service, EndpointSlice) {
    let service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.3.1",
                 "ports": [{"name": "http", "port": 80, "nodePort": NODE_PORT, "protocol": "TCP"}]},
    }))
    .unwrap();
    let slice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [POD.to_string()], "conditions": {"ready": true}}],
    }))
    .unwrap();
    (service, slice)
}

/// [`objects`] with the endpoint at `pod`; an IPv6 Service and slice when `pod` is IPv6.
fn objects_for(pod: IpAddr) -> (Service, EndpointSlice) {
    let (mut service, mut slice) = objects();
    slice.endpoints[0].addresses = vec![pod.to_string()];
    if pod.is_ipv6() {
        let spec = service.spec.as_mut().unwrap();
        spec.cluster_ip = Some("fd00:96::3:1".into());
        spec.cluster_ips = Some(vec!["fd00:96::3:1".into()]);
        spec.ip_families = Some(vec!["IPv6".into()]);
        slice.address_type = "IPv6".into();
    }
    (service, slice)
}

/// The addresses of a [`NodePortNet`] per family (external client, node uplink, node's pod
/// side, pod), each with a namespace role made from `role`.
fn both_families(role: &str) -> [(String, [IpAddr; 4]); 2] {
    [
        (role.to_string(), [EXTERNAL, NODE, NODE_POD_SIDE, POD].map(IpAddr::from)),
        (format!("{role}6"), [EXTERNAL6, NODE6, NODE_POD_SIDE6, POD6].map(IpAddr::from)),
    ]
}

#[test]
fn lb_nodeport_from_outside_the_node_reaches_the_pod_and_replies_from_the_node_port() {
    require_root();
    for_each_dataplane(from_outside_the_node);
}

fn from_outside_the_node(dataplane: Dataplane) {
    let net = NodePortNet::new("np", [EXTERNAL, NODE, NODE_POD_SIDE, POD].map(IpAddr::from));
    let (external, node) = (&net.external, &net.node);

    let (service, slice) = objects();
    let context = NodeContext { name: "node-a".into(), addresses: vec![NODE.into()] };
    let desired = model::build([&service], [&slice], &context);
    let target = format!("{NODE}:{NODE_PORT}");
    match dataplane {
        Dataplane::Ebpf => {
            let (ebpf, _pins) = net.ebpf_on_uplink(&desired);
            let result = probe::run(external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{result}");
            assert_pod_saw(&result, EXTERNAL, "the pod saw the external client's address");
            assert_eq!(result["peer"], target, "{result}");
            assert_translated(&ebpf);
        }
        Dataplane::Nftables => {
            let mut datapath = TestDatapath::new(dataplane, node, "nodeport").unwrap();
            datapath.apply(&desired).unwrap();
            let result = probe::run(external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{result}");
            assert_pod_saw(&result, NODE_POD_SIDE, "masqueraded (kube-proxy's Cluster policy)");
            assert_eq!(result["peer"], target, "{result}");

            // externalTrafficPolicy: Local keeps the client's address (no masquerade).
            let mut local = service.clone();
            local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
            let mut local_slice = slice.clone();
            local_slice.endpoints[0].node_name = Some("node-a".into());
            datapath.apply(&model::build([&local], [&local_slice], &context)).unwrap();
            let result = probe::run(external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_pod_saw(&result, EXTERNAL, "Local policy: the client address is kept");
        }
    }
}

/// An external client, a forwarding node and a pod behind it with an echo server on
/// `pod:8080`, all of one family. `addresses`: external client, node uplink, node's pod side,
/// pod.
struct NodePortNet {
    _backend: EchoServer,
    external: Netns,
    node: Netns,
    uplink: String,
    pod: Netns,
}

impl NodePortNet {
    fn new(role: &str, addresses: [IpAddr; 4]) -> Self {
        let [external_ip, node_ip, node_pod_side, pod_ip] = addresses;
        let external = Netns::new(&format!("{role}ext")).unwrap();
        let node = Netns::new(&format!("{role}node")).unwrap();
        let pod = Netns::new(&format!("{role}pod")).unwrap();
        let uplink = Veth::between(&external, &node).unwrap();
        let pod_link = Veth::between(&node, &pod).unwrap();
        let v6 = pod_ip.is_ipv6();
        let add = |ns: &Netns, addr: IpAddr, dev: &str| {
            let address = format!("{addr}/{}", if v6 { 64 } else { 24 });
            // nodad: IPv6 addresses usable at once.
            let nodad: &[&str] = if v6 { &["nodad"] } else { &[] };
            ns.ip(&[&["addr", "add", &address, "dev", dev][..], nodad].concat()).unwrap();
        };
        add(&external, external_ip, &uplink.a);
        add(&node, node_ip, &uplink.b);
        add(&node, node_pod_side, &pod_link.a);
        add(&pod, pod_ip, &pod_link.b);
        let family = if v6 { "-6" } else { "-4" };
        pod.ip(&[family, "route", "add", "default", "via", &node_pod_side.to_string()]).unwrap();
        let forwarding = if v6 {
            "/proc/sys/net/ipv6/conf/all/forwarding"
        } else {
            "/proc/sys/net/ipv4/ip_forward"
        };
        node.run(|| std::fs::write(forwarding, "1")).unwrap().unwrap();
        let backend = EchoServer::tcp(&pod, (pod_ip, 8080).into()).unwrap();
        Self { _backend: backend, external, node, uplink: uplink.b.clone(), pod }
    }

    /// `desired` on `dataplane` in the node: the eBPF object and its pins
    /// (`(aya::Ebpf, TestPinDir)`, see [`Self::ebpf_on_uplink`]) or a [`TestDatapath`]; kept
    /// alive by the caller.
    fn datapath(
        &self,
        dataplane: Dataplane,
        desired: &model::ServiceState,
        role: &str,
    ) -> Box<dyn std::any::Any> {
        match dataplane {
            Dataplane::Ebpf => Box::new(self.ebpf_on_uplink(desired)),
            Dataplane::Nftables => {
                let mut datapath = TestDatapath::new(dataplane, &self.node, role).unwrap();
                datapath.apply(desired).unwrap();
                Box::new(datapath)
            }
        }
    }

    /// Loads the eBPF object with `desired` in its maps and attaches the tc load balancer to
    /// the node's uplink.
    fn ebpf_on_uplink(&self, desired: &model::ServiceState) -> (aya::Ebpf, TestPinDir) {
        let pins = TestPinDir::new("nodeport").unwrap();
        let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
        let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
        writer.execute(&ServicePlanner::new().plan(desired)).unwrap();
        let attached =
            self.node.run(|| programs::attach_tc_lb(&mut loaded.ebpf, &self.uplink, None)).unwrap();
        assert_eq!(attached.unwrap(), Attached { attached: 2, adopted: 0 });
        (loaded.ebpf, pins)
    }
}

/// The tc programs translated the connection's packets and reverse-translated the replies.
fn assert_translated(ebpf: &aya::Ebpf) {
    let counters = read_counters(ebpf).unwrap();
    let count = |which| counters.iter().find(|(c, _)| *c == which).unwrap().1;
    assert!(
        count(Counter::Translated) >= 3 && count(Counter::ReverseTranslated) >= 2,
        "{counters:?}"
    );
}

/// Asserts that `result` is the pod's answer to a connection it saw coming from `source`.
fn assert_pod_saw(result: &serde_json::Value, source: Ipv4Addr, why: &str) {
    assert!(
        result["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("pong from {POD}:8080 to {source}:"))),
        "{why}: {result}"
    );
}

const EXTERNAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x206, 0, 0, 0, 0, 0, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x206, 0, 0, 0, 0, 0, 2);
const NODE_POD_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x206, 1, 0, 0, 0, 0, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x206, 1, 0, 0, 0, 0, 2);

/// The IPv6 twin of [`from_outside_the_node`]: an IPv6 NodePort (the node's IPv6 address) to a
/// pod's IPv6 endpoint, from an external IPv6 client, on both dataplanes.
#[test]
fn lb_nodeport_over_ipv6_from_outside_the_node_reaches_the_pod() {
    require_root();
    for_each_dataplane(|dataplane| {
        let addresses = [EXTERNAL6, NODE6, NODE_POD_SIDE6, POD6].map(IpAddr::from);
        let net = NodePortNet::new("np6", addresses);

        let (mut service, mut slice) = objects_for(POD6.into());
        let spec = service.spec.as_mut().unwrap();
        // `Local`: the pod must see the external client's own address on both dataplanes.
        spec.external_traffic_policy = Some("Local".into());
        slice.endpoints[0].node_name = Some("node-a".into());
        let context = NodeContext { name: "node-a".into(), addresses: vec![NODE6.into()] };
        let desired = model::build([&service], [&slice], &context);
        let target = format!("[{NODE6}]:{NODE_PORT}");
        let expected = format!("pong from [{POD6}]:8080 to [{EXTERNAL6}]:");

        let check = || {
            let result = probe::run(&net.external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{dataplane:?}: {result}");
            assert!(
                result["reply"].as_str().is_some_and(|r| r.starts_with(&expected)),
                "{dataplane:?}: the pod answered the external client: {result}"
            );
            assert_eq!(result["peer"], target, "{dataplane:?}: replies come from the node port");
        };
        let datapath = net.datapath(dataplane, &desired, "nodeport6");
        check();
        if let Some((ebpf, _)) = datapath.downcast_ref::<(aya::Ebpf, TestPinDir)>() {
            assert_translated(ebpf);
        }
    });
}

/// SCTP NodePort from outside the node, IPv4 and IPv6, on both dataplanes: an INIT to
/// NODE:nodePort reaches the pod's port 8080 and the INIT-ACK comes back from the node port,
/// with a valid CRC32c at both ends (the eBPF tc path rewrites the ports and updates the CRC;
/// on nftables the kernel's NAT does). This kernel has no SCTP stack, so both ends speak over
/// raw sockets (tests/src/sctp.rs).
#[test]
fn lb_nodeport_sctp_from_outside_the_node_reaches_the_pod_with_valid_checksums() {
    require_root();
    for_each_dataplane(|dataplane| {
        for (role, addresses) in both_families("sc") {
            let [external, node, node_pod_side, pod] = addresses;
            let net = NodePortNet::new(&role, addresses);
            let responder = sctp::Responder::start(&net.pod, pod.is_ipv6()).unwrap();

            let (mut service, mut slice) = objects_for(pod);
            service.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol =
                Some("SCTP".into());
            slice.ports.as_mut().unwrap()[0].protocol = Some("SCTP".into());
            let context = NodeContext { name: "node-a".into(), addresses: vec![node] };
            let desired = model::build([&service], [&slice], &context);
            let target = std::net::SocketAddr::new(node, NODE_PORT);
            let timeout = std::time::Duration::from_secs(3);

            // eBPF keeps the client's address; nftables masquerades (Cluster policy).
            let datapath = net.datapath(dataplane, &desired, &role);
            let source = if dataplane == Dataplane::Ebpf { external } else { node_pod_side };
            let exchange = sctp::exchange(&net.external, target, 40_000, timeout)
                .unwrap_or_else(|e| panic!("{dataplane:?} {target}: {e:#}"));
            assert_eq!(
                exchange.reply_from, target,
                "{dataplane:?}: the INIT-ACK comes from the node port"
            );
            assert!(exchange.checksum_ok, "{dataplane:?}: the INIT-ACK's CRC32c after reverse NAT");

            let seen = responder.seen();
            let init = seen.iter().find(|r| r.chunk_type == 1).expect("the pod saw the INIT");
            assert_eq!(init.to_port, 8080, "{dataplane:?}: translated to the target port");
            assert_eq!(init.from.ip(), source, "{dataplane:?}: {seen:?}");
            assert!(init.checksum_ok, "{dataplane:?}: the INIT's CRC32c after DNAT");
            if let Some((ebpf, _)) = datapath.downcast_ref::<(aya::Ebpf, TestPinDir)>() {
                assert_translated_once(ebpf);
            }
        }
    });
}

/// The tc programs translated one packet each way.
fn assert_translated_once(ebpf: &aya::Ebpf) {
    let counters = read_counters(ebpf).unwrap();
    let count = |which| counters.iter().find(|(c, _)| *c == which).unwrap().1;
    assert!(
        count(Counter::Translated) >= 1 && count(Counter::ReverseTranslated) >= 1,
        "{counters:?}"
    );
}

/// A NodePort whose service has no endpoints refuses connections from outside the node at
/// once (kube-proxy's reject: ICMP port unreachable, which the client's TCP turns into
/// "connection refused"), over IPv4 and IPv6, on both dataplanes; on eBPF the tc program
/// writes the ICMP error itself and sends it back out of the uplink.
#[test]
fn lb_nodeport_without_endpoints_refuses_at_once_from_outside_the_node() {
    require_root();
    for_each_dataplane(|dataplane| {
        for (role, addresses) in both_families("ne") {
            let [_, node, _, pod] = addresses;
            let net = NodePortNet::new(&role, addresses);
            let (service, mut slice) = objects_for(pod);
            slice.endpoints.clear();
            let context = NodeContext { name: "node-a".into(), addresses: vec![node] };
            let desired = model::build([&service], [&slice], &context);
            let target = std::net::SocketAddr::new(node, NODE_PORT).to_string();

            let _datapath = net.datapath(dataplane, &desired, &role);
            // A timeout would say "TimedOut" after 3 s; a refusal comes back at once.
            let result = probe::run(&net.external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], false, "{dataplane:?} {target}: {result}");
            assert_eq!(result["kind"], "ConnectionRefused", "{dataplane:?} {target}: {result}");
        }
    });
}
