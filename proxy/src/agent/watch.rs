//! Watching the API server: reflector stores for Services, EndpointSlices and this node's Node,
//! and the log of what changed since the sync loop last looked ([`Changes`]).
//!
//! The watcher contract (kube-rs): a re-list replaces a store's content atomically (at
//! `InitDone`), so a lost Delete event cannot leave a stale object behind. The sync loop
//! applies single Service and EndpointSlice events per object (their keys are logged here
//! after the store has them), and rebuilds everything from the stores after a re-list, a Node
//! change, or a failed write ([`Pending::full`]). Every logged change wakes the loop.
use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, NodeAddress, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;

use crate::model::object_key;
use tokio::{sync::Notify, task::JoinHandle};

/// Read handles on the watched objects.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
}

impl Stores {
    /// Waits until every store has completed its initial list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await
    }
}

/// What changed since [`Changes::take`] was last called.
#[derive(Debug, Default)]
pub struct Pending {
    /// A store was re-listed or this node changed: rebuild everything from the stores.
    pub full: bool,
    /// `namespace/name` of the Services and EndpointSlices that were applied or deleted.
    pub services: BTreeSet<String>,
    pub slices: BTreeSet<String>,
    /// When the oldest of these changes was seen (its event received, the store updated).
    pub since: Option<Instant>,
}

/// The change log the watchers write and the sync loop takes, with its wake-up.
#[derive(Debug, Default)]
pub struct Changes {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Changes {
    /// Records a change and wakes the loop.
    pub fn mark(&self, record: impl FnOnce(&mut Pending)) {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.since.get_or_insert_with(Instant::now);
        record(&mut pending);
        drop(pending);
        self.notify.notify_one();
    }

    /// Takes what changed so far, leaving the log empty.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Waits until something is marked (at once if something was marked since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}

/// Starts the watchers; each runs until its task is aborted, retrying with backoff on errors.
pub fn start(
    client: &Client,
    node_name: &str,
    changes: Arc<Changes>,
) -> (Stores, Vec<JoinHandle<()>>) {
    let (services, services_task) =
        watch_keyed(Api::<Service>::all(client.clone()), watcher::Config::default(), {
            let changes = changes.clone();
            after_first_list(move |event| log_event(&changes, event, |p| &mut p.services))
        });
    let (slices, slices_task) =
        watch_keyed(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), {
            let changes = changes.clone();
            after_first_list(move |event| log_event(&changes, event, |p| &mut p.slices))
        });
    let node_only = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let filter = Mutex::new(NodeChanges::default());
    let (nodes, nodes_task) = watch_keyed(
        Api::<Node>::all(client.clone()),
        node_only,
        after_first_list(move |event| {
            let mut filter = filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if filter.rebuilds(event) {
                changes.mark(|p| p.full = true);
            }
        }),
    );
    (Stores { services, slices, nodes }, vec![services_task, slices_task, nodes_task])
}

/// Passes on every event but the end of the watcher's first list. The agent's first sync is a
/// full one anyway and starts once every store holds its initial list; the end-of-list mark
/// can reach the change log just after that sync took it, which made the next sync (the first
/// change after start) a second full one. The ends of later lists (re-lists) pass.
fn after_first_list<K>(
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> impl Fn(&watcher::Event<K>) + Send + 'static {
    let listed = AtomicBool::new(false);
    move |event| {
        if matches!(event, watcher::Event::InitDone) && !listed.swap(true, Ordering::Relaxed) {
            return;
        }
        on_event(event)
    }
}

/// Which events of this node's Node rebuild the services. The node's addresses decide every
/// node-port frontend: a change of them rebuilds everything. Other changes to the Node
/// (annotations such as the VTEP this agent publishes, labels, the kubelet's status
/// heartbeats) leave the services as they are.
#[derive(Debug, Default)]
struct NodeChanges {
    /// The addresses of the last Node seen (`None`: none seen since the last re-list).
    seen: Option<Vec<NodeAddress>>,
}

impl NodeChanges {
    fn rebuilds(&mut self, event: &watcher::Event<Node>) -> bool {
        match event {
            watcher::Event::Apply(node) => {
                let addresses = node_addresses(node);
                let changed = self.seen.as_ref() != Some(&addresses);
                self.seen = Some(addresses);
                changed
            }
            watcher::Event::Delete(_) => {
                self.seen = None;
                true
            }
            // A re-list: what it finds is the new reference, and its end rebuilds.
            watcher::Event::Init => {
                self.seen = None;
                false
            }
            watcher::Event::InitApply(node) => {
                self.seen = Some(node_addresses(node));
                false
            }
            watcher::Event::InitDone => true,
        }
    }
}

/// What of a Node the service model reads (`status.addresses`, see `node_context`).
fn node_addresses(node: &Node) -> Vec<NodeAddress> {
    node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default()
}

/// Logs one Service or EndpointSlice event into the key set `keys` picks. The store applied
/// the event before this runs, so the loop finds the object's new version (or its absence).
fn log_event<K: Resource>(
    changes: &Changes,
    event: &watcher::Event<K>,
    keys: impl FnOnce(&mut Pending) -> &mut BTreeSet<String>,
) {
    match event {
        watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
            let key = object_key(object.meta());
            changes.mark(|p| {
                keys(p).insert(key);
            })
        }
        // The store swaps in the re-listed objects only now.
        watcher::Event::InitDone => changes.mark(|p| p.full = true),
        watcher::Event::Init | watcher::Event::InitApply(_) => {}
    }
}

