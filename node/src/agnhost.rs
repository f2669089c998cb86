//! `weir builtin agnhost`: the lab's stand-in for the `registry.k8s.io/e2e-test-images/agnhost`
//! image, as far as the upstream NetworkPolicy suite uses it.
//!
//! - `serve-hostname [--tcp] [--udp] [--http[=true|false]] [--close] [--port N]` answers with
//!   the hostname (the pod's name in the lab): raw TCP (written, then the connection closed),
//!   raw UDP (one datagram back per datagram), or HTTP (default, port 9376). As upstream, HTTP
//!   cannot be combined with raw TCP/UDP.
//! - `connect HOST:PORT [--timeout=DURATION] [--protocol=tcp|udp] [--udp-data=TEXT]` exits 0
//!   when the connection works (TCP: the handshake completes; UDP: a datagram comes back) and 1
//!   otherwise, with upstream's prefixes on stderr: `TIMEOUT`, `REFUSED`, `DNS`, `OTHER`,
//!   `UNKNOWN`.
//! - `pause` sleeps until killed.
//!
//! Flags follow Go's pflag syntax (`--port 80`, `--port=80`, `--http=false`, durations like
//! `1s`, `500ms`, `1m30s`). Bad arguments exit 64 with a message. The argument parsing is pure
//! and unit-tested; the servers are plain std threads.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    time::Duration,
};

/// The subcommands the lab's agnhost implements.
pub const SUBCOMMANDS: [&str; 3] = ["serve-hostname", "connect", "pause"];

/// Exit status for bad arguments.
const EXIT_USAGE: u8 = 64;

/// What `serve-hostname` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeHostname {
    pub tcp: bool,
    pub udp: bool,
    pub http: bool,
    pub close: bool,
    pub port: u16,
}

/// A `connect` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub dest: String,
    /// Zero: no timeout (as upstream).
    pub timeout: Duration,
    pub protocol: ConnectProtocol,
    pub udp_data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectProtocol {
    Tcp,
    Udp,
}

/// A parsed agnhost command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agnhost {
    ServeHostname(ServeHostname),
    Connect(Connect),
    Pause,
}

/// Splits `--name=value` / `--name value` / `--name` into (name, inline value).
fn flag_name(arg: &str) -> Option<(&str, Option<&str>)> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    if body.is_empty() {
        return None;
    }
    Some(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

fn parse_bool(flag: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => {
            Ok(true)
        }
        Some("false") | Some("0") | Some("f") | Some("F") | Some("FALSE") | Some("False") => {
            Ok(false)
        }
        Some(other) => Err(format!("--{flag}: {other:?} is not a boolean (use true or false)")),
    }
}

/// A Go duration: a sequence of decimal numbers with units ns, us, µs, ms, s, m, h (`1s`,
/// `1.5s`, `500ms`, `1m30s`); a bare `0` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (use e.g. 1s, 500ms, 1m30s)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if number_len == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Parses `agnhost`'s arguments (the subcommand first).
pub fn parse(args: &[String]) -> Result<Agnhost, String> {
    let Some((subcommand, rest)) = args.split_first() else {
        return Err(format!(
            "agnhost needs a subcommand: the lab implements {}",
            SUBCOMMANDS.join(", ")
        ));
    };
    match subcommand.as_str() {
        "serve-hostname" => parse_serve_hostname(rest).map(Agnhost::ServeHostname),
        "connect" => parse_connect(rest).map(Agnhost::Connect),
        "pause" => match rest.first() {
            None => Ok(Agnhost::Pause),
            Some(extra) => Err(format!("pause takes no arguments, got {extra:?}")),
        },
        other => Err(format!(
            "agnhost subcommand {other:?} is not implemented in the weir lab: it implements {}",
            SUBCOMMANDS.join(", ")
        )),
    }
}

/// Iterates flags, calling `apply(name, inline value, next argument)`; `apply` returns whether
/// it consumed the next argument. Positional arguments are collected.
fn walk_flags(
    args: &[String],
    mut apply: impl FnMut(&str, Option<&str>, Option<&str>) -> Result<bool, String>,
) -> Result<Vec<String>, String> {
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        match flag_name(arg) {
            Some((name, inline)) => {
                let next = args.get(i + 1).map(String::as_str);
                if apply(name, inline, next)? {
                    i += 1;
                }
            }
            None => positional.push(arg.clone()),
        }
        i += 1;
    }
    Ok(positional)
}

