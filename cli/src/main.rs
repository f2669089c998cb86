//! `weir`: the single binary users run. Subcommands arrive with their issues (agent, apiserver,
//! lab, inspect); each is a thin adapter over a library crate.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod agent;
mod dns;
mod flows;
mod inspect;
mod lab;
mod node;
mod policy;

#[derive(Parser)]
#[command(name = "weir", version, about = "Kubernetes networking data plane in Rust and eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version and the size of the embedded eBPF object.
    Version,
    /// Run the embedded Kubernetes-compatible API server (HTTPS, bearer tokens).
    Apiserver(ApiserverArgs),
    /// Run the node agent: kube-proxy replacement (eBPF service load balancing).
    Agent(agent::AgentArgs),
    /// Show what the live datapath holds (read from the agent's pinned maps).
    Inspect(inspect::InspectArgs),
    /// A multi-node cluster of network namespaces on this machine: up, down, status.
    Lab(lab::LabArgs),
    /// Run the cluster DNS server (kube-dns): Service, endpoint and Pod records.
    Dns(dns::DnsArgs),
    /// Run the lab's node runtime (plays kubelet inside a node network namespace).
    Node(node::NodeArgs),
    /// Built-in stand-ins for container images (exec'd by `weir node`).
    #[command(hide = true)]
    Builtin(node::BuiltinArgs),
    /// NetworkPolicy tools: `weir policy trace`.
    Policy(policy::PolicyArgs),
    /// Stream NetworkPolicy decisions (drops and new allowed flows) from the agents.
    Flows(flows::FlowsArgs),
}

#[derive(clap::Args)]
struct ApiserverArgs {
    /// Where the store, the generated CA and certificates and the tokens live.
    #[arg(long)]
    data_dir: PathBuf,
    /// Where to write an admin kubeconfig (rewritten on every start).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// HTTPS address; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Plain HTTP for debugging; loopback addresses only. Still needs a bearer token.
    #[arg(long)]
    insecure_listen: Option<SocketAddr>,
    /// CIDR that Service ClusterIPs are allocated from (IPv4 /8-/30 or IPv6 /64-/126), or an
    /// IPv4,IPv6 pair for dual-stack Services (the primary family first).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// Changes kept for watches to resume from; a watch from an older resourceVersion gets
    /// 410 Gone and must list again.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// CIDR that Node pod CIDRs are allocated from, or an IPv4,IPv6 pair for dual-stack
    /// (each Node then gets one subnet of each).
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Mask size of each Node's IPv4 pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size_ipv4: u8,
    /// Mask size of each Node's IPv6 pod CIDR.
    #[arg(long, default_value_t = 64)]
    node_cidr_mask_size_ipv6: u8,
    /// Do not run the in-process controllers (pod CIDRs, scheduler, EndpointSlices).
    #[arg(long)]
    disable_controllers: bool,
    /// Concurrent non-watch requests served; more get 429 (kube-apiserver's
    /// --max-requests-inflight).
    #[arg(long, default_value_t = 400)]
    max_requests_inflight: usize,
    /// Node names (comma-separated) that get an agent token and a kubeconfig in
    /// <data-dir>/nodes/NAME.kubeconfig.
    #[arg(long, value_delimiter = ',')]
    node_tokens: Vec<String>,
    /// Keep objects in this etcd (http://IP:PORT) instead of the embedded store in the data
    /// dir.
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// Also serve HTTPS inside another network namespace: NAMESPACE_FILE=IP:PORT, e.g.
    /// /run/netns/lab-underlay=10.0.0.1:6443 (repeatable). Each IP goes into the serving
    /// certificate.
    #[arg(long, value_parser = weir_controlplane::netns::parse_netns_listen)]
    netns_listen: Vec<(PathBuf, SocketAddr)>,
    /// Reach the nodes' kubelet endpoints (logs, exec, attach) from inside this network
    /// namespace (a /run/netns file), e.g. the underlay of `weir lab`.
    #[arg(long)]
    node_netns: Option<PathBuf>,
}

/// Exit code for configuration errors (EX_USAGE), before anything was started.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            // What went wrong and its causes, never a backtrace.
            eprintln!("weir: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!(
                "weir {} (eBPF object: {} bytes)",
                env!("CARGO_PKG_VERSION"),
                weir_proxy::programs::OBJECT.len()
            );
        }
        Command::Apiserver(args) => return apiserver(args),
        Command::Agent(args) => return agent::run(args),
        Command::Inspect(args) => inspect::run(args)?,
        Command::Lab(args) => return lab::run(args),
        Command::Dns(args) => return dns::run(args),
        Command::Node(args) => return node::run(args),
        Command::Builtin(args) => return node::builtin(args),
        Command::Policy(args) => return policy::run(args),
        Command::Flows(args) => return flows::run(args),
    }
    Ok(ExitCode::SUCCESS)
}

fn apiserver(args: ApiserverArgs) -> anyhow::Result<ExitCode> {
    use weir_controlplane::api::{self, ServerError};
    let mut config = api::Config::new(args.data_dir);
    config.listen = args.listen;
    config.insecure_listen = args.insecure_listen;
    config.kubeconfig_out = args.kubeconfig_out;
    config.service_cidr = args.service_cidr;
    config.watch_history = args.watch_history;
    config.cluster_cidr = Some(args.cluster_cidr);
    config.node_cidr_mask_size_ipv4 = args.node_cidr_mask_size_ipv4;
    config.node_cidr_mask_size_ipv6 = args.node_cidr_mask_size_ipv6;
    config.controllers = !args.disable_controllers;
    config.node_tokens = args.node_tokens;
    config.max_in_flight = args.max_requests_inflight.max(1);
    config.netns_listen = args.netns_listen;
    config.node_netns = args.node_netns;
    let etcd = args.etcd_endpoints;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let started = match &etcd {
            Some(endpoint) => api::start_with_etcd(config, endpoint).await,
            None => api::start(config).await,
        };
        let server = match started {
            Ok(server) => server,
            Err(
                err @ (ServerError::InsecureNotLoopback(_)
                | ServerError::BadServiceCidr(_)
                | ServerError::BadClusterCidr(_)
                | ServerError::NetnsListen { .. }),
            ) => {
                eprintln!("weir apiserver: {err}");
                return Ok(ExitCode::from(EXIT_BAD_CONFIG));
            }
            Err(err) => return Err(anyhow::Error::new(err).context("starting the API server")),
        };
        // Tests and scripts read these lines to find the chosen ports.
        println!("weir apiserver: serving https://{}", server.addr);
        if let Some(addr) = server.insecure_addr {
            println!("weir apiserver: serving insecure http://{addr}");
        }
        for (netns, addr) in &server.netns_addrs {
            println!("weir apiserver: in {} serving https://{addr}", netns.display());
        }
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        log::info!("weir apiserver: shutting down");
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
