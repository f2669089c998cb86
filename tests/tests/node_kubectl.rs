//! Real kubectl against the node runtime through the API server's pod proxy: `exec -it`,
//! `run -it` and `attach -it` typed into a terminal the test owns (prompt, output, terminal
//! size and resizes, exit status), over WebSocket and over kubectl's SPDY/3.1 fallback
//! (`KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`); and `kubectl get pods` showing the pods'
//! real states the way kube-apiserver prints them.
use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use weir_tests::{
    apiserver::Kubectl,
    node::{LabNode, NODE_IP},
    pty::PtyProgram,
};

const WAIT: Duration = Duration::from_secs(30);

/// `KUBECTL_REMOTE_COMMAND_WEBSOCKETS` values: WebSocket (kubectl's default) and SPDY.
const TRANSPORTS: [(&str, &str); 2] = [("websocket", "true"), ("spdy", "false")];

fn kubectl_command(kubectl: &Kubectl, websockets: &str, args: &[&str]) -> Command {
    let mut cmd = kubectl.command(args);
    cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets);
    cmd
}

fn busybox(command: &str) -> Value {
    json!({"containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", command]}]})
}

#[test]
fn kubectl_exec_it_and_plain_exec_over_websocket_and_spdy() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    lab.create_pod("box", busybox("sleep 3600"));
    lab.wait_running("box");
    for (transport, websockets) in TRANSPORTS {
        // An interactive shell on a terminal: size from kubectl's terminal, resize, exit code.
        let mut term = PtyProgram::spawn(
            kubectl_command(&kubectl, websockets, &["exec", "-it", "box", "--", "sh"]),
            33,
            101,
        );
        term.expect("# ", WAIT);
        term.type_text("stty size; echo sum=$((6*7)); tty\r");
        term.expect("sum=42", WAIT);
        term.expect("33 101", WAIT);
        term.expect("/dev/pts/", WAIT);
        term.resize(40, 120);
        // kubectl forwards the new size when SIGWINCH reaches it; retry until it has.
        weir_tests::wait::eventually(
            &format!("{transport}: the resize reaches the shell"),
            WAIT,
            || {
                term.type_text("stty size\r");
                std::thread::sleep(Duration::from_millis(300));
                let out = term.output();
                (!out.contains("40 120")).then_some(out)
            },
        );
        term.type_text("exit 7\r");
        let status = term.wait(WAIT);
        assert_eq!(status.code(), Some(7), "{transport}: kubectl exec -it exit status");

        // Without a terminal: separate stdout and stderr, the exit code, stdin to EOF.
        let out = kubectl_command(
            &kubectl,
            websockets,
            &["exec", "box", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
        )
        .output()
        .expect("kubectl exec");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{transport}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"), "{transport}: {out:?}");
        assert_eq!(out.status.code(), Some(3), "{transport}: {out:?}");
        let mut cat = kubectl_command(&kubectl, websockets, &["exec", "-i", "box", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl exec -i");
        cat.stdin.take().expect("stdin").write_all(b"line one\nline two\n").expect("stdin");
        let out = cat.wait_with_output().expect("kubectl exec -i");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "line one\nline two\n",
            "{transport}: {out:?}"
        );
        assert!(out.status.success(), "{transport}: {out:?}");
    }
    lab.delete_pod("box");
    lab.assert_clean();
}

#[test]
fn kubectl_run_it_and_attach_it_use_the_containers_terminal() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    // run -it: the pod is created with tty and stdin, kubectl attaches to its terminal.
    let overrides = r#"{"apiVersion": "v1", "spec": {"nodeName": "node-a"}}"#;
    let mut term = PtyProgram::spawn(
        kubectl.command(&[
            "run",
            "tt",
            "-it",
            "--image=busybox",
            "--restart=Never",
            "--overrides",
            overrides,
            "--",
            "sh",
        ]),
        30,
        90,
    );
    term.expect("If you don't see a command prompt", WAIT);
    term.type_text("\r");
    term.expect("# ", WAIT);
    term.type_text("echo run-$((2+3)); stty size\r");
    term.expect("run-5", WAIT);
    term.expect("30 90", WAIT);
    term.type_text("exit 4\r");
    // kubectl run returns the container's exit code.
    let status = term.wait(WAIT);
    assert_eq!(status.code(), Some(4), "kubectl run -it returns the container's exit code");
    let pod = lab.wait_pod("tt", "Failed", WAIT, |p| p["status"]["phase"] == "Failed");
    assert_eq!(pod["spec"]["containers"][0]["tty"], true, "{pod}");
    assert_eq!(pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 4);
    // What the terminal showed is the container's log, line by line.
    let logs = kubectl.ok(&["logs", "tt"]);
    assert!(logs.lines().any(|l| l.trim_end() == "run-5"), "{logs}");

    // attach -it to a running tty container, over both transports.
    for (transport, websockets) in TRANSPORTS {
        let name = format!("att-{transport}");
        let spec = json!({"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "busybox", "command": ["sh"],
            "stdin": true, "tty": true}]});
        lab.create_pod(&name, spec);
        lab.wait_running(&name);
        let mut term = PtyProgram::spawn(
            kubectl_command(&kubectl, websockets, &["attach", "-it", &name]),
            25,
            70,
        );
        term.expect("If you don't see a command prompt", WAIT);
        term.type_text("\r");
        term.expect("# ", WAIT);
        term.type_text("echo att-$((1+1)); stty size\r");
        term.expect("att-2", WAIT);
        term.expect("25 70", WAIT);
        term.type_text("exit\r");
        let status = term.wait(WAIT);
        assert!(status.success(), "{transport}: kubectl attach -it: {status:?}");
        lab.wait_pod(&name, "Succeeded", WAIT, |p| p["status"]["phase"] == "Succeeded");
        lab.delete_pod(&name);
    }
    lab.delete_pod("tt");
    lab.assert_clean();
}

