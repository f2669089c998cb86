//! SCTP from the node's own processes to a ClusterIP, on both dataplanes, IPv4 and IPv6. No
//! socket hook sees SCTP, so on eBPF the uplink's `tc_host_sctp_out` translates the node's
//! packet (it follows the VIP's route: the default route out of the uplink) and redirects it
//! where the backend's route goes; the answer becomes the frontend's on the local pod's veth
//! (`tc_pol_egress`) or on the uplink's ingress (`tc_host_sctp_in`). nftables: the node's table
//! translates it in its output hook (kube-proxy's shape).
//!
//! Four namespaces per case: the node, a pod behind it (the local backend), and over the
//! node's uplink a second node with a pod of its own (the remote backend), reached by the
//! node's default route or over a VXLAN overlay. Also: the local pod's ingress policy still
//! judges the node's packet, and a frontend without endpoints refuses it at once. The kernel has no SCTP stack, so the node's process and the backends
//! speak over raw sockets (tests/src/sctp.rs) and check every CRC32c they receive.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use weir_common::{metrics::Counter, policy::IpcacheValue};
use weir_policy::identity::IDENTITY_HOST;
use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::{ServiceMaps, read_counters},
    model::{self, NodeContext},
    policy::{DatapathPolicy, PolicyMaps, lower},
    programs::{self, Attached, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    dataplane::{Dataplane, TestDatapath, for_each_dataplane},
    names,
    netns::{Netns, Veth},
    packet::{sctp_init_chunk, sctp_segment},
    privileged::require_root,
    routed, sctp,
};

/// The addresses of one family.
struct Plan {
    /// Node uplink, second node's uplink.
    node: IpAddr,
    remote_node: IpAddr,
    /// The node's side of the local pod's link, the local pod.
    node_pod_side: IpAddr,
    local_pod: IpAddr,
    /// The second node's side of its pod's link, its pod.
    remote_pod_side: IpAddr,
    remote_pod: IpAddr,
    /// Frontends whose one endpoint is the local pod, the remote pod.
    vip_local: IpAddr,
    vip_remote: IpAddr,
    /// A frontend without endpoints.
    vip_empty: IpAddr,
    prefix: u8,
}

fn v4() -> Plan {
    let ip = |s: &str| s.parse().unwrap();
    Plan {
        node: ip("10.211.0.1"),
        remote_node: ip("10.211.0.2"),
        node_pod_side: ip("10.211.1.1"),
        local_pod: ip("10.211.1.2"),
        remote_pod_side: ip("10.211.2.1"),
        remote_pod: ip("10.211.2.2"),
        vip_local: ip("10.96.11.1"),
        vip_remote: ip("10.96.11.2"),
        vip_empty: ip("10.96.11.3"),
        prefix: 24,
    }
}

fn v6() -> Plan {
    let ip = |s: &str| s.parse().unwrap();
    Plan {
        node: ip("fd00:211::1"),
        remote_node: ip("fd00:211::2"),
        node_pod_side: ip("fd00:211:1::1"),
        local_pod: ip("fd00:211:1::2"),
        remote_pod_side: ip("fd00:211:2::1"),
        remote_pod: ip("fd00:211:2::2"),
        vip_local: ip("fd00:96::11:1"),
        vip_remote: ip("fd00:96::11:2"),
        vip_empty: ip("fd00:96::11:3"),
        prefix: 64,
    }
}

/// The SCTP service `ngap-<n>` (port 80 -> 8080) at `vip`, its one endpoint at `endpoint`.
fn service(n: usize, vip: IpAddr, endpoint: IpAddr) -> (Service, EndpointSlice) {
    let family = if vip.is_ipv6() { "IPv6" } else { "IPv4" };
    let name = format!("ngap-{n}");
    let service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip.to_string(), "ipFamilies": [family],
                 "ports": [{"name": "ngap", "port": 80, "protocol": "SCTP"}]},
    }))
    .unwrap();
    let slice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": family,
        "ports": [{"name": "ngap", "port": 8080, "protocol": "SCTP"}],
        "endpoints": [{"addresses": [endpoint.to_string()], "conditions": {"ready": true}}],
    }))
    .unwrap();
    (service, slice)
}

