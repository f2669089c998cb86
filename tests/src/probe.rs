//! Running `weir-probe` (tests/src/bin/weir-probe.rs) from tests: inside a namespace, and
//! optionally a cgroup, parsing the one JSON line it prints.
use std::path::PathBuf;

use serde_json::Value;

use crate::{cgroup::TestCgroup, netns::Netns, process::command_in};

/// The `weir-probe` binary. Cargo builds a package's binaries before its integration tests and
/// puts them next to the `deps/` directory the test executable runs from.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables run from <target>/<profile>/deps");
    let probe = profile_dir.join("weir-probe");
    assert!(probe.exists(), "{} is missing: run the tests through cargo", probe.display());
    probe
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
