//! Thin rtnetlink adapter for node routing: the VXLAN device, routes marked with weir's
//! protocol number, permanent neighbours and VXLAN forwarding entries. Built on the generic
//! netlink plumbing of `weir_cni_plugin::netlink`; works in the calling thread's namespace.
//! Addresses, routes and neighbours are IPv4 or IPv6 alike (the family follows the address).
use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use weir_cni_plugin::netlink::{
    IFA_ADDRESS, IFA_LOCAL, IFF_UP, IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO,
    IFLA_MTU, Link, Msg, NDA_DST, NDA_LLADDR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST, NUD_PERMANENT, RT_TABLE_MAIN, RTA_DST, RTA_GATEWAY, RTA_OIF, RTM_NEWLINK,
    RTM_NEWNEIGH, RTM_NEWROUTE, RTN_UNICAST, RTNH_F_ONLINK, Socket, attrs, family, ifinfomsg,
    octets, parse_ip,
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
const AF_INET6: u8 = libc::AF_INET6 as u8;
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

/// A main-table route with weir's protocol number; `gateway` is of `dst`'s family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRoute {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

/// A permanent neighbour or a VXLAN forwarding entry of one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelNeighbour {
    pub ip: IpAddr,
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

pub fn delete_address(sock: &mut Socket, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
    let mut msg = Msg::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK);
    let mut ifa = [0u8; 8];
    ifa[0] = family(&ip);
    ifa[1] = prefix;
    ifa[4..8].copy_from_slice(&index.to_ne_bytes());
    msg.raw(&ifa);
    msg.attr(IFA_LOCAL, &octets(&ip)).attr(IFA_ADDRESS, &octets(&ip));
    sock.request(msg)
}

/// The main table's IPv4 and IPv6 routes with weir's protocol number.
pub fn routes(sock: &mut Socket) -> io::Result<Vec<KernelRoute>> {
    let mut routes = sock.routes(AF_INET)?;
    routes.extend(sock.routes(AF_INET6)?);
    Ok(routes
        .into_iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL)
        .map(|r| KernelRoute {
            dst: r.dst,
            prefix: r.prefix,
            gateway: r.gateway,
            oif: r.oif,
            onlink: r.flags & RTNH_F_ONLINK != 0,
        })
        .collect())
}

fn route_msg(kind: u16, flags: u16, route: &KernelRoute) -> Msg {
    let mut msg = Msg::new(kind, flags);
    let mut rtm = [0u8; 12];
    rtm[0] = family(&route.dst);
    rtm[1] = route.prefix;
    rtm[4] = RT_TABLE_MAIN;
    rtm[5] = ROUTE_PROTOCOL;
    rtm[6] = 0; // RT_SCOPE_UNIVERSE: every weir route has a gateway.
    rtm[7] = RTN_UNICAST;
    let rtm_flags = if route.onlink { RTNH_F_ONLINK } else { 0 };
    rtm[8..12].copy_from_slice(&rtm_flags.to_ne_bytes());
    msg.raw(&rtm);
    msg.attr(RTA_DST, &octets(&route.dst));
    if let Some(gateway) = route.gateway {
        msg.attr(RTA_GATEWAY, &octets(&gateway));
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

/// Permanent neighbours (`family` AF_INET or AF_INET6) or forwarding entries with a
/// destination (`AF_BRIDGE`) of interface `index`.
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
        if family != AF_BRIDGE && state & NUD_PERMANENT == 0 {
            continue;
        }
        let (mut ip, mut mac) = (None, None);
        for (kind, data) in attrs(&p[12..]) {
            match kind {
                // A VXLAN forwarding entry's destination is an IPv4 or IPv6 underlay address.
                NDA_DST => ip = parse_ip(if data.len() == 16 { AF_INET6 } else { AF_INET }, data),
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

/// Permanent IPv4 and IPv6 neighbours of `index`.
pub fn neighbours(sock: &mut Socket, index: u32) -> io::Result<Vec<KernelNeighbour>> {
    let mut out = neighbours_of(sock, AF_INET, index)?;
    out.extend(neighbours_of(sock, AF_INET6, index)?);
    Ok(out)
}

/// VXLAN forwarding entries of `index` as (dst underlay address, MAC).
pub fn fdb(sock: &mut Socket, index: u32) -> io::Result<Vec<KernelNeighbour>> {
    neighbours_of(sock, AF_BRIDGE, index)
}

/// `bridge`: a VXLAN forwarding entry (family AF_BRIDGE); otherwise a neighbour of the
/// entry's address family.
fn neighbour_msg(kind: u16, flags: u16, bridge: bool, index: u32, entry: &KernelNeighbour) -> Msg {
    let mut msg = Msg::new(kind, flags);
    let (fam, ntf) = if bridge { (AF_BRIDGE, NTF_SELF) } else { (family(&entry.ip), 0) };
    msg.raw(&ndmsg(fam, index, NUD_PERMANENT, ntf));
    msg.attr(NDA_DST, &octets(&entry.ip)).attr(NDA_LLADDR, &entry.mac);
    msg
}

pub fn replace_neighbour(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(neighbour_msg(RTM_NEWNEIGH, flags, false, index, entry))
}

pub fn delete_neighbour(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    sock.request(neighbour_msg(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, false, index, entry))
}

/// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
pub fn replace_fdb(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(neighbour_msg(RTM_NEWNEIGH, flags, true, index, entry))
}

pub fn delete_fdb(sock: &mut Socket, index: u32, entry: &KernelNeighbour) -> io::Result<()> {
    sock.request(neighbour_msg(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, true, index, entry))
}
