//! Pure desired state of node-to-node pod routing: Nodes + this node's name + the overlay mode
//! -> the routes, neighbour entries and VXLAN forwarding entries this node must have. No I/O.
//!
//! IPv4 only for now: IPv6 pod CIDRs and addresses are ignored (and reported as skipped).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use k8s_openapi::api::core::v1::Node;

/// Annotation carrying a node's VTEP MAC (`weir.vxlan`'s address), written by its agent.
pub const VTEP_MAC_ANNOTATION: &str = "weir.dev/vtep-mac";
/// Annotation carrying the underlay address a node's VTEP and native routes use.
pub const VTEP_IP_ANNOTATION: &str = "weir.dev/vtep-ip";
/// Bytes of encapsulation VXLAN over IPv4 adds (outer IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How pod CIDRs of other nodes are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    /// The agent does not touch routing (another CNI or the cloud routes pod CIDRs).
    None,
    /// A kernel VXLAN device, `weir.vxlan`; works across any IP underlay.
    Vxlan,
    /// A route per remote pod CIDR via the remote node's address; nodes must share an L2 segment.
    Native,
}

impl FromStr for Overlay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Overlay::None),
            "vxlan" => Ok(Overlay::Vxlan),
            "native" => Ok(Overlay::Native),
            other => Err(format!("unknown overlay {other:?}: use vxlan, native or none")),
        }
    }
}

impl fmt::Display for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overlay::None => "none",
            Overlay::Vxlan => "vxlan",
            Overlay::Native => "native",
        })
    }
}

