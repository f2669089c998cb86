//! The flow viewer's server side: the agent reads the policy programs' ring buffer
//! (`weir_flows_v2`, one [`FlowEvent`] per drop and per new allowed flow) or, on nftables, the
//! policy table's log group ([`super::nft::nflog`]), names what the numbers stand for
//! ([`FlowNames`]) and streams the records to any number of subscribers on a unix socket
//! (`weir flows`).
//!
//! Only one reader may consume a BPF ring buffer, so the agent owns it and fans out through a
//! bounded broadcast channel: a subscriber that falls behind loses the oldest records and is
//! told how many ([`FlowMessage::Lost`]); the datapath and other subscribers never wait.
//!
//! Protocol (NDJSON over a unix stream socket): the client sends one line, a [`FlowRequest`]
//! (`{}` for everything, or `{"pod":"x/a","verdict":"dropped"}`); the server answers one
//! [`FlowMessage::Ready`] (or [`FlowMessage::Error`] and closes), then one
//! [`FlowMessage::Flow`] per matching record, as they happen.
use std::{
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};
use weir_common::{
    metrics::Counter,
    policy::{Addr, DIR_EGRESS, DIR_INGRESS, FlowEvent, VERDICT_ALLOWED, VERDICT_DROPPED},
    proto,
};
use weir_policy::identity::IDENTITY_HOST;

use super::{lower::ip_of, names::FlowNames};

/// The agent's default flow socket.
pub const DEFAULT_FLOWS_SOCKET: &str = "/run/weir/agent-flows.sock";
/// Records buffered per subscriber before the oldest are lost.
pub const SUBSCRIBER_BUFFER: usize = 4096;
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    Allowed,
    Dropped,
}

impl std::str::FromStr for FlowVerdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "dropped" => Ok(Self::Dropped),
            other => Err(format!("verdict {other:?}: use allowed or dropped")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowDirection {
    /// Checked as the destination pod's ingress.
    Ingress,
    /// Checked as the source pod's egress.
    Egress,
}

/// Why the datapath decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowReason {
    /// A rule allowed it ([`FlowRecord::rule`]).
    Rule,
    /// No policy isolates this direction of the pod.
    NotIsolated,
    /// The pod's own node connects to it.
    OwnNode,
    /// Isolated and no rule allows it ([`FlowRecord::policy`] isolates it).
    DefaultDeny,
    /// The pod's policy is not programmed yet (no endpoint entry while policies exist).
    NotReady,
    /// A reason this version does not know (a newer datapath).
    Other,
}

impl fmt::Display for FlowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowReason::Rule => "rule",
            FlowReason::NotIsolated => "not-isolated",
            FlowReason::OwnNode => "own-node",
            FlowReason::DefaultDeny => "default-deny",
            FlowReason::NotReady => "not-ready",
            FlowReason::Other => "other",
        })
    }
}

/// One side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub ip: IpAddr,
    /// `None` for protocols without ports (ICMP...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `NAMESPACE/POD` when the address is a known pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl fmt::Display for FlowPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pod) = &self.pod {
            write!(f, "{pod} ")?;
        }
        match (self.port, self.ip) {
            (Some(port), IpAddr::V6(ip)) => write!(f, "[{ip}]:{port}"),
            (Some(port), ip) => write!(f, "{ip}:{port}"),
            (None, ip) => write!(f, "{ip}"),
        }
    }
}

/// A policy decision with names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The node whose agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// TCP, UDP, SCTP, ICMP or the protocol number.
    pub protocol: String,
    pub direction: FlowDirection,
    pub verdict: FlowVerdict,
    pub reason: FlowReason,
    /// The allowing rule (`NetworkPolicy x/a ingress rule 0, peer 0, port 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The policy a drop is counted against (`x/deny-all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The datapath's number: the rule id (allowed) or the policy id (dropped); 0 for none.
    pub id: u32,
}

impl FlowRecord {
    /// The pods on either side.
    pub fn involves_pod(&self, pod: &str) -> bool {
        [&self.source, &self.destination].iter().any(|p| p.pod.as_deref() == Some(pod))
    }

