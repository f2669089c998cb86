//! One task per pod: it owns the pod's sandbox (netns, cgroup, CNI attachment, files) and its
//! containers' processes, runs the probes, writes the pod's status and events, and tears
//! everything down when the pod is deleted or disappears from the API.
//!
//! The task gets the latest Pod through a watch channel; the sender being dropped means the
//! pod vanished from the API (deleted with grace 0): teardown without the API.
//!
//! Status writes are conditional on the newest version of the pod the task knows
//! (`metadata.resourceVersion` in the patch), so a status decided before the task saw a
//! deletion never lands after it: the API server removes a pod marked for deletion at its next
//! write, which would turn a graceful deletion into a vanished pod (no SIGTERM). On a conflict
//! the task reads the pod again; a deletion found there is handled as if the watch had brought
//! it, and once a deletion is known the task writes no status at all.
//!
//! Init containers run as kubelet runs them: once the sandbox is ready, one at a time in
//! order, each to successful completion, before any app container starts. A failed one is
//! restarted with the crash-loop backoff unless `restartPolicy` is Never (then the pod fails).
//! An init container with `restartPolicy: Always` is a sidecar: the next one starts once it
//! has started, it keeps running (restarted when it exits) next to the app containers, and it
//! is stopped after them.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use k8s_openapi::{
    api::core::v1::{Container, ContainerStatus, Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::{mpsc, watch},
};

use crate::{
    ContainerShared, PodShared, Shared, cni, logs, probe,
    rules::{self, Launch},
    sandbox::{self, PodPaths, Record},
    spawn::{self, ContainerNamespaces},
};

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a new pod's containers wait for the agent to write the pod's policy entry.
const POLICY_WAIT: Duration = Duration::from_secs(5);

/// Tries of one status write whose version the pod has moved past (see `Worker::report`).
const STATUS_WRITE_ATTEMPTS: usize = 3;

/// Whether the node's policy datapaths hold the entries of a pod with `ips` (see
/// `Pod::wait_for_policy`).
fn policy_written(pins: Option<&Path>, ips: &[std::net::IpAddr]) -> std::io::Result<bool> {
    if let Some(pins) = pins
        && !weir_cni_plugin::policy::policy_written(pins, ips)?
    {
        return Ok(false);
    }
    weir_proxy::policy::nft::inspect::endpoints_written(weir_proxy::policy::nft::DEFAULT_TABLE, ips)
}

fn now() -> String {
    Timestamp::now().to_string()
}

#[derive(Debug, Clone)]
enum CState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        code: i32,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

#[derive(Default, Clone, Copy)]
struct ProbeState {
    next_due: Option<Instant>,
    running: bool,
    successes: u32,
    failures: u32,
}

/// What a container is to its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `spec.initContainers[]`: runs to completion, in order, before the app containers.
    Init,
    /// `spec.initContainers[]` with `restartPolicy: Always` (a native sidecar).
    Sidecar,
    /// `spec.containers[]`.
    App,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeKind {
    Startup = 0,
    Readiness = 1,
    Liveness = 2,
}

struct Ctr {
    spec: Container,
    role: Role,
    /// An init container that exited 0: it never runs again in this sandbox.
    completed: bool,
    /// A sidecar that has started once: the init containers after it may run.
    sidecar_started: bool,
    /// A sidecar the runtime stopped because the pod finished (it is not restarted).
    stopping: bool,
    launch: Result<Launch, String>,
    shared: Arc<ContainerShared>,
    restart_count: u32,
    consecutive: u32,
    ever_started: bool,
    state: CState,
    last_terminated: Option<CState>,
    /// The run before `last_terminated`: lastState again when the container ends for good
    /// while it waits in crash-loop backoff (its last run becomes its state).
    terminated_before: Option<CState>,
    pid: Option<u32>,
    started: Instant,
    backoff_until: Option<Instant>,
    ready: bool,
    startup_done: bool,
    probes: [ProbeState; 3],
    generation: u64,
    /// Why the runtime killed the current run (liveness/startup failure).
    killed_reason: Option<String>,
    image_event_sent: bool,
}

enum WorkerEvent {
    Exited { idx: usize, generation: u64, code: i32 },
    Probe { idx: usize, generation: u64, kind: ProbeKind, result: Result<(), String> },
}

struct Sandbox {
    ips: Vec<String>,
    /// The pin directory of weir-cni's node agent (`bpffsDir`), when weir-cni wires the pod.
    policy_pins: Option<PathBuf>,
}

pub struct Worker {
    shared: Arc<Shared>,
    client: Client,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    netns_name: String,
    paths: PodPaths,
    sandbox: Option<Sandbox>,
    sandbox_failures: u32,
    sandbox_retry_at: Option<Instant>,
    sandbox_error: Option<String>,
    ctrs: Vec<Ctr>,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    start_time: String,
    last_status: Option<Value>,
    transitions: HashMap<&'static str, (bool, String)>,
    pod_shared: Arc<PodShared>,
    /// Every init container has completed (sidecars: started) once; stays true.
    initialized: bool,
    /// The newest resourceVersion of the pod the task knows (from the watch, its own status
    /// writes and re-reads): the version its next status write is conditional on.
    resource_version: Option<String>,
    /// The resourceVersion the watch delivered last (the watch may lag behind the task's own
    /// writes: only a version it has not delivered before replaces `resource_version`).
    watched_version: Option<String>,
}

/// Runs a pod until it is gone (see the module docs).
pub async fn run(shared: Arc<Shared>, client: Client, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow_and_update().clone() else { return };
    let mut worker = Worker::new(shared, client, pod);
    loop {
        let latest = rx.borrow_and_update().clone();
        match latest {
            None => {
                log::info!(
                    "pod {}/{} is gone from the API: tearing down",
                    worker.namespace,
                    worker.name
                );
                worker.teardown(rules::MIN_GRACE).await;
                return;
            }
            Some(pod) => worker.observe(pod),
        }
        if worker.deleting() {
            let grace = rules::grace_period(
                worker.pod.metadata.deletion_grace_period_seconds,
                worker.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds),
            );
            worker.teardown(grace).await;
            worker.delete_object().await;
            return;
        }
        worker.step().await;
        worker.report().await;
        if worker.deleting() {
            // A status write found the deletion before the watch brought it.
            continue;
        }
        let wake = worker.next_wake();
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The manager dropped the sender: the pod vanished.
                    rx.mark_changed();
                    let _ = rx.borrow_and_update();
                    worker.teardown(rules::MIN_GRACE).await;
                    return;
                }
            }
            Some(event) = worker.events_rx.recv() => worker.handle(event),
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        while let Ok(event) = worker.events_rx.try_recv() {
            worker.handle(event);
        }
    }
}