/// The cells of `name`'s row in kubectl's table output, split on runs of 2+ spaces (cells such
/// as "3 (5s ago)" contain single spaces); None when there is no such row.
fn cells(table: &str, name: &str) -> Option<Vec<String>> {
    let line = table.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    Some(line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect())
}

fn row(table: &str, name: &str) -> Vec<String> {
    cells(table, name).unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

/// Waits until `name`'s row satisfies `check`; returns the table.
fn wait_row(
    kubectl: &Kubectl,
    args: &[&str],
    name: &str,
    check: impl Fn(&[String]) -> bool,
) -> String {
    let mut last = String::new();
    weir_tests::wait::eventually(&format!("kubectl {}: row {name}", args.join(" ")), WAIT, || {
        last = kubectl.ok(args);
        match cells(&last, name) {
            Some(cells) if check(&cells) => None,
            _ => Some(last.clone()),
        }
    });
    last
}

fn header(table: &str) -> Vec<String> {
    table.lines().next().unwrap_or("").split_whitespace().map(String::from).collect()
}

#[test]
fn kubectl_get_pods_and_nodes_shows_real_states_like_kube_apiserver() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    lab.create_pod("up", busybox("sleep 3600"));
    lab.create_pod("crash", busybox("exit 1"));
    let mut done = busybox("true");
    done["restartPolicy"] = json!("Never");
    lab.create_pod("done", done);
    lab.create_pod(
        "noimage",
        json!({"containers": [{"name": "main", "image": "example.com/app:1"}]}),
    );
    let mut stubborn = busybox("trap '' TERM; sleep 3600");
    stubborn["terminationGracePeriodSeconds"] = json!(25);
    lab.create_pod("stubborn", stubborn);
    let up_ip = lab.wait_running("up");
    lab.wait_running("stubborn");
    lab.wait_pod("crash", "restarted twice", WAIT, |p| {
        p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(2)
    });
    lab.wait_pod("done", "Succeeded", WAIT, |p| p["status"]["phase"] == "Succeeded");
    lab.wait_pod("noimage", "ErrImagePull", WAIT, |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
    });
    kubectl.ok(&["delete", "pod", "stubborn", "--wait=false"]);
    let get = ["get", "pods"];
    // The pod ignores SIGTERM: it stays Terminating for its grace period.
    let table = wait_row(&kubectl, &get, "stubborn", |c| c[2] == "Terminating");
    assert_eq!(header(&table), ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    wait_row(&kubectl, &get, "up", |c| c[1..4] == ["1/1", "Running", "0"]);
    wait_row(&kubectl, &get, "done", |c| c[1..4] == ["0/1", "Completed", "0"]);
    wait_row(&kubectl, &get, "noimage", |c| c[1..3] == ["0/1", "ErrImagePull"]);
    let table = wait_row(&kubectl, &get, "crash", |c| c[1..3] == ["0/1", "CrashLoopBackOff"]);
    // RESTARTS says when the last restart was: "3 (4s ago)".
    let restarts = &row(&table, "crash")[3];
    assert!(restarts.contains(" (") && restarts.ends_with(" ago)"), "{table}");

    let wide = kubectl.ok(&["get", "pods", "-o", "wide"]);
    assert_eq!(
        header(&wide),
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ]
    );
    let up = row(&wide, "up");
    assert_eq!(up[5..], [up_ip.as_str(), "node-a", "<none>", "<none>"], "{wide}");

    let nodes = kubectl.ok(&["get", "nodes", "-o", "wide"]);
    assert_eq!(
        header(&nodes)[..7],
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP"]
    );
    let node = row(&nodes, "node-a");
    assert_eq!(node[1..3], ["Ready", "<none>"], "{nodes}");
    assert_eq!(node[5], NODE_IP, "{nodes}");

    for pod in ["up", "crash", "done", "noimage", "stubborn"] {
        lab.delete_pod(pod);
    }
    lab.assert_clean();
}

