//! SCTP ClusterIP from a pod, on both dataplanes. eBPF: no socket hook sees SCTP, so the
//! programs at the pod's host-side veth translate it per packet (`tc_pol_egress` sends the
//! INIT to a backend, `tc_pol_ingress` gives the INIT-ACK the frontend as its source again);
//! nftables: the node's table translates it (kube-proxy's shape). A client pod and a backend
//! pod behind one node, wired as weir-cni wires them. The kernel has no SCTP stack, so both
//! ends speak over raw sockets (tests/src/sctp.rs) and check every CRC32c they receive.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{self, NodeContext},
    programs::{self, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    netns::{Netns, Veth},
    privileged::require_root,
    routed, sctp,
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 207, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 207, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 207, 1, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);

fn desired(endpoints: &[Ipv4Addr]) -> model::ServiceState {
    let endpoints: Vec<IpAddr> = endpoints.iter().map(|&a| a.into()).collect();
    desired_at(VIP.into(), &endpoints)
}

/// The SCTP service `amf` (port 80 -> 8080) at `vip` with `endpoints`, of `vip`'s family.
fn desired_at(vip: IpAddr, endpoints: &[IpAddr]) -> model::ServiceState {
    let family = if vip.is_ipv6() { "IPv6" } else { "IPv4" };
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "amf", "namespace": "default"},
        "spec": {"clusterIP": vip.to_string(), "ipFamilies": [family],
                 "ports": [{"name": "ngap", "port": 80, "protocol": "SCTP"}]},
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "amf-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "amf"}},
        "addressType": family,
        "ports": [{"name": "ngap", "port": 8080, "protocol": "SCTP"}],
        "endpoints": endpoints.iter()
            .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
            .collect::<Vec<_>>(),
    }))
    .unwrap();
    let context = NodeContext { name: "node-a".into(), addresses: vec![NODE.into()] };
    model::build([&service], [&slice], &context)
}