impl Worker {
    fn new(shared: Arc<Shared>, client: Client, pod: Pod) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let config = &shared.config;
        let netns_name = rules::netns_name(&config.netns_prefix, &uid);
        let paths = PodPaths::new(&config.state_dir, &config.cgroup, &netns_name, &uid);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let status = pod.status.clone().unwrap_or_default();
        let previous: HashMap<String, ContainerStatus> = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let adopted = sandbox::read_record(&paths.record()).filter(|r| r.cni_result.is_some());
        // An adopted sandbox keeps its initialization: completed init containers never run
        // again in it (a new sandbox runs them all again, as kubelet does).
        let was_initialized = adopted.is_some()
            && status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Initialized" && c.status == "True");
        let spec = pod.spec.clone().unwrap_or_default();
        let pod_shared = Arc::new(PodShared {
            uid: uid.clone(),
            netns: paths.netns.clone(),
            cgroup: paths.cgroup.clone(),
            dir: paths.dir.clone(),
            containers: Default::default(),
        });
        let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
        // As kubelet reports them, containers not started yet wait in PodInitializing when
        // the pod has init containers.
        let first_wait = if has_init { "PodInitializing" } else { "ContainerCreating" };
        let init = spec.init_containers.into_iter().flatten().map(|c| {
            let role = if c.restart_policy.as_deref() == Some("Always") {
                Role::Sidecar
            } else {
                Role::Init
            };
            (c, role)
        });
        let apps = spec.containers.into_iter().map(|c| (c, Role::App));
        let mut ctrs = Vec::new();
        for (c, role) in init.chain(apps) {
            let ports: Vec<u16> = c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect();
            let launch = rules::launch_for(
                c.image.as_deref().unwrap_or_default(),
                c.command.as_deref().unwrap_or_default(),
                c.args.as_deref().unwrap_or_default(),
                &ports,
            );
            let exec = Launch::exec_style(&launch);
            let workdir = c.working_dir.clone().unwrap_or_else(|| "/".into());
            let shared_c = Arc::new(ContainerShared::new(
                &c.name,
                exec,
                &workdir,
                c.stdin_once.unwrap_or(false),
                c.tty.unwrap_or(false),
            ));
            pod_shared.containers.lock().unwrap().insert(c.name.clone(), shared_c.clone());
            let before = previous.get(&c.name);
            let completed = role == Role::Init
                && adopted.is_some()
                && (was_initialized || before.and_then(completed_state).is_some());
            // An adopted pod's containers were killed by the restarted runtime: their next run
            // is a restart. A completed init container keeps its count and its state.
            let restart_count = match (before, &adopted) {
                (Some(s), Some(_)) if !completed => s.restart_count as u32 + 1,
                (Some(s), _) => s.restart_count as u32,
                _ => 0,
            };
            let state = if completed {
                before.and_then(completed_state).unwrap_or_else(|| CState::Terminated {
                    code: 0,
                    reason: "Completed".into(),
                    message: None,
                    started_at: now(),
                    finished_at: now(),
                })
            } else {
                CState::Waiting { reason: first_wait.into(), message: None }
            };
            ctrs.push(Ctr {
                spec: c,
                role,
                completed,
                sidecar_started: false,
                stopping: false,
                launch,
                shared: shared_c,
                restart_count,
                consecutive: 0,
                ever_started: completed,
                state,
                last_terminated: None,
                terminated_before: None,
                pid: None,
                started: Instant::now(),
                backoff_until: None,
                ready: false,
                startup_done: false,
                probes: Default::default(),
                generation: 0,
                killed_reason: None,
                image_event_sent: false,
            });
        }
        let initialized = !has_init || was_initialized;
        shared.pods.lock().unwrap().insert((namespace.clone(), name.clone()), pod_shared.clone());
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(now);
        let sandbox = adopted.map(|r| Sandbox {
            ips: r.cni_result.as_ref().map(cni::result_ips).unwrap_or_default(),
            // An adopted pod's policy entry was written long ago.
            policy_pins: None,
        });
        if sandbox.is_some() {
            log::info!("pod {namespace}/{name}: adopted its sandbox {netns_name}");
        }
        let resource_version = pod.metadata.resource_version.clone();
        Self {
            shared,
            client,
            pod,
            uid,
            namespace,
            name,
            netns_name,
            paths,
            sandbox,
            sandbox_failures: 0,
            sandbox_retry_at: None,
            sandbox_error: None,
            ctrs,
            events_tx,
            events_rx,
            start_time,
            last_status: None,
            transitions: HashMap::new(),
            pod_shared,
            initialized,
            watched_version: resource_version.clone(),
            resource_version,
        }
    }

    /// Takes the version of the pod the watch delivers. A deletion the task already knows of
    /// (found by a status write) stays known while the watch has not caught up.
    fn observe(&mut self, pod: Pod) {
        if pod.metadata.resource_version != self.watched_version {
            self.watched_version = pod.metadata.resource_version.clone();
            self.resource_version = pod.metadata.resource_version.clone();
        }
        if self.deleting() && pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        self.pod = pod;
    }

    /// The pod is marked for deletion: stop it, write no more status.
    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn pod_ip(&self) -> Option<&str> {
        self.sandbox.as_ref().and_then(|s| s.ips.first()).map(String::as_str)
    }

    /// One reconcile pass: sandbox, containers, probes.
    async fn step(&mut self) {
        if self.sandbox.is_none() {
            if self.sandbox_retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
            match self.create_sandbox().await {
                Ok(sandbox) => {
                    let pins = sandbox.policy_pins.clone();
                    self.sandbox = Some(sandbox);
                    self.sandbox_failures = 0;
                    self.sandbox_error = None;
                    self.sandbox_retry_at = None;
                    // As kubelet does, the pod's address is reported once its sandbox exists,
                    // before its containers start; the node's agent learns it from there.
                    self.report().await;
                    if self.deleting() {
                        return;
                    }
                    self.wait_for_policy(pins.as_deref()).await;
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    log::warn!("pod {}/{}: sandbox: {message}", self.namespace, self.name);
                    self.sandbox_failures += 1;
                    self.sandbox_retry_at =
                        Some(Instant::now() + rules::sandbox_backoff(self.sandbox_failures));
                    self.event(
                        "Warning",
                        "FailedCreatePodSandBox",
                        &format!("Failed to create pod sandbox: {message}"),
                        None,
                    );
                    self.sandbox_error = Some(message);
                    return;
                }
            }
        }
        if !self.initialized {
            if !self.run_init().await {
                self.stop_sidecars_when_finished();
                self.schedule_probes();
                return;
            }
            self.initialized = true;
            // Initialized, app containers not started yet: what kubectl shows as
            // PodInitializing.
            self.report().await;
            if self.deleting() {
                return;
            }
        }
        self.stop_sidecars_when_finished();
        for idx in 0..self.ctrs.len() {
            match self.ctrs[idx].role {
                Role::Init => {}
                Role::Sidecar if self.ctrs[idx].stopping => {}
                Role::Sidecar | Role::App => self.ensure_container(idx).await,
            }
        }
        self.schedule_probes();
    }

    /// Advances the init containers in order: sidecars are kept running and must have started
    /// once, the first init container that has not completed is run (or restarted). Returns
    /// whether all of them are done.
    async fn run_init(&mut self) -> bool {
        for idx in 0..self.ctrs.len() {
            match self.ctrs[idx].role {
                Role::App => {}
                Role::Init if self.ctrs[idx].completed => {}
                Role::Init => {
                    self.ensure_container(idx).await;
                    return false;
                }
                Role::Sidecar => {
                    if self.ctrs[idx].stopping {
                        return false;
                    }
                    self.ensure_container(idx).await;
                    let ctr = &mut self.ctrs[idx];
                    if ctr.pid.is_some() && ctr.startup_done {
                        ctr.sidecar_started = true;
                    }
                    if !ctr.sidecar_started {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Whether the pod is done: an init container failed under `restartPolicy: Never`, or
    /// every app container has exited for good.
    fn finished(&self) -> bool {
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
        if self.init_failed() {
            return true;
        }
        self.initialized
            && self.ctrs.iter().filter(|c| c.role == Role::App).all(|c| match &c.state {
                CState::Terminated { code, .. } => !rules::should_restart(policy.as_deref(), *code),
                _ => false,
            })
    }

    /// An init container failed and `restartPolicy: Never` keeps it failed: the pod fails.
    fn init_failed(&self) -> bool {
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref());
        policy == Some("Never")
            && self.ctrs.iter().any(|c| {
                c.role == Role::Init
                    && !c.completed
                    && matches!(c.state, CState::Terminated { code, .. } if code != 0)
            })
    }

    /// Once the pod is done its sidecars are stopped (SIGTERM, then SIGKILL after the grace
    /// period) and not restarted, as kubelet does. One waiting in crash-loop backoff will not
    /// run again: its last run is its final state (terminated), as kubelet reports it.
    fn stop_sidecars_when_finished(&mut self) {
        if !self.finished() {
            return;
        }
        let grace = rules::grace_period(
            None,
            self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds),
        );
        for idx in 0..self.ctrs.len() {
            let ctr = &mut self.ctrs[idx];
            if ctr.role != Role::Sidecar || ctr.stopping {
                continue;
            }
            ctr.stopping = true;
            if ctr.backoff_until.take().is_some()
                && let Some(last) = ctr.last_terminated.take()
            {
                ctr.state = last;
                ctr.last_terminated = ctr.terminated_before.take();
            }
            let Some(pid) = ctr.pid else { continue };
            let name = ctr.spec.name.clone();
            self.event("Normal", "Killing", &format!("Stopping container {name}"), Some(&name));
            tokio::spawn(async move {
                spawn::signal_group(pid, libc::SIGTERM);
                tokio::time::sleep(grace).await;
                spawn::signal_group(pid, libc::SIGKILL);
            });
        }
    }

    /// The restart policy of one container: the pod's for app containers; init containers
    /// are restarted on failure unless the pod's is Never; sidecars always (until the pod is
    /// done).
    fn restart_policy(&self, idx: usize) -> Option<String> {
        let pod = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
        match self.ctrs[idx].role {
            Role::App => pod,
            Role::Init if pod.as_deref() == Some("Never") => pod,
            Role::Init => Some("OnFailure".into()),
            Role::Sidecar if self.ctrs[idx].stopping => Some("Never".into()),
            Role::Sidecar => Some("Always".into()),
        }
    }

    /// While NetworkPolicies exist, the node's datapath drops a new pod's packets until the
    /// agent has written its policy entry (no window). Waits, bounded, for that entry so the
    /// containers' first packets (a DNS query, a `wget`) are not dropped. Both datapaths are
    /// asked: the eBPF maps pinned in `pins` (when weir-cni is in the chain) and the nftables
    /// policy table of the node's namespace; each answers "ready" when it is absent.
    async fn wait_for_policy(&self, pins: Option<&Path>) {
        let Some(sandbox) = &self.sandbox else { return };
        let ips: Vec<std::net::IpAddr> =
            sandbox.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let deadline = Instant::now() + POLICY_WAIT;
        loop {
            match policy_written(pins, &ips) {
                Ok(true) => return,
                Ok(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(false) => {
                    log::warn!(
                        "pod {}/{}: the agent has not written its NetworkPolicy entry within \
                         {POLICY_WAIT:?}; starting the containers anyway (their packets are \
                         dropped until it does)",
                        self.namespace,
                        self.name
                    );
                    return;
                }
                Err(err) => {
                    log::warn!(
                        "pod {}/{}: reading the node's policy datapath: {err}",
                        self.namespace,
                        self.name,
                    );
                    return;
                }
            }
        }
    }

    async fn create_sandbox(&mut self) -> anyhow::Result<Sandbox> {
        let config = &self.shared.config;
        let record = Record {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            netns: self.netns_name.clone(),
            cni_result: None,
        };
        sandbox::write_record(&self.paths, &record)?;
        sandbox::create_cgroup(&self.paths.cgroup)?;
        sandbox::create_netns(&self.netns_name)?;
        self.write_files(None)?;
        let list = match cni::load(&config.cni_conf_dir) {
            Ok(list) => list,
            Err(err) => {
                let _ = sandbox::delete_netns(&self.netns_name);
                return Err(err.into());
            }
        };
        let args = rules::cni_args(&self.namespace, &self.name, &self.uid);
        let att = cni::Attachment {
            container_id: &self.uid,
            netns: &self.paths.netns,
            ifname: "eth0",
            args: &args,
        };
        let result = match cni::add(&list, &config.cni_bin_dir, &att).await {
            Ok(result) => result,
            Err(err) => {
                // Never leave a half-configured pod: undo what the chain may have made.
                let _ = cni::del(&list, &config.cni_bin_dir, &att, None).await;
                let _ = sandbox::delete_netns(&self.netns_name);
                return Err(err.into());
            }
        };
        let ips = cni::result_ips(&result);
        sandbox::write_record(&self.paths, &Record { cni_result: Some(result), ..record })?;
        self.write_files(ips.first().map(String::as_str))?;
        let policy_pins = list.plugins.iter().find(|p| p["type"] == "weir-cni").map(|p| {
            p["bpffsDir"].as_str().unwrap_or(weir_common::endpoint::ENDPOINTS_PIN_DIR).into()
        });
        Ok(Sandbox { ips, policy_pins })
    }

    /// resolv.conf, hostname and hosts of the pod, under its state dir.
    fn write_files(&self, ip: Option<&str>) -> anyhow::Result<()> {
        let config = &self.shared.config;
        let spec = self.pod.spec.clone().unwrap_or_default();
        let dns = spec.dns_config.clone().unwrap_or_default();
        let node_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let options: Vec<(String, Option<String>)> = dns
            .options
            .iter()
            .flatten()
            .filter_map(|o| Some((o.name.clone()?, o.value.clone())))
            .collect();
        let resolv = rules::resolv_conf(&rules::DnsInput {
            policy: spec.dns_policy.as_deref(),
            namespace: &self.namespace,
            cluster_dns: &config.cluster_dns,
            cluster_domain: &config.cluster_domain,
            node_resolv: &node_resolv,
            extra_nameservers: dns.nameservers.as_deref().unwrap_or_default(),
            extra_searches: dns.searches.as_deref().unwrap_or_default(),
            extra_options: &options,
        });
        let hostname = self.hostname();
        std::fs::create_dir_all(&self.paths.dir)?;
        std::fs::write(self.paths.dir.join("resolv.conf"), resolv)?;
        std::fs::write(self.paths.dir.join("hostname"), format!("{hostname}\n"))?;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(ip) = ip {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        std::fs::write(self.paths.dir.join("hosts"), hosts)?;
        Ok(())
    }

    fn hostname(&self) -> String {
        self.pod.spec.as_ref().and_then(|s| s.hostname.clone()).unwrap_or_else(|| self.name.clone())
    }

    async fn ensure_container(&mut self, idx: usize) {
        let policy = self.restart_policy(idx);
        let ctr = &mut self.ctrs[idx];
        if let Err(message) = &ctr.launch {
            let message = message.clone();
            ctr.state =
                CState::Waiting { reason: "ErrImagePull".into(), message: Some(message.clone()) };
            if !ctr.image_event_sent {
                ctr.image_event_sent = true;
                let image = ctr.spec.image.clone().unwrap_or_default();
                let field = ctr.spec.name.clone();
                self.event(
                    "Warning",
                    "Failed",
                    &format!("Failed to pull image {image:?}: {message}"),
                    Some(&field),
                );
            }
            return;
        }
        match ctr.state.clone() {
            CState::Running { .. } => {}
            CState::Waiting { .. } if !ctr.ever_started && ctr.backoff_until.is_none() => {
                self.start_container(idx).await
            }
            CState::Waiting { .. } => {
                if ctr.backoff_until.is_some_and(|t| Instant::now() >= t) {
                    ctr.backoff_until = None;
                    ctr.restart_count += 1;
                    ctr.consecutive += 1;
                    self.start_container(idx).await;
                }
            }
            CState::Terminated { code, .. } => {
                if !rules::should_restart(policy.as_deref(), code) {
                    return;
                }
                if ctr.started.elapsed() >= rules::BACKOFF_RESET {
                    ctr.consecutive = 0;
                }
                let wait = rules::restart_backoff(ctr.consecutive);
                ctr.backoff_until = Some(Instant::now() + wait);
                ctr.terminated_before = ctr.last_terminated.replace(ctr.state.clone());
                let name = ctr.spec.name.clone();
                let message = format!(
                    "back-off {wait:?} restarting failed container={name} pod={}_{}({})",
                    self.name, self.namespace, self.uid
                );
                ctr.state =
                    CState::Waiting { reason: "CrashLoopBackOff".into(), message: Some(message) };
                self.event(
                    "Warning",
                    "BackOff",
                    "Back-off restarting failed container",
                    Some(&name),
                );
            }
        }
    }

    fn env_for(&self, ctr: &Ctr) -> Vec<(String, String)> {
        let mut env = vec![
            ("PATH".to_string(), PATH_ENV.to_string()),
            ("HOSTNAME".to_string(), self.hostname()),
        ];
        let host_ip = self.shared.config.node_ip().to_string();
        for var in ctr.spec.env.iter().flatten() {
            let value = if let Some(v) = &var.value {
                Some(v.clone())
            } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                match field.field_path.as_str() {
                    "metadata.name" => Some(self.name.clone()),
                    "metadata.namespace" => Some(self.namespace.clone()),
                    "metadata.uid" => Some(self.uid.clone()),
                    "status.podIP" => self.pod_ip().map(str::to_string),
                    "status.hostIP" => Some(host_ip.clone()),
                    "spec.nodeName" => Some(self.shared.config.node_name.clone()),
                    "spec.serviceAccountName" => {
                        self.pod.spec.as_ref().and_then(|s| s.service_account_name.clone())
                    }
                    other => {
                        log::warn!(
                            "pod {}/{}: env {}: fieldRef {other} is not supported",
                            self.namespace,
                            self.name,
                            var.name
                        );
                        None
                    }
                }
            } else {
                log::warn!(
                    "pod {}/{}: env {}: only value and fieldRef are supported",
                    self.namespace,
                    self.name,
                    var.name
                );
                None
            };
            if let Some(value) = value {
                env.retain(|(k, _)| k != &var.name);
                env.push((var.name.clone(), value));
            }
        }
        env
    }

    async fn start_container(&mut self, idx: usize) {
        let env = self.env_for(&self.ctrs[idx]);
        let config = &self.shared.config;
        let ctr = &self.ctrs[idx];
        let name = ctr.spec.name.clone();
        let argv: Vec<String> = match ctr.launch.as_ref().expect("checked by the caller") {
            Launch::Web { ports } => {
                let mut argv =
                    vec![config.weir_binary.display().to_string(), "builtin".into(), "web".into()];
                for p in ports {
                    argv.extend(["--port".into(), p.to_string()]);
                }
                argv.extend([
                    "--pod".into(),
                    self.name.clone(),
                    "--namespace".into(),
                    self.namespace.clone(),
                ]);
                argv
            }
            Launch::Dns => vec![
                config.weir_binary.display().to_string(),
                "dns".into(),
                "--kubeconfig".into(),
                config.kubeconfig.display().to_string(),
                "--listen".into(),
                "0.0.0.0:53".into(),
            ],
            Launch::Busybox { argv } => rules::busybox_argv(argv, &self.shared.applets),
            Launch::Host { argv } => argv.clone(),
            Launch::Agnhost { args } => rules::agnhost_argv(&config.weir_binary, args),
        };
        let run = ctr.restart_count;
        let log_path = logs::run_log_path(&self.paths.dir, &name, run);
        let workdir = ctr.spec.working_dir.clone().unwrap_or_else(|| "/".into());
        let stdin = ctr.spec.stdin.unwrap_or(false);
        let tty = ctr.spec.tty.unwrap_or(false);
        let image = ctr.spec.image.clone().unwrap_or_default();
        if !ctr.ever_started {
            self.event(
                "Normal",
                "Pulled",
                &format!("Container image {image:?} already present on machine"),
                Some(&name),
            );
        }
        let spawned = self.spawn(&argv, &env, &workdir, stdin, tty, &log_path);
        let generation = self.ctrs[idx].generation + 1;
        let ctr = &mut self.ctrs[idx];
        ctr.generation = generation;
        ctr.ever_started = true;
        ctr.started = Instant::now();
        ctr.ready = false;
        ctr.startup_done = ctr.role == Role::Init || ctr.spec.startup_probe.is_none();
        ctr.probes = Default::default();
        ctr.killed_reason = None;
        *ctr.shared.env.lock().unwrap() = env;
        match spawned {
            Ok(Spawned { mut child, stdin: stdin_pipe, tty_master }) => {
                let pid = child.id().unwrap_or_default();
                ctr.pid = Some(pid);
                ctr.state = CState::Running { started_at: now() };
                {
                    let mut live = ctr.shared.live.lock().unwrap();
                    live.run = Some(run);
                    live.pid = Some(pid);
                    live.stdin = stdin_pipe.map(|s| Arc::new(tokio::sync::Mutex::new(Some(s))));
                    live.tty = tty_master.clone();
                }
                ctr.shared.bump();
                let writers = start_log_writers(&mut child, tty_master, &log_path, &ctr.shared);
                let tx = self.events_tx.clone();
                let shared_c = ctr.shared.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    // Give the output readers a moment to drain what the process wrote.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        futures::future::join_all(writers),
                    )
                    .await;
                    let code = spawn::exit_code(status);
                    {
                        let mut live = shared_c.live.lock().unwrap();
                        live.pid = None;
                        live.stdin = None;
                        live.tty = None;
                    }
                    shared_c.bump();
                    let _ = tx.send(WorkerEvent::Exited { idx, generation, code });
                });
                self.event("Normal", "Created", &format!("Created container: {name}"), Some(&name));
                self.event("Normal", "Started", &format!("Started container {name}"), Some(&name));
            }
            Err(err) => {
                let message = format!("failed to start container {name:?}: {err:#}");
                log::warn!("pod {}/{}: {message}", self.namespace, self.name);
                let ts = now();
                ctr.pid = None;
                ctr.state = CState::Terminated {
                    code: 128,
                    reason: "StartError".into(),
                    message: Some(message.clone()),
                    started_at: ts.clone(),
                    finished_at: ts,
                };
                self.event("Warning", "Failed", &message, Some(&name));
            }
        }
    }

    fn spawn(
        &self,
        argv: &[String],
        env: &[(String, String)],
        workdir: &str,
        stdin: bool,
        tty: bool,
        log_path: &Path,
    ) -> anyhow::Result<Spawned> {
        anyhow::ensure!(!argv.is_empty(), "empty command");
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let dir = &self.paths.dir;
        let (resolv, hostname, hosts) =
            (dir.join("resolv.conf"), dir.join("hostname"), dir.join("hosts"));
        let mut namespaces = ContainerNamespaces::prepare(
            &self.paths.netns,
            &self.paths.cgroup,
            &[(&resolv, "/etc/resolv.conf"), (&hostname, "/etc/hostname"), (&hosts, "/etc/hosts")],
            &self.hostname(),
        )?;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v))).current_dir(workdir);
        // With `tty: true` the process gets a pseudo terminal, as kubelet gives it: stdin,
        // stdout and stderr on the slave, which becomes its controlling terminal.
        let pty = if tty {
            let pty = spawn::Pty::open()?;
            cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave.try_clone()?));
            namespaces = namespaces.with_controlling_tty();
            Some(pty)
        } else {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        };
        namespaces.apply(&mut cmd);
        let spawned = cmd.spawn();
        // The child's copies of the slave are gone with `cmd`: the master sees EOF (EIO) when
        // the container's last process closes it.
        drop(cmd);
        let mut child = spawned.map_err(|e| anyhow::anyhow!("exec {:?}: {e}", argv[0]))?;
        match pty {
            Some(pty) => {
                drop(pty.slave);
                let stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> = if stdin {
                    Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(
                        pty.master.try_clone()?,
                    ))))
                } else {
                    None
                };
                Ok(Spawned { child, stdin, tty_master: Some(Arc::new(pty.master)) })
            }
            None => {
                let stdin = child
                    .stdin
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
                Ok(Spawned { child, stdin, tty_master: None })
            }
        }
    }

    fn handle(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Exited { idx, generation, code } => {
                let Some(ctr) = self.ctrs.get_mut(idx) else { return };
                if ctr.generation != generation {
                    return;
                }
                let started_at = match &ctr.state {
                    CState::Running { started_at } => started_at.clone(),
                    _ => now(),
                };
                let reason = match (&ctr.killed_reason, code) {
                    (Some(_), _) => "Error".to_string(),
                    (None, 0) => "Completed".to_string(),
                    (None, _) => "Error".to_string(),
                };
                ctr.completed |= ctr.role == Role::Init && code == 0 && ctr.killed_reason.is_none();
                log::debug!(
                    "pod {}/{}: container {} exited with {code}",
                    self.namespace,
                    self.name,
                    ctr.spec.name
                );
                ctr.state = CState::Terminated {
                    code,
                    reason,
                    message: ctr.killed_reason.take(),
                    started_at,
                    finished_at: now(),
                };
                ctr.pid = None;
                ctr.ready = false;
            }
            WorkerEvent::Probe { idx, generation, kind, result } => {
                self.probe_result(idx, generation, kind, result)
            }
        }
    }

    fn schedule_probes(&mut self) {
        let Some(pod_ip) = self.pod_ip().map(str::to_string) else { return };
        let now_i = Instant::now();
        for idx in 0..self.ctrs.len() {
            let ctr = &mut self.ctrs[idx];
            let Some(pid) = ctr.pid else { continue };
            // kubelet runs no probes on init containers (sidecars have theirs).
            if ctr.role == Role::Init {
                continue;
            }
            let probes = [
                (ProbeKind::Startup, ctr.spec.startup_probe.clone()),
                (ProbeKind::Readiness, ctr.spec.readiness_probe.clone()),
                (ProbeKind::Liveness, ctr.spec.liveness_probe.clone()),
            ];
            for (kind, spec) in probes {
                let Some(spec) = spec else { continue };
                if kind != ProbeKind::Startup && !ctr.startup_done {
                    continue;
                }
                if kind == ProbeKind::Startup && ctr.startup_done {
                    continue;
                }
                let state = &mut ctr.probes[kind as usize];
                let timing = probe::timing(&spec);
                let due = *state.next_due.get_or_insert(now_i + timing.initial_delay);
                if state.running || now_i < due {
                    continue;
                }
                state.running = true;
                state.next_due = Some(now_i + timing.period);
                let tx = self.events_tx.clone();
                let generation = ctr.generation;
                let container = ctr.spec.clone();
                let cgroup = self.paths.cgroup.clone();
                let workdir = ctr.shared.workdir.clone();
                let env = ctr.shared.env.lock().unwrap().clone();
                let exec = ctr.shared.exec;
                let applets = self.shared.applets.clone();
                let weir_binary = self.shared.config.weir_binary.clone();
                let pod_ip = pod_ip.clone();
                tokio::spawn(async move {
                    let ctx = probe::ExecContext {
                        pid,
                        cgroup: &cgroup,
                        workdir: &workdir,
                        env: &env,
                        exec,
                        applets: &applets,
                        weir_binary: &weir_binary,
                    };
                    let result = probe::run(&spec, &container, &pod_ip, ctx).await;
                    let _ = tx.send(WorkerEvent::Probe { idx, generation, kind, result });
                });
            }
        }
    }

    fn probe_result(
        &mut self,
        idx: usize,
        generation: u64,
        kind: ProbeKind,
        result: Result<(), String>,
    ) {
        let Some(ctr) = self.ctrs.get_mut(idx) else { return };
        if ctr.generation != generation || ctr.pid.is_none() {
            return;
        }
        let spec = match kind {
            ProbeKind::Startup => ctr.spec.startup_probe.clone(),
            ProbeKind::Readiness => ctr.spec.readiness_probe.clone(),
            ProbeKind::Liveness => ctr.spec.liveness_probe.clone(),
        };
        let Some(spec) = spec else { return };
        let timing = probe::timing(&spec);
        let state = &mut ctr.probes[kind as usize];
        state.running = false;
        let name = ctr.spec.name.clone();
        match result {
            Ok(()) => {
                state.failures = 0;
                state.successes += 1;
                match kind {
                    ProbeKind::Startup => ctr.startup_done = true,
                    ProbeKind::Readiness if state.successes >= timing.success_threshold => {
                        ctr.ready = true
                    }
                    _ => {}
                }
            }
            Err(output) => {
                state.successes = 0;
                state.failures += 1;
                let failures = state.failures;
                let label = match kind {
                    ProbeKind::Startup => "Startup",
                    ProbeKind::Readiness => "Readiness",
                    ProbeKind::Liveness => "Liveness",
                };
                if kind == ProbeKind::Readiness && failures >= timing.failure_threshold {
                    ctr.ready = false;
                }
                let kill = kind != ProbeKind::Readiness && failures >= timing.failure_threshold;
                let pid = ctr.pid;
                if kill {
                    ctr.killed_reason = Some(format!("{label} probe failed: {output}"));
                    state.failures = 0;
                }
                self.event(
                    "Warning",
                    "Unhealthy",
                    &format!("{label} probe failed: {output}"),
                    Some(&name),
                );
                if kill {
                    self.event(
                        "Normal",
                        "Killing",
                        &format!(
                            "Container {name} failed {} probe, will be restarted",
                            label.to_lowercase()
                        ),
                        Some(&name),
                    );
                    if let Some(pid) = pid {
                        let grace = rules::grace_period(
                            None,
                            self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds),
                        );
                        tokio::spawn(async move {
                            spawn::signal_group(pid, libc::SIGTERM);
                            tokio::time::sleep(grace.min(Duration::from_secs(5))).await;
                            spawn::signal_group(pid, libc::SIGKILL);
                        });
                    }
                }
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(5);
        if let Some(t) = self.sandbox_retry_at {
            wake = wake.min(t);
        }
        for ctr in &self.ctrs {
            if let Some(t) = ctr.backoff_until {
                wake = wake.min(t);
            }
            if ctr.pid.is_some() {
                for p in &ctr.probes {
                    if let Some(t) = p.next_due {
                        wake = wake.min(t);
                    }
                }
                if ctr.probes.iter().all(|p| p.next_due.is_none()) {
                    // Probes not scheduled yet (first pass after start).
                    wake = wake.min(Instant::now() + Duration::from_millis(100));
                }
            }
        }
        wake.max(Instant::now() + Duration::from_millis(20))
    }

    fn condition(&mut self, kind: &'static str, value: bool) -> Value {
        let entry = self.transitions.entry(kind).or_insert_with(|| (value, now()));
        if entry.0 != value {
            *entry = (value, now());
        }
        json!({"type": kind, "status": if value { "True" } else { "False" }, "lastTransitionTime": entry.1,
               "lastProbeTime": null})
    }

    /// Whether a container counts as ready: running, started, and ready by its readiness
    /// probe; a completed init container is ready, as kubelet reports it.
    fn is_ready(ctr: &Ctr) -> bool {
        match ctr.role {
            Role::Init => ctr.completed,
            Role::Sidecar | Role::App => {
                ctr.pid.is_some()
                    && ctr.startup_done
                    && (ctr.spec.readiness_probe.is_none() || ctr.ready)
            }
        }
    }

    fn container_status(&self, ctr: &Ctr) -> Value {
        let mut state = state_json(&ctr.state);
        if self.sandbox.is_none()
            && let Some(message) = &self.sandbox_error
        {
            state = json!({"waiting": {"reason": "ContainerCreating", "message": message}});
        }
        let image = ctr.spec.image.clone().unwrap_or_default();
        let mut status = json!({
            "name": ctr.spec.name,
            "image": image,
            "imageID": format!("weir-lab://{image}"),
            "ready": Self::is_ready(ctr),
            "started": ctr.pid.is_some() && ctr.startup_done,
            "restartCount": ctr.restart_count,
            "state": state,
            "lastState": ctr.last_terminated.as_ref().map(state_json).unwrap_or_else(|| json!({})),
        });
        if ctr.ever_started {
            status["containerID"] =
                json!(format!("weir://{}/{}/{}", self.uid, ctr.spec.name, ctr.restart_count));
        }
        status
    }

    fn status(&mut self) -> Value {
        let sandbox_up = self.sandbox.is_some();
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
        let apps = || self.ctrs.iter().filter(|c| c.role == Role::App);
        let statuses: Vec<Value> = apps().map(|c| self.container_status(c)).collect();
        let init_statuses: Vec<Value> = self
            .ctrs
            .iter()
            .filter(|c| c.role != Role::App)
            .map(|c| self.container_status(c))
            .collect();
        // Sidecars count for the pod's readiness, as in kubelet.
        let all_ready = apps().next().is_some()
            && self.ctrs.iter().filter(|c| c.role != Role::Init).all(Self::is_ready);
        let any_unstarted = apps().any(|c| !c.ever_started);
        let mut all_done = true;
        let mut any_failed = false;
        for ctr in apps() {
            match &ctr.state {
                CState::Terminated { code, .. } => {
                    if rules::should_restart(policy.as_deref(), *code) {
                        all_done = false;
                    }
                    any_failed |= *code != 0;
                }
                _ => all_done = false,
            }
        }
        let phase = if self.init_failed() {
            "Failed"
        } else if !sandbox_up || !self.initialized || any_unstarted {
            "Pending"
        } else if all_done {
            if any_failed { "Failed" } else { "Succeeded" }
        } else {
            "Running"
        };
        let incomplete: Vec<&str> = self
            .ctrs
            .iter()
            .filter(|c| match c.role {
                Role::Init => !c.completed,
                Role::Sidecar => !c.sidecar_started,
                Role::App => false,
            })
            .map(|c| c.spec.name.as_str())
            .collect();
        let incomplete = format!("containers with incomplete status: [{}]", incomplete.join(" "));
        let initialized = self.initialized;
        let mut initialized_condition = self.condition("Initialized", initialized);
        if !initialized {
            initialized_condition["reason"] = json!("ContainersNotInitialized");
            initialized_condition["message"] = json!(incomplete);
        }
        let conditions = vec![
            self.condition("PodReadyToStartContainers", sandbox_up),
            initialized_condition,
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
            self.condition("PodScheduled", true),
        ];
        let host_ips: Vec<Value> =
            self.shared.config.node_ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        let mut status = json!({
            "phase": phase,
            "hostIP": self.shared.config.node_ip().to_string(),
            "hostIPs": host_ips,
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if let Some(sandbox) = &self.sandbox
            && let Some(ip) = sandbox.ips.first()
        {
            status["podIP"] = json!(ip);
            status["podIPs"] =
                json!(sandbox.ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        }
        status
    }

    /// Writes the status when it changed, conditional on the newest version of the pod the
    /// task knows (see the module docs). A conflict reads the pod again: a deletion found
    /// there becomes the task's pod (nothing is written), another version is written over
    /// once more (bounded); a pod gone or replaced by a namesake is left to the watch.
    async fn report(&mut self) {
        if self.deleting() {
            return;
        }
        let status = self.status();
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let who = format!("{}/{}", self.namespace, self.name);
        for _ in 0..STATUS_WRITE_ATTEMPTS {
            let mut patch = json!({"status": status});
            if let Some(version) = &self.resource_version {
                patch["metadata"] = json!({"resourceVersion": version});
            }
            let params = PatchParams::default();
            let written = api.patch_status(&self.name, &params, &Patch::Merge(&patch)).await;
            let conflict = match written {
                Ok(pod) => {
                    self.resource_version = pod.metadata.resource_version;
                    self.last_status = Some(status);
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => e,
                Err(err) => {
                    log::warn!("pod {who}: writing status: {err}");
                    return;
                }
            };
            let fresh = match api.get_opt(&self.name).await {
                Ok(Some(pod)) if pod.metadata.uid.as_deref() == Some(self.uid.as_str()) => pod,
                Ok(_) => return,
                Err(err) => {
                    log::warn!("pod {who}: reading it after a conflicting status write: {err}");
                    return;
                }
            };
            self.resource_version = fresh.metadata.resource_version.clone();
            if fresh.metadata.deletion_timestamp.is_some() {
                log::info!(
                    "pod {who}: marked for deletion before its status was written ({})",
                    conflict.message
                );
                self.pod = fresh;
                return;
            }
        }
        log::warn!("pod {who}: writing status: the pod kept changing, trying again later");
    }

    /// Posts an event about the pod (or one of its containers); failures are logged only.
    fn event(&self, kind: &str, reason: &str, message: &str, container: Option<&str>) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let ts = Time(Timestamp::now());
        let suffix: u64 =
            Timestamp::now().as_nanosecond() as u64 ^ (std::process::id() as u64) << 32;
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{suffix:x}", self.name)),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                uid: Some(self.uid.clone()),
                field_path: container.map(|c| {
                    let init = self.ctrs.iter().any(|x| x.spec.name == c && x.role != Role::App);
                    let list = if init { "initContainers" } else { "containers" };
                    format!("spec.{list}{{{c}}}")
                }),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(kind.into()),
            count: Some(1),
            first_timestamp: Some(ts.clone()),
            last_timestamp: Some(ts),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.shared.config.node_name.clone()),
            }),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.shared.config.node_name.clone()),
            ..Default::default()
        };
        let who = format!("{}/{}", self.namespace, self.name);
        log::info!("pod {who}: event {reason}: {message}");
        tokio::spawn(async move {
            if let Err(err) = api.create(&PostParams::default(), &event).await {
                log::debug!("pod {who}: event not recorded: {err}");
            }
        });
    }

    /// Stops the containers (SIGTERM, `grace`, SIGKILL) and removes the sandbox. Sidecars are
    /// stopped after the other containers have exited (within the same grace period), as
    /// kubelet does.
    async fn teardown(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        if !grace.is_zero() {
            for sidecars in [false, true] {
                let stopping = |c: &Ctr| (c.role == Role::Sidecar) == sidecars && c.pid.is_some();
                let mut pids = Vec::new();
                for ctr in self.ctrs.iter().filter(|c| stopping(c)) {
                    let name = ctr.spec.name.clone();
                    self.event(
                        "Normal",
                        "Killing",
                        &format!("Stopping container {name}"),
                        Some(&name),
                    );
                    pids.extend(ctr.pid);
                }
                // Sidecars in reverse order of their start.
                for pid in pids.iter().rev() {
                    spawn::signal_group(*pid, libc::SIGTERM);
                }
                while self.ctrs.iter().any(stopping) {
                    match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                        Ok(Some(event)) => self.handle(event),
                        _ => break,
                    }
                }
            }
        }
        sandbox::kill_cgroup(&self.paths.cgroup).await;
        if let Err(err) = remove_sandbox(
            &self.shared,
            &self.paths,
            &self.netns_name,
            &self.uid,
            &self.namespace,
            &self.name,
        )
        .await
        {
            log::warn!("pod {}/{}: teardown: {err:#}", self.namespace, self.name);
        }
        self.sandbox = None;
        let mut pods = self.shared.pods.lock().unwrap();
        let key = (self.namespace.clone(), self.name.clone());
        if pods.get(&key).is_some_and(|p| Arc::ptr_eq(p, &self.pod_shared)) {
            pods.remove(&key);
        }
    }

    /// Deletes the pod object once everything is gone (grace 0, precondition on the uid).
    async fn delete_object(&self) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        for attempt in 0..5 {
            match api.delete(&self.name, &params).await {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                Err(err) => {
                    log::warn!(
                        "pod {}/{}: deleting the object (attempt {}): {err}",
                        self.namespace,
                        self.name,
                        attempt + 1
                    );
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            }
        }
    }
}

