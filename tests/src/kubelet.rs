//! A fake node for the control-plane tests: a Node object whose kubelet endpoint is a tiny
//! HTTP server on 127.0.0.1, plus a loop that plays the node runtime's part in the API.
//!
//! The kubelet server answers what weir's API server proxies to a node:
//! - `GET /containerLogs/NS/POD/CONTAINER`: the lines `POD/CONTAINER line N` for N in 1..=3
//!   (`tailLines` honoured); with `follow=true` it keeps sending one more line every 100 ms
//!   (at most 600) until the client goes away.
//! - `/exec/NS/POD/CONTAINER` and `/attach/...` with a WebSocket upgrade, speaking the
//!   remote-command protocol kubectl uses (`v5.channel.k8s.io`, also v4): `command=echo` writes
//!   its arguments to stdout; anything else (and attach) echoes stdin to stdout until stdin is
//!   closed; then the Success status on the error channel and a close frame. An attach also
//!   marks the Pod Succeeded (the attached process ended), as `kubectl run -i` waits for that.
//!
//! The node-runtime loop (every 100 ms, through the plain-HTTP listener with the admin token):
//! Pods bound to the node that are Pending become Running and Ready with an IP, and Pods with a
//! deletionTimestamp are deleted with gracePeriodSeconds=0, as a node runtime does after
//! stopping the containers. Every request path the kubelet server saw is recorded.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use base64::Engine;
use serde_json::{Value, json};

use crate::apiserver::{ApiServer, http_request};

const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A registered fake node; stops its threads on drop.
pub struct FakeNode {
    pub name: String,
    pub kubelet: SocketAddr,
    /// "METHOD /path?query" of every request the kubelet server got.
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Clone)]
struct Api {
    addr: SocketAddr,
    token: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (content_type, bytes) = match body {
            Some(b) if method == "PATCH" => ("application/merge-patch+json", b.to_string()),
            Some(b) => ("application/json", b.to_string()),
            None => ("application/json", String::new()),
        };
        let resp = http_request(
            self.addr,
            method,
            path,
            Some(&self.token),
            content_type,
            bytes.as_bytes(),
        );
        (resp.status, serde_json::from_slice(&resp.body).unwrap_or(Value::Null))
    }
}

