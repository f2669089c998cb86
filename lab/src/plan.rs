//! The lab's desired shape, computed from its spec with no I/O: names, addresses, ports and
//! paths of everything `up` creates and `down` removes.
//!
//! Every name derives from the lab name, so `down` can find what a crashed `up` left behind:
//! network namespaces are `<lab>.underlay`, `<lab>.<node>` and (made by the node runtime)
//! `<lab>.<node>.<pod uid prefix>`; the cgroup is `<cgroup2>/<lab>`; pins live under
//! `/sys/fs/bpf/<lab>`.
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
};

/// The service load balancing backend the agents use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    Ebpf,
    Nftables,
}

/// How pod traffic crosses between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlay {
    Vxlan,
    Native,
}

/// The address families of pods, services and nodes (kind's `ipFamily`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    /// IPv4 and IPv6: nodes, pods and Services get an address of each family (IPv4 primary).
    Dual,
}

impl FromStr for IpFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipv4" => Ok(IpFamily::Ipv4),
            "dual" => Ok(IpFamily::Dual),
            other => Err(format!("unknown IP family {other:?}: use ipv4 or dual")),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Dual => "dual",
        })
    }
}

impl FromStr for Dataplane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ebpf" => Ok(Dataplane::Ebpf),
            "nftables" => Ok(Dataplane::Nftables),
            other => Err(format!("unknown dataplane {other:?}: use ebpf or nftables")),
        }
    }
}

impl FromStr for Overlay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(Overlay::Vxlan),
            "native" => Ok(Overlay::Native),
            other => Err(format!("unknown overlay {other:?}: use vxlan or native")),
        }
    }
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dataplane::Ebpf => "ebpf",
            Dataplane::Nftables => "nftables",
        })
    }
}

impl fmt::Display for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overlay::Vxlan => "vxlan",
            Overlay::Native => "native",
        })
    }
}

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub nodes: u8,
    pub dataplane: Dataplane,
    pub overlay: Overlay,
    /// Labs recorded before dual-stack existed are IPv4.
    #[serde(default)]
    pub ip_family: IpFamily,
}

/// Most worker nodes a lab may have (the underlay is a /24 and each node gets a /24 pod CIDR).
pub const MAX_NODES: u8 = 50;
/// The underlay network: the bridge (and the API server's listener for the nodes) is `.1`,
/// node `i` (0-based) is `.(i + 2)`, like kind's docker network.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const UNDERLAY_PREFIX: u8 = 24;
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 networks of a dual-stack lab (kind's defaults): a /64 pod CIDR per node from the
/// cluster /56, ClusterIPs from a /112, the underlay in a /64 with the same host numbers.
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
pub const UNDERLAY_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 1);
pub const UNDERLAY_PREFIX6: u8 = 64;
/// kube-dns's ClusterIP: the usual `.10` of the service CIDR.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Port of the API server inside the underlay (the nodes' view of the control plane).
pub const APISERVER_UNDERLAY_PORT: u16 = 6443;
/// kube-proxy's healthz and metrics ports, kubelet's port.
pub const AGENT_HEALTH_PORT: u16 = 10256;
pub const AGENT_METRICS_PORT: u16 = 10249;
pub const NODE_RUNTIME_PORT: u16 = 10250;
/// MTU of the underlay links; VXLAN costs 50 bytes of it.
pub const UNDERLAY_MTU: u32 = 1500;
pub const VXLAN_OVERHEAD: u32 = 50;

/// Checks the spec; the error says what to change.
pub fn validate(spec: &LabSpec) -> Result<(), String> {
    let name = &spec.name;
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty()
        || name.len() > 40
        || !name.chars().all(valid_char)
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "lab name {name:?} is not valid: use 1 to 40 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    if spec.nodes == 0 || spec.nodes > MAX_NODES {
        return Err(format!("--nodes {} is out of range: use 1 to {MAX_NODES}", spec.nodes));
    }
    Ok(())
}

/// One worker node of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlan {
    /// Kubernetes Node name (kind's style: `<lab>-worker`, `<lab>-worker2`, ...).
    pub name: String,
    /// The node's network namespace.
    pub netns: String,
    /// Prefix of the pod namespaces the node runtime creates.
    pub pod_netns_prefix: String,
    /// The node's eth0 address on the underlay.
    pub address: Ipv4Addr,
    /// Its IPv6 underlay address, in a dual-stack lab.
    pub address6: Option<Ipv6Addr>,
    /// The underlay-side end of the node's eth0 veth (inside the underlay namespace).
    pub underlay_port: String,
    /// The node's cgroup, relative to the cgroup2 mount (`<lab>/<node>`): the agent attaches
    /// socket load balancing there and the node runtime puts each pod in a child.
    pub cgroup: PathBuf,
    /// The agent's pinned maps and links.
    pub pin_dir: PathBuf,
    /// Where the node's files live (kubeconfig, CNI config and IPAM store, runtime state, logs).
    pub dir: PathBuf,
}

