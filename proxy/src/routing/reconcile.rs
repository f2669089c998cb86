//! Makes the kernel match a [`Desired`] state: diffs what the kernel has (only entries weir
//! owns: routes with [`ROUTE_PROTOCOL`], and everything on `weir.vxlan`) against the desired
//! state, removes stale entries and adds missing ones. Idempotent: a second run with the same
//! input changes nothing. Synchronous; runs in the calling thread's network namespace.
use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
};

use thiserror::Error;
use weir_cni_plugin::netlink::{Link, RT_SCOPE_UNIVERSE, Socket};

use super::{
    kernel::{self, KernelNeighbour, KernelRoute, ROUTE_PROTOCOL, VxlanParams},
    model::{Desired, Device, Overlay, VXLAN_OVERHEAD},
};

/// The VXLAN device's name.
pub const VXLAN_DEVICE: &str = "weir.vxlan";
/// VXLAN network identifier (Flannel's default too).
pub const VXLAN_VNI: u32 = 1;
/// UDP port of the VXLAN device (the Linux kernel's and Flannel's default, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "this node has no IPv4 address yet: give its Node an InternalIP or pass --node-address"
    )]
    NoLocalAddress,
    #[error(
        "no interface holds this node's address {0}; pass --overlay-uplink with the interface \
         that carries node-to-node traffic"
    )]
    NoUplink(Ipv4Addr),
    #[error("--overlay-uplink {0} does not exist in this network namespace")]
    UplinkMissing(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(io::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Netlink { what, source }
}

/// What one reconcile did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub uplink: String,
    /// MTU pods on this node should use (uplink MTU, minus the VXLAN overhead for VXLAN).
    pub pod_mtu: u32,
    /// The VTEP's MAC address (VXLAN only).
    pub vtep_mac: Option<[u8; 6]>,
    /// Kernel changes made (0 when everything was already in place).
    pub changes: usize,
    /// Routes that the kernel refused (e.g. a native route whose gateway is not on-link),
    /// with the reason; the other routes are still in place.
    pub failed: Vec<String>,
}

/// Applies `desired` for `overlay`. `uplink_override` names the uplink; otherwise it is the
/// interface holding `desired.local_address`.
pub fn reconcile(
    sock: &mut Socket,
    overlay: Overlay,
    desired: &Desired,
    uplink_override: Option<&str>,
) -> Result<Outcome, ReconcileError> {
    let local = desired.local_address.ok_or(ReconcileError::NoLocalAddress)?;
    let links = sock.links().map_err(nl("listing interfaces"))?;
    let uplink = match uplink_override {
        Some(name) => links
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| ReconcileError::UplinkMissing(name.to_string()))?,
        None => {
            let addresses = sock.all_addresses().map_err(nl("listing addresses"))?;
            let index = addresses
                .iter()
                .find(|(_, ip, _)| *ip == IpAddr::V4(local))
                .map(|(index, _, _)| *index)
                .ok_or(ReconcileError::NoUplink(local))?;
            links.iter().find(|l| l.index == index).ok_or(ReconcileError::NoUplink(local))?
        }
    };
    let mut out = Outcome { uplink: uplink.name.clone(), ..Outcome::default() };
    let existing = links.iter().find(|l| l.name == VXLAN_DEVICE);
    let vxlan_index = match overlay {
        Overlay::Vxlan => {
            out.pod_mtu = uplink.mtu.saturating_sub(VXLAN_OVERHEAD);
            let link = ensure_vxlan(sock, existing, uplink, local, out.pod_mtu, &mut out)?;
            out.vtep_mac = Some(link.mac);
            ensure_vxlan_address(sock, link.index, desired, &mut out)?;
            Some(link.index)
        }
        Overlay::None => {
            // Routing is someone else's: report the MTU, touch nothing (`--cleanup` removes
            // what an earlier overlay left).
            out.pod_mtu = uplink.mtu;
            return Ok(out);
        }
        Overlay::Native => {
            out.pod_mtu = uplink.mtu;
            if existing.is_some() {
                // Switched away from VXLAN: its routes, neighbours and FDB go with it.
                sock.delete_link(VXLAN_DEVICE).map_err(nl("deleting weir.vxlan"))?;
                out.changes += 1;
            }
            None
        }
    };
    if let Some(index) = vxlan_index {
        sync_neighbours(sock, index, desired, &mut out)?;
    }
    sync_routes(sock, desired, uplink.index, vxlan_index, &mut out)?;
    Ok(out)
}

