//! A TCP relay from a test namespace's loopback to a listener of the test process's own
//! namespace: an agent running inside a namespace (as the nftables dataplane needs, to program
//! that namespace) reaches the test API server on the root namespace's 127.0.0.1 through it,
//! without any link or address in the root namespace. The listening socket is made inside the
//! namespace; the relaying threads connect out from the test process's namespace. Stopped on
//! drop.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

const ACCEPT_POLL: Duration = Duration::from_millis(20);

pub struct Relay {
    /// Where clients inside the namespace connect (127.0.0.1:port there).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on 127.0.0.1 (kernel-picked port) inside `netns`, relaying to `target`.
    pub fn start(netns: &Netns, target: SocketAddr) -> Result<Relay> {
        let listener = netns
            .run(|| TcpListener::bind("127.0.0.1:0"))?
            .context("binding the relay inside the namespace")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let acceptor = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let _ = inbound.set_nonblocking(false);
                        if let Ok(outbound) = TcpStream::connect(target) {
                            pipe(inbound, outbound);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(ACCEPT_POLL)
                    }
                    Err(_) => std::thread::sleep(ACCEPT_POLL),
                }
            }
        });
        Ok(Relay { addr, stop, acceptor: Some(acceptor) })
    }
}

/// Copies both ways on two threads; each direction ends the other side's writes at EOF.
fn pipe(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone(), b.try_clone()), (b.try_clone(), a.try_clone())]
        .into_iter()
        .filter_map(|(x, y)| Some((x.ok()?, y.ok()?)))
    {
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