/// An IPv4 network in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// `None` when `prefix` > 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32)
            .then(|| Self { network: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    /// Parses `a.b.c.d/len`; host bits must be zero, as Kubernetes requires for pod CIDRs.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 CIDR like 10.244.0.0/16");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let cidr = Ipv4Cidr::new(addr, prefix).ok_or_else(bad)?;
        if cidr.network != addr {
            return Err(format!("{s:?} has host bits set; did you mean {cidr}?"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// What routing needs to know about one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// The first IPv4 pod CIDR (`spec.podCIDRs`, else `spec.podCIDR`).
    pub pod_cidr: Option<Ipv4Cidr>,
    /// The underlay address: the `weir.dev/vtep-ip` annotation, else the first IPv4 InternalIP.
    pub address: Option<Ipv4Addr>,
    /// The `weir.dev/vtep-mac` annotation.
    pub vtep_mac: Option<[u8; 6]>,
}

impl NodeView {
    pub fn from_node(node: &Node) -> NodeView {
        let name = node.metadata.name.clone().unwrap_or_default();
        let spec = node.spec.as_ref();
        let pod_cidr = spec
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(spec.and_then(|s| s.pod_cidr.clone()))
            .find_map(|c| c.parse::<Ipv4Cidr>().ok());
        let annotations = node.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        let address = annotation(VTEP_IP_ANNOTATION).and_then(|a| a.parse().ok()).or(internal_ip);
        let vtep_mac = annotation(VTEP_MAC_ANNOTATION).and_then(|m| parse_mac(m));
        NodeView { name, pod_cidr, address, vtep_mac }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    /// `weir.vxlan` (the route is on-link: its gateway is the remote VTEP's /32).
    Vxlan,
    /// The uplink carrying this node's address.
    Uplink,
}

/// `dst via gateway dev device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: Ipv4Cidr,
    pub gateway: Ipv4Addr,
    pub device: Device,
}

/// A permanent neighbour entry on `weir.vxlan`: the remote VTEP's gateway address -> its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// A forwarding entry on `weir.vxlan`: frames to `mac` are sent to the underlay address `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
}

/// Everything this node should have, given the Nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// This node's pod CIDR (the VXLAN device gets its network address as a /32).
    pub local_pod_cidr: Option<Ipv4Cidr>,
    /// This node's underlay address (the VTEP's local address; finds the uplink).
    pub local_address: Option<Ipv4Addr>,
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
    /// Remote nodes left out, with the reason (shown in the log).
    pub skipped: BTreeMap<String, String>,
}

/// Computes the desired state. `fallback_address` is this node's address when its Node object
/// has none (the agent's `--node-address`).
pub fn desired<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    own_name: &str,
    overlay: Overlay,
    fallback_address: Option<Ipv4Addr>,
) -> Desired {
    let mut views: Vec<NodeView> = nodes.into_iter().map(NodeView::from_node).collect();
    // Deterministic: when two nodes claim overlapping CIDRs, the first by name wins.
    views.sort_by(|a, b| a.name.cmp(&b.name));
    let own = views.iter().find(|v| v.name == own_name);
    let mut out = Desired {
        local_pod_cidr: own.and_then(|v| v.pod_cidr),
        local_address: own.and_then(|v| v.address).or(fallback_address),
        ..Desired::default()
    };
    if overlay == Overlay::None {
        return out;
    }
    let mut taken: Vec<Ipv4Cidr> = out.local_pod_cidr.into_iter().collect();
    for view in views.iter().filter(|v| v.name != own_name) {
        let skip = |out: &mut Desired, why: &str| {
            out.skipped.insert(view.name.clone(), why.to_string());
        };
        let Some(cidr) = view.pod_cidr else {
            skip(&mut out, "no IPv4 pod CIDR yet");
            continue;
        };
        let Some(address) = view.address else {
            skip(&mut out, "no IPv4 InternalIP or weir.dev/vtep-ip annotation");
            continue;
        };
        if Some(address) == out.local_address {
            skip(&mut out, "has this node's own address");
            continue;
        }
        if let Some(other) = taken.iter().find(|t| t.overlaps(&cidr)) {
            skip(&mut out, &format!("pod CIDR {cidr} overlaps {other}, already routed"));
            continue;
        }
        match overlay {
            Overlay::Vxlan => {
                let Some(mac) = view.vtep_mac else {
                    skip(&mut out, "no weir.dev/vtep-mac annotation yet (its agent is not up)");
                    continue;
                };
                out.routes.insert(Route {
                    dst: cidr,
                    gateway: cidr.network,
                    device: Device::Vxlan,
                });
                out.neighbours.insert(Neighbour { ip: cidr.network, mac });
                out.fdb.insert(Fdb { mac, dst: address });
            }
            Overlay::Native => {
                out.routes.insert(Route { dst: cidr, gateway: address, device: Device::Uplink });
            }
            Overlay::None => unreachable!("returned above"),
        }
        taken.push(cidr);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeSpec, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const MAC_C: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>, mac: Option<[u8; 6]>) -> Node {
        let annotations: BTreeMap<String, String> =
            mac.map(|m| (VTEP_MAC_ANNOTATION.to_string(), format_mac(m))).into_iter().collect();
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(Into::into),
                pod_cidrs: cidr.map(|c| vec![c.into()]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: ip.map(|ip| {
                    vec![
                        NodeAddress { type_: "Hostname".into(), address: name.into() },
                        NodeAddress { type_: "InternalIP".into(), address: ip.into() },
                    ]
                }),
                ..NodeStatus::default()
            }),
        }
    }

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    fn cluster() -> Vec<Node> {
        vec![
            node("a", Some("10.244.0.0/24"), Some("192.168.1.10"), Some([2, 0, 0, 0, 0, 0x0a])),
            node("b", Some("10.244.1.0/24"), Some("192.168.1.11"), Some(MAC_B)),
            node("c", Some("10.244.2.0/24"), Some("192.168.1.12"), Some(MAC_C)),
        ]
    }

    #[test]
    fn vxlan_gives_a_route_neighbour_and_fdb_entry_per_remote_node() {
        let d = desired(&cluster(), "a", Overlay::Vxlan, None);
        assert_eq!(d.local_pod_cidr, Some(cidr("10.244.0.0/24")));
        assert_eq!(d.local_address, Some(Ipv4Addr::new(192, 168, 1, 10)));
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            [
                Route {
                    dst: cidr("10.244.1.0/24"),
                    gateway: Ipv4Addr::new(10, 244, 1, 0),
                    device: Device::Vxlan
                },
                Route {
                    dst: cidr("10.244.2.0/24"),
                    gateway: Ipv4Addr::new(10, 244, 2, 0),
                    device: Device::Vxlan
                },
            ]
        );
        assert!(d.neighbours.contains(&Neighbour { ip: Ipv4Addr::new(10, 244, 1, 0), mac: MAC_B }));
        assert!(d.fdb.contains(&Fdb { mac: MAC_C, dst: Ipv4Addr::new(192, 168, 1, 12) }));
        assert_eq!((d.neighbours.len(), d.fdb.len()), (2, 2));
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn native_routes_via_the_remote_node_address() {
        let d = desired(&cluster(), "b", Overlay::Native, None);
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            [
                Route {
                    dst: cidr("10.244.0.0/24"),
                    gateway: Ipv4Addr::new(192, 168, 1, 10),
                    device: Device::Uplink
                },
                Route {
                    dst: cidr("10.244.2.0/24"),
                    gateway: Ipv4Addr::new(192, 168, 1, 12),
                    device: Device::Uplink
                },
            ]
        );
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
    }

    #[test]
    fn overlay_none_routes_nothing_but_still_knows_the_local_node() {
        let d = desired(&cluster(), "a", Overlay::None, None);
        assert!(d.routes.is_empty());
        assert_eq!(d.local_pod_cidr, Some(cidr("10.244.0.0/24")));
    }

    #[test]
    fn a_deleted_node_or_changed_cidr_changes_the_state() {
        let mut nodes = cluster();
        nodes.retain(|n| n.metadata.name.as_deref() != Some("c"));
        let d = desired(&nodes, "a", Overlay::Vxlan, None);
        assert_eq!(d.routes.len(), 1);
        nodes[1] = node("b", Some("10.244.9.0/24"), Some("192.168.1.11"), Some(MAC_B));
        let d = desired(&nodes, "a", Overlay::Vxlan, None);
        assert_eq!(d.routes.iter().next().unwrap().dst, cidr("10.244.9.0/24"));
    }

    #[test]
    fn incomplete_or_conflicting_nodes_are_skipped_with_a_reason() {
        let nodes = vec![
            node("a", Some("10.244.0.0/24"), Some("192.168.1.10"), None),
            node("b", None, Some("192.168.1.11"), Some(MAC_B)),
            node("c", Some("10.244.2.0/24"), None, Some(MAC_C)),
            node("d", Some("10.244.3.0/24"), Some("192.168.1.13"), None),
            node("e", Some("10.244.0.0/16"), Some("192.168.1.14"), Some(MAC_B)),
            node("f", Some("10.244.4.0/24"), Some("192.168.1.10"), Some(MAC_C)),
        ];
        let d = desired(&nodes, "a", Overlay::Vxlan, None);
        assert!(d.routes.is_empty(), "{d:?}");
        assert_eq!(d.skipped.len(), 5, "{:?}", d.skipped);
        assert!(d.skipped["b"].contains("pod CIDR"));
        assert!(d.skipped["c"].contains("InternalIP"));
        assert!(d.skipped["d"].contains("vtep-mac"));
        assert!(d.skipped["e"].contains("overlaps"));
        assert!(d.skipped["f"].contains("own address"));
        // Native routing needs no MAC.
        let d = desired(&nodes, "a", Overlay::Native, None);
        assert_eq!(d.routes.len(), 1);
    }

    #[test]
    fn annotations_override_the_internal_ip_and_the_flag_is_a_fallback() {
        let mut b = node("b", Some("10.244.1.0/24"), Some("192.168.1.11"), Some(MAC_B));
        b.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(VTEP_IP_ANNOTATION.into(), "172.16.0.11".into());
        let a = node("a", Some("10.244.0.0/24"), None, None);
        let fallback = Some(Ipv4Addr::new(172, 16, 0, 10));
        let d = desired([&a, &b], "a", Overlay::Vxlan, fallback);
        assert_eq!(d.local_address, fallback);
        assert_eq!(d.fdb.iter().next().unwrap().dst, Ipv4Addr::new(172, 16, 0, 11));
    }

    #[test]
    fn cidrs_and_macs_parse_strictly() {
        assert_eq!(cidr("10.244.1.0/24").mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!("10.244.1.1/24".parse::<Ipv4Cidr>().unwrap_err().contains("10.244.1.0/24"));
        assert!("10.244.1.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/64".parse::<Ipv4Cidr>().is_err());
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(parse_mac("02:00:00:00:00:0b"), Some(MAC_B));
        assert_eq!(format_mac(MAC_B), "02:00:00:00:00:0b");
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0b:01"), None);
        assert_eq!(parse_mac("02:00:00:00:00:zz"), None);
        assert_eq!("vxlan".parse(), Ok(Overlay::Vxlan));
        assert!("geneve".parse::<Overlay>().is_err());
    }
}
