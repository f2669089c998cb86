//! A `weir lab` for a test: a uniquely named lab (`weirt-<pid>-<seq>-lab`) with its state in a
//! temp dir, brought up with the real `weir lab up` and removed with `weir lab down` on drop
//! (also when the test panics).
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use weir_proxy::policy::nft::{inspect, plan};

use crate::{
    apiserver::{Kubectl, TempDir, weir_binary},
    cni::weir_cni,
    names,
};

pub struct Lab {
    pub name: String,
    state: TempDir,
    pub kubectl: Kubectl,
}

impl Lab {
    /// `weir lab up --nodes N --dataplane D --overlay O`; panics with up's output on failure.
    pub fn up(nodes: u8, dataplane: &str, overlay: &str) -> Lab {
        Self::up_with(nodes, dataplane, overlay, &[])
    }

    /// [`Lab::up`] with more flags of `weir lab up` (e.g. `--ip-family dual`).
    pub fn up_with(nodes: u8, dataplane: &str, overlay: &str, flags: &[&str]) -> Lab {
        let name = names::unique("lab");
        let state = TempDir::new("labstate");
        let out = lab_command(&name, state.path(), "up")
            .args(["--nodes", &nodes.to_string(), "--dataplane", dataplane, "--overlay", overlay])
            .args(flags)
            .output()
            .expect("running weir lab up");
        let kubeconfig = state.path().join("kubeconfig");
        let lab = Lab { name, kubectl: Kubectl::new(&kubeconfig), state };
        assert!(out.status.success(), "weir lab up failed:\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
            "up does not print the kubeconfig to export:\n{stdout}"
        );
        lab
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Runs `weir lab <action>` for this lab.
    pub fn run(&self, action: &str) -> Output {
        lab_command(&self.name, self.state.path(), action).output().expect("running weir lab")
    }

    /// The node's network namespace name (`<lab>.workerN`, 1-based).
    pub fn node_netns(&self, index: usize) -> String {
        format!("{}.worker{}", self.name, index)
    }

    /// Kubernetes Node name of node `index` (1-based), kind's style.
    pub fn node_name(&self, index: usize) -> String {
        match index {
            1 => format!("{}-worker", self.name),
            i => format!("{}-worker{i}", self.name),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.run("down");
        if !out.status.success() {
            // A lab that cannot be removed must fail the test that made it (not only the
            // leftover check at the end of the run), unless the test is already failing.
            assert!(std::thread::panicking(), "weir lab down failed:\n{}", text(&out));
            eprintln!("weir lab down failed:\n{}", text(&out));
        }
    }
}

/// `weir lab ACTION --name NAME --state-dir DIR` (and, for `up`, weir-cni's directory).
pub fn lab_command(name: &str, state_dir: &Path, action: &str) -> Command {
    let mut cmd = Command::new(weir_binary());
    cmd.args(["lab", action, "--name", name, "--state-dir"]).arg(state_dir);
    if action == "up" {
        let cni_dir = weir_cni().parent().expect("weir-cni has a directory").to_path_buf();
        cmd.arg("--cni-bin-dir").arg(cni_dir);
    }
    cmd
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Everything of lab `name` still present on the machine (empty when it is fully gone).
pub fn leftovers(name: &str, state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let prefix = format!("{name}.");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let ns = entry.file_name().to_string_lossy().into_owned();
            if ns.starts_with(&prefix) {
                found.push(format!("netns {ns}"));
            }
        }
    }
    let cgroup_root = weir_proxy::system::cgroup2_mount().ok().flatten();
    let paths: Vec<PathBuf> = [
        Some(PathBuf::from("/sys/fs/bpf").join(name)),
        cgroup_root.map(|root| root.join(name)),
        Some(state_dir.join("lab.json")),
    ]
    .into_iter()
    .flatten()
    .collect();
    for path in paths {
        if path.exists() {
            found.push(path.display().to_string());
        }
    }
    for pid in processes_naming(name) {
        found.push(format!("process {pid}"));
    }
    found
}

/// Pids whose command line mentions `name` (the lab's daemons carry it in their arguments).
fn processes_naming(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(name))
        })
        .collect()
}