/// The value of a flag that takes one: inline (`--port=80`) or the next argument.
fn value<'a>(
    name: &str,
    inline: Option<&'a str>,
    next: Option<&'a str>,
) -> Result<(&'a str, bool), String> {
    match (inline, next) {
        (Some(v), _) => Ok((v, false)),
        (None, Some(v)) => Ok((v, true)),
        (None, None) => Err(format!("--{name} needs a value")),
    }
}

fn parse_serve_hostname(args: &[String]) -> Result<ServeHostname, String> {
    let mut opts = ServeHostname { tcp: false, udp: false, http: true, close: false, port: 9376 };
    let positional = walk_flags(args, |name, inline, next| match name {
        "tcp" => parse_bool(name, inline).map(|v| opts.tcp = v).map(|_| false),
        "udp" => parse_bool(name, inline).map(|v| opts.udp = v).map(|_| false),
        "http" => parse_bool(name, inline).map(|v| opts.http = v).map(|_| false),
        "close" => parse_bool(name, inline).map(|v| opts.close = v).map(|_| false),
        "port" => {
            let (v, consumed) = value(name, inline, next)?;
            opts.port = v.parse().map_err(|_| format!("--port: {v:?} is not a port number"))?;
            Ok(consumed)
        }
        other => Err(format!(
            "serve-hostname: unknown flag --{other} (flags: --tcp, --udp, --http, --close, --port)"
        )),
    })?;
    if let Some(extra) = positional.first() {
        return Err(format!("serve-hostname takes no arguments, got {extra:?}"));
    }
    if opts.http && (opts.tcp || opts.udp) {
        return Err("serve-hostname: can't serve TCP/UDP mode and HTTP mode at the same time \
                    (add --http=false)"
            .into());
    }
    if !(opts.http || opts.tcp || opts.udp) {
        return Err("serve-hostname: nothing to serve (use --tcp, --udp or --http)".into());
    }
    Ok(opts)
}

fn parse_connect(args: &[String]) -> Result<Connect, String> {
    let mut timeout = Duration::ZERO;
    let mut protocol = ConnectProtocol::Tcp;
    let mut udp_data = "hostname".to_string();
    let positional = walk_flags(args, |name, inline, next| match name {
        "timeout" => {
            let (v, consumed) = value(name, inline, next)?;
            timeout = parse_duration(v).map_err(|e| format!("--timeout: {e}"))?;
            Ok(consumed)
        }
        "protocol" => {
            let (v, consumed) = value(name, inline, next)?;
            protocol = match v {
                "" | "tcp" => ConnectProtocol::Tcp,
                "udp" => ConnectProtocol::Udp,
                "sctp" => return Err("--protocol sctp is not supported in the weir lab".into()),
                other => {
                    return Err(format!("--protocol {other:?} is not supported (tcp or udp)"));
                }
            };
            Ok(consumed)
        }
        "udp-data" => {
            let (v, consumed) = value(name, inline, next)?;
            udp_data = v.to_string();
            Ok(consumed)
        }
        other => Err(format!(
            "connect: unknown flag --{other} (flags: --timeout, --protocol, --udp-data)"
        )),
    })?;
    match positional.as_slice() {
        [dest] => Ok(Connect { dest: dest.clone(), timeout, protocol, udp_data }),
        [] => Err("connect needs one argument, HOST:PORT".into()),
        more => Err(format!("connect takes one argument, HOST:PORT; got {more:?}")),
    }
}