    /// One line: `12:00:01.123 x/b 10.244.1.5:40112 -> x/a 10.244.2.7:80 TCP ingress DROPPED
    /// default-deny (NetworkPolicy x/deny-all)`.
    pub fn to_text(&self) -> String {
        // The time of day of an RFC 3339 timestamp: "2026-11-23T12:00:01.123Z"[11..23].
        let time = self.time.get(11..23).unwrap_or(&self.time);
        let verdict = match self.verdict {
            FlowVerdict::Allowed => "ALLOWED",
            FlowVerdict::Dropped => "DROPPED",
        };
        let direction = match self.direction {
            FlowDirection::Ingress => "ingress",
            FlowDirection::Egress => "egress",
        };
        let why = match (self.reason, &self.rule, &self.policy) {
            (FlowReason::Rule, Some(rule), _) => format!("by {rule}"),
            // An nftables allow whose rule the agent could not find again in its applied state
            // (the state changed between the packet and the log read, or two local pods share
            // an address): its sets carry no rule ids.
            (FlowReason::Rule, None, _) if self.id == 0 => {
                "by a rule (`weir policy trace` names it)".into()
            }
            (FlowReason::Rule, None, _) => format!("by rule id {} (name not known yet)", self.id),
            (FlowReason::DefaultDeny, _, Some(policy)) => {
                format!("default-deny (NetworkPolicy {policy})")
            }
            (FlowReason::DefaultDeny, _, None) => format!("default-deny (policy id {})", self.id),
            (FlowReason::NotReady, ..) => {
                "not-ready (the pod's policy is not programmed yet)".into()
            }
            (reason, ..) => reason.to_string(),
        };
        format!(
            "{time} {} -> {} {} {direction} {verdict} {why}",
            self.source, self.destination, self.protocol
        )
    }
}

/// What the client asks for: records involving `pod` (either side), of `verdict`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
}

impl FlowRequest {
    /// Checks the filter's values (a pod is `NAMESPACE/POD`).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(pod) = &self.pod {
            match pod.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {}
                _ => return Err(format!("pod {pod:?}: write NAMESPACE/POD")),
            }
        }
        Ok(())
    }

    pub fn matches(&self, record: &FlowRecord) -> bool {
        self.pod.as_deref().is_none_or(|pod| record.involves_pod(pod))
            && self.verdict.is_none_or(|v| v == record.verdict)
    }
}

/// One line from the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowMessage {
    /// The subscription is active: every later decision matching the request is sent.
    Ready {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    Flow(FlowRecord),
    /// This many records were lost because the client read too slowly.
    Lost {
        records: u64,
    },
    /// The request was refused; the server closes the connection.
    Error {
        message: String,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("flow event of {len} bytes, expected {expected} (agent and eBPF object disagree)")]
    Size { len: usize, expected: usize },
}

/// Copies a [`FlowEvent`] out of a ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<FlowEvent, DecodeError> {
    let expected = size_of::<FlowEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size { len: bytes.len(), expected });
    }
    // SAFETY: the length is exactly that of FlowEvent, a repr(C) struct of integers for which
    // every bit pattern is valid; read_unaligned makes no alignment assumption.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// TCP, UDP, SCTP, ICMP, ICMPv6 or `proto N`.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::TCP => "TCP".to_string(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => format!("proto {other}"),
    }
}

