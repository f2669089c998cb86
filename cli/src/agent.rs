//! `weir agent`: flags -> [`AgentConfig`], validated before anything starts (exit 64 on bad
//! configuration), then the agent's loop on a tokio runtime.
use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use weir_proxy::agent::{
    self, AgentError, config as defaults,
    config::{AgentConfig, Dataplane},
};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// kubeconfig of the API server; without it, the in-cluster service account is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// An address node ports are served on (repeatable), besides the Node object's addresses.
    #[arg(long = "node-address")]
    node_addresses: Vec<IpAddr>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = defaults::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// cgroup v2 directory for the socket load balancer (default: the cgroup2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// An interface traffic from outside the node arrives on (repeatable): node ports,
    /// load-balancer IPs and external IPs are balanced there, per packet.
    #[arg(long = "uplink")]
    uplinks: Vec<String>,
    /// /healthz listener (kube-proxy's port by default; port 0 picks one and prints it).
    #[arg(long, default_value = defaults::DEFAULT_HEALTH_LISTEN)]
    health_listen: std::net::SocketAddr,
    /// /metrics listener.
    #[arg(long, default_value = defaults::DEFAULT_METRICS_LISTEN)]
    metrics_listen: std::net::SocketAddr,
    /// Seconds a change may stay unapplied before /healthz answers 503.
    #[arg(long, default_value_t = defaults::DEFAULT_HEALTH_TIMEOUT.as_secs())]
    health_timeout_seconds: u64,
    /// Forward the eBPF programs' debug logs to this log (costs cycles per packet).
    #[arg(long)]
    forward_ebpf_logs: bool,
    /// The datapath to program: eBPF, or kube-proxy-style nftables rules in this network
    /// namespace (for kernels without the eBPF features).
    #[arg(long, value_enum, default_value_t = DataplaneArg::Ebpf)]
    dataplane: DataplaneArg,
    /// nftables table (family inet) of the nftables dataplane.
    #[arg(long, default_value = defaults::DEFAULT_NFT_TABLE)]
    nft_table: String,
    /// Delete the nftables table on a clean exit (by default it stays and keeps serving).
    #[arg(long)]
    nft_remove_on_exit: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DataplaneArg {
    Ebpf,
    Nftables,
}

/// Exit code for configuration errors (EX_USAGE), before anything was started.
const EXIT_BAD_CONFIG: u8 = 64;

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = AgentConfig {
        kubeconfig: args.kubeconfig,
        node_name: args.node_name,
        node_addresses: args.node_addresses,
        pin_dir: args.pin_dir,
        cgroup: args.cgroup,
        uplinks: args.uplinks,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
        health_timeout: Duration::from_secs(args.health_timeout_seconds),
        forward_ebpf_logs: args.forward_ebpf_logs,
        dataplane: match args.dataplane {
            DataplaneArg::Ebpf => Dataplane::Ebpf,
            DataplaneArg::Nftables => Dataplane::Nftables,
        },
        nft_table: args.nft_table,
        nft_remove_on_exit: args.nft_remove_on_exit,
    };
    if let Err(err) = config.validate() {
        eprintln!("weir agent: {err}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match runtime.block_on(agent::run(config)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err @ AgentError::Config(_)) => {
            eprintln!("weir agent: {err}");
            Ok(ExitCode::from(EXIT_BAD_CONFIG))
        }
        Err(err) => Err(anyhow::Error::new(err).context("weir agent")),
    }
}
