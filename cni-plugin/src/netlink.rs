//! A minimal synchronous rtnetlink client: exactly the requests pod wiring needs (veth with its
//! peer created in another namespace, addresses, routes, permanent neighbours, link lookups and
//! deletion), built by hand on a raw `NETLINK_ROUTE` socket.
//!
//! Contract:
//! - A [`Socket`] talks to the network namespace of the thread that opened it, for its whole
//!   life (the kernel binds a netlink socket to the namespace at creation).
//! - Every request asks for an ACK and returns the kernel's errno as an `io::Error`, so callers
//!   can tell `EEXIST`/`ENODEV`/`ESRCH` apart. Dumps interrupted by `NLM_F_DUMP_INTR` are
//!   retried (bounded).
//!
//! Why not netlink-packet-route: the plugin needs a dozen fixed messages; a hand-written encoder
//! keeps the short-lived binary small, has no async runtime and no API churn to follow.
//!
//! The generic part ([`Msg`], [`attrs`], [`Socket::request`], [`Socket::dump`],
//! [`Socket::request_batch`], any protocol through [`Socket::open_protocol`]) is public: the
//! agent's node routing (`weir_proxy::routing`) builds its own route, neighbour, vxlan and
//! nf_tables messages on it.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWNEIGH: u16 = 28;

pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_NET_NS_FD: u16 = 28;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const VETH_INFO_PEER: u16 = 1;
pub const NLA_F_NESTED: u16 = 0x8000;

pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_FLAGS: u16 = 8;
pub const IFA_F_NODAD: u32 = 0x02;

pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_BOOT: u8 = 3;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RTN_UNICAST: u8 = 1;
pub const RTNH_F_ONLINK: u32 = 4;

pub const NDA_DST: u16 = 1;
pub const NDA_LLADDR: u16 = 2;
pub const NUD_PERMANENT: u16 = 0x80;

pub const IFF_UP: u32 = 0x1;
/// The multicast group of link announcements (`RTMGRP_LINK`), as a bind(2) group mask.
pub const RTMGRP_LINK: u32 = 0x1;
const DUMP_ATTEMPTS: usize = 5;

/// What [`Socket::link`] reports about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    /// `IFLA_INFO_KIND` (`veth`, `vxlan`, ...), when the kernel reports one.
    pub kind: Option<String>,
    /// The raw `IFLA_INFO_DATA` attributes (kind-specific), empty when absent.
    pub info_data: Vec<u8>,
}

/// One route of the main table, as [`Socket::routes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// `rtm_protocol`: who made the route (boot, kernel, or a routing daemon's number).
    pub protocol: u8,
    /// `rtm_flags` (e.g. `RTNH_F_ONLINK`).
    pub flags: u32,
}

/// A `NETLINK_ROUTE` socket bound to the calling thread's network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

/// A message under construction: header placeholder, fixed part, attributes.
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    pub fn new(kind: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Self { buf }
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.align();
        self
    }

    fn align(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.align();
        self
    }

    pub fn attr_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    /// Starts a nested attribute; returns its offset for [`Msg::end_nested`].
    pub fn begin_nested(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn end_nested(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// `struct ifinfomsg`.
pub fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

pub fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

pub fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn parse_ip(family: u8, data: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), data.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

/// Iterates `(type, payload)` over the attributes in `data`.
pub fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & !NLA_F_NESTED;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        let next = (len + 3) & !3;
        data = &data[next.min(data.len())..];
        Some((kind, payload))
    })
}