fn ensure_vxlan(
    sock: &mut Socket,
    existing: Option<&Link>,
    uplink: &Link,
    local: Ipv4Addr,
    mtu: u32,
    out: &mut Outcome,
) -> Result<Link, ReconcileError> {
    let want = VxlanParams {
        vni: VXLAN_VNI,
        local: Some(local),
        link: Some(uplink.index),
        port: VXLAN_PORT,
        learning: false,
    };
    if let Some(link) = existing {
        if kernel::vxlan_params(link) == Some(want) {
            if link.mtu != mtu || !link.up {
                kernel::set_link(sock, link.index, mtu).map_err(nl("setting up weir.vxlan"))?;
                out.changes += 1;
            }
            return Ok(link.clone());
        }
        // Another kind, or other parameters (the node's address or uplink changed): replace.
        log::info!(
            "routing: replacing {VXLAN_DEVICE} ({:?}, want {want:?})",
            kernel::vxlan_params(link)
        );
        sock.delete_link(VXLAN_DEVICE).map_err(nl("deleting weir.vxlan"))?;
    }
    kernel::create_vxlan(sock, VXLAN_DEVICE, &want, mtu).map_err(nl("creating weir.vxlan"))?;
    let link = sock
        .links()
        .map_err(nl("listing interfaces"))?
        .into_iter()
        .find(|l| l.name == VXLAN_DEVICE)
        .ok_or_else(|| nl("finding weir.vxlan")(io::Error::from_raw_os_error(libc::ENODEV)))?;
    kernel::set_link(sock, link.index, mtu).map_err(nl("setting up weir.vxlan"))?;
    out.changes += 1;
    Ok(link)
}

/// Each local pod CIDR's network address as a host route, IPv4 first.
fn vxlan_addresses(desired: &Desired) -> Vec<(IpAddr, u8)> {
    desired.local_pod_cidrs.iter().map(|c| (c.network, c.host_prefix())).collect()
}

/// The device holds exactly `<local pod CIDR network>/32`, and `/128` for an IPv6 pod CIDR
/// (Flannel's scheme: traffic the node itself sends to remote pods gets a source address that
/// remote nodes route back). The kernel's own IPv6 link-local address is left alone.
fn ensure_vxlan_address(
    sock: &mut Socket,
    index: u32,
    desired: &Desired,
    out: &mut Outcome,
) -> Result<(), ReconcileError> {
    let want = vxlan_addresses(desired);
    let have: Vec<(IpAddr, u8)> = sock
        .addresses(index)
        .map_err(nl("listing addresses"))?
        .into_iter()
        .filter(|(ip, _)| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    for &(ip, prefix) in have.iter().filter(|a| !want.contains(a)) {
        kernel::delete_address(sock, index, ip, prefix)
            .map_err(nl(format!("removing {ip}/{prefix} from weir.vxlan")))?;
        out.changes += 1;
    }
    for &(ip, prefix) in want.iter().filter(|a| !have.contains(a)) {
        sock.add_address(index, ip, prefix, RT_SCOPE_UNIVERSE)
            .map_err(nl(format!("adding {ip}/{prefix} to weir.vxlan")))?;
        out.changes += 1;
    }
    Ok(())
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
        other => other,
    }
}

