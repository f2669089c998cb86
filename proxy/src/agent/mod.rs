//! `weir agent`: the node daemon that replaces kube-proxy.
//!
//! The datapath is eBPF (default) or nftables (`--dataplane nftables`: one table in the
//! agent's network namespace, adopted and repaired at start, left in place on exit unless
//! `--nft-remove-on-exit`).
//!
//! Start-up order matters for restarts: the eBPF object is loaded with its maps pinned (a
//! restarted agent reuses them with their contents), the planner adopts what the maps hold,
//! the socket load balancer's pinned links are adopted or created, and only once every
//! watched kind has been listed does the first sync run. Syncing earlier would apply an empty
//! desired state and wipe the services a previous agent programmed.
//!
//! Then the loop: every change wakes it. The watchers log which Services and EndpointSlices
//! changed; the loop feeds their current versions from the stores into the model
//! ([`ServiceTracker`], which re-renders only their services) and plans and writes only the
//! frontends that changed (`plan_changed`), so one change costs the same at 10 services and at
//! 100k. A watcher re-list, a change of this Node's addresses, the periodic resync
//! ([`config::FULL_RESYNC_PERIOD`]) and the first sync rebuild the model from the stores and
//! write by a full diff, which also repairs anything an incremental step could have missed. A
//! failed write is retried after a resync: a new planner adopts what the maps really hold, and
//! the next sync is a full one. On SIGTERM or SIGINT the agent
//! exits and leaves the datapath in place (pinned maps and links), so established and new
//! connections keep working until the next agent adopts it.
pub mod config;
mod healthcheck;
mod http;
pub mod policy;
pub mod status;
mod watch;