impl Socket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// Opens a socket of another netlink family (e.g. `libc::NETLINK_NETFILTER`).
    pub fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Extended ACKs are not needed; a 1 MiB receive buffer keeps dumps of busy nodes whole.
        let size: libc::c_int = 1 << 20;
        // SAFETY: valid fd, pointer and length of a c_int option value.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        Ok(Self { fd, seq: 1 })
    }

    fn send(&mut self, msg: Msg) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        self.send_bytes(&msg.finish(self.seq))?;
        Ok(self.seq)
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value (kernel, no groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: the buffer and address are valid for the given lengths.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let rc =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Sends `msg` (built with NLM_F_ACK) and waits for the kernel's answer.
    pub fn request(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.send(msg)?;
        self.wait_ack(seq, seq)
    }

    /// Sends `msgs` in one datagram (an nf_tables batch: begin, messages, end) and waits for
    /// the answer to the last message that asked for an ACK (`true`); the first error any of
    /// them gets is returned instead. Messages that ask for no ACK (the batch markers) are
    /// answered only when they fail.
    pub fn request_batch(&mut self, msgs: Vec<(Msg, bool)>) -> io::Result<()> {
        let first = self.seq.wrapping_add(1);
        let mut last_acked = None;
        let mut bytes = Vec::new();
        for (msg, acked) in msgs {
            self.seq = self.seq.wrapping_add(1);
            if acked {
                last_acked = Some(self.seq);
            }
            bytes.extend_from_slice(&msg.finish(self.seq));
        }
        self.send_bytes(&bytes)?;
        match last_acked {
            Some(last) => self.wait_ack(first, last),
            None => Ok(()),
        }
    }

    /// Reads answers until the ACK of `last`; an error answer to any sequence number in
    /// `first..=last` is returned at once.
    fn wait_ack(&mut self, first: u32, last: u32) -> io::Result<()> {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = self.recv(&mut buf)?;
            let mut data = &buf[..n];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let msg_seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
                if len < NLMSG_HDRLEN + 4 && kind == NLMSG_ERROR
                    || len < NLMSG_HDRLEN
                    || len > data.len()
                {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                if kind == NLMSG_ERROR && msg_seq.wrapping_sub(first) <= last.wrapping_sub(first) {
                    let errno = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    if msg_seq == last {
                        return Ok(());
                    }
                }
                data = &data[((len + 3) & !3).min(data.len())..];
            }
        }
    }

    /// Sends a dump request and returns each answer's payload (after the netlink header).
    pub fn dump(&mut self, build: impl Fn() -> Msg) -> io::Result<Vec<(u16, Vec<u8>)>> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.send(build())?;
            let mut out = Vec::new();
            let mut interrupted = false;
            let mut buf = vec![0u8; 1 << 16];
            'recv: loop {
                let n = self.recv(&mut buf)?;
                let mut data = &buf[..n];
                while data.len() >= NLMSG_HDRLEN {
                    let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                    let kind = u16::from_ne_bytes([data[4], data[5]]);
                    let flags = u16::from_ne_bytes([data[6], data[7]]);
                    let msg_seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
                    if len < NLMSG_HDRLEN || len > data.len() {
                        return Err(io::Error::other("malformed netlink dump"));
                    }
                    if msg_seq == seq {
                        if flags & NLM_F_DUMP_INTR != 0 {
                            interrupted = true;
                        }
                        match kind {
                            NLMSG_DONE => break 'recv,
                            NLMSG_ERROR => {
                                let errno = i32::from_ne_bytes(data[16..20].try_into().unwrap());
                                if errno != 0 {
                                    return Err(io::Error::from_raw_os_error(-errno));
                                }
                                break 'recv;
                            }
                            _ => out.push((kind, data[NLMSG_HDRLEN..len].to_vec())),
                        }
                        if flags & NLM_F_MULTI == 0 {
                            break 'recv;
                        }
                    }
                    data = &data[((len + 3) & !3).min(data.len())..];
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(io::Error::other("netlink dump kept being interrupted (NLM_F_DUMP_INTR)"))
    }

    /// Creates a veth pair: `host` here (up), `peer` directly inside the namespace `peer_ns`
    /// (down: see below), with the given MACs and MTU. The peer is never moved between namespaces.
    pub fn create_veth(
        &mut self,
        host: &str,
        host_mac: [u8; 6],
        peer: &str,
        peer_mac: [u8; 6],
        peer_ns: RawFd,
        mtu: u32,
    ) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        msg.raw(&ifinfomsg(0, IFF_UP, IFF_UP));
        msg.attr_str(IFLA_IFNAME, host)
            .attr(IFLA_ADDRESS, &host_mac)
            .attr(IFLA_MTU, &mtu.to_ne_bytes());
        let linkinfo = msg.begin_nested(IFLA_LINKINFO);
        msg.attr(IFLA_INFO_KIND, b"veth");
        let data = msg.begin_nested(IFLA_INFO_DATA);
        let peer_at = msg.begin_nested(VETH_INFO_PEER);
        // The peer cannot be brought up here: veth_open() fails with ENOTCONN until the pair
        // is linked, after the peer is configured. The caller sets it up in its namespace.
        msg.raw(&ifinfomsg(0, 0, 0));
        msg.attr_str(IFLA_IFNAME, peer)
            .attr(IFLA_ADDRESS, &peer_mac)
            .attr(IFLA_MTU, &mtu.to_ne_bytes())
            .attr(IFLA_NET_NS_FD, &(peer_ns as u32).to_ne_bytes());
        msg.end_nested(peer_at);
        msg.end_nested(data);
        msg.end_nested(linkinfo);
        self.request(msg)
    }

    /// Sets interface `index` up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.raw(&ifinfomsg(index, IFF_UP, IFF_UP));
        self.request(msg)
    }

    /// Looks an interface up by name; `Ok(None)` when there is none.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST);
        msg.raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        self.get_link(msg)
    }

    /// Looks an interface up by index; `Ok(None)` when there is none.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST);
        msg.raw(&ifinfomsg(index, 0, 0));
        self.get_link(msg)
    }

    fn get_link(&mut self, msg: Msg) -> io::Result<Option<Link>> {
        let seq = self.send(msg)?;
        let mut buf = vec![0u8; 1 << 15];
        loop {
            let n = self.recv(&mut buf)?;
            let data = &buf[..n];
            if data.len() < NLMSG_HDRLEN {
                continue;
            }
            let len = (u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize).min(data.len());
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let msg_seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
            if msg_seq != seq {
                continue;
            }
            if kind == NLMSG_ERROR {
                let errno = -i32::from_ne_bytes(data[16..20].try_into().unwrap());
                return if errno == libc::ENODEV {
                    Ok(None)
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                };
            }
            return Ok(parse_link(&data[NLMSG_HDRLEN..len]));
        }
    }

    /// All interfaces of this namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let answers = self.dump(|| {
            let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP);
            msg.raw(&ifinfomsg(0, 0, 0));
            msg
        })?;
        Ok(answers
            .iter()
            .filter(|(k, _)| *k == RTM_NEWLINK)
            .filter_map(|(_, p)| parse_link(p))
            .collect())
    }

    /// The bytes of a request deleting interface `index` (with ACK), numbered by this socket,
    /// for a caller that sends it itself (see [`crate::unlink`]).
    pub fn delete_link_request(&mut self, index: u32) -> Vec<u8> {
        let mut msg = Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.raw(&ifinfomsg(index, 0, 0));
        self.seq = self.seq.wrapping_add(1);
        msg.finish(self.seq)
    }

    /// Opens a socket in the calling thread's namespace that receives the kernel's link
    /// announcements (`RTNLGRP_LINK`: new, changed and deleted interfaces).
    pub fn subscribe_links() -> io::Result<Self> {
        let sock = Self::open()?;
        // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: bind(2) with a valid address and its length.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Reads every queued announcement without blocking and tells whether one of them
    /// satisfies `wanted(message type, interface index)`. `ENOBUFS` means announcements were
    /// lost (the queue overflowed).
    pub fn drain_announcements(&self, wanted: impl Fn(u16, u32) -> bool) -> io::Result<bool> {
        let mut buf = vec![0u8; 1 << 15];
        let mut found = false;
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::WouldBlock => return Ok(found),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(err),
                }
            }
            let mut data = &buf[..rc as usize];
            while data.len() >= NLMSG_HDRLEN + 8 {
                let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
                if len < NLMSG_HDRLEN || len > data.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let index = i32::from_ne_bytes(data[20..24].try_into().unwrap()) as u32;
                found |= wanted(kind, index);
                data = &data[((len + 3) & !3).min(data.len())..];
            }
        }
    }

    /// The socket's descriptor, for poll(2) and for a forked child's own request.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Deletes an interface by name. `Ok(false)` when it did not exist.
    pub fn delete_link(&mut self, name: &str) -> io::Result<bool> {
        let mut msg = Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        match self.request(msg) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Adds `ip/prefix` to interface `index` (without duplicate address detection for IPv6).
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8, scope: u8) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let mut ifa = [0u8; 8];
        ifa[0] = family(&ip);
        ifa[1] = prefix;
        ifa[2] = IFA_F_NODAD as u8;
        ifa[3] = scope;
        ifa[4..8].copy_from_slice(&index.to_ne_bytes());
        msg.raw(&ifa);
        let bytes = octets(&ip);
        msg.attr(IFA_LOCAL, &bytes)
            .attr(IFA_ADDRESS, &bytes)
            .attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        self.request(msg)
    }

    /// The addresses of interface `index` as `(ip, prefix)`.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<(IpAddr, u8)>> {
        Ok(self
            .all_addresses()?
            .into_iter()
            .filter(|(i, _, _)| *i == index)
            .map(|(_, ip, prefix)| (ip, prefix))
            .collect())
    }

    /// Every address of the namespace, IPv4 and IPv6, as `(ifindex, ip, prefix)`.
    pub fn all_addresses(&mut self) -> io::Result<Vec<(u32, IpAddr, u8)>> {
        let answers = self.dump(|| {
            let mut msg = Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
            msg.raw(&[0u8; 8]);
            msg
        })?;
        let mut out = Vec::new();
        for (_, p) in answers.iter().filter(|(k, _)| *k == RTM_NEWADDR) {
            if p.len() < 8 {
                continue;
            }
            let (fam, prefix) = (p[0], p[1]);
            let index = u32::from_ne_bytes(p[4..8].try_into().unwrap());
            let mut local = None;
            let mut address = None;
            for (kind, data) in attrs(&p[8..]) {
                match kind {
                    IFA_LOCAL => local = parse_ip(fam, data),
                    IFA_ADDRESS => address = parse_ip(fam, data),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                out.push((index, ip, prefix));
            }
        }
        Ok(out)
    }

    /// Adds a main-table route `dst/prefix` out of `oif`, via `gateway` when given. `onlink`
    /// marks the gateway as directly reachable although no local prefix covers it.
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
        onlink: bool,
    ) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let mut rtm = [0u8; 12];
        rtm[0] = family(&dst);
        rtm[1] = prefix;
        rtm[4] = RT_TABLE_MAIN;
        rtm[5] = RTPROT_BOOT;
        rtm[6] = if gateway.is_some() { RT_SCOPE_UNIVERSE } else { RT_SCOPE_LINK };
        rtm[7] = RTN_UNICAST;
        let flags = if onlink { RTNH_F_ONLINK } else { 0 };
        rtm[8..12].copy_from_slice(&flags.to_ne_bytes());
        msg.raw(&rtm);
        if prefix > 0 {
            msg.attr(RTA_DST, &octets(&dst));
        }
        if let Some(gw) = gateway {
            msg.attr(RTA_GATEWAY, &octets(&gw));
        }
        msg.attr(RTA_OIF, &oif.to_ne_bytes());
        self.request(msg)
    }

    /// The main table's routes of one address family (`libc::AF_INET` or `AF_INET6`).
    pub fn routes(&mut self, fam: u8) -> io::Result<Vec<Route>> {
        let answers = self.dump(|| {
            let mut msg = Msg::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP);
            let mut rtm = [0u8; 12];
            rtm[0] = fam;
            msg.raw(&rtm);
            msg
        })?;
        let mut out = Vec::new();
        for (_, p) in answers.iter().filter(|(k, _)| *k == RTM_NEWROUTE) {
            if p.len() < 12 {
                continue;
            }
            let (rfam, prefix, mut table, protocol) = (p[0], p[1], u32::from(p[4]), p[5]);
            let flags = u32::from_ne_bytes(p[8..12].try_into().unwrap());
            let mut dst = None;
            let mut gateway = None;
            let mut oif = None;
            for (kind, data) in attrs(&p[12..]) {
                match kind {
                    RTA_DST => dst = parse_ip(rfam, data),
                    RTA_GATEWAY => gateway = parse_ip(rfam, data),
                    RTA_OIF if data.len() == 4 => {
                        oif = Some(u32::from_ne_bytes(data.try_into().unwrap()))
                    }
                    RTA_TABLE if data.len() == 4 => {
                        table = u32::from_ne_bytes(data.try_into().unwrap())
                    }
                    _ => {}
                }
            }
            if table != u32::from(RT_TABLE_MAIN) {
                continue;
            }
            let unspecified = if i32::from(rfam) == libc::AF_INET {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u8; 16])
            };
            out.push(Route {
                dst: dst.unwrap_or(unspecified),
                prefix,
                gateway,
                oif,
                protocol,
                flags,
            });
        }
        Ok(out)
    }

    /// Adds a permanent neighbour entry `ip -> mac` on interface `index` (replacing one).
    pub fn add_neighbour(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> io::Result<()> {
        const NLM_F_REPLACE: u16 = 0x100;
        let mut msg =
            Msg::new(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        let mut ndm = [0u8; 12];
        ndm[0] = family(&ip);
        ndm[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        ndm[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        msg.raw(&ndm);
        msg.attr(NDA_DST, &octets(&ip)).attr(NDA_LLADDR, &mac);
        self.request(msg)
    }
}

/// A NUL-terminated string attribute.
fn c_string(data: &[u8]) -> String {
    String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

fn parse_link(p: &[u8]) -> Option<Link> {
    if p.len() < 16 {
        return None;
    }
    let index = i32::from_ne_bytes(p[4..8].try_into().unwrap()) as u32;
    let flags = u32::from_ne_bytes(p[8..12].try_into().unwrap());
    let mut link = Link {
        index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: flags & IFF_UP != 0,
        kind: None,
        info_data: Vec::new(),
    };
    for (kind, data) in attrs(&p[16..]) {
        match kind {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_ADDRESS if data.len() == 6 => link.mac.copy_from_slice(data),
            IFLA_MTU if data.len() == 4 => link.mtu = u32::from_ne_bytes(data.try_into().unwrap()),
            IFLA_LINKINFO => {
                for (info, value) in attrs(data) {
                    match info {
                        IFLA_INFO_KIND => link.kind = Some(c_string(value)),
                        IFLA_INFO_DATA => link.info_data = value.to_vec(),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_aligned_attributes_and_nested_lengths() {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST);
        msg.raw(&ifinfomsg(0, 0, 0));
        let at = msg.begin_nested(IFLA_LINKINFO);
        msg.attr(IFLA_INFO_KIND, b"veth");
        msg.end_nested(at);
        msg.attr_str(IFLA_IFNAME, "abc");
        let bytes = msg.finish(7);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize, bytes.len());
        let parsed: Vec<_> = attrs(&bytes[NLMSG_HDRLEN + 16..]).collect();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, IFLA_LINKINFO);
        assert_eq!(attrs(parsed[0].1).next(), Some((IFLA_INFO_KIND, &b"veth"[..])));
        assert_eq!(parsed[1], (IFLA_IFNAME, &b"abc\0"[..]));
    }

    #[test]
    fn truncated_attributes_end_the_iteration() {
        assert_eq!(attrs(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
