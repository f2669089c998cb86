//! SCTP ClusterIP from a pod, on both dataplanes. eBPF: no socket hook sees SCTP, so the
//! programs at the pod's host-side veth translate it per packet (`tc_pol_egress` sends the
//! INIT to a backend, `tc_pol_ingress` gives the INIT-ACK the frontend as its source again);
//! nftables: the node's table translates it (kube-proxy's shape). A client pod and a backend
//! pod behind one node, wired as weir-cni wires them. The kernel has no SCTP stack, so both
//! ends speak over raw sockets (tests/src/sctp.rs) and check every CRC32c they receive.
use std::{
    net::{Ipv4Addr, SocketAddr},
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
    privileged::require_root,
    routed, sctp,
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 207, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 207, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 207, 1, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);

fn desired(endpoints: &[Ipv4Addr]) -> model::ServiceState {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "amf", "namespace": "default"},
        "spec": {"clusterIP": VIP.to_string(),
                 "ports": [{"name": "ngap", "port": 80, "protocol": "SCTP"}]},
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "amf-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "amf"}},
        "addressType": "IPv4",
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