use std::{
    fs::File,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use thiserror::Error;
use tokio::{net::TcpListener, sync::Notify};
use watch::{Changes, Pending, Stores};

use self::{
    config::{AgentConfig, Dataplane},
    status::{Status, SyncReport},
};
use crate::{
    apply::{
        ebpf::{MapWriter, UdpCleanup},
        nft::{NftDataplane, NftError},
        plan::ServicePlanner,
    },
    maps::{self, MapsError, ServiceMaps},
    model::{self, Change, Frontend, NodeContext, ServiceTracker},
    policy::{
        EbpfPolicy, PolicyDatapath, PolicyDatapathError, PolicyMaps, PolicyPrograms,
        SharedPolicyNames,
        flows::{self, FlowSource},
        nft::{nflog::NflogSocket, plan::FLOW_LOG_GROUP},
    },
    programs::{self, LoadOptions},
    routing::host::HostRouting,
    system,
};

/// Pause before retrying after a failed sync.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Load(#[from] programs::LoadError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("cannot open the cgroup {path} to attach the socket load balancer")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 file system is mounted; the socket load balancer needs cgroup v2")]
    NoCgroup2,
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no --kubeconfig given and no in-cluster configuration (service account token and \
         KUBERNETES_SERVICE_HOST) found"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot listen on {addr} for {what}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the watchers stopped before their initial lists completed")]
    WatchersStopped,
    #[error(transparent)]
    Nftables(#[from] NftError),
    #[error(transparent)]
    PolicyPrograms(#[from] crate::policy::attach::AttachError),
}

/// The datapath the loop writes to.
enum Backend {
    Ebpf(Box<EbpfBackend>),
    Nftables(NftDataplane),
}

struct EbpfBackend {
    writer: MapWriter,
    /// The policy programs' flow ring buffer, until the flow viewer takes it.
    flows: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    planner: ServicePlanner,
    /// The loaded object and its attachments live as long as the agent.
    _loaded: programs::Loaded,
}

/// The eBPF policy datapath and its pinned programs, made while loading the object.
struct EbpfPolicyParts {
    datapath: EbpfPolicy,
    programs: PolicyPrograms,
}

/// Why a sync failed.
struct SyncFailure {
    message: String,
    /// The eBPF map that had no room for an entry, when that is why.
    full_map: Option<&'static str>,
}

impl SyncFailure {
    fn maps(err: MapsError) -> Self {
        Self { full_map: err.full_map(), message: error_chain(&err) }
    }

    fn nftables(err: NftError) -> Self {
        Self { message: error_chain(&err), full_map: None }
    }
}

/// What one sync wrote.
struct Synced {
    ops: usize,
    skipped: usize,
    udp: UdpCleanup,
}

impl Backend {
    fn sync(&mut self, desired: &model::ServiceState) -> Result<Synced, SyncFailure> {
        match self {
            Backend::Ebpf(ebpf) => {
                let plan = ebpf.planner.plan(desired);
                let udp = ebpf.writer.apply(&plan).map_err(SyncFailure::maps)?;
                Ok(Synced { ops: plan.len(), skipped: 0, udp })
            }
            Backend::Nftables(table) => {
                let applied = table.apply(desired).map_err(SyncFailure::nftables)?;
                Ok(Synced {
                    ops: applied.ops,
                    skipped: applied.skipped,
                    udp: UdpCleanup::default(),
                })
            }
        }
    }

    /// Writes only the `changed` frontends of `desired` (every other one is as last written).
    fn sync_changed(
        &mut self,
        desired: &model::ServiceState,
        changed: &[Frontend],
    ) -> Result<Synced, SyncFailure> {
        match self {
            Backend::Ebpf(ebpf) => {
                let plan = ebpf.planner.plan_changed(desired, changed);
                let udp = ebpf.writer.apply(&plan).map_err(SyncFailure::maps)?;
                Ok(Synced { ops: plan.len(), skipped: 0, udp })
            }
            Backend::Nftables(table) => {
                let applied =
                    table.apply_changed(desired, changed).map_err(SyncFailure::nftables)?;
                Ok(Synced {
                    ops: applied.ops,
                    skipped: applied.skipped,
                    udp: UdpCleanup::default(),
                })
            }
        }
    }

    /// After a failed sync: rebuild what was applied from the datapath itself.
    fn resync(&mut self) {
        match self {
            Backend::Ebpf(ebpf) => ebpf.planner = ebpf.writer.adopting_planner(),
            Backend::Nftables(table) => {
                if let Err(err) = table.readopt() {
                    log::error!(
                        "reading nftables table {} back: {}",
                        table.table(),
                        error_chain(&err)
                    );
                }
            }
        }
    }

    fn counts(&self) -> (usize, usize) {
        match self {
            Backend::Ebpf(ebpf) => (ebpf.planner.frontends(), ebpf.planner.backends()),
            Backend::Nftables(table) => (table.frontends(), table.backends()),
        }
    }
}

/// What to say when a sync failed because `map` (pinned in `pin_dir`) was full: which map,
/// what still works, and which flag gives it room.
fn map_full_advice(map: &str, pin_dir: &std::path::Path) -> String {
    let flag = config::map_size_flag(map).unwrap_or("--bpf-*-map-max");
    format!(
        "eBPF map {map} is full: the entries that do not fit are not written (what is already \
         programmed keeps working). Give it more room with {flag}; a pinned map keeps its size, \
         so stop the agent, delete {} and start it with the larger {flag}",
        pin_dir.join(map).display()
    )
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Loads (or adopts) the eBPF datapath: pinned maps, socket LB on the cgroup, tc LB on uplinks,
/// and the policy maps (adopted as they are) and programs (pinned for weir-cni).
fn start_ebpf(
    config: &AgentConfig,
    names: &SharedPolicyNames,
) -> Result<(Backend, EbpfPolicyParts, Option<HostRouting>), AgentError> {
    let options = LoadOptions {
        forward_logs: config.forward_ebpf_logs,
        sizes: config.map_sizes,
        ..LoadOptions::new(&config.pin_dir)
    };
    let mut loaded = programs::load(&options)?;
    for mismatch in programs::capacity_mismatches(&config.pin_dir, &config.map_sizes) {
        log::warn!(
            "map {} is pinned with {} entries, the flags ask for {}: the pinned map is kept (its \
             entries keep serving). To resize it, stop the agent, delete {} and start the agent \
             again; it rewrites the entries (flows of the per-packet path lose their conntrack)",
            mismatch.map,
            mismatch.pinned,
            mismatch.wanted,
            config.pin_dir.join(mismatch.map).display()
        );
    }
    let policy_maps = PolicyMaps::take(&mut loaded.ebpf)?;
    let datapath = EbpfPolicy::adopt(policy_maps, names.clone())?;
    let programs = PolicyPrograms::pin(&loaded.ebpf, &config.pin_dir)?;
    log::info!(
        "policy: adopted {} endpoint entries, {} rules; programs pinned in {} (ids {:?})",
        datapath.applied().endpoints.len(),
        datapath.applied().rules.len(),
        config.pin_dir.display(),
        programs.ids()
    );
    let policy = EbpfPolicyParts { datapath, programs };
    let host_routing = match HostRouting::take(&mut loaded.ebpf) {
        Ok(host) => Some(host),
        Err(err) => {
            log::error!("eBPF host routing is off: {err}");
            None
        }
    };
    let writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf)?);
    let flows = loaded
        .ebpf
        .take_map(weir_common::policy::FLOWS_MAP)
        .and_then(|map| aya::maps::RingBuf::try_from(map).ok());
    let planner = writer.adopting_planner();
    log::info!(
        "datapath: maps pinned in {}; adopted {} frontends and {} backends",
        config.pin_dir.display(),
        planner.frontends(),
        planner.backends()
    );
    let cgroup_path = match &config.cgroup {
        Some(path) => path.clone(),
        None => system::cgroup2_mount()
            .map_err(|source| AgentError::Cgroup { path: "/proc/self/mountinfo".into(), source })?
            .ok_or(AgentError::NoCgroup2)?,
    };
    let cgroup = File::open(&cgroup_path)
        .map_err(|source| AgentError::Cgroup { path: cgroup_path.clone(), source })?;
    let links = config.links_dir();
    std::fs::create_dir_all(&links)
        .map_err(|source| programs::LoadError::PinDir { path: links.clone(), source })?;
    let attached = programs::attach_socket_lb(&mut loaded.ebpf, &cgroup, Some(&links))?;
    log::info!(
        "socket load balancer on cgroup {}: {} attached, {} adopted",
        cgroup_path.display(),
        attached.attached,
        attached.adopted
    );
    for uplink in &config.uplinks {
        let attached = programs::attach_tc_lb(&mut loaded.ebpf, uplink, Some(&links))?;
        log::info!(
            "per-packet load balancer on {uplink}: {} attached, {} adopted",
            attached.attached,
            attached.adopted
        );
        let attached = programs::attach_host_sctp(&mut loaded.ebpf, uplink, Some(&links))?;
        log::info!(
            "node's own SCTP to services on {uplink}: {} attached, {} adopted",
            attached.attached,
            attached.adopted
        );
    }
    if let Some(logger) = loaded.logger.take() {
        tokio::spawn(forward_ebpf_logs(logger));
    }
    let backend = Backend::Ebpf(Box::new(EbpfBackend { writer, flows, planner, _loaded: loaded }));
    Ok((backend, policy, host_routing))
}

