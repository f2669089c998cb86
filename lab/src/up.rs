//! `weir lab up`: builds the lab from its plan, step by step, recording what it makes first.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

use crate::{
    cluster, down,
    host::{self, Daemon},
    plan::{self, LabPlan, NodePlan},
    state::{self, DaemonRecord, LabState},
};

/// Where the binaries the lab runs are.
pub struct Binaries {
    /// `weir` itself (the API server, the agents and the node runtimes are its subcommands).
    pub weir: PathBuf,
    /// The directory holding `weir-cni` (the node runtimes' CNI_PATH).
    pub cni_dir: PathBuf,
}

impl Binaries {
    /// `weir` is this executable; `weir-cni` must sit next to it unless `cni_dir` is given.
    pub fn find(cni_dir: Option<PathBuf>) -> Result<Binaries> {
        let weir = std::env::current_exe().context("finding the weir executable")?;
        let cni_dir = match cni_dir {
            Some(dir) => dir,
            None => weir.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        if !cni_dir.join("weir-cni").is_file() {
            bail!(
                "weir-cni is not in {}: build it (`cargo build --release -p weir-cni-plugin`, \
                 `cargo xtask lab up` does) or pass --cni-bin-dir",
                cni_dir.display()
            );
        }
        Ok(Binaries { weir, cni_dir })
    }
}

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Brings the lab of `plan` up and returns once it is ready (its daemons keep running).
pub fn up(plan: &LabPlan, bins: &Binaries) -> Result<()> {
    let started = Instant::now();
    if let Some(existing) = state::load(&plan.state_dir)? {
        let running = existing.daemons.iter().any(|d| d.role == "apiserver" && host::alive(d.pid));
        if running {
            bail!(
                "lab {:?} is already running (state in {}); use it (export KUBECONFIG={}), or \
                 remove it first with `weir lab down --name {}`",
                existing.spec.name,
                plan.state_dir.display(),
                plan.kubeconfig().display(),
                existing.spec.name
            );
        }
        println!(
            "lab: found the remains of an earlier lab {:?} that is not running; removing them",
            existing.spec.name
        );
        down::down(plan)?;
    } else if !host::netns_with_prefix(&plan.netns_prefix()).is_empty() {
        println!(
            "lab: found network namespaces of an earlier lab {:?}; removing them",
            plan.spec.name
        );
        down::down(plan)?;
    }
    let spec = &plan.spec;
    println!(
        "lab: creating {:?} ({} node{}, dataplane {}, overlay {}, IP family {})",
        spec.name,
        spec.nodes,
        if spec.nodes == 1 { "" } else { "s" },
        spec.dataplane,
        spec.overlay,
        spec.ip_family
    );
    let mut record = LabState {
        spec: spec.clone(),
        started: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        ready: false,
        apiserver: None,
        daemons: Vec::new(),
    };
    state::save(&plan.state_dir, &record)?;
    match build(plan, bins, &mut record) {
        Ok(()) => {
            record.ready = true;
            state::save(&plan.state_dir, &record)?;
            print_ready(plan, started.elapsed());
            Ok(())
        }
        Err(err) => {
            eprintln!("lab: up failed: {err:#}");
            eprintln!("lab: removing what was made");
            if let Err(cleanup) = down::down(plan) {
                eprintln!(
                    "lab: cleanup failed too: {cleanup:#}; run `weir lab down --name {}`",
                    spec.name
                );
            }
            Err(err.context("lab up failed (everything it made was removed)"))
        }
    }
}

fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let value = f().with_context(|| what.to_string())?;
    println!("  ok  {what} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(value)
}

fn build(plan: &LabPlan, bins: &Binaries, record: &mut LabState) -> Result<()> {
    for dir in [plan.logs_dir(), plan.apiserver_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cgroup_root = host::cgroup_root()?;
    step("network namespaces: an underlay bridge and one namespace per node", || topology(plan))?;
    step("cgroups and bpffs directories", || {
        for dir in
            [plan.daemons_cgroup()].into_iter().chain(plan.nodes.iter().map(|n| n.cgroup.clone()))
        {
            let dir = cgroup_root.join(dir);
            fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        for node in &plan.nodes {
            fs::create_dir_all(&node.pin_dir)
                .with_context(|| format!("creating {}", node.pin_dir.display()))?;
            fs::create_dir_all(node.cni_conf_dir())?;
        }
        Ok(())
    })?;
    let daemons = cgroup_root.join(plan.daemons_cgroup());
    step("API server", || start_apiserver(plan, bins, &daemons, record))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = runtime.block_on(cluster::client(&plan.kubeconfig()))?;
    let cidrs = step("nodes registered, pod CIDRs allocated", || {
        runtime.block_on(cluster::register_nodes(&client, plan, STEP_TIMEOUT))
    })?;
    step("node configuration: kubeconfigs and CNI config lists", || {
        for (node, cidr) in plan.nodes.iter().zip(&cidrs) {
            write_node_files(plan, node, cidr)?;
        }
        Ok(())
    })?;
    step("agents and node runtimes started on every node", || {
        for node in &plan.nodes {
            start_node(plan, node, bins, &cgroup_root, &daemons, record)?;
        }
        state::save(&plan.state_dir, record)
    })?;
    step("nodes Ready and agents healthy", || {
        wait_agents(plan, record)?;
        runtime.block_on(cluster::wait_nodes_ready(&client, plan, record, STEP_TIMEOUT))
    })?;
    step("cluster DNS (kube-dns at 10.96.0.10) Ready", || {
        runtime.block_on(cluster::install_dns(&client, STEP_TIMEOUT))
    })?;
    Ok(())
}

/// The underlay namespace with bridge `br0`, and each node's namespace with `eth0` on it.
fn topology(plan: &LabPlan) -> Result<()> {
    let underlay = &plan.underlay_netns;
    host::create_netns(underlay)?;
    for node in &plan.nodes {
        host::create_netns(&node.netns)?;
    }
    let mtu = plan::UNDERLAY_MTU;
    let mut batch = vec![
        format!("link add br0 mtu {mtu} type bridge"),
        format!("addr add {}/{} dev br0", plan::UNDERLAY_GATEWAY, plan::UNDERLAY_PREFIX),
        "link set br0 up".to_string(),
    ];
    if plan.spec.ip_family == plan::IpFamily::Dual {
        batch.push(format!(
            "addr add {}/{} dev br0 nodad",
            plan::UNDERLAY_GATEWAY6,
            plan::UNDERLAY_PREFIX6
        ));
    }
    for node in &plan.nodes {
        let port = &node.underlay_port;
        batch.push(format!(
            "link add {port} mtu {mtu} type veth peer name eth0 netns {}",
            node.netns
        ));
        batch.push(format!("link set {port} master br0 up"));
    }
    host::ip_batch(underlay, &batch)?;
    for node in &plan.nodes {
        host::ip_batch(
            &node.netns,
            &[
                format!("addr add {}/{} dev eth0", node.address, plan::UNDERLAY_PREFIX),
                "link set eth0 up".to_string(),
                format!("route add default via {}", plan::UNDERLAY_GATEWAY),
            ],
        )?;
        host::sysctl_in(&node.netns, "net/ipv4/ip_forward", "1")?;
        if let Some(address6) = node.address6 {
            // nodad: the addresses are usable at once (no duplicate detection on a lab bridge).
            host::ip_batch(
                &node.netns,
                &[format!("addr add {address6}/{} dev eth0 nodad", plan::UNDERLAY_PREFIX6)],
            )?;
            host::sysctl_in(&node.netns, "net/ipv6/conf/all/forwarding", "1")?;
        }
    }
    Ok(())
}

fn start_apiserver(
    plan: &LabPlan,
    bins: &Binaries,
    cgroup: &Path,
    record: &mut LabState,
) -> Result<()> {
    let log = plan.logs_dir().join("apiserver.log");
    let nodes: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let args = vec![
        "apiserver".to_string(),
        "--data-dir".into(),
        plan.apiserver_dir().display().to_string(),
        "--kubeconfig-out".into(),
        plan.kubeconfig().display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--netns-listen".into(),
        format!(
            "{}={}",
            host::netns_path(&plan.underlay_netns).display(),
            plan.apiserver_underlay()
        ),
        "--node-netns".into(),
        host::netns_path(&plan.underlay_netns).display().to_string(),
        "--service-cidr".into(),
        plan.service_cidrs(),
        "--cluster-cidr".into(),
        plan.cluster_cidrs(),
        "--node-tokens".into(),
        nodes.join(","),
    ];
    let pid = host::spawn(&Daemon { program: &bins.weir, args, netns: None, cgroup, log: &log })?;
    record.daemons.push(DaemonRecord {
        role: "apiserver".into(),
        node: None,
        pid,
        log: log.clone(),
    });
    state::save(&plan.state_dir, record)?;
    let url = host::wait_for(STEP_TIMEOUT, || {
        if !host::alive(pid) {
            return Some(None);
        }
        let text = fs::read_to_string(&log).ok()?;
        let url = text.lines().find_map(|l| l.split("weir apiserver: serving ").nth(1))?;
        plan.kubeconfig().exists().then(|| Some(url.trim().to_string()))
    });
    match url {
        Some(Some(url)) => {
            record.apiserver = Some(url);
            state::save(&plan.state_dir, record)
        }
        Some(None) => bail!("the API server exited:\n{}", host::log_tail(&log, 20)),
        None => bail!(
            "the API server did not start within {STEP_TIMEOUT:?}:\n{}",
            host::log_tail(&log, 20)
        ),
    }
}

/// The node's kubeconfig (the API server's node token, reached over the underlay) and its CNI
/// config list.
fn write_node_files(plan: &LabPlan, node: &NodePlan, pod_cidrs: &[String]) -> Result<()> {
    let issued = plan.apiserver_dir().join("nodes").join(format!("{}.kubeconfig", node.name));
    let text =
        fs::read_to_string(&issued).with_context(|| format!("reading {}", issued.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", issued.display()))?;
    let server = format!("https://{}", plan.apiserver_underlay());
    for cluster in config["clusters"].as_array_mut().into_iter().flatten() {
        cluster["cluster"]["server"] = server.clone().into();
    }
    fs::write(node.kubeconfig(), serde_json::to_vec_pretty(&config)?)?;
    let conflist = plan::cni_conflist(plan, node, pod_cidrs);
    fs::write(node.cni_conf_dir().join("10-weir.conflist"), serde_json::to_vec_pretty(&conflist)?)?;
    Ok(())
}

fn start_node(
    plan: &LabPlan,
    node: &NodePlan,
    bins: &Binaries,
    cgroup_root: &Path,
    daemons: &Path,
    record: &mut LabState,
) -> Result<()> {
    let node_cgroup = cgroup_root.join(&node.cgroup);
    let kubeconfig = node.kubeconfig().display().to_string();
    let address = node.address.to_string();
    let agent = vec![
        "agent".to_string(),
        "--kubeconfig".into(),
        kubeconfig.clone(),
        "--node-name".into(),
        node.name.clone(),
        "--node-address".into(),
        address.clone(),
        "--pin-dir".into(),
        node.pin_dir.display().to_string(),
        "--cgroup".into(),
        node_cgroup.display().to_string(),
        "--uplink".into(),
        "eth0".into(),
        "--health-listen".into(),
        node.agent_health().to_string(),
        "--metrics-listen".into(),
        node.agent_metrics().to_string(),
        "--dataplane".into(),
        plan.spec.dataplane.to_string(),
        "--overlay".into(),
        plan.spec.overlay.to_string(),
        "--cluster-cidr".into(),
        plan.cluster_cidrs(),
        "--masquerade".into(),
        "true".into(),
        "--flows-socket".into(),
        node.flows_socket().display().to_string(),
    ];
    let runtime = vec![
        "node".to_string(),
        "--kubeconfig".into(),
        kubeconfig,
        "--node-name".into(),
        node.name.clone(),
        "--node-ip".into(),
        node.address6.map_or(address.clone(), |v6| format!("{address},{v6}")),
        "--listen".into(),
        node.runtime_listen().to_string(),
        "--state-dir".into(),
        node.runtime_state().display().to_string(),
        "--cni-bin-dir".into(),
        bins.cni_dir.display().to_string(),
        "--cni-conf-dir".into(),
        node.cni_conf_dir().display().to_string(),
        "--cgroup".into(),
        node_cgroup.display().to_string(),
        "--netns-prefix".into(),
        node.pod_netns_prefix.clone(),
        "--cluster-dns".into(),
        plan::CLUSTER_DNS.to_string(),
        "--cluster-domain".into(),
        plan::CLUSTER_DOMAIN.into(),
    ];
    for (role, args) in [("agent", agent), ("node", runtime)] {
        let log = plan.logs_dir().join(format!("{}-{role}.log", node.name));
        let pid = host::spawn(&Daemon {
            program: &bins.weir,
            args,
            netns: Some(&node.netns),
            cgroup: daemons,
            log: &log,
        })?;
        record.daemons.push(DaemonRecord {
            role: role.into(),
            node: Some(node.name.clone()),
            pid,
            log,
        });
    }
    Ok(())
}

/// Waits until every agent answers /healthz with 200 from inside its node.
fn wait_agents(plan: &LabPlan, record: &LabState) -> Result<()> {
    for node in &plan.nodes {
        let daemon = record
            .daemons
            .iter()
            .find(|d| d.role == "agent" && d.node.as_deref() == Some(&node.name))
            .context("agent not recorded")?;
        let healthy = host::wait_for(STEP_TIMEOUT, || {
            if !host::alive(daemon.pid) {
                return Some(false);
            }
            let answer = host::http_get_in(&node.netns, node.agent_health(), "/healthz");
            matches!(answer, Ok((200, _))).then_some(true)
        });
        match healthy {
            Some(true) => {}
            Some(false) => bail!(
                "the agent on {} exited; its log ({}):\n{}",
                node.name,
                daemon.log.display(),
                host::log_tail(&daemon.log, 20)
            ),
            None => bail!(
                "the agent on {} is not healthy after {STEP_TIMEOUT:?}; its log ({}):\n{}",
                node.name,
                daemon.log.display(),
                host::log_tail(&daemon.log, 20)
            ),
        }
    }
    Ok(())
}

fn print_ready(plan: &LabPlan, took: Duration) {
    let kubeconfig = plan.kubeconfig();
    let kubeconfig = fs::canonicalize(&kubeconfig).unwrap_or(kubeconfig);
    println!();
    println!(
        "lab {:?} is ready in {:.1} s. Point kubectl at it:",
        plan.spec.name,
        took.as_secs_f64()
    );
    println!();
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!();
    println!("Then try:");
    println!("  kubectl get nodes -o wide");
    println!("  kubectl create deployment web --image=nginx --replicas=3");
    println!("  kubectl expose deployment web --port=80");
    println!(
        "  kubectl run client --rm -i --restart=Never --image=busybox -- wget -qO- http://web"
    );
    let weir =
        std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "weir".into());
    let name = &plan.spec.name;
    let at = if *name == "weir" { String::new() } else { format!(" --name {name}") };
    println!("  {weir} lab status{at}   # nodes, pods, services, agents");
    println!("  {weir} lab down{at}     # removes everything the lab made");
    println!("The tutorial: docs/lab.md");
}