#[test]
fn lb_sctp_cluster_ip_from_a_pod_reaches_the_backend_and_replies_from_the_vip() {
    require_root();
    for_each_dataplane(|dataplane| {
        let role = match dataplane {
            Dataplane::Ebpf => "sctpe",
            Dataplane::Nftables => "sctpn",
        };
        let node = routed::node(&format!("{role}node"), NODE).unwrap();
        let (client, client_veth) =
            routed::pod(&node, NODE, &format!("{role}cli"), CLIENT).unwrap();
        let (backend, backend_veth) =
            routed::pod(&node, NODE, &format!("{role}be"), BACKEND).unwrap();
        let responder = sctp::Responder::start(&backend, false).unwrap();

        let pins = TestPinDir::new(role).unwrap();
        let _datapath = match dataplane {
            Dataplane::Ebpf => {
                let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
                let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
                writer.execute(&ServicePlanner::new().plan(&desired(&[BACKEND]))).unwrap();
                for veth in [&client_veth.b, &backend_veth.b] {
                    routed::attach_policy(&mut loaded.ebpf, &node, veth).unwrap();
                }
                Box::new(loaded) as Box<dyn std::any::Any>
            }
            Dataplane::Nftables => {
                let mut datapath = TestDatapath::new(dataplane, &node, role).unwrap();
                datapath.apply(&desired(&[BACKEND])).unwrap();
                Box::new(datapath)
            }
        };

        let target = SocketAddr::from((VIP, 80));
        let exchange = sctp::exchange(&client, target, 40_000, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{dataplane:?}: {e:#}"));
        assert_eq!(exchange.reply_from, target, "{dataplane:?}: the INIT-ACK comes from the VIP");
        assert!(exchange.checksum_ok, "{dataplane:?}: CRC32c of the reverse-translated reply");

        let seen = responder.seen();
        let init = seen.iter().find(|r| r.chunk_type == 1).expect("the backend saw the INIT");
        assert_eq!(init.from, SocketAddr::from((CLIENT, 40_000)), "{dataplane:?}: no SNAT");
        assert_eq!(init.to_port, 8080, "{dataplane:?}: sent to the target port");
        assert!(init.checksum_ok, "{dataplane:?}: CRC32c of the translated INIT");

        // A second association from another port is translated on its own.
        let again = sctp::exchange(&client, target, 40_001, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{dataplane:?}: second association: {e:#}"));
        assert_eq!(again.reply_from, target);
    });
}

/// A pod that is its own service's only backend reaches itself through the service, over
/// IPv4 and IPv6. eBPF: the veth programs show the pod its association coming from the
/// frontend address (ports kept) and send it straight back into the pod; its answer becomes
/// the frontend's again. nftables: the node's table masquerades the hairpin (kube-proxy's
/// shape), so the pod sees the node's address on its link.
#[test]
fn lb_sctp_a_pod_reaches_itself_through_its_service() {
    require_root();
    let v4 =
        Hairpin { vip: VIP.into(), pod: BACKEND.into(), node_side: "169.254.1.1".parse().unwrap() };
    let v6 = Hairpin {
        vip: "fd00:96::7:1".parse().unwrap(),
        pod: "fd00:207:1::3".parse().unwrap(),
        node_side: "fd00:207:1::1".parse().unwrap(),
    };
    for case in [v4, v6] {
        for_each_dataplane(|dataplane| case.run(dataplane));
    }
}

struct Hairpin {
    vip: IpAddr,
    pod: IpAddr,
    /// The node's address on the pod's link (the pod's gateway).
    node_side: IpAddr,
}

impl Hairpin {
    fn run(&self, dataplane: Dataplane) {
        let v6 = self.vip.is_ipv6();
        let role = match (dataplane, v6) {
            (Dataplane::Ebpf, false) => "sctphe",
            (Dataplane::Ebpf, true) => "sctphe6",
            (Dataplane::Nftables, false) => "sctphn",
            (Dataplane::Nftables, true) => "sctphn6",
        };
        let node = routed::node(&format!("{role}node"), NODE).unwrap();
        let (pod, pod_veth) = if v6 {
            let pod = Netns::new(&format!("{role}pod")).unwrap();
            let veth = Veth::between(&pod, &node).unwrap();
            pod.ip(&["addr", "add", &format!("{}/64", self.pod), "dev", &veth.a, "nodad"]).unwrap();
            node.ip(&["addr", "add", &format!("{}/64", self.node_side), "dev", &veth.b, "nodad"])
                .unwrap();
            pod.ip(&["-6", "route", "add", "default", "via", &self.node_side.to_string()]).unwrap();
            node.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1"))
                .unwrap()
                .unwrap();
            (pod, veth)
        } else {
            let IpAddr::V4(ip) = self.pod else { unreachable!() };
            routed::pod(&node, NODE, &format!("{role}pod"), ip).unwrap()
        };
        let responder = sctp::Responder::start(&pod, v6).unwrap();
        let state = desired_at(self.vip, &[self.pod]);

        let pins = TestPinDir::new(role).unwrap();
        let _datapath = match dataplane {
            Dataplane::Ebpf => {
                let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
                let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
                writer.execute(&ServicePlanner::new().plan(&state)).unwrap();
                routed::attach_policy(&mut loaded.ebpf, &node, &pod_veth.b).unwrap();
                Box::new(loaded) as Box<dyn std::any::Any>
            }
            Dataplane::Nftables => {
                let mut datapath = TestDatapath::new(dataplane, &node, role).unwrap();
                datapath.apply(&state).unwrap();
                Box::new(datapath)
            }
        };

        let target = SocketAddr::new(self.vip, 80);
        for sport in [41_000, 41_001] {
            let case = format!("{dataplane:?}, {target}, port {sport}");
            let exchange = sctp::exchange(&pod, target, sport, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("{case}: {e:#}"));
            assert_eq!(exchange.reply_from, target, "{case}: the answer comes from the VIP");
            assert!(exchange.checksum_ok, "{case}: CRC32c of the translated answer");

            let seen = responder.seen();
            let tag = 0x5eed_0000 | u32::from(sport);
            let init = seen
                .iter()
                .find(|r| r.chunk_type == 1 && r.to_port == 8080 && r.initiate_tag == tag)
                .unwrap_or_else(|| panic!("{case}: the pod saw its own INIT: {seen:?}"));
            match dataplane {
                Dataplane::Ebpf => assert_eq!(
                    init.from,
                    SocketAddr::new(self.vip, sport),
                    "{case}: from the frontend address, port kept"
                ),
                // Masqueraded (fully random port) to the node's address on the pod's link.
                Dataplane::Nftables => {
                    assert_eq!(init.from.ip(), self.node_side, "{case}: {seen:?}")
                }
            }
            assert!(init.checksum_ok, "{case}: CRC32c of the translated INIT");
        }
    }
}