/// Runs agnhost with `args`; the process's exit status.
pub fn main(args: &[String]) -> ExitCode {
    match parse(args) {
        Err(message) => {
            eprintln!("agnhost: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Ok(Agnhost::Pause) => loop {
            std::thread::park();
        },
        Ok(Agnhost::Connect(c)) => match connect(&c) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("{message}");
                ExitCode::FAILURE
            }
        },
        Ok(Agnhost::ServeHostname(opts)) => match serve_hostname(&opts) {
            Ok(never) => match never {},
            Err(message) => {
                eprintln!("agnhost serve-hostname: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The hostname of this UTS namespace (the pod's name in the lab).
fn hostname() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string())
}

/// Serves until killed; returns only on a setup error.
fn serve_hostname(opts: &ServeHostname) -> Result<std::convert::Infallible, String> {
    let name = hostname().map_err(|e| format!("reading the hostname: {e}"))?;
    let port = opts.port;
    let mut threads = Vec::new();
    if opts.tcp || opts.http {
        let listener = bind_any(TcpListener::bind, port)
            .map_err(|e| format!("listening on TCP port {port}: {e}"))?;
        let (name, http, close) = (name.clone(), opts.http, opts.close);
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    if http {
                        serve_http(stream, &name, close);
                    } else {
                        serve_tcp(stream, &name);
                    }
                });
            }
        }));
    }
    if opts.udp {
        let socket = bind_any(UdpSocket::bind, port)
            .map_err(|e| format!("listening on UDP port {port}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((_, client)) = socket.recv_from(&mut buf) else { continue };
                println!("UDP request from {}", shown(client));
                let _ = socket.send_to(name.as_bytes(), client);
            }
        }));
    }
    println!("Serving on port {port}.");
    for t in threads {
        let _ = t.join();
    }
    Err("the servers stopped".into())
}

/// Binds `[::]:port` (both families), or `0.0.0.0:port` where IPv6 is off.
fn bind_any<T>(bind: impl Fn(SocketAddr) -> std::io::Result<T>, port: u16) -> std::io::Result<T> {
    bind(SocketAddr::from(([0u16; 8], port))).or_else(|_| bind(SocketAddr::from(([0u8; 4], port))))
}

/// A peer address as upstream logs it (IPv4 clients of the dual-stack socket unmapped).
fn shown(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        v4 => v4,
    }
}

fn serve_tcp(mut stream: TcpStream, name: &str) {
    if let Ok(peer) = stream.peer_addr() {
        println!("TCP request from {}", shown(peer));
    }
    let _ = stream.write_all(name.as_bytes());
}

/// A minimal HTTP/1.1 responder: every request gets 200 with the hostname.
fn serve_http(mut stream: TcpStream, name: &str, close: bool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let peer = stream.peer_addr().map(|p| shown(p).to_string()).unwrap_or_default();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            if pending.len() > 64 * 1024 {
                return;
            }
            continue;
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
        pending.drain(..end + 4);
        println!("HTTP request from {peer}");
        let wants_close = close || head.contains("connection: close");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n{name}",
            name.len(),
            if wants_close { "Connection: close\r\n" } else { "" },
        );
        if stream.write_all(response.as_bytes()).is_err() || wants_close {
            return;
        }
    }
}

fn connect(c: &Connect) -> Result<(), String> {
    let addr = resolve(&c.dest)?;
    let timeout = (!c.timeout.is_zero()).then_some(c.timeout);
    match c.protocol {
        ConnectProtocol::Tcp => {
            let result = match timeout {
                Some(t) => TcpStream::connect_timeout(&addr, t),
                None => TcpStream::connect(addr),
            };
            match result {
                Ok(_) => Ok(()),
                Err(e) if is_timeout(&e) => Err("TIMEOUT".into()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Err("REFUSED".into())
                }
                Err(e) => Err(format!("OTHER: {e}")),
            }
        }
        ConnectProtocol::Udp => {
            let local = if addr.is_ipv4() {
                SocketAddr::from(([0u8; 4], 0))
            } else {
                SocketAddr::from(([0u16; 8], 0))
            };
            let socket = UdpSocket::bind(local).map_err(|e| format!("OTHER: {e}"))?;
            socket.connect(addr).map_err(|e| format!("OTHER: {e}"))?;
            socket.set_read_timeout(timeout).map_err(|e| format!("OTHER: {e}"))?;
            let udp_error = |e: std::io::Error| {
                if is_timeout(&e) {
                    format!("TIMEOUT: {e}")
                } else if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    format!("REFUSED: {e}")
                } else {
                    format!("UNKNOWN: {e}")
                }
            };
            socket.send(format!("{}\n", c.udp_data).as_bytes()).map_err(udp_error)?;
            let mut buf = [0u8; 1024];
            match socket.recv(&mut buf).map_err(udp_error)? {
                0 => Err("OTHER: No data received from the server. Cannot guarantee the server \
                          received the request."
                    .into()),
                _ => Ok(()),
            }
        }
    }
}

