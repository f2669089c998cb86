//! Routed pod wiring (../shared/DESIGN.md, "Pod wiring").
//!
//! For an attachment (container ID + ifname) with addresses A (IPv4) and/or B (IPv6):
//! - a veth pair: `weir<11 hex>` in the node's namespace (the name is a hash of the attachment,
//!   so DEL and GC find it without state) and `ifname` created directly in the pod's namespace;
//!   links are never moved between namespaces;
//! - pod side: `A/32`, `B/128` (no DAD), default routes via 169.254.1.1 / fe80::1 on-link, and
//!   permanent neighbour entries for both gateways pointing at the host side's MAC (no ARP/ND
//!   round trip before the first packet);
//! - node side: the gateway addresses 169.254.1.1/32 and fe80::1/64 on the host veth (so the
//!   pod can reach its gateway; the same link-local address on every host veth is fine), routes
//!   `A/32 dev host-veth` and `B/128 dev host-veth`, and permanent neighbour entries for the pod
//!   addresses; IP forwarding on.
//!
//! Contract: [`add`] either completes or removes the veth it created before returning the
//! error; it never touches a link it did not create. [`del`] is idempotent.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    error::CniError,
    netlink::{self, Link, Socket},
    netns,
};

pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Every host-side veth has this MAC (as in Calico): the pod's gateway neighbour entry is the
/// same everywhere, and the MAC says "weir host veth" in packet captures.
pub const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
pub const DEFAULT_MTU: u32 = 1500;

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    fnv1a(format!("{container_id}/{ifname}").as_bytes())
}

/// Every host-side veth's name starts with this.
pub const HOST_IFNAME_PREFIX: &str = "weir";

/// The host-side interface name of an attachment: `weir` + 11 hex digits (15 bytes).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!("{HOST_IFNAME_PREFIX}{:011x}", attachment_hash(container_id, ifname) & 0xfff_ffff_ffff)
}