/// `kubectl port-forward` over WebSocket (kubectl's default) and SPDY
/// (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`): a local port reaches the pod's port through the
/// API server and the node runtime, which connects on the pod's own loopback; a port nothing
/// listens on gives kubectl the node's error.
#[test]
fn kubectl_port_forward_over_websocket_and_spdy() {
    let mut lab = LabNode::new();
    lab.start();
    let kubectl = Kubectl::new(&lab.api.kubeconfig);
    lab.create_pod(
        "web",
        json!({"containers": [{"name": "nginx", "image": "nginx",
                               "ports": [{"containerPort": 8080}]}]}),
    );
    lab.wait_running("web");
    for (transport, websockets) in TRANSPORTS {
        let mut forward = PortForward::start(&kubectl, websockets, "8080");
        for request in 0..2 {
            let page = forward.get();
            if !page.starts_with("HTTP/1.0 200") {
                panic!("{transport} #{request}: {page:?}; kubectl: {}", forward.stop());
            }
            assert!(page.contains("pod: web"), "{transport} #{request}: {page}");
            assert!(
                page.contains("client address: 127.0.0.1:"),
                "{transport}: the node runtime connects on the pod's loopback: {page}"
            );
        }
        drop(forward);

        let mut refused = PortForward::start(&kubectl, websockets, "8081");
        let answer = refused.get();
        assert!(answer.is_empty(), "{transport}: nothing listens on 8081, yet: {answer}");
        let stderr = refused.stop();
        assert!(
            stderr.contains("error forwarding port 8081 to pod default/web")
                && stderr.contains("refused"),
            "{transport}: kubectl does not show the node's error: {stderr}"
        );
    }
    lab.delete_pod("web");
}

/// A running `kubectl port-forward pod/web :PORT` and the local port it chose.
struct PortForward {
    child: std::process::Child,
    local: std::net::SocketAddr,
    /// Kept open: kubectl prints a line per connection and dies of SIGPIPE without a reader.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl PortForward {
    fn start(kubectl: &Kubectl, websockets: &str, port: &str) -> PortForward {
        let mut child = kubectl
            .command(&["port-forward", "pod/web", &format!(":{port}"), "--address=127.0.0.1"])
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl port-forward");
        // "Forwarding from 127.0.0.1:PORT -> 8080"
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("reading kubectl's output");
        let local = line
            .split_once("Forwarding from ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|address| address.parse().ok());
        let Some(local) = local else {
            let _ = child.kill();
            let out = child.wait_with_output().expect("kubectl port-forward output");
            panic!(
                "kubectl port-forward did not start: {line}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        PortForward { child, local, _stdout: stdout }
    }

    /// One HTTP/1.0 GET through the forwarded port: the whole answer (empty when the
    /// connection closes without one).
    fn get(&mut self) -> String {
        let mut stream = std::net::TcpStream::connect(self.local).expect("connecting to kubectl");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n").expect("sending the request");
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Stops kubectl; its stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        let _ = self.child.wait();
        stderr
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