/// What the policy loop runs on.
struct PolicyBackend {
    datapath: Box<dyn PolicyDatapath>,
    /// The programs to keep on pod veths (eBPF).
    programs: Option<PolicyPrograms>,
}

/// The policy datapath of the chosen dataplane, with the programs to keep on pod veths (eBPF).
/// `Ok(None)`: NetworkPolicy is not enforced.
fn policy_datapath(
    config: &AgentConfig,
    ebpf: Option<EbpfPolicyParts>,
    names: &SharedPolicyNames,
) -> Result<Option<PolicyBackend>, PolicyDatapathError> {
    match (config.dataplane, ebpf) {
        (Dataplane::Ebpf, Some(mut parts)) => {
            if !config.policy.enabled {
                // Off: nothing isolates, nothing is denied (the programs on veths then pass
                // every packet).
                let cleared = parts.datapath.apply(&Default::default(), &Default::default())?;
                log::info!(
                    "NetworkPolicy enforcement is off (--network-policy false); cleared the \
                     policy maps ({} operations)",
                    cleared.ops
                );
                return Ok(None);
            }
            Ok(Some(PolicyBackend {
                datapath: Box::new(parts.datapath),
                programs: Some(parts.programs),
            }))
        }
        (Dataplane::Ebpf, None) => Err("the eBPF datapath was not loaded".into()),
        (Dataplane::Nftables, _) => {
            if !config.policy.enabled {
                return Ok(None);
            }
            let table = crate::policy::nft::NftPolicy::open(&config.nft_policy_table)?
                .with_names(names.clone());
            log::info!("NetworkPolicy: nftables table inet {}", table.table());
            Ok(Some(PolicyBackend { datapath: Box::new(table), programs: None }))
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    config.validate()?;

    let policy_names = SharedPolicyNames::default();
    let mut ebpf_policy = None;
    let mut host_routing = None;
    let mut backend = match config.dataplane {
        Dataplane::Ebpf => {
            let (backend, policy, host) = start_ebpf(&config, &policy_names)?;
            ebpf_policy = Some(policy);
            host_routing = host;
            backend
        }
        Dataplane::Nftables => {
            let table = NftDataplane::open(&config.nft_table)?;
            log::info!(
                "datapath: nftables table inet {}; adopted {} frontends and {} backends",
                table.table(),
                table.frontends(),
                table.backends()
            );
            Backend::Nftables(table)
        }
    };

    let client = client(&config).await?;
    let status = Arc::new(Status::new(config.health_timeout));
    // Names of the policy datapath's numbers (pods, rule ids, policy ids) for flows and
    // metrics; the policy loop publishes a new table after each lowering.
    let _flows = start_flows(&config, &mut backend, &policy_names);
    // How full the eBPF maps are, counted in the background for /metrics.
    let _map_counts = (config.dataplane == Dataplane::Ebpf).then(|| {
        let maps = config.map_sizes.per_map().map(|(map, _)| map);
        status.track_bpf_maps(maps);
        AbortOnDrop(vec![tokio::spawn(count_maps(config.pin_dir.clone(), status.clone()))])
    });
    let counters = match config.dataplane {
        Dataplane::Ebpf => http::CounterSource::Pinned(config.pin_dir.clone()),
        Dataplane::Nftables if config.policy.enabled => {
            http::CounterSource::NftPolicy(config.nft_policy_table.clone())
        }
        Dataplane::Nftables => http::CounterSource::None,
    };
    for (what, addr) in [("health", config.health_listen), ("metrics", config.metrics_listen)] {
        let listener = TcpListener::bind(addr).await.map_err(|source| AgentError::Listen {
            what,
            addr,
            source,
        })?;
        let bound =
            listener.local_addr().map_err(|source| AgentError::Listen { what, addr, source })?;
        // Tests and operators read this line to find ports picked by the kernel (port 0).
        println!("weir agent: serving {what} on http://{bound}");
        tokio::spawn(http::serve(listener, status.clone(), counters.clone(), policy_names.clone()));
    }

    let _policy = match policy_datapath(&config, ebpf_policy, &policy_names) {
        Ok(Some(backend)) => Some(AbortOnDrop(policy::start(
            &client,
            &config,
            backend.datapath,
            backend.programs,
            status.clone(),
        ))),
        Ok(None) => None,
        Err(err) => {
            log::warn!("{}; pods are not isolated", error_chain(err.as_ref()));
            None
        }
    };

    let changes = Arc::new(Changes::default());
    let (stores, _watchers) = watch::start(&client, &config.node_name, changes.clone());
    // Node-to-node routing has its own watcher (every Node, not only this one) and loop, so a
    // Node change never waits behind a service sync and the other way round.
    let _routing = config.routing.enabled().then(|| {
        let nodes_changed = Arc::new(Notify::new());
        let (nodes, watcher) = watch::watch(
            kube::Api::<Node>::all(client.clone()),
            kube::runtime::watcher::Config::default(),
            nodes_changed.clone(),
        );
        let task = tokio::spawn(crate::routing::run(
            config.routing.clone(),
            client.clone(),
            nodes,
            nodes_changed,
            config.node_name.clone(),
            config.node_addresses.clone(),
            host_routing.take(),
        ));
        AbortOnDrop(vec![watcher, task])
    });
    log::info!(
        "waiting for the initial lists of Services, EndpointSlices and Node {}",
        config.node_name
    );
    tokio::select! {
        ready = stores.ready() => ready.map_err(|_| AgentError::WatchersStopped)?,
        _ = shutdown() => return stop(&config, backend),
    }
    let mut health_checks =
        healthcheck::HealthCheckServers::new(config.health_listen.ip(), status.clone());
    // The tracker's health-check change counter the servers follow (`None`: sync them next
    // time, after a full sync or a port that could not be bound), so that a sync that changed
    // no health check does not visit every health-check port.
    let mut health_checks_seen: Option<u64> = None;
    let mut first_sync = true;
    // `None` until the first sync and after a failed one: the next sync is a full one.
    let mut tracker: Option<ServiceTracker> = None;
    let mut next_full = Instant::now();
    loop {
        let started = Instant::now();
        let mut pending = changes.take();
        pending.full |= started >= next_full;
        let (result, full) = match tracker.as_mut() {
            Some(tracker) if !pending.full => {
                let changed = tracker.apply(changed_objects(&stores, &pending));
                (backend.sync_changed(tracker.state(), &changed), false)
            }
            _ => {
                // The old tracker goes first, so that two never coexist at the peak.
                drop(tracker.take());
                let node = node_context(&config, node_object(&stores, &config).as_deref());
                let rebuilt =
                    ServiceTracker::rebuild(node, stores.services.state(), stores.slices.state());
                let result = backend.sync(rebuilt.state());
                tracker = Some(rebuilt);
                next_full = started + config::FULL_RESYNC_PERIOD;
                release_free_memory();
                (result, true)
            }
        };
        match result {
            Ok(synced) => {
                let UdpCleanup { flushed, sockets } = synced.udp;
                if flushed > 0 || sockets > 0 {
                    log::info!(
                        "sync: UDP flows to removed backends: {flushed} conntrack entries \
                         flushed, {sockets} connected sockets terminated"
                    );
                }
                let (frontends, backends) = backend.counts();
                let report = SyncReport {
                    duration: started.elapsed(),
                    event_age: pending.since.map(|since| since.elapsed()),
                    ops: synced.ops,
                    frontends,
                    backends,
                    skipped_frontends: synced.skipped,
                };
                if synced.ops > 0 || full {
                    log::info!(
                        "sync ({}): {} datapath operations in {:?} ({} frontends, {} backends)",
                        if full { "full" } else { "changed objects only" },
                        report.ops,
                        report.duration,
                        report.frontends,
                        report.backends
                    );
                }
                status.applied(started, report);
                if let Some(tracker) = &tracker {
                    let changes = tracker.health_check_changes();
                    if full || health_checks_seen != Some(changes) {
                        let served = health_checks.sync(&tracker.state().health_check_node_ports);
                        health_checks_seen = served.then_some(changes);
                    }
                }
                if first_sync {
                    first_sync = false;
                    // Tests and operators wait for this line: the datapath now matches the API.
                    println!("weir agent: first sync done ({} frontends)", report.frontends);
                }
            }
            Err(err) => {
                match err.full_map {
                    Some(map) => {
                        status.map_full(map);
                        log::error!(
                            "sync failed: {}; resyncing from the datapath in {RETRY_AFTER:?}",
                            map_full_advice(map, &config.pin_dir)
                        );
                        log::debug!("sync failed: {}", err.message);
                    }
                    None => log::error!(
                        "sync failed: {}; resyncing from the datapath in {RETRY_AFTER:?}",
                        err.message
                    ),
                }
                status.failed();
                backend.resync();
                tracker = None;
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        }
        tokio::select! {
            _ = changes.changed() => status.queued(),
            _ = tokio::time::sleep_until(next_full.into()) => {}
            _ = shutdown() => return stop(&config, backend),
        }
    }
}

/// This node's Node object, if the store has it.
fn node_object(stores: &Stores, config: &AgentConfig) -> Option<Arc<Node>> {
    stores.nodes.get(&kube::runtime::reflector::ObjectRef::new(&config.node_name))
}

/// The current version (or absence) of each object `pending` names, from the stores.
fn changed_objects(stores: &Stores, pending: &Pending) -> Vec<Change> {
    fn reference<K: kube::Resource<DynamicType = ()>>(
        key: &str,
    ) -> kube::runtime::reflector::ObjectRef<K> {
        let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
        kube::runtime::reflector::ObjectRef::new(name).within(namespace)
    }
    let services = pending.services.iter().map(|key| Change::Service {
        key: key.clone(),
        object: stores.services.get(&reference(key)),
    });
    let slices = pending
        .slices
        .iter()
        .map(|key| Change::Slice { key: key.clone(), object: stores.slices.get(&reference(key)) });
    services.chain(slices).collect()
}

/// Serves `weir flows` on the flow socket from the eBPF datapath's ring buffer, or from the
/// nftables policy table's log group. Visibility is not worth stopping the datapath for: a
/// failure is logged and the agent goes on without it.
fn start_flows(
    config: &AgentConfig,
    backend: &mut Backend,
    names: &SharedPolicyNames,
) -> AbortOnDrop {
    let source = match backend {
        Backend::Ebpf(ebpf) => match ebpf.flows.take() {
            Some(ring) => FlowSource::Ring(ring),
            None => {
                log::warn!(
                    "flows: the eBPF object has no flow ring buffer; `weir flows` is unavailable"
                );
                return AbortOnDrop(Vec::new());
            }
        },
        Backend::Nftables(_) if !config.policy.enabled => return AbortOnDrop(Vec::new()),
        Backend::Nftables(_) => match NflogSocket::bind(FLOW_LOG_GROUP) {
            Ok(socket) => FlowSource::Nflog(socket),
            Err(err) => {
                log::error!(
                    "flows: cannot listen on nfnetlink_log group {FLOW_LOG_GROUP} ({err}; another \
                     agent in this network namespace?); `weir flows` is unavailable on this node"
                );
                return AbortOnDrop(Vec::new());
            }
        },
    };
    let names = Arc::new(names.clone());
    match flows::start(source, names, Some(config.node_name.clone()), &config.flows_socket) {
        Ok(tasks) => {
            log::info!("flows: serving `weir flows` on {}", config.flows_socket.display());
            AbortOnDrop(tasks)
        }
        Err(err) => {
            log::error!("flows: {}; `weir flows` is unavailable on this node", error_chain(&err));
            AbortOnDrop(Vec::new())
        }
    }
}

/// Counts the entries of the sized eBPF maps pinned in `pin_dir` every
/// [`config::MAP_OCCUPANCY_PERIOD`], on a blocking thread, and hands the counts to `status` for
/// /metrics. The walk costs one system call per entry (about 1 s for full default conntrack
/// and socket maps on a slow VM), so the pause after a count is at least
/// [`config::MAP_OCCUPANCY_PAUSE_FACTOR`] times what it took: counting never takes more than
/// that fraction of a CPU. A map that cannot be read is left out and logged once, until it
/// can be read again.
async fn count_maps(pin_dir: PathBuf, status: Arc<Status>) {
    // The errors of the last count, so that one that persists is logged once.
    let mut unreadable: Vec<String> = Vec::new();
    loop {
        let dir = pin_dir.clone();
        let started = Instant::now();
        let Ok(counted) = tokio::task::spawn_blocking(move || maps::occupancy_pinned(&dir)).await
        else {
            log::warn!("metrics: counting the eBPF maps' entries panicked; counting stops");
            return;
        };
        let mut occupancy = Vec::with_capacity(counted.len());
        let mut failed = Vec::new();
        for result in counted {
            match result {
                Ok(map) => occupancy.push(map),
                Err(err) => {
                    let text = error_chain(&err);
                    if !unreadable.contains(&text) {
                        log::warn!("metrics: counting map entries: {text}");
                    }
                    failed.push(text);
                }
            }
        }
        unreadable = failed;
        status.maps_counted(occupancy);
        let pause = started.elapsed() * config::MAP_OCCUPANCY_PAUSE_FACTOR;
        tokio::time::sleep(pause.max(config::MAP_OCCUPANCY_PERIOD)).await;
    }
}

/// Gives the heap's free pages back to the kernel. A full sync (the first one, re-lists, the
/// periodic one) frees what the lists and the old state took; the allocator would otherwise
/// keep those pages resident for good.
fn release_free_memory() {
    // SAFETY: malloc_trim only returns unused pages of glibc's heap to the kernel.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Aborts its tasks when dropped (when `run` returns).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// A clean shutdown: the datapath stays in place (pinned maps and links, or the nftables
/// table) unless removing the table was asked for.
fn stop(config: &AgentConfig, backend: Backend) -> Result<(), AgentError> {
    match backend {
        Backend::Nftables(table) if config.nft_remove_on_exit => {
            let name = table.table().to_string();
            table.remove_table()?;
            log::info!("shutting down; removed nftables table inet {name}");
            if config.policy.enabled {
                // The policy loop owns its handle; a second one adopts the table to delete it.
                crate::policy::nft::NftPolicy::open(&config.nft_policy_table)?.remove()?;
                log::info!("removed nftables table inet {}", config.nft_policy_table);
            }
        }
        _ => log::info!(
            "shutting down; the datapath stays in place (pinned maps and links or the nftables \
             table, routes)"
        ),
    }
    Ok(())
}

async fn client(config: &AgentConfig) -> Result<Client, AgentError> {
    kube_client(config.kubeconfig.as_deref()).await
}

/// A client from a kubeconfig file, or from the in-cluster service account without one.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, AgentError> {
    let kube_config = match kubeconfig {
        Some(path) => {
            let read_error = |source| AgentError::Kubeconfig { path: path.to_path_buf(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(read_error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(read_error)?
        }
        None => kube::Config::incluster().map_err(AgentError::InCluster)?,
    };
    Client::try_from(kube_config).map_err(AgentError::Client)
}

/// This node's name and the addresses node ports are served on (its Node object's internal and
/// external IPs, plus any given on the command line). It reads only the Node's
/// `status.addresses`: `watch::NodeChanges` rebuilds the services when those change, and only
/// then.
fn node_context(config: &AgentConfig, node: Option<&Node>) -> NodeContext {
    let mut addresses: Vec<IpAddr> = config.node_addresses.clone();
    for address in node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if (address.type_ == "InternalIP" || address.type_ == "ExternalIP")
            && let Ok(ip) = address.address.parse()
            && !addresses.contains(&ip)
        {
            addresses.push(ip);
        }
    }
    NodeContext { name: config.node_name.clone(), addresses }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's file descriptor and keeps it open for as long
    // as the AsyncFd (which owns the logger) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        log::warn!("eBPF log forwarding unavailable");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_is_named_with_the_flag_that_sizes_it_and_how_to_resize() {
        let advice = map_full_advice("weir_svc_v1", std::path::Path::new("/sys/fs/bpf/weir"));
        assert!(advice.contains("eBPF map weir_svc_v1 is full"), "{advice}");
        assert!(advice.contains("--bpf-lb-map-max"), "{advice}");
        assert!(advice.contains("delete /sys/fs/bpf/weir/weir_svc_v1"), "{advice}");
        let advice = map_full_advice("weir_ct6_v1", std::path::Path::new("/p"));
        assert!(advice.contains("--bpf-ct-map-max"), "{advice}");
        let advice = map_full_advice("weir_sock_rev4_v1", std::path::Path::new("/p"));
        assert!(advice.contains("--bpf-sock-rev-map-max"), "{advice}");
    }
}
