//! Pure desired state of node-to-node pod routing: Nodes + this node's name + the overlay mode
//! -> the routes, neighbour entries and VXLAN forwarding entries this node must have. No I/O.
//!
//! Dual stack: each node's first IPv4 and first IPv6 pod CIDR are routed the same way, by the
//! same code. The underlay stays IPv4: one VTEP per node, its FDB entry points at the node's
//! IPv4 address, and IPv6 pod traffic rides the same `weir.vxlan`. Native routes of a family go
//! via the remote node's address of that family, so IPv6 pod CIDRs need an IPv6 InternalIP.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// An IPv4 or IPv6 network in canonical form (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    pub network: IpAddr,
    pub prefix: u8,
}

/// An address as (bits, left-aligned in a u128, and the family's width).
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn from_bits(like: IpAddr, value: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((value >> 96) as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

fn mask(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) }
}

impl IpCidr {
    /// `None` when `prefix` is longer than the address family allows.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let (value, width) = bits(addr);
        (prefix <= width).then(|| Self { network: from_bits(addr, value & mask(prefix)), prefix })
    }

    pub fn is_ipv6(&self) -> bool {
        self.network.is_ipv6()
    }

    /// "IPv4" or "IPv6", for messages.
    pub fn family(&self) -> &'static str {
        if self.is_ipv6() { "IPv6" } else { "IPv4" }
    }

    /// Whether `ip` is in this network (never for an address of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.is_ipv6() && bits(ip).0 & mask(self.prefix) == bits(self.network).0
    }

    pub fn overlaps(&self, other: &IpCidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    pub fn mask(&self) -> IpAddr {
        from_bits(self.network, mask(self.prefix))
    }

    /// The network address as a host route (/32 or /128).
    pub fn host_prefix(&self) -> u8 {
        bits(self.network).1
    }
}

impl FromStr for IpCidr {
    type Err = String;

    /// Parses `addr/len`; host bits must be zero, as Kubernetes requires for pod CIDRs.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a CIDR like 10.244.0.0/16 or fd00:10:244::/56");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let cidr = IpCidr::new(addr, prefix).ok_or_else(bad)?;
        if cidr.network != addr {
            return Err(format!("{s:?} has host bits set; did you mean {cidr}?"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// What routing needs to know about one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// The first IPv4 and the first IPv6 pod CIDR (`spec.podCIDRs`, else `spec.podCIDR`), in
    /// that order.
    pub pod_cidrs: Vec<IpCidr>,
    /// The underlay address: the `weir.dev/vtep-ip` annotation, else the first IPv4 InternalIP.
    pub address: Option<Ipv4Addr>,
    /// The first IPv6 InternalIP: native routes to the IPv6 pod CIDR go via it.
    pub address_v6: Option<Ipv6Addr>,
    /// The `weir.dev/vtep-mac` annotation.
    pub vtep_mac: Option<[u8; 6]>,
}

impl NodeView {
    pub fn from_node(node: &Node) -> NodeView {
        let name = node.metadata.name.clone().unwrap_or_default();
        let spec = node.spec.as_ref();
        let cidrs: Vec<IpCidr> = spec
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(spec.and_then(|s| s.pod_cidr.clone()))
            .filter_map(|c| c.parse::<IpCidr>().ok())
            .collect();
        let first_of = |v6: bool| cidrs.iter().find(|c| c.is_ipv6() == v6).copied();
        let pod_cidrs = [first_of(false), first_of(true)].into_iter().flatten().collect();
        let annotations = node.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let internal_ips: Vec<IpAddr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let address_v6 = first_v6(&internal_ips);
        let address =
            annotation(VTEP_IP_ANNOTATION).and_then(|a| a.parse().ok()).or(first_v4(&internal_ips));
        let vtep_mac = annotation(VTEP_MAC_ANNOTATION).and_then(|m| parse_mac(m));
        NodeView { name, pod_cidrs, address, address_v6, vtep_mac }
    }

    /// The node's address of `cidr`'s family: where native routes to `cidr` go.
    fn address_for(&self, cidr: &IpCidr) -> Option<IpAddr> {
        if cidr.is_ipv6() { self.address_v6.map(IpAddr::V6) } else { self.address.map(IpAddr::V4) }
    }
}

fn first_v4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

fn first_v6(ips: &[IpAddr]) -> Option<Ipv6Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    })
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
    /// `weir.vxlan` (the route is on-link: its gateway is the remote VTEP's /32 or /128).
    Vxlan,
    /// The uplink carrying this node's address.
    Uplink,
}