/// The two services of `plan`, and a third one without endpoints at `plan.vip_empty`.
fn desired(plan: &Plan) -> model::ServiceState {
    let (a, a_slice) = service(1, plan.vip_local, plan.local_pod);
    let (b, b_slice) = service(2, plan.vip_remote, plan.remote_pod);
    let (c, mut c_slice) = service(3, plan.vip_empty, plan.remote_pod);
    c_slice.endpoints.clear();
    let context = NodeContext { name: "node-a".into(), addresses: vec![plan.node] };
    model::build([&a, &b, &c], [&a_slice, &b_slice, &c_slice], &context)
}

/// The namespaces of one case; everything goes away with them.
struct Net {
    node: Netns,
    /// The node's end of its uplink and of the local pod's link.
    uplink: String,
    pod_link: String,
    local_pod: Netns,
    remote_node: Netns,
    /// The second node's end of the uplink.
    remote_uplink: String,
    remote_pod: Netns,
}

impl Net {
    fn new(role: &str, plan: &Plan) -> Self {
        let v6 = plan.node.is_ipv6();
        let node = Netns::new(&format!("{role}n")).unwrap();
        let local_pod = Netns::new(&format!("{role}p")).unwrap();
        let remote_node = Netns::new(&format!("{role}r")).unwrap();
        let remote_pod = Netns::new(&format!("{role}q")).unwrap();
        let uplink = Veth::between(&node, &remote_node).unwrap();
        let pod_link = Veth::between(&node, &local_pod).unwrap();
        let remote_link = Veth::between(&remote_node, &remote_pod).unwrap();
        let add = |ns: &Netns, addr: IpAddr, dev: &str| {
            let address = format!("{addr}/{}", plan.prefix);
            let nodad: &[&str] = if v6 { &["nodad"] } else { &[] };
            ns.ip(&[&["addr", "add", &address, "dev", dev][..], nodad].concat()).unwrap();
        };
        add(&node, plan.node, &uplink.a);
        add(&remote_node, plan.remote_node, &uplink.b);
        add(&node, plan.node_pod_side, &pod_link.a);
        add(&local_pod, plan.local_pod, &pod_link.b);
        add(&remote_node, plan.remote_pod_side, &remote_link.a);
        add(&remote_pod, plan.remote_pod, &remote_link.b);
        let family = if v6 { "-6" } else { "-4" };
        let default_via = |ns: &Netns, gateway: IpAddr| {
            ns.ip(&[family, "route", "add", "default", "via", &gateway.to_string()]).unwrap();
        };
        // The node reaches the service range (and the second node's pods) by its default
        // route, out of the uplink: the VIPs are routed like any other remote address.
        default_via(&node, plan.remote_node);
        default_via(&local_pod, plan.node_pod_side);
        default_via(&remote_pod, plan.remote_pod_side);
        for ns in [&node, &remote_node] {
            let forwarding = if v6 {
                "/proc/sys/net/ipv6/conf/all/forwarding"
            } else {
                "/proc/sys/net/ipv4/ip_forward"
            };
            ns.run(|| std::fs::write(forwarding, "1")).unwrap().unwrap();
        }
        // Strict reverse-path filtering on the node (some distributions' default): a packet
        // from an address must arrive on the interface the node routes that address by.
        node.run(|| std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "1")).unwrap().unwrap();
        Self {
            node,
            uplink: uplink.a.clone(),
            pod_link: pod_link.a.clone(),
            local_pod,
            remote_node,
            remote_uplink: uplink.b.clone(),
            remote_pod,
        }
    }

    /// Puts the two nodes' pods on a VXLAN overlay, as the agent's `--overlay vxlan` does
    /// (`weir.vxlan`, Flannel's scheme; IPv4): per node a VXLAN device over the uplink holding
    /// its pod network's first address, and the other node's pod network routed through it
    /// (route via that network's first address, on-link; its permanent neighbour; the FDB
    /// entry to the other node's uplink address). Returns the node's device.
    fn vxlan(&self, plan: &Plan) -> String {
        let (IpAddr::V4(node), IpAddr::V4(remote)) = (plan.node, plan.remote_node) else {
            panic!("the overlay runs over an IPv4 underlay");
        };
        let network = |pod: IpAddr| {
            let IpAddr::V4(pod) = pod else { unreachable!() };
            let [a, b, c, _] = pod.octets();
            std::net::Ipv4Addr::new(a, b, c, 0)
        };
        let ends = [
            (&self.node, node, &self.uplink, network(plan.local_pod)),
            (&self.remote_node, remote, &self.remote_uplink, network(plan.remote_pod)),
        ];
        let mut devices = Vec::new();
        for (ns, local, uplink, own) in ends {
            let device = names::interface('x');
            let local = local.to_string();
            ns.ip(&[
                "link",
                "add",
                &device,
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                uplink,
                "dstport",
                "8472",
                "nolearning",
            ])
            .unwrap();
            ns.ip(&["addr", "add", &format!("{own}/32"), "dev", &device]).unwrap();
            // No IPv6 link-local address: nothing but the test's packets crosses the device.
            ns.ip(&["link", "set", &device, "addrgenmode", "none"]).unwrap();
            ns.ip(&["link", "set", &device, "up"]).unwrap();
            let brief = ns.ip(&["-br", "link", "show", "dev", &device]).unwrap();
            let mac = brief.split_whitespace().nth(2).unwrap().to_string();
            devices.push((device, mac, own));
        }
        for (i, (ns, _, _, _)) in ends.iter().enumerate() {
            let (device, _, _) = &devices[i];
            let (_, peer_mac, peer_network) = &devices[1 - i];
            let peer_underlay = if i == 0 { remote } else { node }.to_string();
            let gateway = peer_network.to_string();
            ns.ip(&[
                "route",
                "add",
                &format!("{peer_network}/24"),
                "via",
                &gateway,
                "dev",
                device,
                "onlink",
            ])
            .unwrap();
            ns.ip(&[
                "neigh",
                "add",
                &gateway,
                "lladdr",
                peer_mac,
                "dev",
                device,
                "nud",
                "permanent",
            ])
            .unwrap();
            let fdb = [
                "fdb",
                "append",
                peer_mac,
                "dst",
                &peer_underlay,
                "dev",
                device,
                "self",
                "permanent",
            ];
            let bridge = std::process::Command::new("bridge")
                .args([&["-n", ns.name()][..], &fdb[..]].concat())
                .status()
                .unwrap();
            assert!(bridge.success(), "bridge {fdb:?}");
        }
        devices.swap_remove(0).0
    }

    /// The eBPF datapath as the agent sets it up on this node: the service maps, the uplink's
    /// programs (the per-packet load balancer and the node's own SCTP) and the policy
    /// programs on the local pod's veth.
    /// The datapath of `dataplane` serving `plan`'s service on this node, kept alive by the
    /// box.
    fn datapath(&self, plan: &Plan, dataplane: Dataplane, role: &str) -> Box<dyn std::any::Any> {
        match dataplane {
            Dataplane::Ebpf => Box::new(self.ebpf(plan, role)),
            Dataplane::Nftables => {
                let mut datapath = TestDatapath::new(dataplane, &self.node, role).unwrap();
                datapath.apply(&desired(plan)).unwrap();
                Box::new(datapath)
            }
        }
    }

    fn ebpf(&self, plan: &Plan, role: &str) -> (aya::Ebpf, TestPinDir) {
        let pins = TestPinDir::new(role).unwrap();
        let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
        let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
        writer.execute(&ServicePlanner::new().plan(&desired(plan))).unwrap();
        let ebpf = &mut loaded.ebpf;
        let uplink = self.uplink.clone();
        let (lb, host) = self
            .node
            .run(move || {
                let lb = programs::attach_tc_lb(ebpf, &uplink, None)?;
                let host = programs::attach_host_sctp(ebpf, &uplink, None)?;
                Ok::<_, programs::LoadError>((lb, host))
            })
            .unwrap()
            .unwrap();
        let fresh = Attached { attached: 2, adopted: 0 };
        assert_eq!((lb, host), (fresh, fresh));
        routed::attach_policy(&mut loaded.ebpf, &self.node, &self.pod_link).unwrap();
        (loaded.ebpf, pins)
    }
}

