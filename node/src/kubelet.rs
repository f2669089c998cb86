//! The kubelet API subset the API server proxies to, on plain HTTP (lab only: the listener is
//! inside the lab's namespaces; a real kubelet serves TLS and authenticates the API server).
//!
//! - `GET /healthz` -> `ok`
//! - `GET /containerLogs/{ns}/{pod}/{container}?follow&tailLines&timestamps&previous`
//! - `/exec/{ns}/{pod}/{container}?command=..&stdin&stdout&stderr&tty` and
//!   `/attach/{ns}/{pod}/{container}?stdin&stdout&stderr&tty`: WebSocket with the
//!   `v5.channel.k8s.io` (preferred) or `v4.channel.k8s.io` subprotocol. Each binary message
//!   starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the final metav1.Status (exit code
//!   in details.causes, reason ExitCode), 4 terminal resize; v5 adds 255 (close a channel).
//!   Or SPDY/3.1 (`X-Stream-Protocol-Version: v4.channel.k8s.io`), kubectl's fallback: one
//!   SPDY stream per channel, named by its `streamtype` header ([`spdy`] is the codec).
//!   Both transports feed one transport-free [`Session`].
use std::{
    convert::Infallible,
    os::fd::AsFd,
    process::Stdio,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, frame::coding::CloseCode},
    },
};

use crate::{ContainerShared, PodShared, Shared, logs, rules, spawn, spdy};

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;
/// A pod and one of its containers.
type Target = (Arc<PodShared>, Arc<ContainerShared>);

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// The SPDY upgrade kubectl asks for when WebSockets are off, and the stream protocol spoken
/// over it (v4: the error stream carries a JSON metav1.Status).
const SPDY_UPGRADE: &str = "SPDY/3.1";
const SPDY_PROTOCOLS: [&str; 1] = ["v4.channel.k8s.io"];

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, shared).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let body: String = body.into();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("static response")
}

/// Query parameters (repeated keys kept in order).
fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect()
}

fn flag(params: &[(String, String)], key: &str) -> bool {
    params.iter().any(|(k, v)| k == key && matches!(v.as_str(), "1" | "true" | "True" | ""))
}

fn find(
    shared: &Shared,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<Target, Box<Response<Body>>> {
    let pods = shared.pods.lock().unwrap();
    let Some(p) = pods.get(&(ns.to_string(), pod.to_string())).cloned() else {
        return Err(Box::new(text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not on this node"),
        )));
    };
    drop(pods);
    let containers = p.containers.lock().unwrap();
    let c = if container.is_empty() && containers.len() == 1 {
        containers.values().next().cloned()
    } else {
        containers.get(container).cloned()
    };
    drop(containers);
    match c {
        Some(c) => Ok((p, c)),
        None => Err(Box::new(text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} is not valid for pod {pod}"),
        ))),
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["containerLogs", ns, pod, container] => match find(&shared, ns, pod, container) {
            Ok((p, c)) => container_logs(&req, p, c),
            Err(resp) => *resp,
        },
        ["portForward", ns, pod] => {
            let found =
                shared.pods.lock().unwrap().get(&(ns.to_string(), pod.to_string())).cloned();
            match found {
                Some(p) => crate::portforward::upgrade(req, p, format!("{ns}/{pod}")),
                None => text(StatusCode::NOT_FOUND, format!("pod {ns}/{pod} is not on this node")),
            }
        }
        [kind @ ("exec" | "attach"), ns, pod, container] => {
            let kind = kind.to_string();
            match find(&shared, ns, pod, container) {
                Ok((p, c)) => upgrade(req, shared, p, c, &kind),
                Err(resp) => *resp,
            }
        }
        _ => text(StatusCode::NOT_FOUND, format!("{path} is not served by the weir node runtime")),
    }
}

