//! Running `weir-probe` (tests/src/bin/weir-probe.rs) from tests: inside a namespace, and
//! optionally a cgroup, parsing the one JSON line it prints.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use serde_json::Value;
use weir_proxy::model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty};

use crate::{cgroup::TestCgroup, dataplane::Dataplane, netns::Netns, process::command_in};

/// The `weir-probe` binary: next to the running executable (the benchmark binary), or one level
/// up from it (integration tests run from `<target>/<profile>/deps`, and cargo builds the
/// package's binaries into `<target>/<profile>` before them).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("an executable has a directory");
    let candidates = [dir.join("weir-probe"), dir.parent().unwrap_or(dir).join("weir-probe")];
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!("weir-probe not found next to {}: build the weir-tests binaries", exe.display())
    })
}

/// Runs `weir-probe ARGS...` in `netns` (and `cgroup`) and returns its JSON line.
pub fn run(netns: &Netns, cgroup: Option<&TestCgroup>, args: &[&str]) -> Value {
    let output = command_in(netns, cgroup, &binary().to_string_lossy())
        .expect("preparing weir-probe")
        .args(args)
        .output()
        .expect("running weir-probe");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("weir-probe printed no JSON ({e}): {output:?}"))
}

/// `COUNT` sequential TCP connections to `target`; `{"ok", "backends": {addr: n}, "failures",
/// "elapsed_us"}` (the connections' own time, without the probe's start).
pub fn spread(netns: &Netns, cgroup: Option<&TestCgroup>, target: &str, count: u32) -> Value {
    run(netns, cgroup, &["tcp-spread", target, &count.to_string()])
}

/// How a TCP connection to a service without endpoints fails at once on `dataplane` (the
/// `kind` of a failed probe): the eBPF socket load balancer fails connect() itself, nftables
/// answers with a TCP reset.
pub fn refusal(dataplane: Dataplane) -> &'static str {
    match dataplane {
        Dataplane::Ebpf => "PermissionDenied",
        Dataplane::Nftables => "ConnectionRefused",
    }
}

/// Frontends without endpoints: `refused` TCP and UDP port 80 (the service has none),
/// `dropped` TCP port 80 (its traffic policy leaves none on this node).
pub fn no_endpoint_state(refused: IpAddr, dropped: IpAddr) -> ServiceState {
    let mut state = ServiceState::default();
    for (vip, protocol, when_empty) in [
        (refused, Protocol::Tcp, WhenEmpty::Reject),
        (refused, Protocol::Udp, WhenEmpty::Reject),
        (dropped, Protocol::Tcp, WhenEmpty::Drop),
    ] {
        state.frontends.insert(
            Frontend { address: vip, port: 80, protocol },
            FrontendState { when_empty, ..FrontendState::cluster_ip("default/empty", vec![]) },
        );
    }
    state
}

/// Asserts how `dataplane`, holding [`no_endpoint_state`], answers from `netns`: TCP to
/// `refused` fails at once, not after a timeout ([`refusal`]); on nftables UDP too (the reject
/// in the output hook fails the send itself with EPERM, before the ICMP port unreachable it
/// generates could), and TCP to `dropped` times out (the eBPF datapath refuses both today,
/// docs/services.md).
pub fn assert_refused_or_dropped(
    dataplane: Dataplane,
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    refused: IpAddr,
    dropped: IpAddr,
) {
    let (refused, dropped) = (SocketAddr::new(refused, 80), SocketAddr::new(dropped, 80));
    let tcp = run(netns, cgroup, &["tcp", &refused.to_string()]);
    assert_eq!(tcp["ok"], false, "{tcp}");
    assert_eq!(tcp["kind"], refusal(dataplane), "an immediate refusal, not a timeout: {tcp}");
    if dataplane == Dataplane::Nftables {
        let udp = run(netns, cgroup, &["udp-connected", &refused.to_string()]);
        assert!(
            udp["kind"] == "PermissionDenied" || udp["kind"] == "ConnectionRefused",
            "refused, not a timeout: {udp}"
        );
        let dropped = run(netns, cgroup, &["tcp", &dropped.to_string(), "--timeout-ms", "500"]);
        assert_eq!(dropped["kind"], "TimedOut", "dropped, not refused: {dropped}");
    }
}

/// A long-lived TCP connection (or connected UDP socket) held by a `weir-probe tcp-session`
/// (`udp-session`) process; killed on drop.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// Connects to `target` from `netns` (and `cgroup`); panics if the connection fails.
    pub fn open(netns: &Netns, cgroup: Option<&TestCgroup>, target: &str) -> Session {
        Self::start(netns, cgroup, "tcp-session", target)
    }

    /// A UDP socket connected to `target` from `netns` (and `cgroup`).
    pub fn udp(netns: &Netns, cgroup: Option<&TestCgroup>, target: &str) -> Session {
        Self::start(netns, cgroup, "udp-session", target)
    }

    fn start(netns: &Netns, cgroup: Option<&TestCgroup>, mode: &str, target: &str) -> Session {
        let mut child = command_in(netns, cgroup, &binary().to_string_lossy())
            .expect("preparing weir-probe")
            .args([mode, target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning weir-probe");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut session = Session { child, stdin, stdout };
        let hello = session.read();
        assert_eq!(hello["connected"], true, "{hello}");
        session
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading weir-probe");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// One request/response on the held connection: `{"ok": true, "reply": ...}` or the error.
    pub fn ping(&mut self) -> Value {
        writeln!(self.stdin, "ping").expect("writing to weir-probe");
        self.read()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