impl Lab {
    /// `kubectl apply -f` of `manifest` (JSON or YAML), written to the lab's state dir.
    pub fn apply(&self, manifest: &str) -> String {
        let file = self.state_dir().join(format!("{}.manifest", names::unique("apply")));
        std::fs::write(&file, manifest).expect("writing the manifest");
        let out = self.kubectl.ok(&["apply", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(file);
        out
    }

    /// Waits (bounded) until every pod matching `selector` (`-l` syntax, or `pod/NAME`) is
    /// Ready; panics with `kubectl get pods -o wide` and the pods' status when they are not.
    pub fn wait_ready(&self, target: &str) {
        let mut args = vec!["wait", "--for=condition=Ready", "--timeout=90s"];
        if target.contains('=') {
            args.extend(["pod", "-l", target]);
        } else {
            args.push(target);
        }
        let out = self.kubectl.run(&args);
        if !out.status.success() {
            let pods = self.kubectl.run(&["get", "pods", "-A", "-o", "wide"]);
            let described = self.kubectl.run(&["describe", "pods"]);
            panic!(
                "{target} not Ready: {}\n{}\n{}",
                text(&out),
                String::from_utf8_lossy(&pods.stdout),
                String::from_utf8_lossy(&described.stdout)
            );
        }
    }

    /// `kubectl exec POD -- ARGS...`, returning the result (not asserting success).
    pub fn exec(&self, pod: &str, args: &[&str]) -> Output {
        let mut full = vec!["exec", pod, "--"];
        full.extend_from_slice(args);
        self.kubectl.run(&full)
    }

    /// An HTTP GET with busybox wget from inside the underlay namespace (the network the
    /// nodes' eth0 share): how something outside the cluster reaches a NodePort.
    pub fn get_from_underlay(&self, url: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}.underlay", self.name)])
            // Debian's busybox wget has no -T: the whole request is bounded by `timeout`.
            .args(["/bin/busybox", "timeout", "3", "/bin/busybox", "wget", "-qO-", url])
            .output()
            .expect("running busybox wget in the underlay")
    }

    /// Packets the nodes' policy datapaths dropped because the pod had no policy entry yet
    /// (`drop_policy_not_ready` in each agent's metrics on eBPF, the `drop-unknown` counter of
    /// table `inet weir_policy` on nftables), summed over the first `nodes` nodes.
    pub fn not_ready_drops(&self, dataplane: &str, nodes: usize) -> u64 {
        (1..=nodes)
            .map(|i| match dataplane {
                "nftables" => {
                    let netns = PathBuf::from("/run/netns").join(self.node_netns(i));
                    let table = weir_proxy::policy::nft::DEFAULT_TABLE;
                    crate::netns::run_in(&netns, || inspect::drop_counters(table))
                        .expect("entering the node's namespace")
                        .expect("reading the policy table's counters")
                        .get(plan::DROP_UNKNOWN)
                        .copied()
                        .expect("the policy table has its drop-unknown counter")
                }
                _ => {
                    let url = format!("http://{}:10249/metrics", self.node_address(i));
                    let metrics =
                        String::from_utf8_lossy(&self.get_from_underlay(&url).stdout).into_owned();
                    let line = metrics
                        .lines()
                        .find(|l| l.contains("reason=\"drop_policy_not_ready\""))
                        .unwrap_or_else(|| {
                            panic!("no not-ready drop counter in {url}:\n{metrics}")
                        });
                    counter_after(line, "} ")
                }
            })
            .sum()
    }

    /// The node's address on the underlay (`172.30.0.<index + 1>`, 1-based index).
    pub fn node_address(&self, index: usize) -> String {
        format!("172.30.0.{}", index + 1)
    }
}

/// The number right after `marker` in a metrics line.
fn counter_after(line: &str, marker: &str) -> u64 {
    line.split_once(marker)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter value after {marker:?} in {line:?}"))
}
