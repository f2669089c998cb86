//! Echo servers for end-to-end tests: bound inside a test namespace, answering every line on a
//! TCP connection (connections stay open until the client closes them) and every UDP datagram
//! with `pong from <local> to <peer>`, so a test sees which backend answered and which client
//! address it saw. Stopped on drop; their loops are bounded in time.
use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::Netns;

const POLL: Duration = Duration::from_millis(50);
/// A server stops by itself after this long, even if its test forgot it.
const MAX_LIFETIME: Duration = Duration::from_secs(300);

/// A running echo server; stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// A TCP echo server listening on `addr` inside `netns`.
    pub fn tcp(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::accept_loop(netns, addr, |stream, peer, stop, started| {
            std::thread::spawn(move || serve_connection(stream, peer, &stop, started));
        })
    }

    /// A TCP echo server on `addr` inside `netns` that serves one connection at a time in its
    /// own thread: no thread is started per connection, so a benchmark of sequential
    /// connections measures the network path, not thread creation (which waits for a time
    /// slice on a loaded machine). A second client waits until the first one closes.
    pub fn tcp_serial(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::accept_loop(netns, addr, |stream, peer, stop, started| {
            serve_connection(stream, peer, &stop, started)
        })
    }

    /// Listens on `addr` in `netns` and hands every accepted connection to `serve` (with the
    /// stop flag and the server's start), until stopped or its lifetime ends.
    fn accept_loop(
        netns: &Netns,
        addr: SocketAddr,
        serve: impl Fn(TcpStream, SocketAddr, Arc<AtomicBool>, Instant) + Send + 'static,
    ) -> Result<Self> {
        let listener = netns.run(|| TcpListener::bind(addr))?.context("binding TCP")?;
        listener.set_nonblocking(true)?;
        Ok(Self::spawn(move |stop| {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                match listener.accept() {
                    Ok((stream, peer)) => serve(stream, peer, stop.clone(), started),
                    Err(_) => wait_readable(&listener, POLL),
                }
            }
        }))
    }

    /// A UDP echo server bound to `addr` inside `netns`.
    pub fn udp(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = netns.run(|| UdpSocket::bind(addr))?.context("binding UDP")?;
        socket.set_read_timeout(Some(POLL))?;
        Ok(Self::spawn(move |stop| {
            let started = Instant::now();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let local = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let _ =
                        socket.send_to(format!("pong from {local} to {peer}\n").as_bytes(), peer);
                }
            }
        }))
    }

    fn spawn(serve: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Self { stop, thread: Some(std::thread::spawn(move || serve(flag))) }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers every line received on a connection until the client closes it, the server stops,
/// or the server's lifetime ends.
fn serve_connection(stream: TcpStream, peer: SocketAddr, stop: &AtomicBool, started: Instant) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("pong from {local} to {peer}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Waits until `listener` has a pending connection, at most `timeout`.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// Whether a TCP connection from inside `from` to `dst` gets an echo reply within `timeout`
/// (connect, send a line, read the answer).
pub fn tcp_echo_works(from: &Netns, dst: SocketAddr, timeout: Duration) -> bool {
    from.run(move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&dst, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"ping\n")?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply)
    })
    .expect("run in namespace")
    .is_ok_and(|reply| reply.starts_with("pong"))
}

/// The `(local, peer)` addresses an echo reply names.
pub fn parse_reply(reply: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = reply.trim().strip_prefix("pong from ")?;
    let (local, peer) = rest.split_once(" to ")?;
    Some((local.parse().ok()?, peer.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_name_both_ends() {
        let (local, peer) = parse_reply("pong from 10.0.0.2:80 to 10.0.0.1:4000\n").unwrap();
        assert_eq!(local.to_string(), "10.0.0.2:80");
        assert_eq!(peer.to_string(), "10.0.0.1:4000");
        assert_eq!(parse_reply("nonsense"), None);
    }
}
