//! `weir-probe`: one network probe, run by tests inside a pod-like namespace (and cgroup).
//!
//! `weir-probe tcp|udp|udp-connected HOST:PORT [--timeout-ms N]` sends `ping`, waits for one
//! reply and prints one JSON line: `{"ok":true,"reply":"...","peer":"...","local":"..."}` or
//! `{"ok":false,"error":"...","kind":"..."}`. Exit code 0 when a reply came, 1 otherwise, 2 on
//! bad usage. `peer` is what the socket reports (getpeername, or recvfrom's source for UDP).
//!
//! `weir-probe http HOST:PORT [--timeout-ms N]` sends `GET /` (HTTP/1.0) and prints the whole
//! response as `reply`.
//!
//! `weir-probe tcp-session|udp-session HOST:PORT` keeps one TCP connection (or one connected
//! UDP socket) open: every line on stdin sends a `ping` and prints the reply as JSON (with the
//! errno of a failure as `errno`); EOF closes it.
//!
//! `weir-probe tcp-rr HOST:PORT COUNT` makes COUNT request/responses on one TCP connection and
//! prints their latency: `{"ok":true,"count":n,"p50_us":..,"p99_us":..}`.
//!
//! `weir-probe tcp-spread HOST:PORT COUNT` makes COUNT sequential TCP connections to echo
//! servers (tests/src/echo.rs) and prints how many each backend answered and how long the
//! connections took, from the first connect to the last close (`elapsed_us`: the process's
//! start, namespace and cgroup entry excluded):
//! `{"ok":true,"backends":{"10.0.0.2:8080":n,...},"failures":k,"elapsed_us":t}`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use serde_json::json;

const USAGE: &str = "usage: weir-probe tcp|udp|udp-connected|http HOST:PORT [--timeout-ms N] | tcp-spread HOST:PORT COUNT | tcp-rr HOST:PORT COUNT | tcp-session|udp-session HOST:PORT";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(target) = target.parse::<SocketAddr>() else {
        eprintln!("not an address:port: {target}; {USAGE}");
        return ExitCode::from(2);
    };
    if mode == "tcp-session" || mode == "udp-session" {
        return session(target, mode == "udp-session");
    }
    if mode == "tcp-spread" || mode == "tcp-rr" {
        let Some(count) = args.get(2).and_then(|c| c.parse::<u32>().ok()).filter(|c| *c > 0) else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        let count = count.min(100_000);
        return if mode == "tcp-rr" {
            request_response(target, count)
        } else {
            spread(target, count)
        };
    }
    let timeout_ms = match args.get(2).map(String::as_str) {
        Some("--timeout-ms") => args.get(3).and_then(|v| v.parse().ok()).unwrap_or(0),
        None => 2000,
        Some(_) => 0,
    };
    if timeout_ms == 0 {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let timeout = Duration::from_millis(timeout_ms);
    let result = match mode.as_str() {
        "tcp" => tcp(target, timeout),
        "udp" => udp(target, timeout, false),
        "udp-connected" => udp(target, timeout, true),
        "http" => http(target, timeout),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok((reply, peer, local)) => {
            println!("{}", json!({"ok": true, "reply": reply, "peer": peer, "local": local}));
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!(
                "{}",
                json!({"ok": false, "error": err.to_string(), "kind": format!("{:?}", err.kind())})
            );
            ExitCode::from(1)
        }
    }
}

type Probe = std::io::Result<(String, String, String)>;

fn tcp(target: SocketAddr, timeout: Duration) -> Probe {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let reply = exchange(&stream)?;
    Ok((reply, stream.peer_addr()?.to_string(), stream.local_addr()?.to_string()))
}

/// `GET /` over HTTP/1.0; the reply is the whole response (status line, headers, body).
fn http(target: SocketAddr, timeout: Duration) -> Probe {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok((reply, stream.peer_addr()?.to_string(), stream.local_addr()?.to_string()))
}

/// Sends one `ping` line and reads one reply line.
fn exchange(stream: &TcpStream) -> std::io::Result<String> {
    (&*stream).write_all(b"ping\n")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(reply)
}

