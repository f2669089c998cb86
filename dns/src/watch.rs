//! Watching Services, EndpointSlices and Pods with kube-rs reflectors.
//!
//! The watcher contract (kube-rs): a re-list replaces a store's content atomically, so a lost
//! Delete event cannot leave a stale record behind. The server is level-triggered: every event
//! wakes the rebuild through `changed`, and the whole record set is rebuilt from the stores.
use std::sync::Arc;

use futures::StreamExt;
use hickory_proto::rr::Name;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::records::{self, RecordSet};

/// Read handles on the watched objects.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
}

impl Stores {
    /// Waits until every store has completed its first list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.pods.wait_until_ready().await
    }

    /// The record set of what the stores hold now.
    pub fn records(&self, zone: &Name, serial: u32) -> RecordSet {
        let services = self.services.state();
        let slices = self.slices.state();
        let pods = self.pods.state();
        records::build(
            zone,
            serial,
            services.iter().map(Arc::as_ref),
            slices.iter().map(Arc::as_ref),
            pods.iter().map(Arc::as_ref),
        )
    }
}

/// Starts the watchers; each runs until its task is aborted, retrying with backoff on errors.
pub fn start(client: &Client, changed: Arc<Notify>) -> (Stores, Vec<JoinHandle<()>>) {
    let (services, services_task) = watch(Api::<Service>::all(client.clone()), changed.clone());
    let (slices, slices_task) = watch(Api::<EndpointSlice>::all(client.clone()), changed.clone());
    let (pods, pods_task) = watch(Api::<Pod>::all(client.clone()), changed);
    (Stores { services, slices, pods }, vec![services_task, slices_task, pods_task])
}

fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
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
