//! The runtime's main loop: recovery of what a previous runtime left, the Node heartbeat, the
//! kubelet API, and the level-triggered pod reconcile (one [`pod`] task per pod uid).
use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{Config, Shared, kubelet, node, pod, rules, sandbox};

struct PodTask {
    tx: Option<watch::Sender<Option<Pod>>>,
    handle: JoinHandle<()>,
}

/// Runs the node runtime until SIGTERM/SIGINT (which leave the pods running: a restarted
/// runtime adopts them).
pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(config.state_dir.join("pods"))?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&config.kubeconfig)?;
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = Client::try_from(client_config)?;
    let shared = Arc::new(Shared { applets: busybox_applets(), pods: Default::default(), config });

    let listener = tokio::net::TcpListener::bind(shared.config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the kubelet API on {}: {e}", shared.config.listen))?;
    let listen = listener.local_addr()?;
    println!("weir node: serving the kubelet API on http://{listen}");
    tokio::spawn(kubelet::serve(listener, shared.clone()));

    node::register(client.clone(), &shared.config, listen.port()).await?;
    tokio::spawn(node::heartbeat(client.clone(), shared.config.clone(), listen.port()));

    let api: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", shared.config.node_name);
    let (reader, writer) = reflector::store();
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    let stream = watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .reflect(writer)
        .for_each(move |event| {
            if let Err(err) = event {
                log::warn!("pod watch: {err}");
            }
            notify.notify_one();
            futures::future::ready(())
        });
    tokio::spawn(stream);
    reader.wait_until_ready().await?;

    recover(&shared, &reader.state()).await;
    println!("weir node: ready");

    let mut tasks: HashMap<String, PodTask> = HashMap::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let pods = reader.state();
        let mut seen = std::collections::HashSet::new();
        for pod in &pods {
            let Some(uid) = pod.metadata.uid.clone() else { continue };
            seen.insert(uid.clone());
            match tasks.get(&uid) {
                Some(task) if !task.handle.is_finished() => {
                    if let Some(tx) = &task.tx {
                        tx.send_replace(Some((**pod).clone()));
                    }
                }
                _ => {
                    let (tx, rx) = watch::channel(Some((**pod).clone()));
                    let handle = tokio::spawn(pod::run(shared.clone(), client.clone(), rx));
                    tasks.insert(uid, PodTask { tx: Some(tx), handle });
                }
            }
        }
        tasks.retain(|uid, task| {
            if !seen.contains(uid) {
                // Gone from the API: dropping the sender makes the task tear down.
                task.tx = None;
            }
            !task.handle.is_finished() || seen.contains(uid)
        });
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    log::info!("weir node: stopping (pods keep running; a restarted runtime adopts them)");
    Ok(())
}

/// Kills every process a previous runtime left in the pod cgroups, keeps the sandboxes of pods
/// that still exist (their tasks adopt them) and removes everything else it recorded, plus
/// namespaces with the runtime's prefix that no record explains.
async fn recover(shared: &Arc<Shared>, pods: &[Arc<Pod>]) {
    let config = &shared.config;
    if let Ok(entries) = std::fs::read_dir(&config.cgroup) {
        for entry in entries.flatten() {
            if entry.path().join("cgroup.procs").exists() {
                sandbox::kill_cgroup(&entry.path()).await;
            }
        }
    }
    let live: std::collections::HashSet<String> =
        pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    let records = sandbox::records(&config.state_dir);
    let mut known = std::collections::HashSet::new();
    for record in records {
        let netns = rules::netns_name(&config.netns_prefix, &record.uid);
        known.insert(netns.clone());
        if live.contains(&record.uid) {
            continue;
        }
        log::info!(
            "recovery: removing the sandbox of gone pod {}/{}",
            record.namespace,
            record.name
        );
        let paths = sandbox::PodPaths::new(&config.state_dir, &config.cgroup, &netns, &record.uid);
        if let Err(err) = pod::remove_sandbox(
            shared,
            &paths,
            &netns,
            &record.uid,
            &record.namespace,
            &record.name,
        )
        .await
        {
            log::warn!("recovery: {}/{}: {err:#}", record.namespace, record.name);
        }
    }
    for name in sandbox::netns_with_prefix(&config.netns_prefix) {
        if !known.contains(&name) {
            log::info!("recovery: deleting unrecorded namespace {name}");
            let _ = sandbox::delete_netns(&name);
        }
    }
    // Pod directories without a record (a crash before the first write) and empty cgroups.
    if let Ok(entries) = std::fs::read_dir(config.state_dir.join("pods")) {
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&uid) && !entry.path().join("sandbox.json").exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&config.cgroup) {
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&uid) && entry.path().join("cgroup.procs").exists() {
                let _ = sandbox::remove_cgroup(&entry.path()).await;
            }
        }
    }
}

fn busybox_applets() -> Vec<String> {
    std::process::Command::new(rules::BUSYBOX)
        .arg("--list")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
        .unwrap_or_default()
}