fn container_logs(
    req: &Request<Incoming>,
    pod: Arc<PodShared>,
    c: Arc<ContainerShared>,
) -> Response<Body> {
    let params = query(req);
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let follow = flag(&params, "follow") && get("follow").is_some();
    let previous = get("previous").is_some() && flag(&params, "previous");
    let timestamps = get("timestamps").is_some() && flag(&params, "timestamps");
    let tail_lines = match get("tailLines").map(|v| v.parse::<i64>()) {
        Some(Ok(n)) if n >= 0 => Some(n as usize),
        Some(_) => {
            return text(StatusCode::BAD_REQUEST, "tailLines must be a non-negative integer");
        }
        None => None,
    };
    let current = c.live.lock().unwrap().run;
    let run = match (current, previous) {
        (None, _) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("container {:?} is waiting to start: no logs yet", c.name),
            );
        }
        (Some(0), true) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container {:?} not found", c.name),
            );
        }
        (Some(run), true) => run - 1,
        (Some(run), false) => run,
    };
    let path = logs::run_log_path(&pod.dir, &c.name, run);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    tokio::spawn(async move {
        let content = tokio::fs::read(&path).await.unwrap_or_default();
        let complete = content.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let text_content = String::from_utf8_lossy(&content[..complete]).into_owned();
        let mut out = String::new();
        for line in logs::tail(&text_content, tail_lines) {
            if let Some(parsed) = logs::parse_line(line) {
                out.push_str(&logs::render(&parsed, timestamps));
            }
        }
        if !out.is_empty() && tx.send(Ok(Frame::data(Bytes::from(out)))).await.is_err() {
            return;
        }
        if !follow || previous {
            return;
        }
        let mut offset = complete;
        let mut changes = c.changes.subscribe();
        loop {
            let running = {
                let live = c.live.lock().unwrap();
                live.run == Some(run) && live.pid.is_some()
            };
            let content = tokio::fs::read(&path).await.unwrap_or_default();
            if content.len() > offset {
                let end = content[offset..]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(offset, |i| offset + i + 1);
                let mut out = String::new();
                for line in String::from_utf8_lossy(&content[offset..end]).lines() {
                    if let Some(parsed) = logs::parse_line(line) {
                        out.push_str(&logs::render(&parsed, timestamps));
                    }
                }
                offset = end;
                if !out.is_empty() && tx.send(Ok(Frame::data(Bytes::from(out)))).await.is_err() {
                    return;
                }
            }
            if !running {
                return;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(BodyExt::boxed(body))
        .expect("static response")
}

fn tokio_stream<T>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The wire protocol of an exec/attach request.
enum Transport {
    WebSocket { accept_key: String, protocol: &'static str },
    Spdy { protocol: &'static str },
}

/// Picks the transport from the upgrade request, or says why none fits.
fn transport(req: &Request<Incoming>) -> Result<Transport, String> {
    let headers = req.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let listed = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .filter(|p| !p.is_empty())
            .collect()
    };
    if upgrade.eq_ignore_ascii_case("websocket") {
        let key = headers
            .get("sec-websocket-key")
            .map(|k| derive_accept_key(k.as_bytes()))
            .ok_or("missing Sec-WebSocket-Key")?;
        let offered = listed("sec-websocket-protocol");
        let protocol =
            PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)).ok_or_else(|| {
                format!("no supported subprotocol in {offered:?}: use one of {PROTOCOLS:?}")
            })?;
        return Ok(Transport::WebSocket { accept_key: key, protocol });
    }
    if upgrade.eq_ignore_ascii_case(SPDY_UPGRADE) {
        let offered = listed("x-stream-protocol-version");
        let protocol = SPDY_PROTOCOLS
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
            .ok_or_else(|| {
                format!(
                    "no supported X-Stream-Protocol-Version in {offered:?}: use one of {SPDY_PROTOCOLS:?}"
                )
            })?;
        return Ok(Transport::Spdy { protocol });
    }
    Err(format!(
        "exec/attach needs an upgrade to WebSocket ({PROTOCOLS:?}) or {SPDY_UPGRADE} \
         ({SPDY_PROTOCOLS:?}); got Upgrade: {upgrade:?}"
    ))
}

fn upgrade(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    pod: Arc<PodShared>,
    c: Arc<ContainerShared>,
    kind: &str,
) -> Response<Body> {
    let transport = match transport(&req) {
        Ok(t) => t,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let params = query(&req);
    let (pid, run) = {
        let live = c.live.lock().unwrap();
        (live.pid, live.run)
    };
    // attach to a container that has just exited gets its exit status.
    let pid = match (pid, kind) {
        (Some(pid), _) => pid,
        (None, "attach") if run.is_some() => 0,
        _ => {
            return text(StatusCode::BAD_REQUEST, format!("container {:?} is not running", c.name));
        }
    };
    let command: Vec<String> =
        params.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
    if kind == "exec" && command.is_empty() {
        return text(StatusCode::BAD_REQUEST, "exec needs at least one command parameter");
    }
    let tty = flag(&params, "tty");
    let opts = StreamOpts {
        stdin: flag(&params, "stdin") || flag(&params, "input"),
        stdout: flag(&params, "stdout") || flag(&params, "output"),
        // As kubelet: a terminal has no separate stderr.
        stderr: (flag(&params, "stderr") || flag(&params, "error")) && !tty,
        tty,
    };
    let response = match &transport {
        Transport::WebSocket { accept_key, protocol } => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", accept_key.as_str())
            .header("sec-websocket-protocol", *protocol),
        Transport::Spdy { protocol } => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, SPDY_UPGRADE)
            .header("x-stream-protocol-version", *protocol),
    };
    let kind = kind.to_string();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => TokioIo::new(u),
            Err(err) => {
                log::warn!("{kind}: upgrade failed: {err}");
                return;
            }
        };
        let session = match transport {
            Transport::WebSocket { protocol, .. } => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                websocket_session(ws, protocol.starts_with("v5"))
            }
            Transport::Spdy { .. } => spdy_session(upgraded, opts),
        };
        let result = if kind == "exec" {
            exec_session(session, &shared, &pod, &c, pid, command, opts).await
        } else {
            attach_session(session, &c, opts).await
        };
        if let Err(err) = result {
            log::debug!("{kind} session ended: {err:#}");
        }
    });
    response
        .body(Full::new(Bytes::new()).map_err(|never| match never {}).boxed())
        .expect("static response")
}