/// `dst via gateway dev device`; `gateway` is of `dst`'s family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpCidr,
    pub gateway: IpAddr,
    pub device: Device,
}

/// A permanent neighbour entry on `weir.vxlan`: the remote VTEP's gateway address (IPv4 or
/// IPv6) -> its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
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
    /// This node's pod CIDRs, IPv4 first (the VXLAN device gets each network address as a /32
    /// or /128).
    pub local_pod_cidrs: Vec<IpCidr>,
    /// This node's underlay address (the VTEP's local address; finds the uplink).
    pub local_address: Option<Ipv4Addr>,
    /// This node's IPv6 address (a remote node claiming it is not routed).
    pub local_address_v6: Option<Ipv6Addr>,
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
    /// Remote nodes left out, wholly or for one family, with the reason (shown in the log).
    pub skipped: BTreeMap<String, String>,
}

impl Desired {
    /// This node's pod CIDR of one family.
    pub fn local_pod_cidr(&self, v6: bool) -> Option<IpCidr> {
        self.local_pod_cidrs.iter().find(|c| c.is_ipv6() == v6).copied()
    }
}

/// What one remote pod CIDR needs: a route and, for VXLAN, the neighbour and FDB entries.
type Plan = (Route, Option<(Neighbour, Fdb)>);

/// Computes the desired state. `fallback_addresses` are this node's addresses when its Node
/// object has none of a family (the agent's `--node-address`).
pub fn desired<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    own_name: &str,
    overlay: Overlay,
    fallback_addresses: &[IpAddr],
) -> Desired {
    let mut views: Vec<NodeView> = nodes.into_iter().map(NodeView::from_node).collect();
    // Deterministic: when two nodes claim overlapping CIDRs, the first by name wins.
    views.sort_by(|a, b| a.name.cmp(&b.name));
    let own = views.iter().find(|v| v.name == own_name);
    let mut out = Desired {
        local_pod_cidrs: own.map(|v| v.pod_cidrs.clone()).unwrap_or_default(),
        local_address: own.and_then(|v| v.address).or(first_v4(fallback_addresses)),
        local_address_v6: own.and_then(|v| v.address_v6).or(first_v6(fallback_addresses)),
        ..Desired::default()
    };
    if overlay == Overlay::None {
        return out;
    }
    let mut taken: Vec<IpCidr> = out.local_pod_cidrs.clone();
    for view in views.iter().filter(|v| v.name != own_name) {
        if view.pod_cidrs.is_empty() {
            out.skipped.insert(view.name.clone(), "not routed: no pod CIDR yet".into());
            continue;
        }
        let mut failed: Vec<(IpCidr, String)> = Vec::new();
        for cidr in &view.pod_cidrs {
            match plan(view, cidr, overlay, &out, &taken) {
                Ok((route, vxlan)) => {
                    out.routes.insert(route);
                    if let Some((neighbour, fdb)) = vxlan {
                        out.neighbours.insert(neighbour);
                        out.fdb.insert(fdb);
                    }
                    taken.push(*cidr);
                }
                Err(why) => failed.push((*cidr, why)),
            }
        }
        let Some((_, first)) = failed.first() else { continue };
        // One reason for the whole node when it is the same for every family.
        let why = if failed.len() == view.pod_cidrs.len() && failed.iter().all(|(_, w)| w == first)
        {
            format!("not routed: {first}")
        } else {
            let parts: Vec<String> =
                failed.iter().map(|(cidr, why)| format!("{cidr} not routed: {why}")).collect();
            parts.join("; ")
        };
        out.skipped.insert(view.name.clone(), why);
    }
    out
}