/// Names an event. `unix_ns` is the event's wall-clock time ([`BootClock`]), `node` the
/// reporting node.
pub fn annotate(
    event: &FlowEvent,
    names: &dyn FlowNames,
    unix_ns: u64,
    node: Option<&str>,
) -> FlowRecord {
    let has_ports = matches!(event.proto, proto::TCP | proto::UDP | proto::SCTP);
    let peer = |addr: Addr, port: u16| {
        let ip = ip_of(addr);
        FlowPeer {
            ip,
            port: has_ports.then(|| u16::from_be(port)),
            pod: names.pod(ip).map(|p| p.to_string()),
        }
    };
    let protocol = protocol_name(event.proto);
    let direction =
        if event.direction == DIR_EGRESS { FlowDirection::Egress } else { FlowDirection::Ingress };
    let (verdict, reason, rule, policy) = match event.verdict {
        VERDICT_ALLOWED => {
            let reason = if event.rule_id != 0 {
                FlowReason::Rule
            } else if event.direction == DIR_INGRESS && event.peer_identity == IDENTITY_HOST {
                FlowReason::OwnNode
            } else {
                FlowReason::NotIsolated
            };
            let rule = (event.rule_id != 0)
                .then(|| names.rule(event.rule_id))
                .flatten()
                .map(|o| o.to_string());
            (FlowVerdict::Allowed, reason, rule, None)
        }
        _ => {
            let reason = match event.reason {
                r if r == Counter::DropPolicyNotReady as u32 => FlowReason::NotReady,
                r if r == Counter::DropPolicyIngress as u32
                    || r == Counter::DropPolicyEgress as u32 =>
                {
                    FlowReason::DefaultDeny
                }
                _ => FlowReason::Other,
            };
            let policy = (event.rule_id != 0)
                .then(|| names.policy(event.rule_id))
                .flatten()
                .map(|p| p.to_string());
            (FlowVerdict::Dropped, reason, None, policy)
        }
    };
    FlowRecord {
        time: rfc3339_millis(unix_ns),
        node: node.map(str::to_string),
        source: peer(event.saddr, event.sport),
        destination: peer(event.daddr, event.dport),
        protocol,
        direction,
        verdict,
        reason,
        rule,
        policy,
        id: event.rule_id,
    }
}

const _: () = assert!(VERDICT_DROPPED != VERDICT_ALLOWED);

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// Realtime minus monotonic, in ns.
    offset: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write to; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl BootClock {
    /// Measures the offset now (re-measure now and then: the wall clock may be stepped).
    pub fn now() -> Self {
        Self { offset: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC) }
    }

    pub fn unix_ns(&self, ktime_ns: u64) -> u64 {
        (i128::from(ktime_ns) + self.offset).clamp(0, i128::from(u64::MAX)) as u64
    }
}

/// `2026-11-23T12:00:01.123Z`.
pub fn rfc3339_millis(unix_ns: u64) -> String {
    use k8s_openapi::jiff::Timestamp;
    let time = Timestamp::from_nanosecond(i128::from(unix_ns)).unwrap_or(Timestamp::UNIX_EPOCH);
    time.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The fan-out point between the ring buffer reader and the subscribers.
#[derive(Clone, Debug)]
pub struct FlowHub {
    sender: broadcast::Sender<Arc<FlowRecord>>,
    node: Option<String>,
}

impl FlowHub {
    /// A hub for `node`'s records, buffering `capacity` records per subscriber.
    pub fn new(node: Option<String>, capacity: usize) -> Self {
        Self { sender: broadcast::channel(capacity.max(1)).0, node }
    }

    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Sends a record to every current subscriber (none: it is dropped).
    pub fn publish(&self, record: FlowRecord) {
        let _ = self.sender.send(Arc::new(record));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.sender.subscribe()
    }
}

/// Reads the ring buffer until the task is aborted, publishing named records to `hub`.
pub async fn read_ring(
    ring: RingBuf<MapData>,
    names: Arc<dyn FlowNames + Send + Sync>,
    hub: FlowHub,
) {
    // SAFETY: the ring buffer owns its map's file descriptor and keeps it open for as long as
    // the AsyncFd (which owns the ring buffer) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(err) => {
            log::error!(
                "flows: cannot poll the flow ring buffer: {err}; `weir flows` gets nothing"
            );
            return;
        }
    };
    let mut bad_events = 0u64;
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        let clock = BootClock::now();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let decoded = decode(&item);
            drop(item);
            match decoded {
                Ok(event) => hub.publish(annotate(
                    &event,
                    names.as_ref(),
                    clock.unix_ns(event.time_ns),
                    hub.node(),
                )),
                Err(err) => {
                    bad_events += 1;
                    if bad_events == 1 {
                        log::warn!("flows: {err}");
                    }
                }
            }
        }
        guard.clear_ready();
    }
}

