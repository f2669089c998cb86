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
use std::{convert::Infallible, os::fd::AsFd, process::Stdio, sync::Arc, time::Duration};

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

use crate::{ContainerShared, PodShared, Shared, logs, rules, spawn};

type Body = BoxBody<Bytes, std::io::Error>;
/// A pod and one of its containers.
type Target = (Arc<PodShared>, Arc<ContainerShared>);

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

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

fn upgrade(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    pod: Arc<PodShared>,
    c: Arc<ContainerShared>,
    kind: &str,
) -> Response<Body> {
    let headers = req.headers();
    let is_ws = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_ws {
        return text(
            StatusCode::BAD_REQUEST,
            "the weir node runtime serves exec/attach over WebSocket (v5.channel.k8s.io, \
             v4.channel.k8s.io) only; SPDY is not supported",
        );
    }
    let Some(key) = headers.get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes()))
    else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("no supported subprotocol in {offered:?}: use one of {PROTOCOLS:?}"),
        );
    };
    let v5 = protocol.starts_with("v5");
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
    let opts = StreamOpts {
        stdin: flag(&params, "stdin") || flag(&params, "input"),
        stdout: flag(&params, "stdout") || flag(&params, "output"),
        stderr: flag(&params, "stderr") || flag(&params, "error"),
        tty: flag(&params, "tty"),
    };
    let kind = kind.to_string();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(err) => {
                log::warn!("{kind}: upgrade failed: {err}");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let result = if kind == "exec" {
            exec_session(ws, &shared, &pod, &c, pid, command, opts, v5).await
        } else {
            attach_session(ws, &c, opts, v5).await
        };
        if let Err(err) = result {
            log::debug!("{kind} session ended: {err:#}");
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", key)
        .header("sec-websocket-protocol", *protocol)
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
    Gone,
}

fn decode(msg: Message, v5: bool) -> ClientMsg {
    let data = match msg {
        Message::Binary(b) => b,
        Message::Close(_) => return ClientMsg::Gone,
        _ => return ClientMsg::Ignore,
    };
    match data.first() {
        Some(0) => ClientMsg::Stdin(data.slice(1..)),
        Some(4) => {
            let size: Option<(u64, u64)> = serde_json::from_slice::<Value>(&data[1..])
                .ok()
                .and_then(|v| Some((v["Width"].as_u64()?, v["Height"].as_u64()?)));
            match size {
                Some((w, h)) => ClientMsg::Resize(w as u16, h as u16),
                None => ClientMsg::Ignore,
            }
        }
        Some(255) if v5 && data.get(1) == Some(&0) => ClientMsg::CloseStdin,
        _ => ClientMsg::Ignore,
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    Message::Binary(out.into())
}

/// Container output for an attached client, if it asked for that stream (a tty merges both).
fn attach_frame(opts: StreamOpts, channel: u8, data: &[u8]) -> Option<Message> {
    let wanted = if channel == 1 { opts.stdout } else { opts.stderr || opts.tty };
    wanted.then(|| frame(if opts.tty { 1 } else { channel }, data))
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

async fn pump_output(mut reader: impl AsyncRead + Unpin, channel: u8, tx: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(frame(channel, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn exec_session(
    ws: WebSocketStream<impl Io>,
    shared: &Shared,
    pod: &PodShared,
    c: &ContainerShared,
    pid: u32,
    command: Vec<String>,
    opts: StreamOpts,
    v5: bool,
) -> anyhow::Result<()> {
    let (mut sink, mut stream) = ws.split();
    let argv = rules::exec_argv(c.exec, &command, &shared.applets, &shared.config.weir_binary);
    let env = c.env.lock().unwrap().clone();
    let join = match spawn::JoinNamespaces::prepare(pid, &pod.cgroup, &c.workdir, opts.tty) {
        Ok(j) => j,
        Err(err) => {
            sink.send(frame(3, failure(&format!("{err:#}")).to_string().as_bytes())).await?;
            return Ok(());
        }
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
            sink.send(frame(3, failure(&message).to_string().as_bytes())).await?;
            close_normally(&mut sink).await;
            return Ok(());
        }
    };
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(32);
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
            Some(msg) = out_rx.recv() => sink.send(msg).await?,
            msg = stream.next() => match msg.and_then(|m| m.ok()).map_or(ClientMsg::Gone, |m| decode(m, v5)) {
                ClientMsg::Stdin(data) => {
                    if let Some(w) = stdin_writer.as_mut() {
                        let _ = w.write_all(&data).await;
                        let _ = w.flush().await;
                    }
                }
                ClientMsg::CloseStdin => stdin_writer = None,
                ClientMsg::Ignore => {}
                ClientMsg::Resize(w, h) => {
                    if let Some(m) = &master_for_resize {
                        spawn::resize(&m.as_fd(), w, h);
                    }
                }
                ClientMsg::Gone => {
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
        while let Some(msg) = out_rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    for r in readers {
        r.abort();
    }
    let code = spawn::exit_code(status);
    sink.send(frame(3, exit_status(code).to_string().as_bytes())).await?;
    close_normally(&mut sink).await;
    Ok(())
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

async fn attach_session(
    ws: WebSocketStream<impl Io>,
    c: &ContainerShared,
    opts: StreamOpts,
    v5: bool,
) -> anyhow::Result<()> {
    let (mut sink, mut stream) = ws.split();
    let (stdin, run) = {
        let live = c.live.lock().unwrap();
        (live.stdin.clone(), live.run)
    };
    // Like kubelet, attach streams what the container writes from now on; kubectl fetches
    // what came before from the logs itself (`kubectl run -i` prints them first).
    let mut output = c.output.subscribe();
    let mut changes = c.changes.subscribe();
    let mut stdin_open = opts.stdin && stdin.is_some();
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
                    if let Some(msg) = attach_frame(opts, channel, &data) {
                        sink.send(msg).await?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            },
            _ = changes.changed() => {}
            msg = stream.next() => match msg.and_then(|m| m.ok()).map_or(ClientMsg::Gone, |m| decode(m, v5)) {
                ClientMsg::Stdin(data) if stdin_open => {
                    if let Some(pipe) = &stdin {
                        let mut guard = pipe.lock().await;
                        if let Some(w) = guard.as_mut() {
                            let _ = w.write_all(&data).await;
                            let _ = w.flush().await;
                        }
                    }
                }
                ClientMsg::CloseStdin => {
                    stdin_open = false;
                    if c.stdin_once && let Some(pipe) = &stdin {
                        pipe.lock().await.take();
                    }
                }
                ClientMsg::Gone => {
                    if c.stdin_once && let Some(pipe) = &stdin {
                        pipe.lock().await.take();
                    }
                    return Ok(());
                }
                _ => {}
            },
        }
    }
    // Output the container wrote just before it exited.
    while let Ok((channel, data)) = output.try_recv() {
        if let Some(msg) = attach_frame(opts, channel, &data) {
            sink.send(msg).await?;
        }
    }
    sink.send(frame(3, exit_status(0).to_string().as_bytes())).await?;
    close_normally(&mut sink).await;
    Ok(())
}
