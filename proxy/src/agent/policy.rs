//! The agent's NetworkPolicy loop.
//!
//! Its own watchers (Namespaces, Pods, NetworkPolicies, every Node), its own task, so a policy
//! change never waits behind a service sync. Each watch event is one change to an
//! [`IncrementalCompiler`] (a re-list deletes what it no longer lists); the events that arrived
//! together are then handed to the datapath as one [`weir_policy::Delta`]
//! ([`PolicyDatapath::apply_delta`]), so a change costs what it touches, not the size of the
//! cluster's policy. Nothing is applied before every kind has completed its initial list: a
//! restarted agent never applies an empty policy over the one its predecessor programmed.
//!
//! The safety net, at the first sync, after a failed apply and every [`RESYNC`]: a full
//! compile of the same inputs (`Compiler::compile`, continuing the incremental compiler's
//! numbering) must give exactly the incremental state (if not, the difference is logged and the
//! state rebuilt), and the datapath takes the whole state ([`PolicyDatapath::apply`]), diffing
//! it against what it holds.
//!
//! After each apply on the eBPF datapath, every local pod veth is checked for the policy
//! programs ([`PolicyPrograms::reconcile`]): pods made before the agent ran get them, and a
//! previous agent's programs are replaced.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::mpsc, task::JoinHandle};
use weir_cni_plugin::wiring::{GATEWAY_V4, GATEWAY_V6};
use weir_policy::{Change, Cidr, Compiled, IncrementalCompiler, ObjectKey};

use super::{
    config::AgentConfig,
    node_context,
    status::{PolicySyncReport, Status},
};
use crate::policy::{PolicyDatapath, PolicyNode, PolicyPrograms};

/// Pause before retrying after a failed apply.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A full recompile and reconcile at least this often, even without changes (repairs
/// attachments of veths whose pods the API has not reported yet).
const RESYNC: Duration = Duration::from_secs(30);

/// When packets of a local pod the policy does not know yet are dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyUnknown {
    /// While at least one NetworkPolicy exists (no policy: nothing to protect).
    #[default]
    Auto,
    Always,
    Never,
}

impl DenyUnknown {
    fn decide(self, policies: usize) -> bool {
        match self {
            DenyUnknown::Auto => policies > 0,
            DenyUnknown::Always => true,
            DenyUnknown::Never => false,
        }
    }
}

/// The policy part of the agent's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Enforce NetworkPolicy (`--network-policy`).
    pub enabled: bool,
    pub deny_unknown: DenyUnknown,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { enabled: true, deny_unknown: DenyUnknown::Auto }
    }
}

/// One watch event of one of the kinds the compiler reads.
enum Update {
    Namespace(Box<watcher::Event<Namespace>>),
    Pod(Box<watcher::Event<Pod>>),
    Policy(Box<watcher::Event<NetworkPolicy>>),
    Node(Box<watcher::Event<Node>>),
}

/// The kinds, in the order of [`Update`] (for the initial-list bookkeeping).
const KINDS: [&str; 4] = ["Namespaces", "Pods", "NetworkPolicies", "Nodes"];

/// Streams a kind's watch events into `updates` until aborted, retrying with backoff.
fn watch_events<K>(
    api: Api<K>,
    updates: mpsc::UnboundedSender<Update>,
    wrap: fn(watcher::Event<K>) -> Update,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if updates.send(wrap(event)).is_err() {
                        return;
                    }
                }
                Err(err) => log::warn!("watch {kind}: {err} (retrying with backoff)"),
            }
        }
    })
}

/// Starts the watchers and the loop; the returned tasks run until aborted.
pub fn start(
    client: &Client,
    config: &AgentConfig,
    datapath: Box<dyn PolicyDatapath>,
    programs: Option<PolicyPrograms>,
    status: Arc<Status>,
) -> Vec<JoinHandle<()>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let tasks = vec![
        watch_events(Api::<Namespace>::all(client.clone()), tx.clone(), |e| {
            Update::Namespace(Box::new(e))
        }),
        watch_events(Api::<Pod>::all(client.clone()), tx.clone(), |e| Update::Pod(Box::new(e))),
        watch_events(Api::<NetworkPolicy>::all(client.clone()), tx.clone(), |e| {
            Update::Policy(Box::new(e))
        }),
        watch_events(Api::<Node>::all(client.clone()), tx, |e| Update::Node(Box::new(e))),
    ];
    let sync = Sync {
        config: config.clone(),
        datapath,
        programs,
        status,
        compiler: IncrementalCompiler::new(Some(&config.node_name)),
        this_node: None,
        listed: [false; 4],
        relisting: Default::default(),
    };
    let mut tasks = tasks;
    tasks.push(tokio::spawn(sync.run(rx)));
    tasks
}

/// At most this many events are taken into one sync (the rest wait for the next).
const BATCH: usize = 10_000;

