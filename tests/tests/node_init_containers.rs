//! Init containers in the lab's node runtime (`weir node`), against a real API server, the
//! real weir-cni and the real kubectl: they run one at a time, in order, to completion before
//! the app containers; a failure fails the pod (`restartPolicy: Never`) or crash-loops
//! (OnFailure) without starting the app; their logs are served; a restarted runtime does not
//! run completed ones again; sidecars (`restartPolicy: Always`) run next to the app and stop
//! after it, also when the runtime learns of the deletion late, and end terminated when the
//! pod finishes during their crash-loop backoff.
//!
//! The containers coordinate with the test through files of a temp dir (pod mount namespaces
//! see the node's file system): an init container waits for a gate file, so each step of the
//! initialization can be observed without timing assumptions.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
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

/// A sidecar that logs its start and its SIGTERM to `file` and exits 1 (a crash) once `crash`
/// exists (removing it, so its next run keeps running).
fn crashable_sidecar(file: &Path, crash: &Path) -> Value {
    let mut sidecar = sh(
        "side",
        &format!(
            "echo side >> {f}; trap 'echo side-term >> {f}; exit 0' TERM; \
             while [ ! -e {c} ]; do sleep 0.1; done; rm {c}; exit 1",
            f = file.display(),
            c = crash.display()
        ),
    );
    sidecar["restartPolicy"] = json!("Always");
    sidecar
}

/// An app container that logs its start and its SIGTERM to `file`.
fn term_logging_app(file: &Path) -> Value {
    sh(
        "app",
        &format!(
            "echo app >> {f}; trap 'echo app-term >> {f}; exit 0' TERM; \
             while true; do sleep 0.1; done",
            f = file.display()
        ),
    )
}

/// A DELETE with the pod's own grace period.
fn delete_gracefully(lab: &LabNode, name: &str) {
    // The API server answers 409 when the runtime's status write lands between its read and
    // its write (kube-apiserver retries that itself): ask again.
    eventually(&format!("a graceful DELETE of {name}"), WAIT, || {
        let path = format!("/api/v1/namespaces/default/pods/{name}");
        let (code, body) = lab.api.json("DELETE", &path, None);
        (code != 200 && code != 202).then(|| format!("{code} {body}"))
    });
}

fn wait_gone(lab: &LabNode, name: &str) {
    eventually(&format!("{name} is gone"), WAIT, || {
        let pod = lab.pod(name);
        (!pod.is_null()).then(|| pod["status"].to_string())
    });
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
    let sidecar = crashable_sidecar(&file, &crash);
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
            "containers": [term_logging_app(&file)],
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
    // Deleted at once, while the restarted sidecar's startup probe may still be pending: the
    // status write that follows it must not cut the graceful stop short (see
    // a_deletion_the_runtime_has_not_seen_yet_still_stops_the_containers_gracefully).
    let pod = lab.wait_pod("mesh", "sidecar restarted", WAIT, |p| {
        init_status(p, 0)["restartCount"].as_u64() >= Some(1)
            && init_status(p, 0)["state"]["running"].is_object()
    });
    assert_eq!(init_status(&pod, 0)["lastState"]["terminated"]["exitCode"], 1);
    assert_eq!(app_status(&pod)["restartCount"], 0);

    // Deletion stops the app first, then the sidecar.
    delete_gracefully(&lab, "mesh");
    wait_gone(&lab, "mesh");
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

/// A relay between the node runtime and the API server that can hold back what the API server
/// sends on the connections open when the hold starts (the runtime's watch among them) while
/// the runtime's requests still reach it: a runtime whose view of the API lags, made on demand.
/// Connections opened during a hold are not held (a held TLS handshake would keep every new
/// request from the API server). Stopped (and released) on drop.
struct HoldingRelay {
    addr: SocketAddr,
    held: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl HoldingRelay {
    /// Listens on 127.0.0.1 inside the node's namespace, relaying to the API server.
    fn start(lab: &LabNode) -> HoldingRelay {
        let listener = lab
            .node
            .ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .expect("entering the node namespace")
            .expect("binding the relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let (held, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (held2, stop2, target) = (held.clone(), stop.clone(), lab.api.addr);
        let acceptor = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                // Connections opened during a hold are not held.
                let held = (!held2.load(Ordering::SeqCst)).then(|| held2.clone());
                let Ok(server) = TcpStream::connect(target) else { continue };
                let (mut up_from, mut up_to) =
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                    let _ = up_to.shutdown(Shutdown::Both);
                });
                let stop = stop2.clone();
                std::thread::spawn(move || relay_down(server, client, held.as_deref(), &stop));
            }
        });
        HoldingRelay { addr, held, stop, acceptor: Some(acceptor) }
    }

    /// A kubeconfig for the runtime that reaches the API server through the relay.
    fn kubeconfig(&self, lab: &LabNode, dir: &Path) -> PathBuf {
        let admin = std::fs::read_to_string(&lab.api.kubeconfig).expect("admin kubeconfig");
        let path = dir.join("relayed.kubeconfig");
        let relayed = admin.replace(
            &format!("https://{}", lab.api.addr),
            &format!("https://127.0.0.1:{}", self.addr.port()),
        );
        std::fs::write(&path, relayed).expect("writing the relayed kubeconfig");
        path
    }

    fn hold(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }
}