impl NodePlan {
    pub fn agent_health(&self) -> SocketAddr {
        SocketAddrV4::new(self.address, AGENT_HEALTH_PORT).into()
    }
    pub fn agent_metrics(&self) -> SocketAddr {
        SocketAddrV4::new(self.address, AGENT_METRICS_PORT).into()
    }
    pub fn runtime_listen(&self) -> SocketAddr {
        SocketAddrV4::new(self.address, NODE_RUNTIME_PORT).into()
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
    pub fn runtime_state(&self) -> PathBuf {
        self.dir.join("runtime")
    }
    /// The agent's `--flows-socket` (`weir flows --lab`).
    pub fn flows_socket(&self) -> PathBuf {
        self.dir.join("flows.sock")
    }
    /// MTU of the pods' interfaces.
    pub fn pod_mtu(overlay: Overlay) -> u32 {
        match overlay {
            Overlay::Vxlan => UNDERLAY_MTU - VXLAN_OVERHEAD,
            Overlay::Native => UNDERLAY_MTU,
        }
    }
}

/// Everything the lab is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabPlan {
    pub spec: LabSpec,
    pub state_dir: PathBuf,
    pub underlay_netns: String,
    pub nodes: Vec<NodePlan>,
    /// The lab's cgroup relative to the cgroup2 mount; daemons live in `<lab>/daemons`.
    pub cgroup: PathBuf,
    pub pin_root: PathBuf,
}