/// The upgraded connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

#[derive(Clone, Copy)]
struct StreamOpts {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// What the client sends.
enum ClientMsg {
    Stdin(Bytes),
    CloseStdin,
    Resize(u16, u16),
    /// Pings (kubectl's heartbeat), unknown channels, malformed resizes: nothing to do.
    Ignore,
}

/// What a session sends to the client.
enum Out {
    /// Output on 1 (stdout) or 2 (stderr).
    Data(u8, Bytes),
    /// The final `metav1.Status`; the connection is closed after it.
    Status(Value),
}

/// An exec/attach session with the wire protocol taken off: output goes into `out`, client
/// messages come from `inbound`, which ends (None) when the client leaves.
struct Session {
    out: mpsc::Sender<Out>,
    inbound: mpsc::Receiver<ClientMsg>,
}

impl Session {
    async fn send(&self, out: Out) -> anyhow::Result<()> {
        self.out.send(out).await.map_err(|_| anyhow::anyhow!("the client connection is gone"))
    }
}

/// A terminal size message `{"Width":W,"Height":H}`.
fn parse_resize(data: &[u8]) -> Option<(u16, u16)> {
    let v: Value = serde_json::from_slice(data).ok()?;
    Some((v["Width"].as_u64()? as u16, v["Height"].as_u64()? as u16))
}

fn decode(msg: Message, v5: bool) -> Option<ClientMsg> {
    let data = match msg {
        Message::Binary(b) => b,
        Message::Close(_) => return None,
        _ => return Some(ClientMsg::Ignore),
    };
    Some(match data.first() {
        Some(0) => ClientMsg::Stdin(data.slice(1..)),
        Some(4) => match parse_resize(&data[1..]) {
            Some((w, h)) => ClientMsg::Resize(w, h),
            None => ClientMsg::Ignore,
        },
        Some(255) if v5 && data.get(1) == Some(&0) => ClientMsg::CloseStdin,
        _ => ClientMsg::Ignore,
    })
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    Message::Binary(out.into())
}

/// Runs the WebSocket side of a session (channel-prefixed binary messages) on its own task.
fn websocket_session(ws: WebSocketStream<impl Io>, v5: bool) -> Session {
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(32);
    let (in_tx, in_rx) = mpsc::channel::<ClientMsg>(32);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let mut in_tx = Some(in_tx);
        // One client message at a time: reading stops while it waits (backpressure).
        let mut pending: Option<ClientMsg> = None;
        loop {
            let reading = in_tx.is_some() && pending.is_none();
            let mut client_gone = false;
            tokio::select! {
                out = out_rx.recv() => match out {
                    Some(Out::Data(channel, data)) => {
                        if sink.send(frame(channel, &data)).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::Status(status)) => {
                        let _ = sink.send(frame(3, status.to_string().as_bytes())).await;
                        break;
                    }
                    None => break,
                },
                permit = reserve(&in_tx), if pending.is_some() => match permit {
                    Some(permit) => permit.send(pending.take().expect("checked")),
                    None => client_gone = true,
                },
                msg = stream.next(), if reading => {
                    match msg.and_then(|m| m.ok()).and_then(|m| decode(m, v5)) {
                        Some(ClientMsg::Ignore) => {}
                        Some(msg) => pending = Some(msg),
                        None => client_gone = true,
                    }
                }
            }
            if client_gone {
                // The session sees the end of its inbound channel.
                in_tx = None;
                pending = None;
            }
        }
        close_normally(&mut sink).await;
        // The closing handshake: read until the client's Close (bounded). Closing the socket
        // with the client's last frames unread would make the kernel reset the connection,
        // which can drop the final status still on its way to the client.
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    });
    Session { out: out_tx, inbound: in_rx }
}