/// CNI DEL, netns, cgroup and state files of a pod (each step best-effort, all attempted).
pub async fn remove_sandbox(
    shared: &Shared,
    paths: &PodPaths,
    netns_name: &str,
    uid: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let config = &shared.config;
    let mut first_error: Option<anyhow::Error> = None;
    let record = sandbox::read_record(&paths.record());
    if record.is_some() || paths.netns.exists() {
        match cni::load(&config.cni_conf_dir) {
            Ok(list) => {
                let args = rules::cni_args(namespace, name, uid);
                let att = cni::Attachment {
                    container_id: uid,
                    netns: &paths.netns,
                    ifname: "eth0",
                    args: &args,
                };
                let cached = record.as_ref().and_then(|r| r.cni_result.as_ref());
                if let Err(err) = cni::del(&list, &config.cni_bin_dir, &att, cached).await {
                    first_error.get_or_insert(err.into());
                }
            }
            Err(err) => {
                first_error.get_or_insert(err.into());
            }
        }
    }
    if let Err(err) = sandbox::delete_netns(netns_name) {
        first_error.get_or_insert(err);
    }
    if let Err(err) = sandbox::remove_cgroup(&paths.cgroup).await {
        first_error.get_or_insert(err);
    }
    if first_error.is_none() {
        let _ = std::fs::remove_dir_all(&paths.dir);
    }
    first_error.map_or(Ok(()), Err)
}