/// Deletes what `have` has beyond `want`, then adds what `want` has beyond `have`; counts
/// the changes. Deleting an entry that is already gone is fine.
fn sync_set<T: Ord + std::fmt::Debug>(
    sock: &mut Socket,
    (have, want): (&BTreeSet<T>, &BTreeSet<T>),
    what: &str,
    out: &mut Outcome,
    delete: impl Fn(&mut Socket, &T) -> io::Result<()>,
    add: impl Fn(&mut Socket, &T) -> io::Result<()>,
) -> Result<(), ReconcileError> {
    for stale in have.difference(want) {
        ignore_missing(delete(sock, stale)).map_err(nl(format!("deleting {what} {stale:?}")))?;
        out.changes += 1;
    }
    for missing in want.difference(have) {
        add(sock, missing).map_err(nl(format!("adding {what} {missing:?}")))?;
        out.changes += 1;
    }
    Ok(())
}

fn sync_neighbours(
    sock: &mut Socket,
    index: u32,
    desired: &Desired,
    out: &mut Outcome,
) -> Result<(), ReconcileError> {
    let want: BTreeSet<KernelNeighbour> =
        desired.fdb.iter().map(|f| KernelNeighbour { ip: IpAddr::V4(f.dst), mac: f.mac }).collect();
    let have: BTreeSet<KernelNeighbour> =
        kernel::fdb(sock, index).map_err(nl("listing weir.vxlan's fdb"))?.into_iter().collect();
    sync_set(
        sock,
        (&have, &want),
        "fdb entry",
        out,
        |s, e| kernel::delete_fdb(s, index, e),
        |s, e| kernel::replace_fdb(s, index, e),
    )?;
    let want: BTreeSet<KernelNeighbour> =
        desired.neighbours.iter().map(|n| KernelNeighbour { ip: n.ip, mac: n.mac }).collect();
    let have: BTreeSet<KernelNeighbour> = kernel::neighbours(sock, index)
        .map_err(nl("listing weir.vxlan's neighbours"))?
        .into_iter()
        .collect();
    // A changed MAC for the same address: the old entry is deleted, the new one added.
    sync_set(
        sock,
        (&have, &want),
        "neighbour",
        out,
        |s, e| kernel::delete_neighbour(s, index, e),
        |s, e| kernel::replace_neighbour(s, index, e),
    )
}

/// The kernel routes of `desired` (both families): on-link through `weir.vxlan` (index
/// `vxlan`, none when there is no device) or via a gateway on the uplink.
fn kernel_routes(desired: &Desired, uplink: u32, vxlan: Option<u32>) -> BTreeSet<KernelRoute> {
    desired
        .routes
        .iter()
        .filter_map(|r| {
            let (oif, onlink) = match r.device {
                Device::Vxlan => (vxlan?, true),
                Device::Uplink => (uplink, false),
            };
            Some(KernelRoute {
                dst: r.dst.network,
                prefix: r.dst.prefix,
                gateway: Some(r.gateway),
                oif: Some(oif),
                onlink,
            })
        })
        .collect()
}

fn sync_routes(
    sock: &mut Socket,
    desired: &Desired,
    uplink: u32,
    vxlan: Option<u32>,
    out: &mut Outcome,
) -> Result<(), ReconcileError> {
    let want = kernel_routes(desired, uplink, vxlan);
    let have: BTreeSet<KernelRoute> =
        kernel::routes(sock).map_err(nl("listing routes"))?.into_iter().collect();
    for stale in have.difference(&want) {
        // Replaced in place below when the same destination is still wanted.
        if want.iter().any(|w| (w.dst, w.prefix) == (stale.dst, stale.prefix)) {
            continue;
        }
        ignore_missing(kernel::delete_route(sock, stale)).map_err(nl(format!(
            "deleting route {}/{} proto {ROUTE_PROTOCOL}",
            stale.dst, stale.prefix
        )))?;
        out.changes += 1;
    }
    for missing in want.difference(&have) {
        let mut result = kernel::replace_route(sock, missing);
        // IPv6 refuses an on-link gateway that the old route of this destination reaches
        // through another device (a switch from native routing to VXLAN): delete, then add.
        if result.is_err()
            && let Some(old) =
                have.iter().find(|h| (h.dst, h.prefix) == (missing.dst, missing.prefix))
            && ignore_missing(kernel::delete_route(sock, old)).is_ok()
        {
            out.changes += 1;
            result = kernel::replace_route(sock, missing);
        }
        match result {
            Ok(()) => out.changes += 1,
            // One bad route (e.g. a native gateway not on this segment) must not block others.
            Err(err) => out.failed.push(format!(
                "route {}/{} via {:?}: {err}",
                missing.dst, missing.prefix, missing.gateway
            )),
        }
    }
    Ok(())
}