/// Whether `name` has the form of a host-side veth name.
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == 15
        && name.starts_with(HOST_IFNAME_PREFIX)
        && name[HOST_IFNAME_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// A locally administered unicast MAC for the pod side, stable per attachment.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = attachment_hash(container_id, ifname).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn gateway_for(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() { IpAddr::V4(GATEWAY_V4) } else { IpAddr::V6(GATEWAY_V6) }
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn netlink_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CniError {
    let what = what.into();
    move |e| CniError::io(what, e)
}

/// What [`add`] made.
#[derive(Debug, Clone)]
pub struct Wired {
    pub host: Link,
    pub pod_mac: [u8; 6],
    pub pod_index: u32,
    pub mtu: u32,
}

/// The MTU of the interface carrying the node's default route, or 1500.
pub fn uplink_mtu(node: &mut Socket) -> u32 {
    let oif = node
        .routes(libc::AF_INET as u8)
        .ok()
        .and_then(|routes| routes.into_iter().find(|r| r.prefix == 0).and_then(|r| r.oif));
    let Some(oif) = oif else { return DEFAULT_MTU };
    node.links()
        .ok()
        .and_then(|links| links.into_iter().find(|l| l.index == oif))
        .map_or(DEFAULT_MTU, |l| l.mtu)
}

/// Turns IP forwarding on in the calling thread's (the node's) namespace where it is off.
pub fn enable_forwarding(v6: bool) -> Result<(), CniError> {
    let mut knobs = vec!["/proc/sys/net/ipv4/ip_forward"];
    if v6 {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for knob in knobs {
        if std::fs::read_to_string(knob).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(knob, b"1")
            .map_err(|e| CniError::io(format!("enabling forwarding ({knob})"), e))?;
    }
    Ok(())
}

/// A hook for the crash tests: `WEIR_CNI_TEST_KILL_AT=<point>` makes the plugin SIGKILL itself
/// when it reaches `<point>` (after-reservation, after-veth, after-routes). Test-only.
pub fn test_kill_point(point: &str) {
    if std::env::var_os("WEIR_CNI_TEST_KILL_AT").is_some_and(|v| v == point) {
        // SAFETY: kill(2) on our own PID; SIGKILL does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Wires the pod. `node` is a socket in the node's namespace, `pod_ns` the pod's namespace.
/// `before_addresses` runs with the host veth's index once the veth exists and before the pod
/// gets its addresses and routes (weir-cni attaches the policy programs there); its error
/// undoes the veth like any other.
#[allow(clippy::too_many_arguments)] // one call site; the attachment's parts, each distinct
pub fn add(
    node: &mut Socket,
    pod_ns: &File,
    host_name: &str,
    pod_mac: [u8; 6],
    ifname: &str,
    ips: &[IpAddr],
    mtu: u32,
    before_addresses: &dyn Fn(u32) -> Result<(), CniError>,
) -> Result<Wired, CniError> {
    use std::os::fd::AsRawFd;
    node.create_veth(host_name, HOST_MAC, ifname, pod_mac, pod_ns.as_raw_fd(), mtu).map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) {
            CniError::AlreadyExists {
                msg: format!(
                    "{host_name} or {ifname} in the container already exists: the attachment is already \
                     wired (DEL it first) or the container has another {ifname}"
                ),
            }
        } else {
            CniError::io(format!("creating the veth {host_name} <-> {ifname}"), e)
        }
    })?;
    test_kill_point("after-veth");
    let finish = |node: &mut Socket| -> Result<Wired, CniError> {
        let host = node
            .link(host_name)
            .map_err(netlink_err(format!("looking up {host_name}")))?
            .ok_or_else(|| {
                CniError::io(
                    format!("{host_name} vanished"),
                    std::io::Error::from_raw_os_error(libc::ENODEV),
                )
            })?;
        // Nothing can reach the pod yet: it has no address and the node no route to it.
        before_addresses(host.index)?;
        let pod_index = netns::run_in(pod_ns, || {
            let mut pod =
                Socket::open().map_err(netlink_err("opening netlink in the container"))?;
            let link = pod
                .link(ifname)
                .map_err(netlink_err(format!("looking up {ifname} in the container")))?
                .ok_or_else(|| {
                    CniError::io(
                        format!("{ifname} is missing in the container"),
                        std::io::Error::from_raw_os_error(libc::ENODEV),
                    )
                })?;
            pod.set_up(link.index).map_err(netlink_err(format!("setting {ifname} up")))?;
            for ip in ips {
                pod.add_address(link.index, *ip, host_prefix(*ip), 0)
                    .map_err(netlink_err(format!("adding {ip} to {ifname}")))?;
                let gw = gateway_for(*ip);
                pod.add_neighbour(link.index, gw, HOST_MAC)
                    .map_err(netlink_err(format!("adding the gateway neighbour {gw}")))?;
                let any = if ip.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                pod.add_route(any, 0, Some(gw), link.index, true).map_err(netlink_err(format!(
                    "adding the default route via {gw} in the container"
                )))?;
            }
            Ok(link.index)
        })?;
        let mut gateways: Vec<IpAddr> = ips.iter().map(|ip| gateway_for(*ip)).collect();
        gateways.dedup();
        for gw in gateways {
            let (prefix, scope) = if gw.is_ipv4() {
                (32, netlink::RT_SCOPE_LINK)
            } else {
                (64, netlink::RT_SCOPE_LINK)
            };
            node.add_address(host.index, gw, prefix, scope)
                .map_err(netlink_err(format!("adding {gw} to {host_name}")))?;
        }
        for ip in ips {
            node.add_route(*ip, host_prefix(*ip), None, host.index, false)
                .map_err(netlink_err(format!("adding the route {ip} dev {host_name}")))?;
            node.add_neighbour(host.index, *ip, pod_mac)
                .map_err(netlink_err(format!("adding the neighbour {ip} on {host_name}")))?;
        }
        Ok(Wired { host, pod_mac, pod_index, mtu })
    };
    match finish(node) {
        Ok(wired) => Ok(wired),
        Err(err) => {
            // Deleting our end removes the peer, addresses, routes and neighbours with it.
            let _ = node.delete_link(host_name);
            Err(err)
        }
    }
}

/// Removes an attachment's veth (both ends, with their routes). `Ok(false)` when it was gone.
pub fn del(node: &mut Socket, host_name: &str) -> Result<bool, CniError> {
    node.delete_link(host_name).map_err(netlink_err(format!("deleting {host_name}")))
}

/// [`del`] for the DEL command: returns once the kernel has unlisted the pair and leaves the
/// rest of the kernel's teardown to a short-lived child process (see [`crate::unlink`]).
pub fn del_unlisted(node: &mut Socket, host_name: &str) -> Result<bool, CniError> {
    crate::unlink::delete_unlisted(node, host_name)
        .map_err(netlink_err(format!("deleting {host_name}")))
}

/// Verifies the wiring of an attachment against the addresses it should have.
pub fn check(
    node: &mut Socket,
    pod_ns: &File,
    host_name: &str,
    ifname: &str,
    ips: &[IpAddr],
) -> Result<(), CniError> {
    let failed = |msg: String| CniError::CheckFailed { msg };
    let host = node
        .link(host_name)
        .map_err(netlink_err(format!("looking up {host_name}")))?
        .ok_or_else(|| failed(format!("the host-side veth {host_name} is missing")))?;
    if !host.up {
        return Err(failed(format!("the host-side veth {host_name} is down")));
    }
    for ip in ips {
        let fam = if ip.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 } as u8;
        let routes = node.routes(fam).map_err(netlink_err("listing the node's routes"))?;
        if !routes
            .iter()
            .any(|r| r.dst == *ip && r.prefix == host_prefix(*ip) && r.oif == Some(host.index))
        {
            return Err(failed(format!("the node has no route {ip} dev {host_name}")));
        }
    }
    netns::run_in(pod_ns, || {
        let mut pod = Socket::open().map_err(netlink_err("opening netlink in the container"))?;
        let link = pod
            .link(ifname)
            .map_err(netlink_err(format!("looking up {ifname}")))?
            .ok_or_else(|| failed(format!("{ifname} is missing in the container")))?;
        let addresses = pod.addresses(link.index).map_err(netlink_err("listing addresses"))?;
        for ip in ips {
            if !addresses.contains(&(*ip, host_prefix(*ip))) {
                return Err(failed(format!("{ifname} does not have {ip}/{}", host_prefix(*ip))));
            }
            let fam = if ip.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 } as u8;
            let routes = pod.routes(fam).map_err(netlink_err("listing the container's routes"))?;
            let gw = gateway_for(*ip);
            if !routes
                .iter()
                .any(|r| r.prefix == 0 && r.gateway == Some(gw) && r.oif == Some(link.index))
            {
                return Err(failed(format!(
                    "the container has no default route via {gw} dev {ifname}"
                )));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weir"));
        assert!(is_host_ifname(&a));
        assert!(!is_host_ifname("weir-nat"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
        let mac = pod_mac("abc", "eth0");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(format_mac([0xee; 6]), "ee:ee:ee:ee:ee:ee");
    }
}
