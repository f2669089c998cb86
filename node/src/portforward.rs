//! `kubectl port-forward`: the kubelet's `/portForward/NS/POD` endpoint.
//!
//! The protocol is `portforward.k8s.io` over SPDY/3.1, reached either by a plain SPDY upgrade
//! or, as kubectl 1.31+ does first, tunnelled in a WebSocket whose subprotocol is
//! `SPDY/3.1+portforward.k8s.io` (each binary message carries SPDY bytes). Every forwarded
//! connection is a pair of client-opened streams sharing a `requestid` header: `streamtype:
//! error` and `streamtype: data`, both with the pod's `port`. Once both are open the node
//! connects to `127.0.0.1:<port>` inside the pod's network namespace (as a container runtime
//! does, so a server listening on the pod's loopback is reachable too) and copies bytes both
//! ways; a failure to connect is written on the error stream, which kubectl prints. When the
//! pod's side ends, the data stream and then the error stream are half-closed (kubectl waits
//! for the error stream to end).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use crate::{PodShared, kubelet::Body, spdy};

/// The SPDY subprotocol kubectl asks for (`X-Stream-Protocol-Version`).
const PROTOCOL: &str = "portforward.k8s.io";
/// The same, tunnelled in a WebSocket (`Sec-WebSocket-Protocol`).
const TUNNELLED: &str = "SPDY/3.1+portforward.k8s.io";
const SPDY_UPGRADE: &str = "SPDY/3.1";
/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the pod per data frame.
const CHUNK: usize = 32 * 1024;

enum Transport {
    WebSocket { accept_key: String },
    Spdy,
}

fn transport(req: &Request<Incoming>) -> Result<Transport, String> {
    let headers = req.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let offers = |name: &str, wanted: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == wanted)
    };
    if upgrade.eq_ignore_ascii_case("websocket") && offers("sec-websocket-protocol", TUNNELLED) {
        let key = headers.get("sec-websocket-key").ok_or("missing Sec-WebSocket-Key")?;
        return Ok(Transport::WebSocket { accept_key: derive_accept_key(key.as_bytes()) });
    }
    if upgrade.eq_ignore_ascii_case(SPDY_UPGRADE) && offers("x-stream-protocol-version", PROTOCOL) {
        return Ok(Transport::Spdy);
    }
    Err(format!(
        "port-forward needs an upgrade to WebSocket with subprotocol {TUNNELLED} or to \
         {SPDY_UPGRADE} with X-Stream-Protocol-Version {PROTOCOL}; got Upgrade: {upgrade:?}"
    ))
}

/// Answers the upgrade and serves the session on its own task.
pub fn upgrade(req: Request<Incoming>, pod: Arc<PodShared>, name: String) -> Response<Body> {
    let transport = match transport(&req) {
        Ok(t) => t,
        Err(message) => return plain(StatusCode::BAD_REQUEST, message),
    };
    let response = match &transport {
        Transport::WebSocket { accept_key } => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", accept_key.as_str())
            .header("sec-websocket-protocol", TUNNELLED),
        Transport::Spdy => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, SPDY_UPGRADE)
            .header("x-stream-protocol-version", PROTOCOL),
    };
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => TokioIo::new(u),
            Err(err) => {
                log::warn!("port-forward to {name}: upgrade failed: {err}");
                return;
            }
        };
        let target = Target { netns: pod.netns.clone(), name, uid: pod.uid.clone() };
        let result = match transport {
            Transport::Spdy => serve(upgraded, target).await,
            Transport::WebSocket { .. } => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                serve(untunnel(ws), target).await
            }
        };
        if let Err(err) = result {
            log::debug!("port-forward session ended: {err:#}");
        }
    });
    response
        .body(Full::new(Bytes::new()).map_err(|never| match never {}).boxed())
        .expect("static response")
}

fn plain(status: StatusCode, message: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(message)).map_err(|never| match never {}).boxed())
        .expect("static response")
}

/// The byte stream inside a tunnelling WebSocket: binary messages in, binary messages out.
fn untunnel<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (inner, outer) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut sink, mut source) = ws.split();
        let (mut read, mut write) = tokio::io::split(inner);
        let inbound = async {
            while let Some(message) = source.next().await {
                let Ok(message) = message else { break };
                let data = match message {
                    Message::Binary(data) => data,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if write.write_all(&data).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        };
        let outbound = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                        if sink.send(message).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        // The session ends when the client leaves or the SPDY side is done writing.
        tokio::select! {
            _ = inbound => {}
            _ = outbound => {}
        }
    });
    outer
}

/// The pod a session forwards to.
#[derive(Clone)]
struct Target {
    netns: PathBuf,
    name: String,
    uid: String,
}

/// The two streams of one forwarded connection, as they are opened.
#[derive(Default)]
struct Pair {
    port: u16,
    data: Option<u32>,
    error: Option<u32>,
}