struct Sync {
    config: AgentConfig,
    datapath: Box<dyn PolicyDatapath>,
    programs: Option<PolicyPrograms>,
    status: Arc<Status>,
    compiler: IncrementalCompiler,
    /// This node's object (addresses, pod ranges).
    this_node: Option<Node>,
    /// Which kinds completed their initial list.
    listed: [bool; 4],
    /// Per kind being re-listed, the objects listed so far.
    relisting: [Option<BTreeSet<ObjectKey>>; 4],
}

/// What kind of object a key names (the index in [`KINDS`]).
fn kind_of(key: &ObjectKey) -> usize {
    match key {
        ObjectKey::Namespace(_) => 0,
        ObjectKey::Pod(_) => 1,
        ObjectKey::Policy(_) => 2,
        ObjectKey::Node(_) => 3,
    }
}

impl Sync {
    /// Feeds one watch event to the compiler.
    fn take(&mut self, update: Update) {
        fn split<K>(event: watcher::Event<K>) -> (Option<K>, bool, Phase) {
            match event {
                watcher::Event::Apply(object) => (Some(object), false, Phase::Live),
                watcher::Event::Delete(object) => (Some(object), true, Phase::Live),
                watcher::Event::Init => (None, false, Phase::Init),
                watcher::Event::InitApply(object) => (Some(object), false, Phase::Listing),
                watcher::Event::InitDone => (None, false, Phase::Done),
            }
        }
        let (kind, change, phase) = match update {
            Update::Namespace(event) => {
                let (object, deleted, phase) = split(*event);
                (0, object.and_then(|o| Change::namespace(&o, deleted)), phase)
            }
            Update::Pod(event) => {
                let (object, deleted, phase) = split(*event);
                (1, object.and_then(|o| Change::pod(&o, deleted)), phase)
            }
            Update::Policy(event) => {
                let (object, deleted, phase) = split(*event);
                (2, object.and_then(|o| Change::policy(&o, deleted)), phase)
            }
            Update::Node(event) => {
                let (object, deleted, phase) = split(*event);
                if let Some(node) = &object
                    && node.metadata.name.as_deref() == Some(self.config.node_name.as_str())
                {
                    self.this_node = (!deleted).then(|| node.clone());
                }
                (3, object.and_then(|o| Change::node(&o, deleted)), phase)
            }
        };
        match phase {
            Phase::Init => self.relisting[kind] = Some(BTreeSet::new()),
            Phase::Listing => {
                if let (Some(seen), Some(change)) = (&mut self.relisting[kind], &change) {
                    seen.insert(change.key());
                }
            }
            Phase::Done => {
                // Objects not listed again were deleted while the watch was down.
                let seen = self.relisting[kind].take().unwrap_or_default();
                let gone: Vec<ObjectKey> = self
                    .compiler
                    .keys()
                    .into_iter()
                    .filter(|key| kind_of(key) == kind && !seen.contains(key))
                    .collect();
                for key in gone {
                    self.compiler.apply(Change::deletion(key));
                }
                if kind == 3 && !seen.contains(&ObjectKey::Node(self.config.node_name.clone())) {
                    self.this_node = None;
                }
                if !self.listed[kind] {
                    log::info!("policy: {} listed", KINDS[kind]);
                }
                self.listed[kind] = true;
            }
            Phase::Live => {}
        }
        if let Some(change) = change {
            self.compiler.apply(change);
        }
    }

    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>) {
        log::info!(
            "policy: waiting for the initial lists of Namespaces, Pods, NetworkPolicies and Nodes"
        );
        let mut reported = BTreeSet::new();
        let mut first = true;
        let mut full = true;
        let mut last_full = Instant::now();
        loop {
            // Wait for an event (or the resync), then take everything that is already there.
            let ready = self.listed.iter().all(|listed| *listed);
            if !(ready && full) {
                // Before the initial lists only events count.
                let timeout =
                    if ready { RESYNC.saturating_sub(last_full.elapsed()) } else { RESYNC };
                tokio::select! {
                    update = updates.recv() => match update {
                        Some(update) => self.take(update),
                        None => {
                            log::error!("policy: the watchers stopped");
                            return;
                        }
                    },
                    _ = tokio::time::sleep(timeout) => full = ready,
                }
            }
            let mut taken = 0;
            while taken < BATCH {
                let Ok(update) = updates.try_recv() else { break };
                self.take(update);
                taken += 1;
            }
            if self.listed.iter().any(|l| !l) {
                continue;
            }
            let started = Instant::now();
            let delta = self.compiler.take_delta();
            let node = self.policy_node();
            if full {
                self.check_full_compile().await;
            }
            let compiled = self.compiler.compiled();
            if delta.problems || full {
                report_problems(compiled, &mut reported);
            }
            let result = if full {
                self.datapath.apply(compiled, &node)
            } else {
                self.datapath.apply_delta(compiled, &delta, &node)
            };
            match result {
                Ok(applied) => {
                    if full || !delta.endpoints.is_empty() {
                        self.reconcile_attachments();
                    }
                    let compiled = self.compiler.compiled();
                    let report = PolicySyncReport {
                        duration: started.elapsed(),
                        ops: applied.ops,
                        endpoints: compiled.endpoints.len(),
                        identities: compiled.identities.len(),
                        rules: rules(compiled),
                        policies: self.compiler.policy_count(),
                    };
                    self.status.policy_applied(report);
                    let summary = format!(
                        "policy sync ({}): {} endpoints, {} identities, {} rules of {} policies, \
                         {} datapath operations in {:?}{}",
                        if full { "full" } else { "changes" },
                        report.endpoints,
                        report.identities,
                        report.rules,
                        report.policies,
                        report.ops,
                        report.duration,
                        if node.deny_unknown { "; unknown pods denied" } else { "" }
                    );
                    if report.ops > 0 || first {
                        log::info!("{summary}");
                    } else {
                        log::debug!("{summary}");
                    }
                    if first {
                        first = false;
                        // Tests and operators wait for this line: the node's pods have their
                        // policy.
                        println!(
                            "weir agent: first policy sync done ({} endpoints)",
                            report.endpoints
                        );
                    }
                    if full {
                        full = false;
                        last_full = Instant::now();
                    }
                }
                Err(err) => {
                    log::error!(
                        "policy sync failed: {}; retrying in {RETRY_AFTER:?}",
                        super::error_chain(err.as_ref())
                    );
                    self.status.policy_failed();
                    tokio::time::sleep(RETRY_AFTER).await;
                    full = true;
                }
            }
        }
    }

    /// The safety net: a full compile of the same inputs must give the incremental state.
    async fn check_full_compile(&mut self) {
        let mut reference = self.compiler.reference();
        let cluster = self.compiler.cluster();
        let node = self.config.node_name.clone();
        let compiled =
            tokio::task::spawn_blocking(move || reference.compile(&cluster, Some(&node))).await;
        match compiled {
            Ok(compiled) if compiled == *self.compiler.compiled() => {}
            Ok(_) => {
                log::error!(
                    "policy: the incremental compile differs from a full compile of the same \
                     objects (a bug); rebuilding it from the objects"
                );
                self.compiler = self.compiler.rebuilt();
            }
            Err(err) => log::error!("policy: the full compile did not finish: {err}"),
        }
    }

    fn policy_node(&self) -> PolicyNode {
        let node = self.this_node.as_ref();
        let policies = self.compiler.policy_count();
        let mut host_addresses = node_context(&self.config, node).addresses;
        // The node reaches its pods from the gateway address weir-cni puts on every host veth
        // (the host route to a pod has link scope, so the kernel picks that source): kubelet's
        // probes come from it. Over IPv6 a node without a global address of its own uses the
        // link-local gateway address weir-cni puts there too.
        host_addresses.push(IpAddr::V4(GATEWAY_V4));
        host_addresses.push(IpAddr::V6(GATEWAY_V6));
        let spec = node.and_then(|n| n.spec.as_ref());
        let pod_cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .collect();
        PolicyNode {
            host_addresses,
            pod_cidrs,
            deny_unknown: self.config.policy.deny_unknown.decide(policies),
        }
    }

    fn reconcile_attachments(&self) {
        let Some(programs) = &self.programs else { return };
        let compiled = self.compiler.compiled();
        let local_ips: Vec<_> =
            compiled.endpoints.keys().flat_map(|pod| compiled.pods[pod].ips.clone()).collect();
        match programs.reconcile(&local_ips) {
            Ok(done) if done.attached + done.detached + done.failed > 0 => log::info!(
                "policy programs on {} pod veths: {} attached, {} old copies detached, {} failed",
                done.veths,
                done.attached,
                done.detached,
                done.failed
            ),
            Ok(_) => {}
            Err(err) => log::warn!(
                "checking the policy programs on pod veths: {}",
                super::error_chain(&err)
            ),
        }
    }
}

/// Where a watch event is in a (re-)list.
enum Phase {
    Init,
    Listing,
    Done,
    Live,
}

/// Allow entries of all local endpoints (the rules the datapath enforces).
fn rules(compiled: &Compiled) -> usize {
    compiled.endpoints.values().map(|e| e.ingress.allow.len() + e.egress.allow.len()).sum()
}

/// Warns once about each part of a policy that was left out.
fn report_problems(compiled: &Compiled, reported: &mut BTreeSet<String>) {
    for problem in &compiled.problems {
        let text = problem.to_string();
        if reported.insert(text.clone()) {
            log::warn!("{text} (this part is left out: the policy allows less until it is fixed)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_unknown_follows_the_mode() {
        assert!(!DenyUnknown::Auto.decide(0));
        assert!(DenyUnknown::Auto.decide(1));
        assert!(DenyUnknown::Always.decide(0));
        assert!(!DenyUnknown::Never.decide(3));
    }
}