/// A watcher feeding a reflector store that wakes `changed` on every event (every re-list too).
pub(super) fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watch_keyed(api, config, move |_| changed.notify_one())
}

/// A watcher feeding a reflector store; `on_event` sees each event after the store applied it.
fn watch_keyed<K>(
    api: Api<K>,
    config: watcher::Config,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream =
        reflector(writer, watcher(api, config).default_backoff().modify(strip_bookkeeping));
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => on_event(&event),
                Err(err) => log::warn!("watch {kind}: {err} (retrying with backoff)"),
            }
        }
    });
    (reader, task)
}

/// The annotation `kubectl apply` keeps a copy of the whole object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no part of the agent reads and what can be large, before the object is stored
/// (kube-proxy's informers do the same): `managedFields` and kubectl's last-applied copy.
fn strip_bookkeeping<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_address_changes_of_the_node_rebuild_the_services() {
        let node = |annotation: &str, address: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1", "annotations": {"weir.dev/vtep-mac": annotation}},
                "status": {"addresses": [{"type": "InternalIP", "address": address}]},
            }))
            .unwrap()
        };
        let mut changes = NodeChanges::default();
        let events = [
            (watcher::Event::Init, false),
            (watcher::Event::InitApply(node("", "10.0.0.1")), false),
            (watcher::Event::InitDone, true),
            (watcher::Event::Apply(node("aa:bb", "10.0.0.1")), false),
            (watcher::Event::Apply(node("aa:bb", "10.0.0.2")), true),
            (watcher::Event::Apply(node("aa:bb", "10.0.0.2")), false),
            (watcher::Event::Delete(node("aa:bb", "10.0.0.2")), true),
            (watcher::Event::Apply(node("aa:bb", "10.0.0.2")), true),
        ];
        for (i, (event, rebuilds)) in events.into_iter().enumerate() {
            assert_eq!(changes.rebuilds(&event), rebuilds, "event {i}");
        }
    }

    #[test]
    fn the_end_of_the_first_list_is_not_passed_on() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let on_event = after_first_list({
            let seen = seen.clone();
            move |event: &watcher::Event<Node>| {
                seen.lock().unwrap().push(matches!(event, watcher::Event::InitDone))
            }
        });
        for event in [
            watcher::Event::Init,
            watcher::Event::InitDone,
            watcher::Event::Init,
            watcher::Event::InitDone,
        ] {
            on_event(&event);
        }
        assert_eq!(*seen.lock().unwrap(), [false, false, true], "Init, Init, the re-list's end");
    }

    #[test]
    fn stored_objects_lose_managed_fields_and_the_last_applied_copy() {
        let mut service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "default",
                "annotations": {LAST_APPLIED: "{...}", "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {"clusterIP": "10.96.0.10"},
        }))
        .unwrap();
        strip_bookkeeping(&mut service);
        assert!(service.metadata.managed_fields.is_none());
        let annotations = service.metadata.annotations.unwrap();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["keep"]);
        assert_eq!(service.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
    }
}