/// Copies the API server's bytes to the runtime, each chunk once `held` (if any) is false.
fn relay_down(
    mut server: TcpStream,
    mut client: TcpStream,
    held: Option<&AtomicBool>,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while held.is_some_and(|h| h.load(Ordering::SeqCst)) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.hold(false);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A graceful deletion the runtime learns of late, while the restarted sidecar's startup probe
/// passes: the status write that follows the probe reaches the API server after the deletion
/// mark and before the runtime has seen it (the relay holds the API server's answers back).
/// The pod must stay until its containers got SIGTERM; the API server drops a marked pod at
/// its next write, so a runtime that writes status over a deletion it has not seen makes the
/// pod vanish and its containers die without SIGTERM.
#[test]
fn a_deletion_the_runtime_has_not_seen_yet_still_stops_the_containers_gracefully() {
    let mut lab = LabNode::new();
    let dir = TempDir::new("sidecar-delete");
    let relay = HoldingRelay::start(&lab);
    lab.kubeconfig = relay.kubeconfig(&lab, dir.path());
    lab.start();
    let (file, crash, gate, probed) = (
        dir.path().join("order"),
        dir.path().join("crash"),
        dir.path().join("gate"),
        dir.path().join("probed"),
    );
    let mut sidecar = crashable_sidecar(&file, &crash);
    // Pending until the gate is open (no failures, so no events while the relay holds);
    // each pass is counted in `probed`.
    let probe = format!(
        "until [ -e {g} ]; do sleep 0.1; done; echo passed >> {p}",
        g = gate.display(),
        p = probed.display()
    );
    sidecar["startupProbe"] = json!({"exec": {"command": ["sh", "-c", probe]},
                                     "periodSeconds": 1, "timeoutSeconds": 60});
    std::fs::write(&gate, "").expect("opening the gate");
    lab.create_pod(
        "late",
        json!({
            "terminationGracePeriodSeconds": 10,
            "initContainers": [sidecar],
            "containers": [term_logging_app(&file)],
        }),
    );
    lab.wait_pod("late", "Ready", WAIT, |p| condition(p, "Ready")["status"] == "True");

    // The restarted sidecar's startup probe waits for the gate.
    std::fs::remove_file(&gate).expect("closing the gate");
    std::fs::write(&crash, "").expect("crashing the sidecar");
    lab.wait_pod("late", "sidecar restarted, not started", WAIT, |p| {
        init_status(p, 0)["restartCount"].as_u64() >= Some(1)
            && init_status(p, 0)["state"]["running"].is_object()
            && init_status(p, 0)["started"] == false
    });
    let passes = read(&probed).lines().count();
    // The runtime must not be waiting for the answer to that status write while the relay
    // holds (it would write nothing more): the answer takes milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    relay.hold(true);
    delete_gracefully(&lab, "late");
    let pod = lab.pod("late");
    assert!(pod["metadata"]["deletionTimestamp"].is_string(), "not marked: {}", pod["metadata"]);
    std::fs::write(&gate, "").expect("opening the gate");
    eventually("the restarted sidecar's startup probe passed", WAIT, || {
        let now = read(&probed).lines().count();
        (now == passes).then(|| format!("{now} passes"))
    });
    // The runtime writes the sidecar's new status as soon as the probe has passed (its answer
    // is held); a second is ample for the request to reach the API server.
    std::thread::sleep(Duration::from_secs(1));
    let during = lab.pod("late");
    relay.hold(false);

    wait_gone(&lab, "late");
    assert_eq!(
        read(&file),
        "side\napp\nside\napp-term\nside-term\n",
        "the pod went away before its containers got SIGTERM (while the answers were held it \
         was {})",
        if during.is_null() { "already gone".to_string() } else { during["metadata"].to_string() }
    );
    lab.assert_clean();
}

/// A pod that finishes while its sidecar waits in crash-loop backoff: the sidecar is not
/// restarted and its final state is its last run (terminated), not waiting.
#[test]
fn a_crash_looping_sidecar_ends_terminated_when_the_pod_finishes() {
    let mut lab = LabNode::new();
    lab.start();
    let dir = TempDir::new("sidecar-crashloop");
    let gate = dir.path().join("gate");
    let mut sidecar = sh("side", "echo side; exit 1");
    sidecar["restartPolicy"] = json!("Always");
    lab.create_pod(
        "loop",
        json!({"restartPolicy": "Never", "initContainers": [sidecar],
               "containers": [sh("app", &format!(
                   "until [ -e {} ]; do sleep 0.1; done; echo done", gate.display()))]}),
    );
    // After its third run the sidecar waits 4 s before the next: the app ends in that wait.
    let pod = lab.wait_pod("loop", "sidecar in crash-loop backoff", Duration::from_secs(60), |p| {
        init_status(p, 0)["restartCount"].as_u64() >= Some(2)
            && init_status(p, 0)["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    });
    let restarts = init_status(&pod, 0)["restartCount"].clone();
    std::fs::write(&gate, "").expect("letting the app finish");
    let pod = lab.wait_pod("loop", "Succeeded", WAIT, |p| p["status"]["phase"] == "Succeeded");
    let s = init_status(&pod, 0);
    assert_eq!(s["state"]["terminated"]["exitCode"], 1, "{s}");
    assert_eq!(s["state"]["terminated"]["reason"], "Error", "{s}");
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 1, "{s}");
    assert_eq!(s["restartCount"], restarts, "{s}");
    assert_eq!(s["started"], false, "{s}");
    assert_eq!(app_status(&pod)["state"]["terminated"]["exitCode"], 0, "{}", pod["status"]);
    // Stays so: the sidecar is not started again.
    std::thread::sleep(Duration::from_secs(5));
    let later = lab.pod("loop");
    assert_eq!(init_status(&later, 0), s, "{}", later["status"]);
    lab.delete_pod("loop");
    lab.assert_clean();
}