/// One INIT from the node to `vip`:80 from `sport`: the INIT-ACK comes from the VIP with a
/// valid CRC32c, and `backend` saw the INIT at port 8080 from the node's uplink address
/// (`source`: no SNAT on either dataplane), with a valid CRC32c.
fn exchange(
    case: &str,
    net: &Net,
    vip: IpAddr,
    sport: u16,
    backend: &sctp::Responder,
    source: IpAddr,
) {
    let target = SocketAddr::new(vip, 80);
    let exchange = sctp::exchange(&net.node, target, sport, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
    assert_eq!(exchange.reply_from, target, "{case}: the INIT-ACK comes from the VIP");
    assert!(exchange.checksum_ok, "{case}: CRC32c of the answer the node got");
    let seen = backend.seen();
    let tag = 0x5eed_0000 | u32::from(sport);
    let init = seen
        .iter()
        .find(|r| r.chunk_type == 1 && r.initiate_tag == tag)
        .unwrap_or_else(|| panic!("{case}: the backend saw no INIT: {seen:?}"));
    assert_eq!(init.to_port, 8080, "{case}: sent to the target port");
    assert!(init.checksum_ok, "{case}: CRC32c of the translated INIT");
    assert_eq!(init.from, SocketAddr::new(source, sport), "{case}: from the node, no SNAT");
}

/// A unique-name role for a case: `base`, the dataplane's letter, `6` for IPv6.
fn role(base: &str, dataplane: Dataplane, v6: bool) -> String {
    let letter = match dataplane {
        Dataplane::Ebpf => "e",
        Dataplane::Nftables => "n",
    };
    format!("{base}{letter}{}", if v6 { "6" } else { "" })
}

#[test]
fn lb_sctp_node_cluster_ip_from_the_node_reaches_local_and_remote_backends() {
    require_root();
    for plan in [v4(), v6()] {
        for_each_dataplane(|dataplane| {
            let v6 = plan.node.is_ipv6();
            let role = &role("sctpn", dataplane, v6);
            let net = Net::new(role, &plan);
            let local = sctp::Responder::start(&net.local_pod, v6).unwrap();
            let remote = sctp::Responder::start(&net.remote_pod, v6).unwrap();
            let _datapath = net.datapath(&plan, dataplane, role);
            for sport in [42_000, 42_001] {
                let case = format!("{dataplane:?}, port {sport}");
                exchange(
                    &format!("{case}, local pod"),
                    &net,
                    plan.vip_local,
                    sport,
                    &local,
                    plan.node,
                );
                exchange(
                    &format!("{case}, remote pod"),
                    &net,
                    plan.vip_remote,
                    sport,
                    &remote,
                    plan.node,
                );
            }
        });
    }
}

/// The node's packet redirected to a local pod's veth still meets the pod's ingress policy
/// (`tc_pol_ingress` on the veth's tc egress): while the policy drops addresses it does not
/// know, the INIT is dropped there; once the node's address is the host identity (as the
/// agent writes it), the association is allowed, and its answer passes as a reply.
#[test]
fn lb_sctp_node_to_a_local_pod_meets_the_pods_ingress_policy() {
    require_root();
    let plan = v4();
    let net = Net::new("sctpnp", &plan);
    let local = sctp::Responder::start(&net.local_pod, false).unwrap();
    let (mut ebpf, _pins) = net.ebpf(&plan, "sctpnp");
    let mut policy = PolicyMaps::take(&mut ebpf).unwrap();
    policy.set_deny_unknown(true).unwrap();

    let not_ready = |ebpf: &aya::Ebpf| {
        let counters = read_counters(ebpf).unwrap();
        counters.iter().find(|(c, _)| *c == Counter::DropPolicyNotReady).unwrap().1
    };
    let target = SocketAddr::new(plan.vip_local, 80);
    let denied = sctp::exchange(&net.node, target, 43_000, Duration::from_secs(1));
    assert!(denied.is_err(), "the pod's ingress policy let the node in: {denied:?}");
    assert!(not_ready(&ebpf) >= 1, "dropped by tc_pol_ingress on the pod's veth");
    assert!(local.seen().is_empty(), "the pod saw nothing: {:?}", local.seen());

    let mut host = DatapathPolicy::default();
    host.ipcache.insert(
        (lower::HOST_BITS, lower::addr(plan.node)),
        IpcacheValue { identity: IDENTITY_HOST, cidr_class: 0 },
    );
    policy.apply(&DatapathPolicy::default(), &host).unwrap();
    exchange("host identity", &net, plan.vip_local, 43_001, &local, plan.node);
}

/// The same over a VXLAN overlay (IPv4): the translated packet to the other node's pod is
/// redirected to the VXLAN device (the backend's route), and the pod's answer, addressed to
/// the node's uplink address, comes back over the underlay to the uplink's ingress
/// (`tc_host_sctp_in`; nothing is needed on the VXLAN device), with strict reverse-path
/// filtering on the node.
#[test]
fn lb_sctp_node_cluster_ip_from_the_node_over_a_vxlan_overlay() {
    require_root();
    let plan = v4();
    for_each_dataplane(|dataplane| {
        let role = &role("sctpnx", dataplane, false);
        let net = Net::new(role, &plan);
        let device = net.vxlan(&plan);
        if dataplane == Dataplane::Nftables {
            // The answer comes by the underlay from the pod's address, which the node routes
            // through the overlay: strict reverse-path filtering drops it before conntrack
            // turns it into the frontend's (eBPF translates it on the uplink's tc ingress,
            // before the check).
            let loose = || std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "2");
            net.node.run(loose).unwrap().unwrap();
        }
        let remote = sctp::Responder::start(&net.remote_pod, false).unwrap();
        let _datapath = net.datapath(&plan, dataplane, role);
        let case = format!("{dataplane:?}, over VXLAN");
        let sent = || {
            let stats = net.node.ip(&["-j", "-s", "link", "show", "dev", &device]).unwrap();
            let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
            stats[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
        };
        let before = sent();
        exchange(&case, &net, plan.vip_remote, 44_000, &remote, plan.node);
        assert!(sent() > before, "{case}: the INIT went through the overlay");
    });
}

/// A frontend without endpoints refuses the node's SCTP at once: on eBPF the INIT becomes an
/// ICMP port unreachable (ICMPv6 for IPv6) from the frontend, handed into the node; on
/// nftables the output hook's reject fails the send itself.
#[test]
fn lb_sctp_node_to_a_frontend_without_endpoints_is_refused() {
    require_root();
    for plan in [v4(), v6()] {
        for_each_dataplane(|dataplane| {
            let v6 = plan.node.is_ipv6();
            let role = &role("sctpnr", dataplane, v6);
            let net = Net::new(role, &plan);
            let _datapath = net.datapath(&plan, dataplane, role);
            let outcome = port_unreachable(&net.node, SocketAddr::new(plan.vip_empty, 80));
            let case = format!("{dataplane:?}, {}", plan.vip_empty);
            match dataplane {
                Dataplane::Ebpf => {
                    assert!(outcome.unwrap(), "{case}: an ICMP port unreachable from the VIP")
                }
                Dataplane::Nftables => {
                    let error = outcome.expect_err("the send fails").root_cause().to_string();
                    let eperm = std::io::Error::from_raw_os_error(libc::EPERM).to_string();
                    assert_eq!(error, eperm, "{case}: refused in the output hook");
                }
            }
        });
    }
}

/// Sends one INIT from `ns` to `target`; `Ok(true)` when an ICMP port unreachable (ICMPv6
/// for IPv6) from `target`'s address came back within 3 s, `Err` when the send failed.
fn port_unreachable(ns: &Netns, target: SocketAddr) -> anyhow::Result<bool> {
    let v6 = target.is_ipv6();
    let (family, protocol) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_ICMP)
    };
    let icmp = ns.run(|| {
        // SAFETY: plain socket(2) call; the descriptor is owned right away.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })??;
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: setsockopt with a correctly sized timeval.
    let rc = unsafe {
        libc::setsockopt(
            icmp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    anyhow::ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    let init = sctp_segment(45_000, target.port(), 0, &sctp_init_chunk(0x5eed_0001));
    sctp::RawSctp::open(ns, v6)?.send(target.ip(), &init)?;
    for _ in 0..30 {
        let mut buf = [0u8; 1500];
        // SAFETY: zeroed sockaddr_storage is a valid out-parameter.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        // SAFETY: the buffer and the address are valid for the lengths given.
        let got = unsafe {
            libc::recvfrom(
                icmp.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        let Ok(got) = usize::try_from(got) else { continue };
        let packet = &buf[..got];
        // IPv4 raw sockets deliver the IP header too; IPv6 ones only the ICMPv6 message.
        let (source, message): (IpAddr, &[u8]) = if v6 {
            // SAFETY: the kernel filled a sockaddr_in6 for an AF_INET6 socket.
            let sin6 =
                unsafe { &*(&from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            (IpAddr::from(sin6.sin6_addr.s6_addr), packet)
        } else {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let source: [u8; 4] = packet[12..16].try_into()?;
            (IpAddr::from(source), &packet[ihl..])
        };
        let unreachable = if v6 { [1, 4] } else { [3, 3] };
        if source == target.ip() && message.get(..2) == Some(&unreachable[..]) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The uplink programs as the agent attaches them: pinned as bpf links in the pin directory's
/// `links/`, so the node's SCTP keeps being translated while no agent runs (the object that
/// attached them is gone), and a restarted agent adopts them instead of attaching them twice.
#[test]
fn lb_sctp_node_programs_outlive_the_agent_and_are_adopted() {
    require_root();
    let plan = v4();
    let net = Net::new("sctpna", &plan);
    let remote = sctp::Responder::start(&net.remote_pod, false).unwrap();
    let pins = TestPinDir::new("sctpna").unwrap();
    let links = pins.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let agent = |program_services: bool| {
        let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
        if program_services {
            let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
            writer.execute(&ServicePlanner::new().plan(&desired(&plan))).unwrap();
        }
        let (ebpf, uplink, links) = (&mut loaded.ebpf, net.uplink.clone(), links.clone());
        let attached = net
            .node
            .run(move || {
                programs::attach_tc_lb(ebpf, &uplink, Some(&links))?;
                programs::attach_host_sctp(ebpf, &uplink, Some(&links))
            })
            .unwrap()
            .unwrap();
        (loaded, attached)
    };

    let (first, attached) = agent(true);
    assert_eq!(attached, Attached { attached: 2, adopted: 0 });
    for name in [programs::TC_HOST_SCTP_OUT, programs::TC_HOST_SCTP_IN] {
        let pin = links.join(format!("{name}@{}", net.uplink));
        assert!(pin.exists(), "{} is pinned", pin.display());
    }
    drop(first);
    exchange("no agent", &net, plan.vip_remote, 46_000, &remote, plan.node);

    let (_second, attached) = agent(false);
    assert_eq!(attached, Attached { attached: 0, adopted: 2 });
    exchange("restarted agent", &net, plan.vip_remote, 46_001, &remote, plan.node);
}
