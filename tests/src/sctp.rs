//! SCTP over raw sockets, for service tests on a kernel without an SCTP stack (this one has
//! none: `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with EPROTONOSUPPORT). A client
//! sends an INIT chunk and waits for the INIT-ACK; a responder in the backend's namespace
//! answers every INIT with an INIT-ACK from the port it was sent to. Both are real packets
//! through the datapath under test (and through netfilter's SCTP conntrack on the nftables
//! dataplane, which checks the chunks and verification tags), and both ends check the CRC32c
//! of what they receive.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use weir_common::proto;

use crate::{
    netns::Netns,
    packet::{sctp_checksum_ok, sctp_init_chunk, sctp_segment},
};

const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;

/// A raw socket for IP protocol 132 in one network namespace.
pub struct RawSctp {
    fd: OwnedFd,
    v6: bool,
}

/// An SCTP segment received, with where it came from.
#[derive(Clone, Debug)]
pub struct Received {
    pub from: SocketAddr,
    pub to_port: u16,
    pub verification_tag: u32,
    pub chunk_type: u8,
    /// The initiate tag of an INIT or INIT-ACK chunk.
    pub initiate_tag: u32,
    pub checksum_ok: bool,
}

impl RawSctp {
    /// Opens the socket in `ns` for IPv6 (`v6`) or IPv4. The socket stays in that namespace.
    pub fn open(ns: &Netns, v6: bool) -> Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let fd = ns.run(|| {
            // SAFETY: plain socket(2) call; the descriptor is owned right away.
            let fd = unsafe {
                libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto::SCTP))
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })??;
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: setsockopt with a correctly sized timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        Ok(Self { fd, v6 })
    }

    /// Sends `segment` (an SCTP common header and chunks) to `to`.
    pub fn send(&self, to: IpAddr, segment: &[u8]) -> Result<()> {
        let (storage, len) = sockaddr(SocketAddr::new(to, 0));
        // SAFETY: the buffer and the address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("sendto {to}"));
        }
        Ok(())
    }

    /// The next SCTP segment within 100 ms; `None` when none came.
    pub fn recv(&self) -> Result<Option<Received>> {
        let mut buf = [0u8; 2048];
        // SAFETY: zeroed sockaddr_storage is a valid out-parameter.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        // SAFETY: the buffer and the address are valid for the lengths given.
        let got = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        if got < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(error).context("recvfrom"),
            };
        }
        let packet = &buf[..got as usize];
        // IPv4 raw sockets deliver the IP header too; IPv6 ones only the payload.
        let (source, segment) = if self.v6 {
            // SAFETY: the kernel filled a sockaddr_in6 for an AF_INET6 socket.
            let sin6 =
                unsafe { &*(&from as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            (IpAddr::from(sin6.sin6_addr.s6_addr), packet)
        } else {
            let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
            let source: [u8; 4] = packet.get(12..16).context("short IPv4 header")?.try_into()?;
            (IpAddr::from(source), packet.get(ihl..).context("short IPv4 packet")?)
        };
        if segment.len() < 16 {
            return Ok(None);
        }
        let u16_at = |i: usize| u16::from_be_bytes([segment[i], segment[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes(segment[i..i + 4].try_into().unwrap());
        let chunk_type = segment[12];
        let initiate_tag =
            if segment.len() >= 20 && matches!(chunk_type, CHUNK_INIT | CHUNK_INIT_ACK) {
                u32_at(16)
            } else {
                0
            };
        Ok(Some(Received {
            from: SocketAddr::new(source, u16_at(0)),
            to_port: u16_at(2),
            verification_tag: u32_at(4),
            chunk_type,
            initiate_tag,
            checksum_ok: sctp_checksum_ok(segment),
        }))
    }
}

/// A socket address for sendto(2).
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as u32)
}

/// An INIT-ACK chunk answering initiate tag `peer_tag` with our own `tag`, carrying a state
/// cookie parameter as RFC 9260 requires.
fn init_ack_chunk(tag: u32) -> Vec<u8> {
    let mut chunk = sctp_init_chunk(tag);
    chunk[0] = CHUNK_INIT_ACK;
    // State cookie parameter (type 7): 4 bytes of header, 8 of cookie.
    chunk.extend_from_slice(&[0, 7, 0, 12]);
    chunk.extend_from_slice(b"weircook");
    let len = chunk.len() as u16;
    chunk[2..4].copy_from_slice(&len.to_be_bytes());
    chunk
}

/// What a client saw of one INIT / INIT-ACK exchange.
#[derive(Debug)]
pub struct Exchange {
    /// The address and port the INIT-ACK came from.
    pub reply_from: SocketAddr,
    pub checksum_ok: bool,
}

/// Sends an INIT from `ns` (source port `sport`) to `target` and waits up to `timeout` for
/// the INIT-ACK that answers it (verification tag = our initiate tag, to our port).
pub fn exchange(ns: &Netns, target: SocketAddr, sport: u16, timeout: Duration) -> Result<Exchange> {
    let socket = RawSctp::open(ns, target.is_ipv6())?;
    let tag = 0x5eed_0000 | u32::from(sport);
    let init = sctp_segment(sport, target.port(), 0, &sctp_init_chunk(tag));
    socket.send(target.ip(), &init)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(got) = socket.recv()?
            && got.chunk_type == CHUNK_INIT_ACK
            && got.to_port == sport
            && got.verification_tag == tag
        {
            return Ok(Exchange { reply_from: got.from, checksum_ok: got.checksum_ok });
        }
    }
    bail!("no INIT-ACK from {target} within {timeout:?}")
}

/// Answers every INIT arriving in a namespace with an INIT-ACK, and records what it saw.
pub struct Responder {
    seen: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    /// Starts answering in `ns` (IPv6 when `v6`). Segments with a bad checksum are recorded
    /// and not answered, as an SCTP stack would drop them.
    pub fn start(ns: &Netns, v6: bool) -> Result<Self> {
        let socket = RawSctp::open(ns, v6)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Some(got)) = socket.recv() else { continue };
                    seen.lock().unwrap().push(got.clone());
                    if got.chunk_type != CHUNK_INIT || !got.checksum_ok {
                        continue;
                    }
                    let chunk = init_ack_chunk(got.initiate_tag.wrapping_add(1));
                    let ack = sctp_segment(got.to_port, got.from.port(), got.initiate_tag, &chunk);
                    let _ = socket.send(got.from.ip(), &ack);
                }
            }
        });
        Ok(Self { seen, stop, thread: Some(thread) })
    }

    /// Every segment received so far.
    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