#[derive(Debug, Error)]
pub enum FlowsError {
    #[error("cannot create {path} for the flow socket")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another process already serves flows on {path}; stop it or give this agent another \
         --flows-socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or give another --flows-socket")]
    NotASocket { path: PathBuf },
    #[error("cannot listen on the flow socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Listens on `path`: creates its directory, replaces a stale socket left by a previous agent,
/// refuses to take over one that something still listens on.
pub fn bind(path: &Path) -> Result<UnixListener, FlowsError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| FlowsError::Dir { path: dir.to_path_buf(), source })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(FlowsError::NotASocket { path: path.to_path_buf() });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(FlowsError::InUse { path: path.to_path_buf() });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| FlowsError::Bind { path: path.to_path_buf(), source })
}

/// Where a dataplane's flow events come from.
pub enum FlowSource {
    /// The eBPF policy programs' ring buffer.
    Ring(RingBuf<MapData>),
    /// The nftables policy table's log group.
    Nflog(super::nft::nflog::NflogSocket),
}

/// The agent's flow viewer: reads `source` and serves subscribers on `socket`. The tasks run
/// until their handles are aborted.
pub fn start(
    source: FlowSource,
    names: Arc<dyn FlowNames + Send + Sync>,
    node: Option<String>,
    socket: &Path,
) -> Result<Vec<tokio::task::JoinHandle<()>>, FlowsError> {
    let listener = bind(socket)?;
    let hub = FlowHub::new(node, SUBSCRIBER_BUFFER);
    let reader = match source {
        FlowSource::Ring(ring) => tokio::spawn(read_ring(ring, names, hub.clone())),
        FlowSource::Nflog(socket) => {
            tokio::spawn(super::nft::nflog::read(socket, names, hub.clone()))
        }
    };
    Ok(vec![reader, tokio::spawn(serve(listener, hub))])
}

/// Serves subscribers until the task is aborted.
pub async fn serve(listener: UnixListener, hub: FlowHub) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, hub.clone()));
            }
            Err(err) => {
                log::warn!("flows: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    message: &FlowMessage,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

async fn serve_client(stream: UnixStream, hub: FlowHub) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str::<FlowRequest>(line.trim())
            .map_err(|err| format!("bad request line {:?}: {err}", line.trim()))
            .and_then(|r| r.validate().map(|()| r)),
        Ok(Err(err)) => Err(format!("reading the request line: {err}")),
        Err(_) => Err(format!("no request line within {REQUEST_TIMEOUT:?}")),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            let _ = send(&mut write, &FlowMessage::Error { message }).await;
            return;
        }
    };
    let mut records = hub.subscribe();
    if send(&mut write, &FlowMessage::Ready { node: hub.node().map(str::to_string) }).await.is_err()
    {
        return;
    }
    let mut read = reader.into_inner().into_inner();
    let mut scratch = [0u8; 64];
    loop {
        let message = tokio::select! {
            message = next_for(&mut records, &request) => match message {
                Some(message) => message,
                None => return,
            },
            // The client sends nothing more: data or EOF both end the subscription.
            _ = read.read(&mut scratch) => return,
        };
        if send(&mut write, &message).await.is_err() {
            return;
        }
    }
}