/// The route (and VXLAN entries) to `view`'s pod CIDR `cidr`, or why there is none.
fn plan(
    view: &NodeView,
    cidr: &IpCidr,
    overlay: Overlay,
    local: &Desired,
    taken: &[IpCidr],
) -> Result<Plan, String> {
    // VXLAN reaches every family through the IPv4 underlay; native routes go via the remote
    // node's address of the pod CIDR's family.
    let (address, device) = match overlay {
        Overlay::Vxlan => (view.address.map(IpAddr::V4), Device::Vxlan),
        _ => (view.address_for(cidr), Device::Uplink),
    };
    let address = address.ok_or_else(|| match (overlay, cidr.is_ipv6()) {
        (Overlay::Native, true) => "no IPv6 InternalIP".to_string(),
        _ => "no IPv4 InternalIP or weir.dev/vtep-ip annotation".to_string(),
    })?;
    let own = [local.local_address.map(IpAddr::V4), local.local_address_v6.map(IpAddr::V6)];
    if own.contains(&Some(address)) {
        return Err("has this node's own address".into());
    }
    if let Some(other) = taken.iter().find(|t| t.overlaps(cidr)) {
        return Err(format!("pod CIDR {cidr} overlaps {other}, already routed"));
    }
    match (device, view.vtep_mac, view.address) {
        (Device::Uplink, _, _) => {
            Ok((Route { dst: *cidr, gateway: address, device: Device::Uplink }, None))
        }
        (Device::Vxlan, Some(mac), Some(underlay)) => Ok((
            Route { dst: *cidr, gateway: cidr.network, device: Device::Vxlan },
            Some((Neighbour { ip: cidr.network, mac }, Fdb { mac, dst: underlay })),
        )),
        (Device::Vxlan, _, _) => {
            Err("no weir.dev/vtep-mac annotation yet (its agent is not up)".into())
        }
    }
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
        dual_node(name, &Vec::from_iter(cidr), &Vec::from_iter(ip), mac)
    }

    /// A Node with `spec.podCIDRs` = `cidrs` and an InternalIP per entry of `ips`.
    fn dual_node(name: &str, cidrs: &[&str], ips: &[&str], mac: Option<[u8; 6]>) -> Node {
        let annotations: BTreeMap<String, String> =
            mac.map(|m| (VTEP_MAC_ANNOTATION.to_string(), format_mac(m))).into_iter().collect();
        let internal = ips
            .iter()
            .map(|ip| NodeAddress { type_: "InternalIP".into(), address: ip.to_string() });
        let hostname = NodeAddress { type_: "Hostname".into(), address: name.into() };
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidrs.first().map(|c| c.to_string()),
                pod_cidrs: (!cidrs.is_empty())
                    .then(|| cidrs.iter().map(|c| c.to_string()).collect()),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: (!ips.is_empty())
                    .then(|| std::iter::once(hostname).chain(internal).collect()),
                ..NodeStatus::default()
            }),
        }
    }

    fn cidr(s: &str) -> IpCidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
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
        let d = desired(&cluster(), "a", Overlay::Vxlan, &[]);
        assert_eq!(d.local_pod_cidrs, [cidr("10.244.0.0/24")]);
        assert_eq!(d.local_address, Some(Ipv4Addr::new(192, 168, 1, 10)));
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            [
                Route {
                    dst: cidr("10.244.1.0/24"),
                    gateway: ip("10.244.1.0"),
                    device: Device::Vxlan
                },
                Route {
                    dst: cidr("10.244.2.0/24"),
                    gateway: ip("10.244.2.0"),
                    device: Device::Vxlan
                },
            ]
        );
        assert!(d.neighbours.contains(&Neighbour { ip: ip("10.244.1.0"), mac: MAC_B }));
        assert!(d.fdb.contains(&Fdb { mac: MAC_C, dst: Ipv4Addr::new(192, 168, 1, 12) }));
        assert_eq!((d.neighbours.len(), d.fdb.len()), (2, 2));
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn native_routes_via_the_remote_node_address() {
        let d = desired(&cluster(), "b", Overlay::Native, &[]);
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            [
                Route {
                    dst: cidr("10.244.0.0/24"),
                    gateway: ip("192.168.1.10"),
                    device: Device::Uplink
                },
                Route {
                    dst: cidr("10.244.2.0/24"),
                    gateway: ip("192.168.1.12"),
                    device: Device::Uplink
                },
            ]
        );
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
    }

    #[test]
    fn overlay_none_routes_nothing_but_still_knows_the_local_node() {
        let d = desired(&cluster(), "a", Overlay::None, &[]);
        assert!(d.routes.is_empty());
        assert_eq!(d.local_pod_cidrs, [cidr("10.244.0.0/24")]);
    }

    #[test]
    fn a_deleted_node_or_changed_cidr_changes_the_state() {
        let mut nodes = cluster();
        nodes.retain(|n| n.metadata.name.as_deref() != Some("c"));
        let d = desired(&nodes, "a", Overlay::Vxlan, &[]);
        assert_eq!(d.routes.len(), 1);
        nodes[1] = node("b", Some("10.244.9.0/24"), Some("192.168.1.11"), Some(MAC_B));
        let d = desired(&nodes, "a", Overlay::Vxlan, &[]);
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
        let d = desired(&nodes, "a", Overlay::Vxlan, &[]);
        assert!(d.routes.is_empty(), "{d:?}");
        assert_eq!(d.skipped.len(), 5, "{:?}", d.skipped);
        assert!(d.skipped["b"].contains("pod CIDR"));
        assert!(d.skipped["c"].contains("InternalIP"));
        assert!(d.skipped["d"].contains("vtep-mac"));
        assert!(d.skipped["e"].contains("overlaps"));
        assert!(d.skipped["f"].contains("own address"));
        // Native routing needs no MAC.
        let d = desired(&nodes, "a", Overlay::Native, &[]);
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
        let d = desired([&a, &b], "a", Overlay::Vxlan, &[ip("fd00::10"), ip("172.16.0.10")]);
        assert_eq!(d.local_address, Some(Ipv4Addr::new(172, 16, 0, 10)));
        assert_eq!(d.local_address_v6, Some("fd00::10".parse().unwrap()));
        assert_eq!(d.fdb.iter().next().unwrap().dst, Ipv4Addr::new(172, 16, 0, 11));
    }

    fn dual_cluster() -> Vec<Node> {
        let a = ["10.244.0.0/24", "fd00:10:244::/64"];
        let b = ["fd00:10:244:1::/64", "10.244.1.0/24"];
        vec![
            dual_node("a", &a, &["192.168.1.10", "fd00:1::10"], Some([2, 0, 0, 0, 0, 0x0a])),
            dual_node("b", &b, &["fd00:1::11", "192.168.1.11"], Some(MAC_B)),
            // No IPv6 InternalIP: native routing cannot reach its IPv6 pod CIDR.
            dual_node(
                "c",
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                &["192.168.1.12"],
                Some(MAC_C),
            ),
        ]
    }

    #[test]
    fn vxlan_routes_ipv6_pod_cidrs_through_the_same_vtep_and_ipv4_underlay() {
        let d = desired(&dual_cluster(), "a", Overlay::Vxlan, &[]);
        assert_eq!(d.local_pod_cidrs, [cidr("10.244.0.0/24"), cidr("fd00:10:244::/64")]);
        assert_eq!(d.local_pod_cidr(true), Some(cidr("fd00:10:244::/64")));
        let v6: Vec<_> = d.routes.iter().filter(|r| r.dst.is_ipv6()).copied().collect();
        assert_eq!(
            v6,
            [
                Route {
                    dst: cidr("fd00:10:244:1::/64"),
                    gateway: ip("fd00:10:244:1::"),
                    device: Device::Vxlan
                },
                Route {
                    dst: cidr("fd00:10:244:2::/64"),
                    gateway: ip("fd00:10:244:2::"),
                    device: Device::Vxlan
                },
            ]
        );
        assert_eq!(d.routes.len(), 4, "{:?}", d.routes);
        assert!(d.neighbours.contains(&Neighbour { ip: ip("fd00:10:244:1::"), mac: MAC_B }));
        assert!(d.neighbours.contains(&Neighbour { ip: ip("10.244.1.0"), mac: MAC_B }));
        assert_eq!(d.neighbours.len(), 4);
        // One VTEP per node, reached over IPv4, whatever the inner family.
        let fdb: Vec<_> = d.fdb.iter().copied().collect();
        assert_eq!(
            fdb,
            [
                Fdb { mac: MAC_B, dst: Ipv4Addr::new(192, 168, 1, 11) },
                Fdb { mac: MAC_C, dst: Ipv4Addr::new(192, 168, 1, 12) }
            ]
        );
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
    }

    #[test]
    fn native_routes_ipv6_via_the_ipv6_internal_ip_and_says_when_there_is_none() {
        let d = desired(&dual_cluster(), "a", Overlay::Native, &[]);
        assert_eq!(d.local_address_v6, Some("fd00:1::10".parse().unwrap()));
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            [
                Route {
                    dst: cidr("10.244.1.0/24"),
                    gateway: ip("192.168.1.11"),
                    device: Device::Uplink
                },
                Route {
                    dst: cidr("10.244.2.0/24"),
                    gateway: ip("192.168.1.12"),
                    device: Device::Uplink
                },
                Route {
                    dst: cidr("fd00:10:244:1::/64"),
                    gateway: ip("fd00:1::11"),
                    device: Device::Uplink
                },
            ]
        );
        assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
        assert_eq!(d.skipped["c"], "fd00:10:244:2::/64 not routed: no IPv6 InternalIP");
    }

    #[test]
    fn ipv6_overlaps_and_own_addresses_are_skipped_like_ipv4_ones() {
        let mut nodes = dual_cluster();
        // e's IPv6 CIDR covers a's; f claims a's IPv6 address; g has only an IPv6 pod CIDR.
        let e = ["10.244.4.0/24", "fd00:10:244::/48"];
        nodes.push(dual_node("e", &e, &["192.168.1.14", "fd00:1::14"], Some(MAC_B)));
        let f = ["10.244.5.0/24", "fd00:10:244:5::/64"];
        nodes.push(dual_node("f", &f, &["192.168.1.15", "fd00:1::10"], Some(MAC_C)));
        nodes.push(dual_node("g", &["fd00:10:244:6::/64"], &["fd00:1::16"], None));
        let d = desired(&nodes, "a", Overlay::Native, &[]);
        assert!(d.skipped["e"].starts_with("fd00:10:244::/48 not routed: pod CIDR"), "{d:?}");
        assert!(d.skipped["e"].contains("overlaps fd00:10:244::/64"), "{d:?}");
        assert!(d.skipped["f"].contains("own address"), "{d:?}");
        let routed: BTreeSet<String> = d.routes.iter().map(|r| r.dst.to_string()).collect();
        for want in ["10.244.4.0/24", "10.244.5.0/24", "fd00:10:244:6::/64"] {
            assert!(routed.contains(want), "{want} in {routed:?}");
        }
        // Both families fail for the same reason: said once, for the node.
        let d = desired(&nodes, "a", Overlay::Vxlan, &[]);
        assert_eq!(d.skipped["g"], "not routed: no IPv4 InternalIP or weir.dev/vtep-ip annotation");
    }

    #[test]
    fn cidrs_and_macs_parse_strictly() {
        assert_eq!(cidr("10.244.1.0/24").mask(), ip("255.255.255.0"));
        assert!("10.244.1.1/24".parse::<IpCidr>().unwrap_err().contains("10.244.1.0/24"));
        assert!("10.244.1.0/33".parse::<IpCidr>().is_err());
        assert!("10.244.1.0".parse::<IpCidr>().is_err());
        assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")), "families never mix");
        assert_eq!(cidr("fd00:10:244:1::/64").mask(), ip("ffff:ffff:ffff:ffff::"));
        assert_eq!(cidr("fd00:10:244:1::/64").host_prefix(), 128);
        assert_eq!(cidr("10.244.1.0/24").host_prefix(), 32);
        assert!(cidr("fd00:10:244::/56").contains(ip("fd00:10:244:ff::1")));
        assert!(!cidr("fd00:10:244::/56").contains(ip("fd00:10:245::1")));
        assert!(cidr("fd00:10:244::/56").overlaps(&cidr("fd00:10:244:3::/64")));
        assert!(!cidr("::/0").overlaps(&cidr("10.0.0.0/8")));
        let err = "fd00:10:244:1::1/64".parse::<IpCidr>().unwrap_err();
        assert!(err.contains("did you mean fd00:10:244:1::/64"), "{err}");
        assert!("fd00::/129".parse::<IpCidr>().is_err());
        assert_eq!(parse_mac("02:00:00:00:00:0b"), Some(MAC_B));
        assert_eq!(format_mac(MAC_B), "02:00:00:00:00:0b");
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0b:01"), None);
        assert_eq!(parse_mac("02:00:00:00:00:zz"), None);
        assert_eq!("vxlan".parse(), Ok(Overlay::Vxlan));
        assert!("geneve".parse::<Overlay>().is_err());
    }
}