/// Serves the SPDY session: streams in, one forwarding task per complete pair.
async fn serve(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    target: Target,
) -> anyhow::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(io);
    // Every frame goes through one writer task, in the order it was queued.
    let (frames, mut queued) = mpsc::channel::<Vec<u8>>(64);
    let writing = tokio::spawn(async move {
        while let Some(frame) = queued.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut codec = spdy::Codec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Data stream id -> the bytes the client sends on it, for its forwarding task.
    let mut inbound: HashMap<u32, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    'session: loop {
        while let Some((frame, used)) = codec.parse(&buf)? {
            buf.drain(..used);
            match frame {
                spdy::Frame::SynStream { stream_id, headers, .. } => {
                    let header = |name: &str| {
                        headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
                    };
                    let port =
                        header("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0);
                    let (Some(port), Some(kind @ ("data" | "error"))) =
                        (port, header("streamtype"))
                    else {
                        log::debug!(
                            "port-forward stream without a valid port and streamtype refused"
                        );
                        let refused = spdy::encode_rst_stream(stream_id, spdy::RST_REFUSED_STREAM);
                        frames.send(refused).await?;
                        continue;
                    };
                    // Old clients send no request id: their pairs are consecutive streams.
                    let request = header("requestid").map(str::to_string).unwrap_or_else(|| {
                        let error_id =
                            if kind == "data" { stream_id.saturating_sub(2) } else { stream_id };
                        error_id.to_string()
                    });
                    frames.send(codec.encode_syn_reply(stream_id, &[])).await?;
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.port = port;
                    if kind == "data" {
                        pair.data = Some(stream_id);
                    } else {
                        pair.error = Some(stream_id);
                    }
                    if let (Some(data), Some(error)) = (pair.data, pair.error) {
                        pairs.remove(&request);
                        let (tx, rx) = mpsc::unbounded_channel();
                        inbound.insert(data, tx);
                        let streams = Streams { data, error, port };
                        tokio::spawn(forward(target.clone(), streams, rx, frames.clone()));
                    }
                }
                spdy::Frame::Data { stream_id, fin, data } => {
                    if !data.is_empty() {
                        frames
                            .send(spdy::encode_window_update(stream_id, data.len() as u32))
                            .await?;
                        if let Some(tx) = inbound.get(&stream_id) {
                            let _ = tx.send(Bytes::from(data));
                        }
                    }
                    if fin {
                        inbound.remove(&stream_id);
                    }
                }
                spdy::Frame::RstStream { stream_id, .. } => {
                    inbound.remove(&stream_id);
                }
                spdy::Frame::Ping { id } => frames.send(spdy::encode_ping(id)).await?,
                spdy::Frame::GoAway { .. } => break 'session,
                _ => {}
            }
        }
        if matches!(reader.read_buf(&mut buf).await, Ok(0) | Err(_)) {
            break;
        }
    }
    drop(inbound);
    drop(frames);
    let _ = writing.await;
    Ok(())
}

#[derive(Clone, Copy)]
struct Streams {
    data: u32,
    error: u32,
    port: u16,
}

/// One forwarded connection: connect inside the pod, copy both ways, then half-close the
/// data stream and the error stream (with the failure, if any, written on it).
async fn forward(
    target: Target,
    streams: Streams,
    mut from_client: mpsc::UnboundedReceiver<Bytes>,
    frames: mpsc::Sender<Vec<u8>>,
) {
    let connected = connect(&target, streams.port).await;
    log::debug!("port-forward to {} port {}: {connected:?}", target.name, streams.port);
    let failure = match connected {
        Err(err) => Some(format!(
            "error forwarding port {} to pod {}, uid {}: {err}",
            streams.port, target.name, target.uid
        )),
        Ok(stream) => {
            let (mut pod_read, mut pod_write) = stream.into_split();
            let to_pod = async {
                while let Some(data) = from_client.recv().await {
                    if pod_write.write_all(&data).await.is_err() {
                        return;
                    }
                }
                // The client half-closed its side.
                let _ = pod_write.shutdown().await;
            };
            let to_client = async {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match pod_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let frame = spdy::encode_data(streams.data, &buf[..n], false);
                            if frames.send(frame).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            // The pod's side ending ends the connection (kubectl then closes its own); the
            // client half-closing only stops the copy towards the pod.
            tokio::pin!(to_pod, to_client);
            let mut sending = true;
            loop {
                tokio::select! {
                    _ = &mut to_client => break,
                    _ = &mut to_pod, if sending => sending = false,
                }
            }
            None
        }
    };
    let mut end = spdy::encode_data(streams.data, &[], true);
    let message = failure.unwrap_or_default();
    end.extend(spdy::encode_data(streams.error, message.as_bytes(), true));
    let _ = frames.send(end).await;
}

/// Connects to `127.0.0.1:port` inside the pod's network namespace.
async fn connect(target: &Target, port: u16) -> std::io::Result<TcpStream> {
    let netns = target.netns.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A dedicated thread (never a pooled one) enters the namespace; the socket stays in it.
    std::thread::spawn(move || {
        let result = (|| {
            let ns = std::fs::File::open(&netns)?;
            weir_cni_plugin::netns::run_in(&ns, || {
                let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map_err(|err| {
                    weir_cni_plugin::error::CniError::io(format!("connect to {address}"), err)
                })
            })
            .map_err(|err| std::io::Error::other(err.to_string()))
        })();
        let _ = tx.send(result);
    });
    let stream = rx.await.map_err(|_| std::io::Error::other("the connecting thread died"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}
