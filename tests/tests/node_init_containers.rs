//! Init containers in the lab's node runtime (`weir node`), against a real API server, the
//! real weir-cni and the real kubectl: they run one at a time, in order, to completion before
//! the app containers; a failure fails the pod (`restartPolicy: Never`) or crash-loops
//! (OnFailure) without starting the app; their logs are served; a restarted runtime does not
//! run completed ones again; sidecars (`restartPolicy: Always`) run next to the app and stop
//! after it.
//!
//! The containers coordinate with the test through files of a temp dir (pod mount namespaces
//! see the node's file system): an init container waits for a gate file, so each step of the
//! initialization can be observed without timing assumptions.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_tests::{
    apiserver::{Kubectl, TempDir},
    node::LabNode,
    wait::eventually,
};

const WAIT: Duration = Duration::from_secs(30);

fn sh(name: &str, script: &str) -> Value {
    json!({"name": name, "image": "busybox", "command": ["sh", "-c", script]})
}

/// A script that appends `line` to `file`, then waits for `gate` to exist.
fn append_then_wait(file: &Path, line: &str, gate: &Path) -> String {
    format!(
        "echo {line} >> {f}; echo {line} says hi; until [ -e {g} ]; do sleep 0.1; done",
        f = file.display(),
        g = gate.display()
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn init_status(pod: &Value, i: usize) -> &Value {
    &pod["status"]["initContainerStatuses"][i]
}

fn app_status(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

fn condition<'a>(pod: &'a Value, kind: &str) -> &'a Value {
    pod["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// The STATUS column of `kubectl get pod NAME` (the API server prints the table).
fn kubectl_status(kubectl: &Kubectl, name: &str) -> String {
    let table = kubectl.ok(&["get", "pod", name, "--no-headers"]);
    table.split_whitespace().nth(2).unwrap_or_default().to_string()
}

fn wait_kubectl_status(kubectl: &Kubectl, name: &str, want: &str) {
    eventually(&format!("kubectl get pod {name} shows {want}"), WAIT, || {
        let status = kubectl_status(kubectl, name);
        (status != want).then_some(status)
    });
}

/// `kubectl get pods --watch`: the STATUS of every row it prints for `name`.
struct WatchedStatuses {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl WatchedStatuses {
    fn start(kubectl: &Kubectl) -> WatchedStatuses {
        let mut child = kubectl
            .command(&["get", "pods", "--watch", "--no-headers"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kubectl get pods --watch");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        WatchedStatuses { child, lines }
    }

    /// The distinct successive statuses of `name` until `last` (bounded by `WAIT`).
    fn until(&self, name: &str, last: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen: Vec<String> = Vec::new();
        while seen.last().map(String::as_str) != Some(last) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("kubectl get pods --watch did not show {name} {last}; it showed {seen:?}")
            };
            let cells: Vec<&str> = line.split_whitespace().collect();
            if cells.first() == Some(&name)
                && let Some(status) = cells.get(2)
                && seen.last().map(String::as_str) != Some(*status)
            {
                seen.push(status.to_string());
            }
        }
        seen
    }
}

impl Drop for WatchedStatuses {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn init_containers_run_in_order_before_the_app() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    let dir = TempDir::new("init-order");
    let (file, gate1, gate2) =
        (dir.path().join("order"), dir.path().join("gate1"), dir.path().join("gate2"));
    let watch = WatchedStatuses::start(&kubectl);
    let mut first = sh("init1", &append_then_wait(&file, "init1", &gate1));
    // kubelet runs no probes on init containers: this one would kill it at once.
    first["livenessProbe"] =
        json!({"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 1});
    lab.create_pod(
        "steps",
        json!({
            "initContainers": [first, sh("init2", &append_then_wait(&file, "init2", &gate2))],
            "containers": [sh("app", &format!("echo app >> {}; sleep 3600", file.display()))],
        }),
    );
    wait_kubectl_status(&kubectl, "steps", "Init:0/2");
    let pod = lab.pod("steps");
    assert_eq!(pod["status"]["phase"], "Pending", "{}", pod["status"]);
    assert_eq!(condition(&pod, "Initialized")["status"], "False");
    assert_eq!(condition(&pod, "Initialized")["reason"], "ContainersNotInitialized");
    assert_eq!(app_status(&pod)["state"]["waiting"]["reason"], "PodInitializing");
    // Long enough for a liveness probe (period 1 s) to have killed init1, were it run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(read(&file), "init1\n", "init2 and the app wait for init1");
    std::fs::write(&gate1, "").expect("opening gate 1");

    wait_kubectl_status(&kubectl, "steps", "Init:1/2");
    assert_eq!(read(&file), "init1\ninit2\n", "the app waits for init2");
    std::fs::write(&gate2, "").expect("opening gate 2");

    lab.wait_running("steps");
    let statuses = watch.until("steps", "Running");
    let steps = ["Init:0/2", "Init:1/2", "PodInitializing", "Running"];
    let mut rest = statuses.iter();
    for step in steps {
        assert!(rest.any(|s| s == step), "{step} missing from kubectl's watch: {statuses:?}");
    }
    eventually("the app ran", WAIT, || {
        let text = read(&file);
        (text != "init1\ninit2\napp\n").then_some(text)
    });

    let pod = lab.pod("steps");
    assert_eq!(condition(&pod, "Initialized")["status"], "True", "{}", pod["status"]);
    assert_eq!(condition(&pod, "Ready")["status"], "True");
    for (i, name) in ["init1", "init2"].into_iter().enumerate() {
        let s = init_status(&pod, i);
        assert_eq!(s["name"], name, "{s}");
        assert_eq!(s["state"]["terminated"]["exitCode"], 0, "{s}");
        assert_eq!(s["state"]["terminated"]["reason"], "Completed", "{s}");
        assert_eq!(s["ready"], true, "{s}");
        assert_eq!(s["started"], false, "{s}");
        assert_eq!(s["restartCount"], 0, "{s}");
        assert_eq!(s["image"], "busybox", "{s}");
        assert_eq!(s["imageID"], "weir-lab://busybox", "{s}");
        assert!(s["containerID"].as_str().unwrap_or_default().contains(name), "{s}");
    }
    assert!(app_status(&pod)["state"]["running"].is_object(), "{}", pod["status"]);
    assert_eq!(kubectl.ok(&["logs", "steps", "-c", "init2"]), "init2 says hi\n");
    assert_eq!(kubectl.ok(&["logs", "steps", "-c", "init1"]), "init1 says hi\n");
    lab.delete_pod("steps");
    lab.assert_clean();
}

#[test]
fn a_failing_init_container_fails_the_pod_or_crash_loops() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    let dir = TempDir::new("init-fail");
    let app = |marker: &str| {
        sh("app", &format!("touch {}; sleep 3600", dir.path().join(marker).display()))
    };
    lab.create_pod(
        "never",
        json!({"restartPolicy": "Never",
               "initContainers": [sh("setup", "echo cannot; exit 3")],
               "containers": [app("never-app")]}),
    );
    lab.create_pod(
        "again",
        json!({"restartPolicy": "OnFailure",
               "initContainers": [sh("setup", "echo try; exit 1")],
               "containers": [app("again-app")]}),
    );
    let never = lab.wait_pod("never", "Failed", WAIT, |p| p["status"]["phase"] == "Failed");
    let s = init_status(&never, 0);
    assert_eq!(s["state"]["terminated"]["exitCode"], 3, "{s}");
    assert_eq!(s["state"]["terminated"]["reason"], "Error", "{s}");
    assert_eq!(s["restartCount"], 0, "{s}");
    assert_eq!(app_status(&never)["state"]["waiting"]["reason"], "PodInitializing");
    assert_eq!(condition(&never, "Initialized")["status"], "False");
    assert_eq!(kubectl_status(&kubectl, "never"), "Init:Error");
    assert_eq!(kubectl.ok(&["logs", "never", "-c", "setup"]), "cannot\n");

    let again = lab.wait_pod("again", "init crash loop", Duration::from_secs(60), |p| {
        let s = init_status(p, 0);
        s["restartCount"].as_u64().unwrap_or(0) >= 2
            && s["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    });
    let s = init_status(&again, 0);
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 1, "{s}");
    assert_eq!(again["status"]["phase"], "Pending");
    assert_eq!(app_status(&again)["state"]["waiting"]["reason"], "PodInitializing");
    assert_eq!(app_status(&again)["restartCount"], 0);
    wait_kubectl_status(&kubectl, "again", "Init:CrashLoopBackOff");
    assert_eq!(kubectl.ok(&["logs", "again", "-c", "setup", "--previous"]), "try\n");

    // Neither app ever started.
    for marker in ["never-app", "again-app"] {
        assert!(!dir.path().join(marker).exists(), "{marker} started");
    }
    for name in ["never", "again"] {
        lab.delete_pod(name);
    }
    lab.assert_clean();
}

#[test]
fn an_init_container_the_lab_cannot_run_is_err_image_pull() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    lab.create_pod(
        "badinit",
        json!({"initContainers": [{"name": "setup", "image": "quay.io/example/setup:1.0"}],
               "containers": [sh("app", "sleep 3600")]}),
    );
    let pod = lab.wait_pod("badinit", "ErrImagePull", WAIT, |p| {
        init_status(p, 0)["state"]["waiting"]["reason"] == "ErrImagePull"
    });
    let message = init_status(&pod, 0)["state"]["waiting"]["message"].as_str().unwrap_or("");
    assert!(message.contains("quay.io/example/setup:1.0"), "{message}");
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(app_status(&pod)["state"]["waiting"]["reason"], "PodInitializing");
    wait_kubectl_status(&kubectl, "badinit", "Init:ErrImagePull");
    lab.delete_pod("badinit");
    lab.assert_clean();
}

#[test]
fn a_restarted_runtime_does_not_run_completed_init_containers_again() {
    let mut lab = LabNode::new();
    lab.start();
    let dir = TempDir::new("init-restart");
    let (done_file, part_file, gate) =
        (dir.path().join("done"), dir.path().join("part"), dir.path().join("gate"));
    let append = |file: &Path, line: &str| format!("echo {line} >> {}", file.display());
    // Initialized before the crash.
    lab.create_pod(
        "done",
        json!({"initContainers": [sh("init1", &append(&done_file, "init1")),
                                  sh("init2", &append(&done_file, "init2"))],
               "containers": [sh("app", "sleep 3600")]}),
    );
    // Crashes during its second init container.
    lab.create_pod(
        "part",
        json!({"initContainers": [sh("init1", &append(&part_file, "init1")),
                                  sh("init2", &append_then_wait(&part_file, "init2", &gate))],
               "containers": [sh("app", "sleep 3600")]}),
    );
    lab.wait_running("done");
    lab.wait_pod("part", "init2 running", WAIT, |p| {
        init_status(p, 1)["state"]["running"].is_object()
    });
    lab.kill_runtime();
    lab.start();
    let done = lab.wait_pod("done", "the app restarted by the new runtime", WAIT, |p| {
        app_status(p)["restartCount"].as_u64() >= Some(1)
            && app_status(p)["state"]["running"].is_object()
    });
    assert_eq!(read(&done_file), "init1\ninit2\n", "completed init containers ran again");
    for i in 0..2 {
        let s = init_status(&done, i);
        assert_eq!(s["restartCount"], 0, "{s}");
        assert_eq!(s["state"]["terminated"]["reason"], "Completed", "{s}");
    }
    assert_eq!(condition(&done, "Initialized")["status"], "True");
    // The interrupted init container runs again (a restart), the completed one does not.
    lab.wait_pod("part", "init2 restarted", WAIT, |p| {
        init_status(p, 1)["restartCount"].as_u64() >= Some(1)
            && init_status(p, 1)["state"]["running"].is_object()
    });
    eventually("init2 ran again", WAIT, || {
        let text = read(&part_file);
        (text != "init1\ninit2\ninit2\n").then_some(text)
    });
    std::fs::write(&gate, "").expect("opening the gate");
    let part = lab.wait_pod("part", "Running", WAIT, |p| p["status"]["phase"] == "Running");
    assert_eq!(init_status(&part, 0)["restartCount"], 0);
    assert_eq!(read(&part_file), "init1\ninit2\ninit2\n");
    for name in ["done", "part"] {
        lab.delete_pod(name);
    }
    lab.assert_clean();
}

#[test]
fn sidecars_run_next_to_the_app_restart_and_stop_after_it() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    let dir = TempDir::new("init-sidecar");
    let (file, crash) = (dir.path().join("order"), dir.path().join("crash"));
    let f = file.display();
    // The sidecar logs its start and its SIGTERM, and exits when asked to (a crash).
    let mut sidecar = sh(
        "side",
        &format!(
            "echo side >> {f}; trap 'echo side-term >> {f}; exit 0' TERM; \
             while [ ! -e {c} ]; do sleep 0.1; done; rm {c}; exit 1",
            c = crash.display()
        ),
    );
    sidecar["restartPolicy"] = json!("Always");
    let mut probed = sidecar.clone();
    // The next init container starts once the sidecar has started: here, once its startup
    // probe has seen its line (without one, once its process is spawned).
    probed["startupProbe"] =
        json!({"exec": {"command": ["grep", "-q", "side", file]}, "periodSeconds": 1});
    probed["readinessProbe"] = json!({"exec": {"command": ["true"]}, "periodSeconds": 1});
    lab.create_pod(
        "mesh",
        json!({
            "terminationGracePeriodSeconds": 10,
            "initContainers": [probed, sh("init", &format!("echo init >> {f}"))],
            "containers": [sh("app", &format!(
                "echo app >> {f}; trap 'echo app-term >> {f}; exit 0' TERM; \
                 while true; do sleep 0.1; done"))],
        }),
    );
    lab.wait_running("mesh");
    let pod = lab.wait_pod("mesh", "Ready", WAIT, |p| condition(p, "Ready")["status"] == "True");
    // The next init container started once the sidecar had (the sidecar keeps running).
    eventually("sidecar, init, app in order", WAIT, || {
        let text = read(&file);
        (text != "side\ninit\napp\n").then_some(text)
    });
    let s = init_status(&pod, 0);
    assert!(s["state"]["running"].is_object(), "{s}");
    assert_eq!(s["started"], true, "{s}");
    assert_eq!(s["ready"], true, "{s}");
    let table = kubectl.ok(&["get", "pod", "mesh", "--no-headers"]);
    assert_eq!(table.split_whitespace().nth(1), Some("2/2"), "{table}");

    // A sidecar that exits is restarted; the app is not.
    std::fs::write(&crash, "").expect("crashing the sidecar");
    // Restarted and started again (its startup probe passed), so the deletion below meets a
    // steady pod: a deletion that lands while the restarted sidecar's startup probe is still
    // pending was seen to skip the graceful stop (2 of about 15 runs; open in the runtime).
    let pod = lab.wait_pod("mesh", "sidecar restarted", WAIT, |p| {
        init_status(p, 0)["restartCount"].as_u64() >= Some(1)
            && init_status(p, 0)["state"]["running"].is_object()
            && init_status(p, 0)["started"] == true
            && condition(p, "Ready")["status"] == "True"
    });
    assert_eq!(init_status(&pod, 0)["lastState"]["terminated"]["exitCode"], 1);
    assert_eq!(app_status(&pod)["restartCount"], 0);

    // Deletion stops the app first, then the sidecar.
    // The API server answers 409 when the runtime's status write lands between its read and
    // its write (kube-apiserver retries that itself): ask again.
    eventually("a graceful DELETE of mesh", WAIT, || {
        let (code, body) = lab.api.json("DELETE", "/api/v1/namespaces/default/pods/mesh", None);
        (code != 200 && code != 202).then(|| format!("{code} {body}"))
    });
    eventually("mesh is gone", WAIT, || {
        let pod = lab.pod("mesh");
        (!pod.is_null()).then(|| pod["status"].to_string())
    });
    let events = lab.api.json("GET", "/api/v1/namespaces/default/events", None).1;
    let reasons: Vec<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == "mesh")
        .map(|e| format!("{} {}", e["reason"], e["message"]))
        .collect();
    assert_eq!(
        read(&file),
        "side\ninit\napp\nside\napp-term\nside-term\n",
        "the app then the sidecar got SIGTERM; events: {reasons:#?}"
    );

    // A pod that ends: its sidecar is stopped and the pod succeeds.
    let mut sidecar = sh("side", "trap 'exit 0' TERM; while true; do sleep 0.1; done");
    sidecar["restartPolicy"] = json!("Always");
    lab.create_pod(
        "job",
        json!({"restartPolicy": "Never", "initContainers": [sidecar],
               "containers": [sh("app", "echo done")]}),
    );
    let job = lab.wait_pod("job", "Succeeded with its sidecar stopped", WAIT, |p| {
        p["status"]["phase"] == "Succeeded" && init_status(p, 0)["state"]["terminated"].is_object()
    });
    assert_eq!(init_status(&job, 0)["restartCount"], 0, "{}", job["status"]);
    lab.delete_pod("job");
    lab.assert_clean();
}