/// COUNT request/responses on one connection; prints their p50 and p99 in microseconds.
fn request_response(target: SocketAddr, count: u32) -> ExitCode {
    let result = (|| -> std::io::Result<Vec<f64>> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_nodelay(true)?;
        let mut latencies = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let started = std::time::Instant::now();
            exchange(&stream)?;
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
        latencies.sort_by(f64::total_cmp);
        Ok(latencies)
    })();
    match result {
        Ok(l) => {
            let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
            println!(
                "{}",
                json!({"ok": true, "count": l.len(), "p50_us": at(0.5), "p99_us": at(0.99)})
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{}", json!({"ok": false, "error": err.to_string()}));
            ExitCode::from(1)
        }
    }
}

/// One connection kept open: every line on stdin sends a `ping` and prints the reply (or the
/// error) as JSON; EOF on stdin closes the connection.
/// The connection a session holds.
enum Held {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Held {
    fn open(target: SocketAddr, udp: bool) -> std::io::Result<Self> {
        let timeout = Duration::from_secs(2);
        if !udp {
            let stream = TcpStream::connect_timeout(&target, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            return Ok(Self::Tcp(stream));
        }
        let socket = udp_socket(target, timeout)?;
        socket.connect(target)?;
        Ok(Self::Udp(socket))
    }

    fn exchange(&self) -> std::io::Result<String> {
        match self {
            Self::Tcp(stream) => exchange(stream),
            Self::Udp(socket) => {
                socket.send(b"ping\n")?;
                let mut buf = [0u8; 512];
                let n = socket.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
        }
    }
}

fn session(target: SocketAddr, udp: bool) -> ExitCode {
    let held = match Held::open(target, udp) {
        Ok(held) => held,
        Err(err) => {
            println!("{}", json!({"ok": false, "error": err.to_string()}));
            return ExitCode::from(1);
        }
    };
    println!("{}", json!({"ok": true, "connected": true}));
    let mut ok = true;
    for _ in std::io::stdin().lines().map_while(Result::ok) {
        match held.exchange() {
            Ok(reply) => println!("{}", json!({"ok": true, "reply": reply})),
            Err(err) => {
                ok = false;
                println!(
                    "{}",
                    json!({
                        "ok": false,
                        "error": err.to_string(),
                        "kind": format!("{:?}", err.kind()),
                        "errno": err.raw_os_error(),
                    })
                );
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// A UDP socket of `target`'s family on an ephemeral port, reads bounded by `timeout`.
fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

fn udp(target: SocketAddr, timeout: Duration, connected: bool) -> Probe {
    let socket = udp_socket(target, timeout)?;
    let mut buf = [0u8; 512];
    let (n, from) = if connected {
        socket.connect(target)?;
        socket.send(b"ping\n")?;
        let n = socket.recv(&mut buf)?;
        (n, socket.peer_addr()?)
    } else {
        socket.send_to(b"ping\n", target)?;
        socket.recv_from(&mut buf)?
    };
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok((reply, from.to_string(), socket.local_addr()?.to_string()))
}

fn spread(target: SocketAddr, count: u32) -> ExitCode {
    let mut backends = std::collections::BTreeMap::<String, u32>::new();
    let mut failures = 0u32;
    let mut first_error = None;
    let started = std::time::Instant::now();
    for _ in 0..count {
        match tcp(target, Duration::from_secs(2)) {
            Ok((reply, _, _)) => {
                // "pong from <backend> to <client>"
                let backend = reply.split_whitespace().nth(2).unwrap_or("?").to_string();
                *backends.entry(backend).or_default() += 1;
            }
            Err(err) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("{err} ({:?})", err.kind()));
            }
        }
    }
    let elapsed_us = started.elapsed().as_micros() as u64;
    println!(
        "{}",
        json!({
            "ok": failures == 0,
            "backends": backends,
            "failures": failures,
            "first_error": first_error,
            "elapsed_us": elapsed_us,
        })
    );
    if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