/// A send permit on the client-message channel, None when it is closed.
async fn reserve(tx: &Option<mpsc::Sender<ClientMsg>>) -> Option<mpsc::Permit<'_, ClientMsg>> {
    tx.as_ref()?.reserve().await.ok()
}

/// Ends a session with a Close frame carrying 1000 (normal closure): kubectl's WebSocket client
/// reports a close without a status code (1005) as a broken stream.
async fn close_normally<S>(sink: &mut S)
where
    S: futures::Sink<Message> + Unpin,
{
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

/// How long a WebSocket client has to answer the server's Close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);
/// How long a SPDY client has to open the streams the request asked for (kubelet's value).
const SPDY_STREAMS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the client has to close the connection after the final status.
const SPDY_LINGER: Duration = Duration::from_secs(5);

/// The streams of a SPDY session by their `streamtype` header.
#[derive(Default)]
struct SpdyStreams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl SpdyStreams {
    /// Whether every stream the request asked for is open (kubelet waits for them too).
    fn complete(&self, opts: StreamOpts) -> bool {
        self.error.is_some()
            && (!opts.stdin || self.stdin.is_some())
            && (!opts.stdout || self.stdout.is_some())
            && (!opts.stderr || self.stderr.is_some())
            && (!opts.tty || self.resize.is_some())
    }

    fn slot(&mut self, stream_type: &str) -> Option<&mut Option<u32>> {
        Some(match stream_type {
            "error" => &mut self.error,
            "stdin" => &mut self.stdin,
            "stdout" => &mut self.stdout,
            "stderr" => &mut self.stderr,
            "resize" => &mut self.resize,
            _ => return None,
        })
    }

    fn all(&self) -> impl Iterator<Item = u32> {
        [self.stdout, self.stderr, self.error, self.stdin, self.resize].into_iter().flatten()
    }
}

/// Runs the SPDY/3.1 side of a session (the remote command protocol v4: one stream per
/// channel) on its own task. Output waits until the client has opened the streams the request
/// asked for; the final status goes on the error stream, then every stream is half-closed.
fn spdy_session(io: impl Io, opts: StreamOpts) -> Session {
    let (out_tx, out_rx) = mpsc::channel::<Out>(32);
    let (in_tx, in_rx) = mpsc::channel::<ClientMsg>(32);
    tokio::spawn(async move {
        if let Err(err) = run_spdy(io, opts, out_rx, in_tx).await {
            log::debug!("SPDY session: {err:#}");
        }
    });
    Session { out: out_tx, inbound: in_rx }
}

async fn run_spdy(
    io: impl Io,
    opts: StreamOpts,
    mut out_rx: mpsc::Receiver<Out>,
    in_tx: mpsc::Sender<ClientMsg>,
) -> anyhow::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(io);
    let mut codec = spdy::Codec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut streams = SpdyStreams::default();
    let mut resize_buf: Vec<u8> = Vec::new();
    let mut in_tx = Some(in_tx);
    let mut pending: std::collections::VecDeque<ClientMsg> = Default::default();
    let mut reading = true;
    let mut finished = false;
    let streams_deadline = tokio::time::Instant::now() + SPDY_STREAMS_TIMEOUT;
    let mut linger_deadline = None;
    loop {
        // Whole frames already read, while the session keeps up with client messages.
        while pending.is_empty() {
            let Some((frame, used)) = codec.parse(&buf)? else { break };
            buf.drain(..used);
            match frame {
                spdy::Frame::SynStream { stream_id, headers, .. } => {
                    let stream_type = headers
                        .iter()
                        .find(|(k, _)| k == "streamtype")
                        .map(|(_, v)| v.as_str())
                        .unwrap_or("");
                    match streams.slot(stream_type) {
                        Some(slot) => {
                            *slot = Some(stream_id);
                            writer.write_all(&codec.encode_syn_reply(stream_id, &[])).await?;
                        }
                        None => {
                            log::debug!("SPDY stream of unknown type {stream_type:?} refused");
                            let rst = spdy::encode_rst_stream(stream_id, spdy::RST_REFUSED_STREAM);
                            writer.write_all(&rst).await?;
                        }
                    }
                }
                spdy::Frame::Data { stream_id, fin, data } => {
                    if Some(stream_id) == streams.stdin {
                        if !data.is_empty() {
                            pending.push_back(ClientMsg::Stdin(Bytes::from(data)));
                        }
                        if fin {
                            pending.push_back(ClientMsg::CloseStdin);
                        }
                    } else if Some(stream_id) == streams.resize {
                        resize_buf.extend_from_slice(&data);
                        let mut objects =
                            serde_json::Deserializer::from_slice(&resize_buf).into_iter::<Value>();
                        let mut consumed = 0;
                        while let Some(Ok(size)) = objects.next() {
                            consumed = objects.byte_offset();
                            let w = size["Width"].as_u64();
                            let h = size["Height"].as_u64();
                            if let (Some(w), Some(h)) = (w, h) {
                                pending.push_back(ClientMsg::Resize(w as u16, h as u16));
                            }
                        }
                        resize_buf.drain(..consumed);
                    }
                }
                spdy::Frame::RstStream { stream_id, .. } if Some(stream_id) == streams.stdin => {
                    pending.push_back(ClientMsg::CloseStdin);
                }
                spdy::Frame::Ping { id } => writer.write_all(&spdy::encode_ping(id)).await?,
                _ => {}
            }
        }
        if finished && !reading {
            break;
        }
        let streams_ready = streams.complete(opts);
        let deadline = match linger_deadline {
            Some(d) => d,
            None if !streams_ready => streams_deadline,
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        let mut client_gone = false;
        tokio::select! {
            read = reader.read_buf(&mut buf), if reading && pending.is_empty() => {
                if matches!(read, Ok(0) | Err(_)) {
                    reading = false;
                    client_gone = true;
                }
            }
            permit = reserve(&in_tx), if !pending.is_empty() => match permit {
                Some(permit) => permit.send(pending.pop_front().expect("checked")),
                None => client_gone = true,
            },
            out = out_rx.recv(), if (streams_ready || !reading) && !finished => match out {
                Some(Out::Data(channel, data)) => {
                    let stream = if channel == 2 { streams.stderr } else { streams.stdout };
                    if let Some(id) = stream {
                        writer.write_all(&spdy::encode_data(id, &data, false)).await?;
                    }
                }
                Some(Out::Status(status)) => {
                    finish_spdy(&mut writer, &streams, Some(&status)).await?;
                    finished = true;
                    linger_deadline = Some(tokio::time::Instant::now() + SPDY_LINGER);
                }
                None => {
                    finish_spdy(&mut writer, &streams, None).await?;
                    finished = true;
                    linger_deadline = Some(tokio::time::Instant::now() + SPDY_LINGER);
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                if !streams_ready && linger_deadline.is_none() {
                    log::warn!("SPDY client did not open the requested streams within {} s", SPDY_STREAMS_TIMEOUT.as_secs());
                }
                break;
            }
        }
        if client_gone {
            in_tx = None;
            pending.clear();
        }
    }
    let _ = writer.shutdown().await;
    Ok(())
}

/// Half-closes the output streams, writes the status on the error stream, and half-closes
/// the rest: kubectl returns once stdout/stderr end and the error stream is complete.
async fn finish_spdy(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    streams: &SpdyStreams,
    status: Option<&Value>,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    for id in streams.all() {
        let body = match status {
            Some(status) if Some(id) == streams.error => status.to_string().into_bytes(),
            _ => Vec::new(),
        };
        out.extend(spdy::encode_data(id, &body, true));
    }
    writer.write_all(&out).await?;
    writer.flush().await
}

/// Container output for an attached client, if it asked for that stream (a tty merges both).
fn attach_out(opts: StreamOpts, channel: u8, data: Bytes) -> Option<Out> {
    let wanted = if channel == 1 { opts.stdout } else { opts.stderr || opts.tty };
    wanted.then(|| Out::Data(if opts.tty { 1 } else { channel }, data))
}

fn exit_status(code: i32) -> Value {
    if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure",
               "message": format!("command terminated with non-zero exit code: exit status {code}"),
               "reason": "NonZeroExitCode",
               "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
    }
}

fn failure(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"})
}

async fn pump_output(mut reader: impl AsyncRead + Unpin, channel: u8, tx: mpsc::Sender<Out>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Out::Data(channel, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn exec_session(
    mut session: Session,
    shared: &Shared,
    pod: &PodShared,
    c: &ContainerShared,
    pid: u32,
    command: Vec<String>,
    opts: StreamOpts,
) -> anyhow::Result<()> {
    let argv = rules::exec_argv(c.exec, &command, &shared.applets, &shared.config.weir_binary);
    let env = c.env.lock().unwrap().clone();
    let join = match spawn::JoinNamespaces::prepare(pid, &pod.cgroup, &c.workdir, opts.tty) {
        Ok(j) => j,
        Err(err) => return session.send(Out::Status(failure(&format!("{err:#}")))).await,
    };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v))).kill_on_drop(true);
    let pty = if opts.tty {
        let pty = spawn::Pty::open()?;
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave.try_clone()?));
        Some(pty)
    } else {
        cmd.stdin(if opts.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(if opts.stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(if opts.stderr { Stdio::piped() } else { Stdio::null() });
        None
    };
    join.apply(&mut cmd);
    let spawned = cmd.spawn();
    drop(cmd);
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let message = format!("exec {:?} in container {:?}: {err}", argv[0], c.name);
            return session.send(Out::Status(failure(&message))).await;
        }
    };
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(32);
    let mut readers = Vec::new();
    let mut stdin_writer: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = None;
    let mut master_for_resize = None;
    if let Some(pty) = pty {
        drop(pty.slave);
        let read = tokio::fs::File::from_std(std::fs::File::from(pty.master.try_clone()?));
        readers.push(tokio::spawn(pump_output(read, 1, out_tx.clone())));
        if opts.stdin {
            stdin_writer = Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(
                pty.master.try_clone()?,
            ))));
        }
        master_for_resize = Some(pty.master);
    } else {
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump_output(out, 1, out_tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump_output(err, 2, out_tx.clone())));
        }
        if let Some(stdin) = child.stdin.take() {
            stdin_writer = Some(Box::new(stdin));
        }
    }
    drop(out_tx);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(out) = out_rx.recv() => session.send(out).await?,
            msg = session.inbound.recv() => match msg {
                Some(ClientMsg::Stdin(data)) => {
                    if let Some(w) = stdin_writer.as_mut() {
                        let _ = w.write_all(&data).await;
                        let _ = w.flush().await;
                    }
                }
                Some(ClientMsg::CloseStdin) => stdin_writer = None,
                Some(ClientMsg::Ignore) => {}
                Some(ClientMsg::Resize(w, h)) => {
                    if let Some(m) = &master_for_resize {
                        spawn::resize(&m.as_fd(), w, h);
                    }
                }
                None => {
                    // The client left: stop what it started.
                    if let Some(pid) = child.id() {
                        spawn::signal_group(pid, libc::SIGKILL);
                    }
                    let _ = child.wait().await;
                    return Ok(());
                }
            },
        }
    };
    drop(stdin_writer);
    // Drain output the process wrote before it exited (bounded: a background child may
    // keep a pipe open).
    let drain = async {
        while let Some(out) = out_rx.recv().await {
            if session.send(out).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    for r in readers {
        r.abort();
    }
    session.send(Out::Status(exit_status(spawn::exit_code(status)))).await
}

async fn attach_session(
    mut session: Session,
    c: &ContainerShared,
    opts: StreamOpts,
) -> anyhow::Result<()> {
    let (stdin, run, terminal, log) = {
        let live = c.live.lock().unwrap();
        (live.stdin.clone(), live.run, live.tty.clone(), live.log.clone())
    };
    // Attach streams what the container writes from now on. The first client of a stdinOnce
    // container without a terminal (`kubectl run -i`, which attaches once it sees the pod
    // Running) also gets what the run wrote before it came, so a command that finishes
    // quickly is not lost between the start and the attach. The writers send each line under
    // the log file's lock, so it is either in the file read here or on the subscription.
    let first = c.stdin_once && !c.tty && !c.attached.swap(true, Ordering::SeqCst);
    let (mut output, earlier) = match (&log, first) {
        (Some((path, file)), true) => {
            let _lines = file.lock().unwrap();
            (c.output.subscribe(), std::fs::read_to_string(path).unwrap_or_default())
        }
        _ => (c.output.subscribe(), String::new()),
    };
    for line in earlier.lines().filter_map(logs::parse_line) {
        let channel = if line.stream == "stderr" { 2 } else { 1 };
        let data = Bytes::from(format!("{}\n", line.text));
        if let Some(out) = attach_out(opts, channel, data) {
            session.send(out).await?;
        }
    }
    let mut changes = c.changes.subscribe();
    let mut stdin_open = opts.stdin && stdin.is_some();
    // stdinOnce: the container's stdin closes when the first attached client is done with it.
    // A terminal cannot be half-closed: it gets end-of-file (^D) instead.
    let close_once = || async {
        if c.stdin_once
            && let Some(pipe) = &stdin
        {
            let mut guard = pipe.lock().await;
            if c.tty
                && let Some(w) = guard.as_mut()
            {
                let _ = w.write_all(b"\x04").await;
                let _ = w.flush().await;
            }
            guard.take();
        }
    };
    loop {
        let running = {
            let live = c.live.lock().unwrap();
            live.run == run && live.pid.is_some()
        };
        if !running {
            break;
        }
        tokio::select! {
            out = output.recv() => match out {
                Ok((channel, data)) => {
                    if let Some(out) = attach_out(opts, channel, data) {
                        session.send(out).await?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            _ = changes.changed() => {}
            msg = session.inbound.recv() => match msg {
                Some(ClientMsg::Stdin(data)) if stdin_open => {
                    if let Some(pipe) = &stdin {
                        let mut guard = pipe.lock().await;
                        if let Some(w) = guard.as_mut() {
                            let _ = w.write_all(&data).await;
                            let _ = w.flush().await;
                        }
                    }
                }
                Some(ClientMsg::CloseStdin) => {
                    stdin_open = false;
                    close_once().await;
                }
                Some(ClientMsg::Resize(w, h)) => {
                    if let Some(master) = &terminal {
                        spawn::resize(&master.as_fd(), w, h);
                    }
                }
                None => {
                    close_once().await;
                    return Ok(());
                }
                _ => {}
            },
        }
    }
    // Output the container wrote just before it exited.
    while let Ok((channel, data)) = output.try_recv() {
        if let Some(out) = attach_out(opts, channel, data) {
            session.send(out).await?;
        }
    }
    session.send(Out::Status(exit_status(0))).await
}
