//! Thin rtnetlink adapter for node routing: the VXLAN device, routes marked with weir's
//! protocol number, permanent neighbours and VXLAN forwarding entries. Built on the generic
//! netlink plumbing of `weir_cni_plugin::netlink`; works in the calling thread's namespace.
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use weir_cni_plugin::netlink::{
    IFA_ADDRESS, IFA_LOCAL, IFF_UP, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO,
    IFLA_MTU, Link, Msg, NDA_DST, NDA_LLADDR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST, NUD_PERMANENT, RT_TABLE_MAIN, RTA_DST, RTA_GATEWAY, RTA_OIF, RTM_GETADDR,
    RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE, RTN_UNICAST, RTNH_F_ONLINK, Socket,
    attrs, ifinfomsg,
};

/// Routes weir makes carry this `rtm_protocol` (`ip route show proto 87`), so the reconciler
/// only ever lists, changes and deletes its own.
pub const ROUTE_PROTOCOL: u8 = 0x57;

const NLM_F_REPLACE: u16 = 0x100;

const RTM_DELADDR: u16 = 21;
const RTM_DELROUTE: u16 = 25;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;

const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LINK: u16 = 3;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;

const NTF_SELF: u8 = 0x02;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_BRIDGE: u8 = libc::AF_BRIDGE as u8;

/// The parameters weir sets on its VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub link: Option<u32>,
    pub port: u16,
    pub learning: bool,
}

/// A main-table IPv4 route with weir's protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

/// A permanent IPv4 neighbour or a VXLAN forwarding entry of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelNeighbour {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

fn ndmsg(family: u8, index: u32, state: u16, flags: u8) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[0] = family;
    m[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    m[8..10].copy_from_slice(&state.to_ne_bytes());
    m[10] = flags;
    m
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from)
}

fn u32_of(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_ne_bytes)
}

/// The VXLAN parameters of `link`, `None` when it is not a VXLAN device.
pub fn vxlan_params(link: &Link) -> Option<VxlanParams> {
    (link.kind.as_deref() == Some("vxlan")).then(|| parse_vxlan(&link.info_data))
}

fn parse_vxlan(data: &[u8]) -> VxlanParams {
    let mut params = VxlanParams { vni: 0, local: None, link: None, port: 0, learning: true };
    for (kind, value) in attrs(data) {
        match kind {
            IFLA_VXLAN_ID => params.vni = u32_of(value).unwrap_or(0),
            IFLA_VXLAN_LOCAL => params.local = ipv4(value),
            IFLA_VXLAN_LINK => params.link = u32_of(value),
            IFLA_VXLAN_PORT if value.len() == 2 => {
                params.port = u16::from_be_bytes([value[0], value[1]])
            }
            IFLA_VXLAN_LEARNING if value.len() == 1 => params.learning = value[0] != 0,
            _ => {}
        }
    }
    params
}

/// Creates a VXLAN device (down; [`set_link`] brings it up).
pub fn create_vxlan(
    sock: &mut Socket,
    name: &str,
    params: &VxlanParams,
    mtu: u32,
) -> io::Result<()> {
    let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
    msg.raw(&ifinfomsg(0, 0, 0));
    msg.attr_str(IFLA_IFNAME, name).attr(IFLA_MTU, &mtu.to_ne_bytes());
    let linkinfo = msg.begin_nested(IFLA_LINKINFO);
    msg.attr(IFLA_INFO_KIND, b"vxlan");
    let data = msg.begin_nested(IFLA_INFO_DATA);
    msg.attr(IFLA_VXLAN_ID, &params.vni.to_ne_bytes());
    if let Some(link) = params.link {
        msg.attr(IFLA_VXLAN_LINK, &link.to_ne_bytes());
    }
    if let Some(local) = params.local {
        msg.attr(IFLA_VXLAN_LOCAL, &local.octets());
    }
    msg.attr(IFLA_VXLAN_LEARNING, &[u8::from(params.learning)])
        .attr(IFLA_VXLAN_PORT, &params.port.to_be_bytes());
    msg.end_nested(data);
    msg.end_nested(linkinfo);
    sock.request(msg)
}

/// Sets an interface's MTU and brings it up.
pub fn set_link(sock: &mut Socket, index: u32, mtu: u32) -> io::Result<()> {
    let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
    msg.raw(&ifinfomsg(index, IFF_UP, IFF_UP)).attr(IFLA_MTU, &mtu.to_ne_bytes());
    sock.request(msg)
}

