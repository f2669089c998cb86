//! `weir lab up` / `status` / `down`: a lab comes up with Ready nodes and healthy agents, a
//! second `up` refuses, and `down` removes everything, also after `up` was killed mid-way.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use weir_tests::{
    apiserver::TempDir,
    lab::{Lab, lab_command, leftovers, text},
    names,
    privileged::require_root,
};

#[test]
fn up_status_down_leaves_nothing_behind() {
    require_root();
    let lab = Lab::up(2, "ebpf", "vxlan");
    let nodes = lab.kubectl.ok(&["get", "nodes", "-o", "name"]);
    assert!(nodes.contains(&lab.node_name(1)) && nodes.contains(&lab.node_name(2)), "{nodes}");
    let status = lab.run("status");
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{}", text(&status));
    assert!(shown.contains("running, healthy"), "status shows no healthy agent:\n{shown}");
    assert_eq!(shown.matches(" Ready ").count(), 2, "both nodes Ready:\n{shown}");

    let again = lab_command(&lab.name, lab.state_dir(), "up").output().expect("second up");
    assert!(!again.status.success(), "a second up must refuse:\n{}", text(&again));
    assert!(text(&again).contains("already running"), "{}", text(&again));

    let name = lab.name.clone();
    let state = lab.state_dir().to_path_buf();
    drop(lab);
    assert_eq!(leftovers(&name, &state), Vec::<String>::new());
}

#[test]
fn down_after_up_was_killed_removes_everything() {
    require_root();
    let name = names::unique("lab");
    let state = TempDir::new("labstate");
    let mut up = lab_command(&name, state.path(), "up")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting weir lab up");
    // Kill it once it has started daemons: the API server is recorded in the state file.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let recorded = std::fs::read_to_string(state.path().join("lab.json")).unwrap_or_default();
        if recorded.contains("\"agent\"") || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    up.kill().expect("SIGKILL weir lab up");
    let _ = up.wait();
    assert!(!leftovers(&name, state.path()).is_empty(), "the killed up left nothing to clean?");
    let down = lab_command(&name, state.path(), "down").output().expect("weir lab down");
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(leftovers(&name, state.path()), Vec::<String>::new());
}

#[test]
fn bad_arguments_are_refused_before_anything_is_made() {
    require_root();
    let name = names::unique("lab");
    let state = TempDir::new("labstate");
    let out = lab_command(&name, state.path(), "up").args(["--nodes", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--nodes 0 is out of range"), "{}", text(&out));
    let out = lab_command(&name, state.path(), "up").args(["--overlay", "gre"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("use vxlan or native"), "{}", text(&out));
    assert_eq!(leftovers(&name, state.path()), Vec::<String>::new());
}
