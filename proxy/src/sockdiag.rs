//! Finding and terminating connected UDP sockets in every network namespace of the node, over
//! the kernel's socket diagnostics netlink family (`NETLINK_SOCK_DIAG`: what `ss -K` uses).
//!
//! The socket-level load balancer gives a connected UDP socket its backend once, at
//! `connect()`. When that backend leaves the service, the socket would keep sending to it; the
//! agent terminates it instead (the kernel's `udp_abort`: the socket is disconnected and its
//! next call fails with `ECONNABORTED`), so the application reconnects and is balanced again.
//! Cilium does the same with the `bpf_sock_destroy` kfunc from a socket iterator; the netlink
//! route needs no program and works the same from kernel 4.5 (`CONFIG_INET_DIAG_DESTROY`).
//!
//! Sockets live in the namespace they were made in, and pods have their own, so the dump runs
//! in each namespace: those of the node's processes (`/proc/<pid>/ns/net`, which needs the
//! host's PID namespace: the DaemonSet sets `hostPID`) and the ones pinned in `/run/netns` or
//! `/var/run/netns` (where runtimes keep pod namespaces). Each namespace is entered by a
//! short-lived thread of its own, so the agent's threads never change namespace.
use std::{
    collections::HashSet,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::PathBuf,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSG_HDRLEN: usize = 16;
/// `TCP_ESTABLISHED`, the state of a connected UDP socket in the diagnostics.
const STATE_ESTABLISHED: u32 = 1;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` (what the dump returns per socket, attributes after it).
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// Replies larger than a dump's batch are impossible; a page-multiple buffer takes a batch.
const RECV_BUFFER: usize = 64 * 1024;
/// Bound on the replies read for one dump (each holds many sockets).
const MAX_DUMP_BATCHES: usize = 100_000;

/// One connected UDP socket as the diagnostics report it: enough to name it for destruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The interface the socket is bound to (0: none).
    pub interface: u32,
    /// The kernel's socket cookie, the one `bpf_get_socket_cookie` returns.
    pub cookie: u64,
}

/// What a pass over the node's namespaces did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Terminated {
    pub namespaces: usize,
    pub sockets: usize,
    /// Namespaces that could not be entered or dumped (a process that exited meanwhile, most
    /// often); the first error is logged by the caller.
    pub failed_namespaces: usize,
}

/// Terminates, in every network namespace of the node, the connected UDP sockets `doomed`
/// picks. `doomed` sees each connected UDP socket of both families once.
pub fn terminate_udp_sockets(
    doomed: impl Fn(&UdpSocket) -> bool + Sync,
) -> (Terminated, Option<io::Error>) {
    let mut outcome = Terminated::default();
    let mut first_error = None;
    for namespace in network_namespaces() {
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<usize> {
                    enter(&namespace)?;
                    let socket = DiagSocket::open()?;
                    let mut destroyed = 0;
                    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                        for udp in socket.dump_connected_udp(family)? {
                            if doomed(&udp) {
                                match socket.destroy(family, &udp) {
                                    Ok(()) => destroyed += 1,
                                    // Closed meanwhile: nothing left to terminate.
                                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                                    Err(err) => return Err(err),
                                }
                            }
                        }
                    }
                    Ok(destroyed)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace's thread panicked")))
        });
        outcome.namespaces += 1;
        match result {
            Ok(destroyed) => outcome.sockets += destroyed,
            Err(err) => {
                outcome.failed_namespaces += 1;
                first_error.get_or_insert(io::Error::new(
                    err.kind(),
                    format!("{}: {err}", namespace.display()),
                ));
            }
        }
    }
    (outcome, first_error)
}

/// One path per distinct network namespace: each process's, then the pinned ones.
fn network_namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    let mut consider = |path: PathBuf| {
        if let Ok(meta) = fs::metadata(&path)
            && seen.insert((meta.dev(), meta.ino()))
        {
            paths.push(path);
        }
    };
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                consider(entry.path().join("ns/net"));
            }
        }
    }
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                consider(entry.path());
            }
        }
    }
    paths
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &std::path::Path) -> io::Result<()> {
    let file = fs::File::open(path)?;
    // SAFETY: setns on a valid descriptor; it changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `NETLINK_SOCK_DIAG` socket, bound to the namespace it was opened in.
struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer is valid for its length; the kernel is the default destination.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid and writable for its length.
        let read =
            unsafe { libc::recv(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(read as usize)
    }

    /// The namespace's connected UDP sockets of `family`.
    fn dump_connected_udp(&self, family: u8) -> io::Result<Vec<UdpSocket>> {
        let request = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, None);
        self.send(&request)?;
        let mut sockets = Vec::new();
        let mut buffer = vec![0u8; RECV_BUFFER];
        for _ in 0..MAX_DUMP_BATCHES {
            let read = self.recv(&mut buffer)?;
            for message in messages(&buffer[..read]) {
                let (kind, payload) = message?;
                match kind {
                    NLMSG_DONE => return Ok(sockets),
                    NLMSG_ERROR => return Err(error_of(payload).unwrap_or_else(truncated)),
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(socket) = parse_msg(payload) {
                            sockets.push(socket);
                        }
                    }
                    _ => {}
                }
            }
        }
        Err(io::Error::other("the socket dump did not end"))
    }

    /// Terminates one socket (`SOCK_DESTROY`, acknowledged).
    fn destroy(&self, family: u8, socket: &UdpSocket) -> io::Result<()> {
        self.send(&request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, Some(socket)))?;
        let mut buffer = vec![0u8; 4096];
        let read = self.recv(&mut buffer)?;
        for message in messages(&buffer[..read]) {
            let (kind, payload) = message?;
            if kind == NLMSG_ERROR {
                return match error_of(payload) {
                    None => Ok(()),
                    Some(err) => Err(err),
                };
            }
        }
        Err(io::Error::other("no acknowledgement of the socket's destruction"))
    }
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "truncated netlink error message")
}

/// A netlink message: header and `inet_diag_req_v2` for UDP in the established state,
/// naming `socket` when given.
fn request(kind: u16, flags: u16, family: u8, socket: Option<&UdpSocket>) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    message.extend_from_slice(&(1u32 << STATE_ESTABLISHED).to_ne_bytes());
    match socket {
        Some(socket) => message.extend_from_slice(&sockid(socket)),
        None => message.extend_from_slice(&[0; SOCKID_LEN]),
    }
    message
}

/// `struct inet_diag_sockid` of `socket`: ports and addresses in network order.
fn sockid(socket: &UdpSocket) -> [u8; SOCKID_LEN] {
    let mut id = [0u8; SOCKID_LEN];
    id[0..2].copy_from_slice(&socket.local.port().to_be_bytes());
    id[2..4].copy_from_slice(&socket.remote.port().to_be_bytes());
    id[4..20].copy_from_slice(&address_bytes(socket.local.ip()));
    id[20..36].copy_from_slice(&address_bytes(socket.remote.ip()));
    id[36..40].copy_from_slice(&socket.interface.to_ne_bytes());
    id[40..44].copy_from_slice(&(socket.cookie as u32).to_ne_bytes());
    id[44..48].copy_from_slice(&((socket.cookie >> 32) as u32).to_ne_bytes());
    id
}

/// An address in a sockid's 16 bytes (IPv4 in the first four).
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// The messages of one netlink read: (type, payload), or an error for a malformed one.
fn messages(mut data: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > data.len() {
            data = &[];
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed netlink message",
            )));
        }
        let payload = &data[NLMSG_HDRLEN..len];
        // Messages are 4-byte aligned.
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some(Ok((kind, payload)))
    })
}

/// The error of an `NLMSG_ERROR` payload; `None` for an acknowledgement (error 0).
fn error_of(payload: &[u8]) -> Option<io::Error> {
    let Some(code) = payload.get(0..4) else { return Some(truncated()) };
    let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// A connected UDP socket from an `inet_diag_msg`; `None` for a short or foreign one.
fn parse_msg(payload: &[u8]) -> Option<UdpSocket> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let family = payload[0];
    let id = &payload[4..4 + SOCKID_LEN];
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let address = |at: usize| -> Option<IpAddr> {
        let bytes: [u8; 16] = id[at..at + 16].try_into().ok()?;
        match i32::from(family) {
            libc::AF_INET => {
                Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])))
            }
            libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => None,
        }
    };
    let word = |at: usize| u32::from_ne_bytes(id[at..at + 4].try_into().expect("4 bytes"));
    Some(UdpSocket {
        local: SocketAddr::new(address(4)?, port(0)),
        remote: SocketAddr::new(address(20)?, port(2)),
        interface: word(36),
        cookie: u64::from(word(40)) | (u64::from(word(44)) << 32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sockid_round_trips_through_a_diag_message() {
        let socket = UdpSocket {
            local: "10.0.0.5:40000".parse().unwrap(),
            remote: "10.0.1.7:53".parse().unwrap(),
            interface: 3,
            cookie: 0x1234_5678_9abc_def0,
        };
        let mut msg = vec![libc::AF_INET as u8, 1, 0, 0];
        msg.extend_from_slice(&sockid(&socket));
        msg.extend_from_slice(&[0; 20]);
        assert_eq!(parse_msg(&msg), Some(socket));
        let six = UdpSocket {
            local: "[fd00::5]:40000".parse().unwrap(),
            remote: "[fd00::1:7]:53".parse().unwrap(),
            ..socket
        };
        let mut msg = vec![libc::AF_INET6 as u8, 1, 0, 0];
        msg.extend_from_slice(&sockid(&six));
        msg.extend_from_slice(&[0; 20]);
        assert_eq!(parse_msg(&msg), Some(six));
        assert_eq!(parse_msg(&msg[..MSG_LEN - 1]), None, "short message");
    }

    #[test]
    fn requests_are_well_formed() {
        let message = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 2, None);
        assert_eq!(message.len(), NLMSG_HDRLEN + REQ_LEN);
        let parsed: Vec<_> = messages(&message).collect::<io::Result<_>>().unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, SOCK_DIAG_BY_FAMILY);
        assert_eq!(parsed[0].1[1], libc::IPPROTO_UDP as u8);
    }

    #[test]
    fn malformed_netlink_input_is_an_error_not_a_panic() {
        let mut bogus = 9999u32.to_ne_bytes().to_vec();
        bogus.extend_from_slice(&[0; 12]);
        assert!(messages(&bogus).next().unwrap().is_err());
        assert!(error_of(&[1, 2]).is_some(), "a truncated error is an error");
        assert!(error_of(&0i32.to_ne_bytes()).is_none(), "an acknowledgement");
        assert_eq!(
            error_of(&(-libc::ENOENT).to_ne_bytes()).unwrap().raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    /// A privileged check of the whole path in a scratch namespace: a connected UDP socket
    /// is found, terminated, and its next receive fails with ECONNABORTED.
    #[test]
    fn terminates_a_connected_udp_socket() {
        if unsafe { libc::geteuid() } != 0 {
            panic!("needs root (CAP_NET_ADMIN for SOCK_DESTROY)");
        }
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(peer.local_addr().unwrap()).unwrap();
        let (local, remote) = (socket.local_addr().unwrap(), peer.local_addr().unwrap());
        let (outcome, error) = terminate_udp_sockets(|s| s.local == local && s.remote == remote);
        assert!(error.is_none() || outcome.failed_namespaces > 0, "{error:?}");
        assert_eq!(outcome.sockets, 1, "{outcome:?}");
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let err = socket.recv(&mut [0u8; 16]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        // The peer's socket (unconnected) was not touched.
        assert!(peer.local_addr().is_ok());
    }
}
