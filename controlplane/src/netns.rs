//! Sockets inside other network namespaces: listeners (`weir apiserver --netns-listen`) and
//! connections to node runtimes (`--node-netns`).
//!
//! A socket belongs to the namespace it was created in, whatever thread later uses it. So a
//! short-lived thread enters the namespace, binds and listens, and ends; the listener is then
//! served by the ordinary accept loop. No other code runs on that thread, and it goes back to
//! its original namespace before ending.
use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

fn setns(file: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor we own; it only changes this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside the network namespace at `path`, which goes back
/// to its original namespace before ending.
fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let target = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let original = File::open("/proc/thread-self/ns/net")?;
                setns(&target).map_err(|err| {
                    std::io::Error::new(
                        err.kind(),
                        format!("entering {} failed: {err} (needs CAP_SYS_ADMIN)", path.display()),
                    )
                })?;
                let result = f();
                setns(&original)?;
                result
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// Binds a non-blocking TCP listener on `addr` inside the network namespace at `path`
/// (e.g. /run/netns/NAME).
pub fn listen_in(path: &Path, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = in_netns(path, || TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Connects to `addr` from inside the network namespace at `path` (`--node-netns`: the lab's
/// node runtimes are reachable only from its underlay); the stream is non-blocking.
pub fn connect_in(path: &Path, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = in_netns(path, || TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Parses `--netns-listen` values: `/run/netns/NAME=IP:PORT`.
pub fn parse_netns_listen(value: &str) -> Result<(std::path::PathBuf, SocketAddr), String> {
    let (path, addr) = value.rsplit_once('=').ok_or_else(|| {
        format!(
            "{value:?} is not NAMESPACE_FILE=IP:PORT (e.g. /run/netns/lab-underlay=10.0.0.1:6443)"
        )
    })?;
    if path.is_empty() {
        return Err(format!("{value:?} names no namespace file before '='"));
    }
    let addr: SocketAddr =
        addr.parse().map_err(|_| format!("{addr:?} in {value:?} is not an IP:PORT address"))?;
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{addr} in {value:?} is the unspecified address; name the IP the namespace's clients use, so it can go into the serving certificate"
        ));
    }
    Ok((path.into(), addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_listen_values_are_checked() {
        let (path, addr) = parse_netns_listen("/run/netns/lab=10.0.0.1:6443").unwrap();
        assert_eq!(path, Path::new("/run/netns/lab"));
        assert_eq!(addr, "10.0.0.1:6443".parse().unwrap());
        assert!(parse_netns_listen("/run/netns/lab").unwrap_err().contains("NAMESPACE_FILE"));
        assert!(parse_netns_listen("=10.0.0.1:1").is_err());
        assert!(parse_netns_listen("/x=10.0.0.1").unwrap_err().contains("IP:PORT"));
        assert!(parse_netns_listen("/x=0.0.0.0:1").unwrap_err().contains("unspecified"));
    }

    #[test]
    fn a_missing_namespace_is_an_error() {
        let err = listen_in(
            Path::new("/run/netns/weir-no-such-namespace"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
