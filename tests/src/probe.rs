//! Running `weir-probe` (tests/src/bin/weir-probe.rs) from tests: inside a namespace, and
//! optionally a cgroup, parsing the one JSON line it prints.
use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use serde_json::Value;

use crate::{cgroup::TestCgroup, netns::Netns, process::command_in};

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

/// `COUNT` sequential TCP connections to `target`; `{"ok", "backends": {addr: n}, "failures"}`.
pub fn spread(netns: &Netns, cgroup: Option<&TestCgroup>, target: &str, count: u32) -> Value {
    run(netns, cgroup, &["tcp-spread", target, &count.to_string()])
}

/// A long-lived TCP connection held by a `weir-probe tcp-session` process; killed on drop.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Session {
    /// Connects to `target` from `netns` (and `cgroup`); panics if the connection fails.
    pub fn open(netns: &Netns, cgroup: Option<&TestCgroup>, target: &str) -> Session {
        let mut child = command_in(netns, cgroup, &binary().to_string_lossy())
            .expect("preparing weir-probe")
            .args(["tcp-session", target])
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