/// The next message for a subscriber: a record matching its request, or how many records it
/// lost by reading too slowly; `None` once the hub is gone.
async fn next_for(
    records: &mut broadcast::Receiver<Arc<FlowRecord>>,
    request: &FlowRequest,
) -> Option<FlowMessage> {
    loop {
        match records.recv().await {
            Ok(record) if request.matches(&record) => {
                return Some(FlowMessage::Flow((*record).clone()));
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(records)) => {
                return Some(FlowMessage::Lost { records });
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

#[derive(Debug, Error)]
pub enum FlowClientError {
    #[error(
        "no weir agent serves flows on {path} ({source}); is `weir agent` running on this node \
         (it listens on --flows-socket, default {DEFAULT_FLOWS_SOCKET})? For a lab use \
         `weir flows --lab NAME`"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {path} refused the request: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("reading flows from {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {path} sent a line this weir does not understand: {line:?}")]
    Garbled { path: PathBuf, line: String },
    #[error("the agent on {path} closed the connection")]
    Closed { path: PathBuf },
}

/// A blocking subscription (the CLI and tests).
pub struct FlowClient {
    path: PathBuf,
    reader: io::BufReader<std::os::unix::net::UnixStream>,
    /// The node the agent serves (from its Ready line).
    pub node: Option<String>,
}

impl FlowClient {
    /// Connects, sends `request` and waits for the agent's Ready (or its refusal).
    pub fn connect(path: &Path, request: &FlowRequest) -> Result<Self, FlowClientError> {
        use std::io::Write;
        let connect_error = |source| FlowClientError::Connect { path: path.to_path_buf(), source };
        let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(connect_error)?;
        let mut line = serde_json::to_vec(request).expect("a request serializes");
        line.push(b'\n');
        stream.write_all(&line).map_err(connect_error)?;
        let mut client =
            Self { path: path.to_path_buf(), reader: io::BufReader::new(stream), node: None };
        match client.next_message()? {
            FlowMessage::Ready { node } => client.node = node,
            FlowMessage::Error { message } => {
                return Err(FlowClientError::Refused { path: path.to_path_buf(), message });
            }
            other => {
                return Err(FlowClientError::Garbled {
                    path: path.to_path_buf(),
                    line: format!("{other:?}"),
                });
            }
        }
        Ok(client)
    }

    /// Bounds how long [`Self::next_message`] waits (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    /// The next line from the agent (blocks).
    pub fn next_message(&mut self) -> Result<FlowMessage, FlowClientError> {
        use std::io::BufRead;
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|source| FlowClientError::Read { path: self.path.clone(), source })?;
        if read == 0 {
            return Err(FlowClientError::Closed { path: self.path.clone() });
        }
        serde_json::from_str(line.trim())
            .map_err(|_| FlowClientError::Garbled { path: self.path.clone(), line })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_policy::{Direction, ObjectRef, Origin};

    use super::*;
    use crate::policy::names::PolicyNames;

    fn names() -> PolicyNames {
        let policy = ObjectRef::new("x", "deny-all");
        PolicyNames {
            pod_ips: BTreeMap::from([
                ("10.244.1.5".parse().unwrap(), ObjectRef::new("x", "b")),
                ("10.244.2.7".parse().unwrap(), ObjectRef::new("x", "a")),
            ]),
            rules_by_id: BTreeMap::from([(
                7,
                Origin {
                    policy: ObjectRef::new("x", "a-from-b"),
                    direction: Direction::Ingress,
                    rule: 0,
                    peer: Some(0),
                    port: None,
                },
            )]),
            policies_by_id: BTreeMap::from([(3, policy)]),
            ..Default::default()
        }
    }

    fn event(verdict: u8, reason: Counter, id: u32) -> FlowEvent {
        FlowEvent {
            time_ns: 5,
            saddr: weir_common::policy::v4_mapped([10, 244, 1, 5]),
            daddr: weir_common::policy::v4_mapped([10, 244, 2, 7]),
            sport: 40112u16.to_be(),
            dport: 80u16.to_be(),
            proto: proto::TCP,
            direction: DIR_INGRESS,
            verdict,
            _pad: 0,
            rule_id: id,
            reason: reason as u32,
            peer_identity: 300,
            _pad2: 0,
        }
    }

    /// 2026-11-23T12:00:01.123Z
    const NOON: u64 = 1_795_435_201_123_000_000;

    #[test]
    fn events_decode_from_ring_bytes() {
        let e = event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3);
        // SAFETY: FlowEvent is plain integers; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const FlowEvent).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        };
        assert_eq!(decode(bytes), Ok(e));
        assert_eq!(decode(&bytes[1..]), Err(DecodeError::Size { len: 63, expected: 64 }));
    }

    #[test]
    fn a_drop_names_pods_and_the_policy() {
        let r = annotate(
            &event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3),
            &names(),
            NOON,
            Some("n1"),
        );
        assert_eq!(r.time, "2026-11-23T12:00:01.123Z");
        assert_eq!(r.source.pod.as_deref(), Some("x/b"));
        assert_eq!(r.destination.port, Some(80));
        assert_eq!((r.verdict, r.reason), (FlowVerdict::Dropped, FlowReason::DefaultDeny));
        assert_eq!(r.policy.as_deref(), Some("x/deny-all"));
        assert_eq!(
            r.to_text(),
            "12:00:01.123 x/b 10.244.1.5:40112 -> x/a 10.244.2.7:80 TCP ingress DROPPED \
             default-deny (NetworkPolicy x/deny-all)"
        );
    }

    #[test]
    fn allowed_flows_name_the_rule_or_why_no_rule_was_needed() {
        let n = names();
        let r = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 7), &n, NOON, None);
        assert_eq!(r.reason, FlowReason::Rule);
        assert!(
            r.to_text().ends_with(
                "TCP ingress ALLOWED by NetworkPolicy x/a-from-b ingress rule 0, peer 0, any port"
            ),
            "{}",
            r.to_text()
        );
        let r = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 0), &n, NOON, None);
        assert_eq!(r.reason, FlowReason::NotIsolated);
        let mut host = event(VERDICT_ALLOWED, Counter::PolicyAllowed, 0);
        host.peer_identity = IDENTITY_HOST;
        assert_eq!(annotate(&host, &n, NOON, None).reason, FlowReason::OwnNode);
        // A number the names do not know yet still shows the number.
        let r = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 99), &n, NOON, None);
        assert!(r.to_text().contains("by rule id 99"), "{}", r.to_text());
        let r = annotate(&event(VERDICT_DROPPED, Counter::DropPolicyNotReady, 0), &n, NOON, None);
        assert_eq!(r.reason, FlowReason::NotReady);
        let mut icmp = event(VERDICT_DROPPED, Counter::DropPolicyEgress, 42);
        icmp.proto = 1;
        icmp.direction = DIR_EGRESS;
        let text = annotate(&icmp, &n, NOON, None).to_text();
        assert!(text.contains("x/b 10.244.1.5 -> x/a 10.244.2.7 ICMP egress DROPPED"), "{text}");
        assert!(text.ends_with("default-deny (policy id 42)"), "{text}");
    }

    #[test]
    fn ipv6_flows_show_ipv6_addresses_and_pods() {
        let mut n = names();
        n.pod_ips.insert("fd00::1:5".parse().unwrap(), ObjectRef::new("x", "b"));
        let mut e = event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3);
        e.saddr = "fd00::1:5".parse::<std::net::Ipv6Addr>().unwrap().octets();
        e.daddr = "fd00::2:7".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let text = annotate(&e, &n, NOON, None).to_text();
        assert!(text.contains("x/b [fd00::1:5]:40112 -> [fd00::2:7]:80 TCP ingress"), "{text}");
        e.proto = proto::ICMPV6;
        let text = annotate(&e, &n, NOON, None).to_text();
        assert!(text.contains("x/b fd00::1:5 -> fd00::2:7 ICMPv6 ingress"), "{text}");
    }

    #[test]
    fn filters_select_by_pod_and_verdict() {
        let n = names();
        let drop = annotate(&event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3), &n, NOON, None);
        let allow = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 7), &n, NOON, None);
        let req = |pod: Option<&str>, verdict| FlowRequest { pod: pod.map(Into::into), verdict };
        assert!(req(None, None).matches(&drop) && req(None, None).matches(&allow));
        assert!(req(Some("x/a"), None).matches(&drop));
        assert!(req(Some("x/b"), Some(FlowVerdict::Dropped)).matches(&drop));
        assert!(!req(Some("x/b"), Some(FlowVerdict::Dropped)).matches(&allow));
        assert!(!req(Some("y/a"), None).matches(&drop));
        assert!(req(Some("x"), None).validate().unwrap_err().contains("NAMESPACE/POD"));
        assert_eq!(
            serde_json::from_str::<FlowRequest>(r#"{"pod":"x/a","verdict":"dropped"}"#).unwrap(),
            req(Some("x/a"), Some(FlowVerdict::Dropped))
        );
        assert!(serde_json::from_str::<FlowRequest>(r#"{"verdict":"maybe"}"#).is_err());
        assert!(serde_json::from_str::<FlowRequest>(r#"{"pods":"x/a"}"#).is_err());
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let n = names();
        let flow = annotate(&event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3), &n, NOON, None);
        for message in [
            FlowMessage::Ready { node: Some("n1".into()) },
            FlowMessage::Flow(flow),
            FlowMessage::Lost { records: 3 },
            FlowMessage::Error { message: "no".into() },
        ] {
            let line = serde_json::to_string(&message).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<FlowMessage>(&line).unwrap(), message);
        }
        assert_eq!(
            serde_json::to_string(&FlowMessage::Lost { records: 3 }).unwrap(),
            r#"{"lost":{"records":3}}"#
        );
    }

    #[test]
    fn wall_clock_dates() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_millis(NOON), "2026-11-23T12:00:01.123Z");
        let clock = BootClock::now();
        let now = clock.unix_ns(clock_ns(libc::CLOCK_MONOTONIC) as u64);
        assert!(rfc3339_millis(now).starts_with("20"), "{}", rfc3339_millis(now));
    }

    /// A slow subscriber is told how many records it lost, then gets the newest ones.
    #[tokio::test]
    async fn slow_subscribers_learn_how_many_records_they_lost() {
        let n = names();
        let drop = annotate(&event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3), &n, NOON, None);
        let allow = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 7), &n, NOON, None);
        let hub = FlowHub::new(None, 4);
        let mut rx = hub.subscribe();
        for _ in 0..10 {
            hub.publish(allow.clone());
        }
        hub.publish(drop.clone());
        let dropped = FlowRequest { pod: None, verdict: Some(FlowVerdict::Dropped) };
        assert_eq!(next_for(&mut rx, &dropped).await, Some(FlowMessage::Lost { records: 7 }));
        assert_eq!(next_for(&mut rx, &dropped).await, Some(FlowMessage::Flow(drop)));
        std::mem::drop(hub);
        assert_eq!(next_for(&mut rx, &dropped).await, None);
    }

    /// A subscriber on a real unix socket gets Ready and its filtered records; a bad request
    /// gets an error line; a live socket is never taken over, a stale one is replaced.
    #[tokio::test]
    async fn subscribers_on_the_socket_get_filtered_records() {
        let dir = std::env::temp_dir().join(format!("weir-flows-unit-{}", std::process::id()));
        let path = dir.join("flows.sock");
        let listener = bind(&path).unwrap();
        let hub = FlowHub::new(Some("n1".into()), 64);
        let server = tokio::spawn(serve(listener, hub.clone()));
        let n = names();
        let drop = annotate(&event(VERDICT_DROPPED, Counter::DropPolicyIngress, 3), &n, NOON, None);
        let allow = annotate(&event(VERDICT_ALLOWED, Counter::PolicyAllowed, 7), &n, NOON, None);

        let (p, h, expected) = (path.clone(), hub.clone(), drop.clone());
        let first = tokio::task::spawn_blocking(move || {
            let request = FlowRequest { pod: None, verdict: Some(FlowVerdict::Dropped) };
            let mut client = FlowClient::connect(&p, &request).unwrap();
            assert_eq!(client.node.as_deref(), Some("n1"));
            h.publish(allow);
            h.publish(expected);
            client.set_timeout(Some(Duration::from_secs(10))).unwrap();
            client.next_message().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(first, FlowMessage::Flow(drop));

        let p = path.clone();
        let refused = tokio::task::spawn_blocking(move || {
            FlowClient::connect(&p, &FlowRequest { pod: Some("nope".into()), verdict: None })
        })
        .await
        .unwrap();
        assert!(
            matches!(&refused, Err(FlowClientError::Refused { message, .. }) if message.contains("NAMESPACE/POD")),
            "{:?}",
            refused.err()
        );
        // A second server may not take over a live socket.
        assert!(matches!(bind(&path), Err(FlowsError::InUse { .. })));
        server.abort();
        let _ = server.await;
        // Once the server is gone the stale socket is replaced.
        std::mem::drop(bind(&path).unwrap());
        let err =
            FlowClient::connect(&dir.join("none.sock"), &FlowRequest::default()).err().unwrap();
        assert!(err.to_string().contains("none.sock"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
