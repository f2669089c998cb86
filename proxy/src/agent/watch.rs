//! Watching the API server: reflector stores for Services, EndpointSlices and this node's Node.
//!
//! The watcher contract (kube-rs): a re-list replaces a store's content atomically, so a lost
//! Delete event cannot leave a stale object behind; the agent is level-triggered and rebuilds
//! its desired state from the stores, never from individual events. Every event, and every
//! re-list, wakes the sync loop through `changed`.
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
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

/// Starts the watchers; each runs until its task is aborted, retrying with backoff on errors.
pub fn start(
    client: &Client,
    node_name: &str,
    changed: Arc<Notify>,
) -> (Stores, Vec<JoinHandle<()>>) {
    let (services, services_task) =
        watch(Api::<Service>::all(client.clone()), watcher::Config::default(), changed.clone());
    let (slices, slices_task) = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let node_only = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let (nodes, nodes_task) = watch(Api::<Node>::all(client.clone()), node_only, changed);
    (Stores { services, slices, nodes }, vec![services_task, slices_task, nodes_task])
}

pub(super) fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(err) => log::warn!("watch {kind}: {err} (retrying with backoff)"),
            }
        }
    });
    (reader, task)
}