fn state_json(state: &CState) -> Value {
    match state {
        CState::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        CState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        CState::Terminated { code, reason, message, started_at, finished_at } => {
            json!({"terminated": {
                "exitCode": code, "reason": reason, "message": message,
                "startedAt": started_at, "finishedAt": finished_at,
                "containerID": null,
            }})
        }
    }
}

/// The state of a run that exited 0, from a container's reported status.
fn completed_state(status: &ContainerStatus) -> Option<CState> {
    let t = status.state.as_ref()?.terminated.as_ref()?;
    (t.exit_code == 0).then(|| CState::Terminated {
        code: 0,
        reason: t.reason.clone().unwrap_or_else(|| "Completed".into()),
        message: t.message.clone(),
        started_at: t.started_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        finished_at: t.finished_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
    })
}

/// A started container process.
struct Spawned {
    child: tokio::process::Child,
    stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    /// The pty master of a `tty: true` container (its only output).
    tty_master: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Copies a container's stdout and stderr (or its terminal) into its log file (CRI format)
/// and to attached clients.
fn start_log_writers(
    child: &mut tokio::process::Child,
    tty_master: Option<Arc<std::os::fd::OwnedFd>>,
    path: &Path,
    shared: &Arc<ContainerShared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
    let file = match file {
        Ok(f) => Arc::new(std::sync::Mutex::new(f)),
        Err(err) => {
            log::warn!("opening log {}: {err}", path.display());
            return Vec::new();
        }
    };
    shared.live.lock().unwrap().log = Some((path.to_path_buf(), file.clone()));
    let mut handles = Vec::new();
    if let Some(master) = tty_master {
        match master.try_clone() {
            Ok(fd) => {
                let reader = tokio::fs::File::from_std(std::fs::File::from(fd));
                handles.push(tokio::spawn(copy_terminal(reader, file, shared.clone())));
            }
            Err(err) => log::warn!("reading the terminal of {}: {err}", shared.name),
        }
        return handles;
    }
    if let Some(out) = child.stdout.take() {
        handles.push(tokio::spawn(copy_lines(out, 1, file.clone(), shared.clone())));
    }
    if let Some(err) = child.stderr.take() {
        handles.push(tokio::spawn(copy_lines(err, 2, file, shared.clone())));
    }
    handles
}

/// Copies a terminal's output: attached clients get it as it comes (prompts have no newline),
/// the log gets whole lines (without the terminal's carriage returns) on stdout.
async fn copy_terminal(
    mut master: impl AsyncRead + Unpin,
    file: Arc<std::sync::Mutex<std::fs::File>>,
    shared: Arc<ContainerShared>,
) {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    let write_line = |file: &mut std::fs::File, line: &[u8]| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let _ = file.write_all(&logs::format_line(&now(), "stdout", line));
    };
    loop {
        // A pty master reads EIO once the last slave is closed: the end of the output.
        let n = match master.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut file = file.lock().unwrap();
        let _ = shared.output.send((1, Bytes::copy_from_slice(&buf[..n])));
        partial.extend_from_slice(&buf[..n]);
        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
            write_line(&mut file, &partial[..end]);
            partial.drain(..=end);
        }
    }
    if !partial.is_empty() {
        write_line(&mut file.lock().unwrap(), &partial);
    }
}

async fn copy_lines(
    stream: impl AsyncRead + Unpin,
    channel: u8,
    file: Arc<std::sync::Mutex<std::fs::File>>,
    shared: Arc<ContainerShared>,
) {
    use std::io::Write;
    let name = if channel == 1 { "stdout" } else { "stderr" };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let formatted = logs::format_line(&now(), name, text);
        // Under the file's lock, so an attaching client sees each line exactly once: either
        // in the file it replays or on the channel it subscribed to.
        let mut file = file.lock().unwrap();
        let _ = shared.output.send((channel, Bytes::copy_from_slice(&line)));
        let _ = file.write_all(&formatted);
    }
}