impl FakeNode {
    /// Registers Node `name` (Ready, InternalIP 127.0.0.1, kubelet port of the fake server)
    /// and starts the kubelet server and the node-runtime loop.
    pub fn start(server: &ApiServer, name: &str) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake kubelet");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let kubelet = listener.local_addr().expect("address");
        let api = Api {
            addr: server.insecure_addr.expect("insecure listener"),
            token: server.token("admin"),
        };
        let node = json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port()}},
            }
        });
        let (code, body) = api.call("POST", "/api/v1/nodes", Some(&node));
        assert_eq!(code, 201, "registering node {name}: {body}");
        // Status is a subresource: write it there too, with a merge patch as the node runtime
        // does (the pod-CIDR controller may update the new Node at the same moment).
        let status = json!({"status": node["status"].clone()});
        let (code, body) =
            api.call("PATCH", &format!("/api/v1/nodes/{name}/status"), Some(&status));
        assert_eq!(code, 200, "node status: {body}");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, requests, api) = (stop.clone(), requests.clone(), api.clone());
            threads.push(std::thread::spawn(move || serve(listener, stop, requests, api)));
        }
        {
            let (stop, api, name) = (stop.clone(), api.clone(), name.to_string());
            threads.push(std::thread::spawn(move || node_runtime(&name, &api, &stop)));
        }
        FakeNode { name: name.to_string(), kubelet, requests, stop, threads }
    }

    /// The recorded kubelet requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<String> {
        let all = self.requests.lock().expect("requests lock");
        all.iter()
            .filter(|r| r.split(' ').nth(1).is_some_and(|p| p.starts_with(prefix)))
            .cloned()
            .collect()
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn node_runtime(node: &str, api: &Api, stop: &AtomicBool) {
    let mut next_ip = 10u32;
    while !stop.load(Ordering::SeqCst) {
        let (code, list) =
            api.call("GET", &format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}"), None);
        if code == 200 {
            for pod in list["items"].as_array().into_iter().flatten() {
                let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
                let name = pod["metadata"]["name"].as_str().unwrap_or("");
                let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
                if pod["metadata"]["deletionTimestamp"].is_string() {
                    api.call("DELETE", &format!("{path}?gracePeriodSeconds=0"), None);
                } else if pod["status"]["phase"].as_str().is_none_or(|p| p == "Pending") {
                    next_ip += 1;
                    let ip = format!("10.244.0.{}", next_ip % 250 + 2);
                    let status = json!({"status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "containerStatuses": pod["spec"]["containers"].as_array().into_iter().flatten().map(|c| json!({
                            "name": c["name"], "image": c["image"], "ready": true, "restartCount": 0,
                            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})).collect::<Vec<_>>(),
                    }});
                    api.call("PATCH", &format!("{path}/status"), Some(&status));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    api: Api,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (stop, requests, api) = (stop.clone(), requests.clone(), api.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                    if let Err(err) = connection(stream, &stop, &requests, &api) {
                        eprintln!("fake kubelet: {err}");
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

struct Head {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn params(&self, key: &str) -> Vec<&str> {
        self.query.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    fn flag(&self, key: &str) -> bool {
        self.params(key).first().is_some_and(|v| *v == "true" || *v == "1")
    }
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Head> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect();
    Ok(Head { method, path: path.to_string(), query, headers })
}

fn connection(
    stream: TcpStream,
    stop: &AtomicBool,
    requests: &Mutex<Vec<String>>,
    api: &Api,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let head = read_head(&mut reader)?;
    let query_text: Vec<String> = head.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    requests.lock().expect("requests lock").push(format!(
        "{} {}?{}",
        head.method,
        head.path,
        query_text.join("&")
    ));
    let segments: Vec<&str> = head.path.split('/').filter(|s| !s.is_empty()).collect();
    let mut out = stream;
    match segments.as_slice() {
        ["containerLogs", _ns, pod, container] => logs(&mut out, &head, pod, container, stop),
        [kind @ ("exec" | "attach"), ns, pod, container] if head.header("upgrade").is_some() => {
            let target = Target { ns, pod, container, attach: *kind == "attach" };
            remote_command(reader, out, &head, &target, api)
        }
        _ => out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        ),
    }
}

fn logs(
    out: &mut TcpStream,
    head: &Head,
    pod: &str,
    container: &str,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let tail: usize = head.params("tailLines").first().and_then(|t| t.parse().ok()).unwrap_or(3);
    let lines: Vec<String> = (1..=3).map(|n| format!("{pod}/{container} line {n}\n")).collect();
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )?;
    let chunk = |out: &mut TcpStream, text: &str| -> std::io::Result<()> {
        write!(out, "{:x}\r\n{text}\r\n", text.len())?;
        out.flush()
    };
    for line in &lines[lines.len().saturating_sub(tail)..] {
        chunk(out, line)?;
    }
    if head.flag("follow") {
        for n in 4..=600 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            // Fails once the client has gone away.
            chunk(out, &format!("{pod}/{container} line {n}\n"))?;
        }
    }
    out.write_all(b"0\r\n\r\n")
}

/// One WebSocket frame from the client (masked); None on a close frame or EOF.
fn read_frame(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut h = [0u8; 2];
    if reader.read_exact(&mut h).is_err() {
        return Ok(None);
    }
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        reader.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        reader.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    if masked {
        reader.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(if opcode == 8 { None } else { Some((opcode, payload)) })
}

fn write_frame(out: &mut TcpStream, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    out.write_all(&frame)?;
    out.flush()
}

#[derive(Clone, Copy)]
struct Target<'a> {
    ns: &'a str,
    pod: &'a str,
    container: &'a str,
    attach: bool,
}

fn remote_command(
    mut reader: BufReader<TcpStream>,
    mut out: TcpStream,
    head: &Head,
    target: &Target<'_>,
    api: &Api,
) -> std::io::Result<()> {
    let Target { ns, pod, container, attach } = *target;
    let key = head.header("sec-websocket-key").unwrap_or("");
    let offered = head.header("sec-websocket-protocol").unwrap_or("");
    let protocol = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p))
        .unwrap_or("v4.channel.k8s.io");
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    write!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )?;
    let command = head.params("command");
    if !attach && command.first() == Some(&"echo") {
        let text = format!("{}\n", command[1..].join(" "));
        write_frame(&mut out, 2, &[&[1u8][..], text.as_bytes()].concat())?;
    } else if head.flag("stdin") {
        // Echo stdin to stdout until stdin closes (v5: a close signal on channel 255).
        while let Some((opcode, payload)) = read_frame(&mut reader)? {
            match (opcode, payload.first()) {
                (2, Some(0)) => write_frame(&mut out, 2, &[&[1u8][..], &payload[1..]].concat())?,
                (2, Some(255)) => break,
                (9, _) => write_frame(&mut out, 10, &payload)?,
                _ => {}
            }
        }
    }
    if attach {
        let status = json!({"status": {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": container, "ready": false, "restartCount": 0, "image": "",
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}});
        api.call("PATCH", &format!("/api/v1/namespaces/{ns}/pods/{pod}/status"), Some(&status));
    }
    let success = br#"{"metadata":{},"status":"Success"}"#;
    write_frame(&mut out, 2, &[&[3u8][..], success].concat())?;
    write_frame(&mut out, 8, &1000u16.to_be_bytes())?;
    // Wait for the client's close (bounded by the read timeout) before closing the socket.
    while read_frame(&mut reader)?.is_some() {}
    Ok(())
}
