//! NodePort traffic from outside the node, per packet: an external client reaches
//! NODE_IP:nodePort; the node translates it to a pod behind the node, and the reply leaves the
//! uplink with the node port as its source again. Three namespaces: external client, node
//! (forwarding), pod. Both dataplanes: eBPF (the tc load balancer on the node's uplink, which
//! keeps the client address for a local pod) and nftables (the table in the node's namespace,
//! kube-proxy's semantics: `externalTrafficPolicy: Cluster` traffic is masqueraded, `Local`
//! traffic keeps the client's address). The same over IPv6 (the eBPF tc path's IPv6 half).
use std::net::{Ipv4Addr, Ipv6Addr};

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
    probe,
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

#[test]
fn lb_nodeport_from_outside_the_node_reaches_the_pod_and_replies_from_the_node_port() {
    require_root();
    for_each_dataplane(from_outside_the_node);
}

fn from_outside_the_node(dataplane: Dataplane) {
    let external = Netns::new("npext").unwrap();
    let node = Netns::new("npnode").unwrap();
    let pod = Netns::new("nppod").unwrap();
    let uplink = Veth::between(&external, &node).unwrap();
    let pod_link = Veth::between(&node, &pod).unwrap();
    external.ip(&["addr", "add", &format!("{EXTERNAL}/24"), "dev", &uplink.a]).unwrap();
    node.ip(&["addr", "add", &format!("{NODE}/24"), "dev", &uplink.b]).unwrap();
    node.ip(&["addr", "add", &format!("{NODE_POD_SIDE}/24"), "dev", &pod_link.a]).unwrap();
    pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", &pod_link.b]).unwrap();
    pod.ip(&["route", "add", "default", "via", &NODE_POD_SIDE.to_string()]).unwrap();
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")).unwrap().unwrap();
    let _backend = EchoServer::tcp(&pod, (POD, 8080).into()).unwrap();

    let (service, slice) = objects();
    let context = NodeContext { name: "node-a".into(), addresses: vec![NODE.into()] };
    let desired = model::build([&service], [&slice], &context);
    let target = format!("{NODE}:{NODE_PORT}");
    match dataplane {
        Dataplane::Ebpf => {
            let pins = TestPinDir::new("nodeport").unwrap();
            let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
            let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
            writer.execute(&ServicePlanner::new().plan(&desired)).unwrap();
            let interface = uplink.b.clone();
            let attached =
                node.run(|| programs::attach_tc_lb(&mut loaded.ebpf, &interface, None)).unwrap();
            assert_eq!(attached.unwrap(), Attached { attached: 2, adopted: 0 });

            let result = probe::run(&external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{result}");
            assert_pod_saw(&result, EXTERNAL, "the pod saw the external client's address");
            assert_eq!(result["peer"], target, "{result}");
            let counters = read_counters(&loaded.ebpf).unwrap();
            let count = |which| counters.iter().find(|(c, _)| *c == which).unwrap().1;
            assert!(
                count(Counter::Translated) >= 3 && count(Counter::ReverseTranslated) >= 2,
                "{counters:?}"
            );
        }
        Dataplane::Nftables => {
            let mut datapath = TestDatapath::new(dataplane, &node, "nodeport").unwrap();
            datapath.apply(&desired).unwrap();
            let result = probe::run(&external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{result}");
            assert_pod_saw(&result, NODE_POD_SIDE, "masqueraded (kube-proxy's Cluster policy)");
            assert_eq!(result["peer"], target, "{result}");

            // externalTrafficPolicy: Local keeps the client's address (no masquerade).
            let mut local = service.clone();
            local.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
            let mut local_slice = slice.clone();
            local_slice.endpoints[0].node_name = Some("node-a".into());
            datapath.apply(&model::build([&local], [&local_slice], &context)).unwrap();
            let result = probe::run(&external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_pod_saw(&result, EXTERNAL, "Local policy: the client address is kept");
        }
    }
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
        let external = Netns::new("np6ext").unwrap();
        let node = Netns::new("np6node").unwrap();
        let pod = Netns::new("np6pod").unwrap();
        let uplink = Veth::between(&external, &node).unwrap();
        let pod_link = Veth::between(&node, &pod).unwrap();
        let add = |ns: &Netns, addr: Ipv6Addr, dev: &str| {
            ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"]).unwrap();
        };
        add(&external, EXTERNAL6, &uplink.a);
        add(&node, NODE6, &uplink.b);
        add(&node, NODE_POD_SIDE6, &pod_link.a);
        add(&pod, POD6, &pod_link.b);
        pod.ip(&["-6", "route", "add", "default", "via", &NODE_POD_SIDE6.to_string()]).unwrap();
        node.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1"))
            .unwrap()
            .unwrap();
        let _backend = EchoServer::tcp(&pod, (POD6, 8080).into()).unwrap();

        let (mut service, mut slice) = objects();
        let spec = service.spec.as_mut().unwrap();
        spec.cluster_ip = Some("fd00:96::3:1".into());
        spec.cluster_ips = Some(vec!["fd00:96::3:1".into()]);
        spec.ip_families = Some(vec!["IPv6".into()]);
        slice.address_type = "IPv6".into();
        slice.endpoints[0].addresses = vec![POD6.to_string()];
        // `Local`: the pod must see the external client's own address on both dataplanes.
        spec.external_traffic_policy = Some("Local".into());
        slice.endpoints[0].node_name = Some("node-a".into());
        let context = NodeContext { name: "node-a".into(), addresses: vec![NODE6.into()] };
        let desired = model::build([&service], [&slice], &context);
        let target = format!("[{NODE6}]:{NODE_PORT}");
        let expected = format!("pong from [{POD6}]:8080 to [{EXTERNAL6}]:");

        let check = || {
            let result = probe::run(&external, None, &["tcp", &target, "--timeout-ms", "3000"]);
            assert_eq!(result["ok"], true, "{dataplane:?}: {result}");
            assert!(
                result["reply"].as_str().is_some_and(|r| r.starts_with(&expected)),
                "{dataplane:?}: the pod answered the external client: {result}"
            );
            assert_eq!(result["peer"], target, "{dataplane:?}: replies come from the node port");
        };
        match dataplane {
            Dataplane::Ebpf => {
                let pins = TestPinDir::new("nodeport6").unwrap();
                let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
                let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
                writer.execute(&ServicePlanner::new().plan(&desired)).unwrap();
                let interface = uplink.b.clone();
                node.run(|| programs::attach_tc_lb(&mut loaded.ebpf, &interface, None))
                    .unwrap()
                    .unwrap();
                check();
                let counters = read_counters(&loaded.ebpf).unwrap();
                let count = |which| counters.iter().find(|(c, _)| *c == which).unwrap().1;
                assert!(
                    count(Counter::Translated) >= 3 && count(Counter::ReverseTranslated) >= 2,
                    "{counters:?}"
                );
            }
            Dataplane::Nftables => {
                let mut datapath = TestDatapath::new(dataplane, &node, "nodeport6").unwrap();
                datapath.apply(&desired).unwrap();
                check();
            }
        }
    });
}