/// Every IPv4 address of the namespace as `(ifindex, ip, prefix)`.
pub fn addresses(sock: &mut Socket) -> io::Result<Vec<(u32, Ipv4Addr, u8)>> {
    let answers = sock.dump(|| {
        let mut msg = Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        msg.raw(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        msg
    })?;
    let mut out = Vec::new();
    for (_, p) in answers.iter().filter(|(k, _)| *k == RTM_NEWADDR) {
        if p.len() < 8 || p[0] != AF_INET {
            continue;
        }
        let (prefix, index) = (p[1], u32_of(&p[4..8]).unwrap_or(0));
        let mut local = None;
        let mut address = None;
        for (kind, data) in attrs(&p[8..]) {
            match kind {
                IFA_LOCAL => local = ipv4(data),
                IFA_ADDRESS => address = ipv4(data),
                _ => {}
            }
        }
        if let Some(ip) = local.or(address) {
            out.push((index, ip, prefix));
        }
    }
    Ok(out)
}

fn address_msg(kind: u16, flags: u16, index: u32, ip: Ipv4Addr, prefix: u8) -> Msg {
    let mut msg = Msg::new(kind, flags);
    let mut ifa = [0u8; 8];
    ifa[0] = AF_INET;
    ifa[1] = prefix;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    msg.raw(&ifa);
    msg.attr(IFA_LOCAL, &ip.octets()).attr(IFA_ADDRESS, &ip.octets());
    msg
}

pub fn add_address(sock: &mut Socket, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(address_msg(RTM_NEWADDR, flags, index, ip, prefix))
}

pub fn delete_address(sock: &mut Socket, index: u32, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    sock.request(address_msg(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, index, ip, prefix))
}

/// The main table's IPv4 routes with weir's protocol number.
pub fn routes(sock: &mut Socket) -> io::Result<Vec<KernelRoute>> {
    let routes = sock.routes(AF_INET)?;
    Ok(routes
        .into_iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
        .filter_map(|r| {
            let (IpAddr::V4(dst), gateway) = (r.dst, r.gateway) else { return None };
            Some(KernelRoute {
                dst,
                prefix: r.prefix,
                gateway: match gateway {
                    Some(IpAddr::V4(gw)) => Some(gw),
                    _ => None,
                },
                oif: r.oif,
                onlink: r.flags & RTNH_F_ONLINK != 0,
            })
        })
        .collect())
}

fn route_msg(kind: u16, flags: u16, route: &KernelRoute) -> Msg {
    let mut msg = Msg::new(kind, flags);
    let mut rtm = [0u8; 12];
    rtm[0] = AF_INET;
    rtm[1] = route.prefix;
    rtm[4] = RT_TABLE_MAIN;
    rtm[5] = ROUTE_PROTOCOL;
    rtm[6] = 0; // RT_SCOPE_UNIVERSE: every weir route has a gateway.
    rtm[7] = RTN_UNICAST;
    let rtm_flags = if route.onlink { RTNH_F_ONLINK } else { 0 };
    rtm[8..12].copy_from_slice(&rtm_flags.to_ne_bytes());
    msg.raw(&rtm);
    msg.attr(RTA_DST, &route.dst.octets());
    if let Some(gateway) = route.gateway {
        msg.attr(RTA_GATEWAY, &gateway.octets());
    }
    if let Some(oif) = route.oif {
        msg.attr(RTA_OIF, &oif.to_ne_bytes());
    }
    msg
}

/// Adds or replaces the main-table route to `route.dst/prefix`.
pub fn replace_route(sock: &mut Socket, route: &KernelRoute) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(route_msg(RTM_NEWROUTE, flags, route))
}

pub fn delete_route(sock: &mut Socket, route: &KernelRoute) -> io::Result<()> {
    sock.request(route_msg(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, route))
}

/// Permanent IPv4 neighbours (`family` AF_INET) or forwarding entries with a destination
/// (`AF_BRIDGE`) of interface `index`.
fn neighbours_of(sock: &mut Socket, family: u8, index: u32) -> io::Result<Vec<KernelNeighbour>> {
    let answers = sock.dump(|| {
        let mut msg = Msg::new(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP);
        msg.raw(&ndmsg(family, 0, 0, 0));
        msg
    })?;
    let mut out = Vec::new();
    for (_, p) in answers.iter().filter(|(k, _)| *k == RTM_NEWNEIGH) {
        if p.len() < 12 || p[0] != family || u32_of(&p[4..8]) != Some(index) {
            continue;
        }
        let state = u16::from_ne_bytes([p[8], p[9]]);
        if family == AF_INET && state & NUD_PERMANENT == 0 {
            continue;
        }
        let (mut ip, mut mac) = (None, None);
        for (kind, data) in attrs(&p[12..]) {
            match kind {
                NDA_DST => ip = ipv4(data),
                NDA_LLADDR => mac = <[u8; 6]>::try_from(data).ok(),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            out.push(KernelNeighbour { ip, mac });
        }
    }
    Ok(out)
}

pub fn neighbours(sock: &mut Socket, index: u32) -> io::Result<Vec<KernelNeighbour>> {
    neighbours_of(sock, AF_INET, index)
}

/// VXLAN forwarding entries of `index` as (dst underlay address, MAC).
pub fn fdb(sock: &mut Socket, index: u32) -> io::Result<Vec<KernelNeighbour>> {
    neighbours_of(sock, AF_BRIDGE, index)
}

fn neighbour_msg(kind: u16, flags: u16, family: u8, index: u32, entry: &KernelNeighbour) -> Msg {
    let mut msg = Msg::new(kind, flags);
    let ntf = if family == AF_BRIDGE { NTF_SELF } else { 0 };
    msg.raw(&ndmsg(family, index, NUD_PERMANENT, ntf));
    msg.attr(NDA_DST, &entry.ip.octets()).attr(NDA_LLADDR, &entry.mac);
    msg
}

pub fn replace_neighbour(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(neighbour_msg(RTM_NEWNEIGH, flags, AF_INET, index, entry))
}

pub fn delete_neighbour(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    sock.request(neighbour_msg(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, AF_INET, index, entry))
}

/// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
pub fn replace_fdb(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(neighbour_msg(RTM_NEWNEIGH, flags, AF_BRIDGE, index, entry))
}

pub fn delete_fdb(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    sock.request(neighbour_msg(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, AF_BRIDGE, index, entry))
}