/// Removes everything weir's routing made in this namespace: `weir.vxlan` (with its
/// neighbours and forwarding entries) and every route with weir's protocol number.
pub fn remove_all(sock: &mut Socket) -> Result<usize, ReconcileError> {
    let mut removed = 0;
    if sock.delete_link(VXLAN_DEVICE).map_err(nl("deleting weir.vxlan"))? {
        removed += 1;
    }
    for route in kernel::routes(sock).map_err(nl("listing routes"))? {
        ignore_missing(kernel::delete_route(sock, &route))
            .map_err(nl(format!("deleting route {}/{}", route.dst, route.prefix)))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::routing::model::{VTEP_MAC_ANNOTATION, desired};

    fn node(name: &str, cidrs: [&str; 2], ips: [&str; 2], mac: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some([(VTEP_MAC_ANNOTATION.to_string(), mac.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.map(String::from).to_vec()),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    ips.map(|ip| NodeAddress { type_: "InternalIP".into(), address: ip.into() })
                        .to_vec(),
                ),
                ..NodeStatus::default()
            }),
        }
    }

    fn dual_stack() -> Vec<Node> {
        vec![
            node(
                "a",
                ["10.244.0.0/24", "fd00:10:244::/64"],
                ["10.0.0.1", "fd00::1"],
                "02:00:00:00:00:0a",
            ),
            node(
                "b",
                ["10.244.1.0/24", "fd00:10:244:1::/64"],
                ["10.0.0.2", "fd00::2"],
                "02:00:00:00:00:0b",
            ),
        ]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn vxlan_routes_of_both_families_are_on_link_through_the_device() {
        let d = desired(&dual_stack(), "a", Overlay::Vxlan, &[]);
        let routes: Vec<KernelRoute> = kernel_routes(&d, 2, Some(7)).into_iter().collect();
        let onlink = |dst: &str, prefix| KernelRoute {
            dst: ip(dst),
            prefix,
            gateway: Some(ip(dst)),
            oif: Some(7),
            onlink: true,
        };
        assert_eq!(routes, [onlink("10.244.1.0", 24), onlink("fd00:10:244:1::", 64)]);
        assert_eq!(vxlan_addresses(&d), [(ip("10.244.0.0"), 32), (ip("fd00:10:244::"), 128)]);
        // No device (yet): no VXLAN routes rather than routes through the wrong interface.
        assert!(kernel_routes(&d, 2, None).is_empty());
    }

    #[test]
    fn native_routes_of_both_families_go_via_the_remote_address_of_that_family() {
        let d = desired(&dual_stack(), "b", Overlay::Native, &[]);
        let routes: Vec<KernelRoute> = kernel_routes(&d, 2, None).into_iter().collect();
        let via = |dst: &str, prefix, gateway: &str| KernelRoute {
            dst: ip(dst),
            prefix,
            gateway: Some(ip(gateway)),
            oif: Some(2),
            onlink: false,
        };
        assert_eq!(
            routes,
            [via("10.244.0.0", 24, "10.0.0.1"), via("fd00:10:244::", 64, "fd00::1")]
        );
    }
}