impl LabPlan {
    /// Prefix of every network namespace of this lab (`down` removes all of them).
    pub fn netns_prefix(&self) -> String {
        netns_prefix(&self.spec.name)
    }
    pub fn daemons_cgroup(&self) -> PathBuf {
        self.cgroup.join("daemons")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }
    pub fn apiserver_dir(&self) -> PathBuf {
        self.state_dir.join("apiserver")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    pub fn apiserver_underlay(&self) -> SocketAddr {
        SocketAddrV4::new(UNDERLAY_GATEWAY, APISERVER_UNDERLAY_PORT).into()
    }
    /// `--cluster-cidr` of the API server (its node IPAM): one CIDR per family.
    pub fn cluster_cidrs(&self) -> String {
        match self.spec.ip_family {
            IpFamily::Ipv4 => CLUSTER_CIDR.to_string(),
            IpFamily::Dual => format!("{CLUSTER_CIDR},{CLUSTER_CIDR6}"),
        }
    }
    /// `--service-cidr` of the API server: one CIDR per family.
    pub fn service_cidrs(&self) -> String {
        match self.spec.ip_family {
            IpFamily::Ipv4 => SERVICE_CIDR.to_string(),
            IpFamily::Dual => format!("{SERVICE_CIDR},{SERVICE_CIDR6}"),
        }
    }
}

/// Prefix of the network namespaces of lab `name`.
pub fn netns_prefix(name: &str) -> String {
    format!("{name}.")
}

/// kind's node names: `<lab>-worker`, `<lab>-worker2`, ...
pub fn node_name(lab: &str, index: usize) -> String {
    match index {
        0 => format!("{lab}-worker"),
        i => format!("{lab}-worker{}", i + 1),
    }
}

/// The plan for `spec`, with files under `state_dir`. The spec must be valid.
pub fn plan(spec: &LabSpec, state_dir: &Path) -> LabPlan {
    let lab = &spec.name;
    let cgroup = PathBuf::from(lab);
    let pin_root = PathBuf::from("/sys/fs/bpf").join(lab);
    let nodes = (0..usize::from(spec.nodes))
        .map(|i| {
            let name = node_name(lab, i);
            let netns = format!("{lab}.{}", short_node(i));
            let [a, b, c, _] = UNDERLAY_GATEWAY.octets();
            let host = 2 + i as u16;
            NodePlan {
                pod_netns_prefix: format!("{netns}."),
                address: Ipv4Addr::new(a, b, c, host as u8),
                address6: (spec.ip_family == IpFamily::Dual).then(|| {
                    let mut segments = UNDERLAY_GATEWAY6.segments();
                    segments[7] = host;
                    Ipv6Addr::from(segments)
                }),
                underlay_port: format!("node{i}"),
                cgroup: cgroup.join(short_node(i)),
                pin_dir: pin_root.join(short_node(i)),
                dir: state_dir.join("nodes").join(&name),
                name,
                netns,
            }
        })
        .collect();
    LabPlan {
        spec: spec.clone(),
        state_dir: state_dir.to_path_buf(),
        underlay_netns: format!("{lab}.underlay"),
        nodes,
        cgroup,
        pin_root,
    }
}

fn short_node(index: usize) -> String {
    format!("worker{}", index + 1)
}

/// The CNI network configuration list for a node with `pod_cidrs` (one range per family).
pub fn cni_conflist(plan: &LabPlan, node: &NodePlan, pod_cidrs: &[String]) -> serde_json::Value {
    let ranges: Vec<serde_json::Value> =
        pod_cidrs.iter().map(|cidr| serde_json::json!([{ "subnet": cidr }])).collect();
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "weir",
        "plugins": [{
            "type": "weir-cni",
            "mtu": NodePlan::pod_mtu(plan.spec.overlay),
            "bpffsDir": node.pin_dir,
            "dns": {
                "nameservers": [CLUSTER_DNS.to_string()],
                "search": [format!("svc.{CLUSTER_DOMAIN}"), CLUSTER_DOMAIN.to_string()],
            },
            "ipam": {
                "ranges": ranges,
                "dataDir": node.dir.join("ipam"),
            }
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, nodes: u8) -> LabSpec {
        LabSpec {
            name: name.into(),
            nodes,
            dataplane: Dataplane::Ebpf,
            overlay: Overlay::Vxlan,
            ip_family: IpFamily::Ipv4,
        }
    }

    #[test]
    fn names_and_addresses_derive_from_the_lab_name() {
        let plan = plan(&spec("weir", 2), Path::new("/var/lib/weir/lab"));
        assert_eq!(plan.underlay_netns, "weir.underlay");
        let names: Vec<_> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["weir-worker", "weir-worker2"]);
        assert_eq!(plan.nodes[1].netns, "weir.worker2");
        assert_eq!(plan.nodes[1].pod_netns_prefix, "weir.worker2.");
        assert_eq!(plan.nodes[0].address, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(plan.nodes[1].address, Ipv4Addr::new(172, 30, 0, 3));
        assert_eq!(plan.nodes[1].cgroup, PathBuf::from("weir/worker2"));
        assert_eq!(plan.nodes[0].pin_dir, PathBuf::from("/sys/fs/bpf/weir/worker1"));
        assert_eq!(
            plan.nodes[1].flows_socket(),
            PathBuf::from("/var/lib/weir/lab/nodes/weir-worker2/flows.sock")
        );
        assert!(plan.nodes.iter().all(|n| n.netns.starts_with(&plan.netns_prefix())));
        assert!(plan.underlay_netns.starts_with(&plan.netns_prefix()));
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let plan = plan(&spec("weir", MAX_NODES), Path::new("/x"));
        assert!(plan.nodes.iter().all(|n| n.underlay_port.len() <= 15));
    }

    #[test]
    fn bad_specs_say_what_to_change() {
        assert!(validate(&spec("Weir", 2)).unwrap_err().contains("lowercase"));
        assert!(validate(&spec("a.b", 2)).is_err());
        assert!(validate(&spec("", 2)).is_err());
        assert!(validate(&spec("weir", 0)).unwrap_err().contains("1 to 50"));
        assert!(validate(&spec("weir", 51)).is_err());
        assert!(validate(&spec("weir", 3)).is_ok());
    }

    #[test]
    fn vxlan_pods_leave_room_for_the_encapsulation() {
        assert_eq!(NodePlan::pod_mtu(Overlay::Vxlan), 1450);
        assert_eq!(NodePlan::pod_mtu(Overlay::Native), 1500);
        let plan = plan(&spec("weir", 1), Path::new("/s"));
        let conf = cni_conflist(&plan, &plan.nodes[0], &["10.244.1.0/24".into()]);
        assert_eq!(conf["plugins"][0]["mtu"], 1450);
        assert_eq!(conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(conf["plugins"][0]["bpffsDir"], "/sys/fs/bpf/weir/worker1");
    }

    #[test]
    fn a_dual_stack_lab_has_a_network_of_each_family() {
        let single = plan(&spec("weir", 2), Path::new("/s"));
        assert_eq!(single.nodes[1].address6, None);
        assert_eq!(
            (single.cluster_cidrs().as_str(), single.service_cidrs().as_str()),
            (CLUSTER_CIDR, SERVICE_CIDR)
        );
        let dual = plan(&LabSpec { ip_family: IpFamily::Dual, ..spec("weir", 2) }, Path::new("/s"));
        assert_eq!(dual.nodes[1].address6, Some("fd00:172:30::3".parse().unwrap()));
        assert_eq!(dual.cluster_cidrs(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!(dual.service_cidrs(), "10.96.0.0/12,fd00:10:96::/112");
        let cidrs = ["10.244.1.0/24".to_string(), "fd00:10:244:1::/64".to_string()];
        let conf = cni_conflist(&dual, &dual.nodes[0], &cidrs);
        assert_eq!(conf["plugins"][0]["ipam"]["ranges"][1][0]["subnet"], "fd00:10:244:1::/64");
        // A lab recorded before dual-stack existed reads back as IPv4.
        let old: LabSpec = serde_json::from_value(serde_json::json!({
            "name": "weir", "nodes": 1, "dataplane": "ebpf", "overlay": "vxlan"
        }))
        .unwrap();
        assert_eq!(old.ip_family, IpFamily::Ipv4);
    }
}