fn resolve(dest: &str) -> Result<SocketAddr, String> {
    if dest.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.is_empty()) {
        return Err(format!("UNKNOWN: address {dest}: missing port in address"));
    }
    dest.to_socket_addrs()
        .map_err(|e| format!("DNS: {e}"))?
        .next()
        .ok_or_else(|| format!("DNS: no address for {dest}"))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn serve_hostname_flags_as_upstream_writes_them() {
        let parsed =
            parse(&args(&["serve-hostname", "--tcp", "--http=false", "--port", "80"])).unwrap();
        assert_eq!(
            parsed,
            Agnhost::ServeHostname(ServeHostname {
                tcp: true,
                udp: false,
                http: false,
                close: false,
                port: 80
            })
        );
        let Agnhost::ServeHostname(udp) =
            parse(&args(&["serve-hostname", "--udp", "--http=false", "--port=81"])).unwrap()
        else {
            panic!()
        };
        assert!(udp.udp && !udp.tcp && udp.port == 81);
        let Agnhost::ServeHostname(http) = parse(&args(&["serve-hostname"])).unwrap() else {
            panic!()
        };
        assert!(http.http && http.port == 9376);
    }

    #[test]
    fn serve_hostname_rejects_what_upstream_rejects() {
        let err = parse(&args(&["serve-hostname", "--tcp"])).unwrap_err();
        assert!(err.contains("--http=false"), "{err}");
        assert!(parse(&args(&["serve-hostname", "--port", "x"])).unwrap_err().contains("port"));
        assert!(parse(&args(&["serve-hostname", "--port"])).unwrap_err().contains("value"));
        assert!(parse(&args(&["serve-hostname", "--nope"])).unwrap_err().contains("--nope"));
        assert!(parse(&args(&["serve-hostname", "--http=maybe"])).is_err());
        assert!(parse(&args(&["serve-hostname", "--http=false"])).is_err());
    }

    #[test]
    fn connect_flags() {
        assert_eq!(
            parse(&args(&["connect", "10.0.0.1:80", "--timeout=1s", "--protocol=udp"])).unwrap(),
            Agnhost::Connect(Connect {
                dest: "10.0.0.1:80".into(),
                timeout: Duration::from_secs(1),
                protocol: ConnectProtocol::Udp,
                udp_data: "hostname".into(),
            })
        );
        let Agnhost::Connect(c) =
            parse(&args(&["connect", "--timeout", "500ms", "s-x-a.x.svc:81"])).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.protocol, ConnectProtocol::Tcp);
        assert!(parse(&args(&["connect"])).unwrap_err().contains("HOST:PORT"));
        assert!(parse(&args(&["connect", "a:1", "b:2"])).is_err());
        assert!(parse(&args(&["connect", "a:1", "--protocol=sctp"])).unwrap_err().contains("sctp"));
        assert!(parse(&args(&["connect", "a:1", "--timeout=soon"])).is_err());
    }

    #[test]
    fn other_subcommands() {
        assert_eq!(parse(&args(&["pause"])).unwrap(), Agnhost::Pause);
        let err = parse(&args(&["netexec"])).unwrap_err();
        assert!(err.contains("netexec") && err.contains("serve-hostname"), "{err}");
        assert!(parse(&[]).unwrap_err().contains("subcommand"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "1", "s", "1x", "-1s", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serves_and_connects_on_loopback() {
        // Real sockets on the loopback of the test's own namespace: TCP and UDP servers answer
        // with the hostname, connect succeeds against them and fails against a closed port.
        let name = hostname().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let n = name.clone();
        std::thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                serve_tcp(s, &n);
            }
        });
        let mut got = String::new();
        TcpStream::connect(("127.0.0.1", tcp_port)).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, name);
        let c = |dest: String, protocol| Connect {
            dest,
            timeout: Duration::from_secs(1),
            protocol,
            udp_data: "hostname".into(),
        };
        connect(&c(format!("127.0.0.1:{tcp_port}"), ConnectProtocol::Tcp)).unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = connect(&c(format!("127.0.0.1:{closed}"), ConnectProtocol::Tcp)).unwrap_err();
        assert_eq!(err, "REFUSED");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(b"me", from);
            }
        });
        connect(&c(format!("127.0.0.1:{udp_port}"), ConnectProtocol::Udp)).unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let err =
            connect(&c(format!("127.0.0.1:{silent_port}"), ConnectProtocol::Udp)).unwrap_err();
        assert!(err.starts_with("TIMEOUT"), "{err}");
        assert!(
            connect(&c("nohost".into(), ConnectProtocol::Tcp)).unwrap_err().starts_with("UNKNOWN")
        );
    }
}
