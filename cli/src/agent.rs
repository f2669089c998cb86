//! `weir agent`: flags -> [`AgentConfig`], validated before anything starts (exit 64 on bad
//! configuration), then the agent's loop on a tokio runtime.
use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use weir_proxy::{
    agent::{
        self, AgentError, config as defaults,
        config::{AgentConfig, Dataplane},
        policy::{DenyUnknown, PolicyConfig},
    },
    programs::MapSizes,
    routing::{self, RoutingConfig, model::IpCidr, model::Overlay},
};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// kubeconfig of the API server; without it, the in-cluster service account is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object).
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
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
    /// How pod CIDRs of other nodes are reached: vxlan (device weir.vxlan, VNI 1, UDP 8472),
    /// native (a route via each node's address; nodes on one L2 segment), or none.
    #[arg(long, default_value = "none")]
    overlay: Overlay,
    /// The pod network of the whole cluster (e.g. 10.244.0.0/16), or an IPv4,IPv6 pair for
    /// dual stack (10.244.0.0/16,fd00:10:244::/56); needed for --masquerade.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<IpCidr>,
    /// SNAT pod traffic from --cluster-cidr to outside it to the node's address (per family).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    masquerade: bool,
    /// nftables table (family ip, and ip6 for an IPv6 cluster CIDR) of the masquerade rules.
    #[arg(long, default_value = routing::DEFAULT_NAT_TABLE)]
    nft_table_nat: String,
    /// Interface node-to-node traffic leaves by (default: the one holding the node's address).
    #[arg(long)]
    overlay_uplink: Option<String>,
    /// Write this node's pod CIDR and pod MTU here for weir-cni (e.g. /run/weir/node-state.json).
    #[arg(long)]
    node_state_file: Option<PathBuf>,
    /// Seconds between repairing resyncs of routes, neighbours and VXLAN entries.
    #[arg(long, default_value_t = routing::DEFAULT_RESYNC.as_secs())]
    routing_resync_seconds: u64,
    /// eBPF host routing (eBPF dataplane): pod-to-pod traffic between nodes is forwarded by
    /// weir's programs past the node's IP stack and netfilter; false leaves it to the kernel.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    bpf_host_routing: bool,
    /// Remove weir.vxlan, weir's routes (proto 87) and the masquerade table, then exit.
    #[arg(long)]
    cleanup: bool,
    /// The datapath to program: eBPF, or kube-proxy-style nftables rules in this network
    /// namespace (for kernels without the eBPF features).
    #[arg(long, value_enum, default_value_t = DataplaneArg::Ebpf)]
    dataplane: DataplaneArg,
    /// nftables table (family inet) of the nftables dataplane.
    #[arg(long, default_value = defaults::DEFAULT_NFT_TABLE)]
    nft_table: String,
    /// nftables table (family inet) of NetworkPolicy with the nftables dataplane.
    #[arg(long, default_value = weir_proxy::policy::nft::DEFAULT_TABLE)]
    nft_policy_table: String,
    /// Delete the nftables tables on a clean exit (by default they stay and keep serving).
    #[arg(long)]
    nft_remove_on_exit: bool,
    /// Enforce NetworkPolicy on this node's pods (false: the policy maps are emptied and
    /// everything passes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// Drop packets of a local pod whose policy is not written yet: auto (while at least one
    /// NetworkPolicy exists), always, or never. The node may always reach its pods.
    #[arg(long, value_enum, default_value_t = DenyUnknownArg::Auto)]
    policy_deny_unknown: DenyUnknownArg,
    /// Unix socket `weir flows` connects to (policy flow events of the eBPF datapath).
    #[arg(long, default_value = weir_proxy::policy::flows::DEFAULT_FLOWS_SOCKET)]
    flows_socket: PathBuf,
    /// Entries of the eBPF service, backend and reverse-NAT maps (each family). A service port
    /// takes one service entry plus one per endpoint: the default holds about 13,000 services
    /// of 4 endpoints. Applies when the maps are created; pinned maps keep their size.
    #[arg(long, default_value_t = MapSizes::default().services)]
    bpf_lb_map_max: u32,
    /// Entries of the per-packet path's conntrack map (each family; LRU: the oldest flows make
    /// room when it is full).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    bpf_ct_map_max: u32,
    /// Entries of the socket load balancer's reverse map (socket and backend -> service; LRU),
    /// which getpeername() and UDP replies read.
    #[arg(long, default_value_t = MapSizes::default().socket_rev_nat)]
    bpf_sock_rev_map_max: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DenyUnknownArg {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DataplaneArg {
    Ebpf,
    Nftables,
}

/// Exit code for configuration errors (EX_USAGE), before anything was started.
const EXIT_BAD_CONFIG: u8 = 64;

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.cleanup {
        return match routing::cleanup(&args.nft_table_nat) {
            Ok(what) => {
                println!("weir agent: cleanup: {what}");
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => Err(anyhow::anyhow!("weir agent --cleanup: {err}")),
        };
    }
    let config = AgentConfig {
        kubeconfig: args.kubeconfig,
        node_name: args.node_name.unwrap_or_default(),
        node_addresses: args.node_addresses,
        pin_dir: args.pin_dir,
        cgroup: args.cgroup,
        uplinks: args.uplinks,
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
        health_timeout: Duration::from_secs(args.health_timeout_seconds),
        forward_ebpf_logs: args.forward_ebpf_logs,
        routing: RoutingConfig {
            overlay: args.overlay,
            cluster_cidrs: args.cluster_cidr,
            masquerade: args.masquerade,
            nat_table: args.nft_table_nat,
            uplink: args.overlay_uplink,
            node_state_file: args.node_state_file,
            resync: Duration::from_secs(args.routing_resync_seconds.max(1)),
            ebpf_host_routing: args.bpf_host_routing,
        },
        dataplane: match args.dataplane {
            DataplaneArg::Ebpf => Dataplane::Ebpf,
            DataplaneArg::Nftables => Dataplane::Nftables,
        },
        nft_table: args.nft_table,
        nft_policy_table: args.nft_policy_table,
        nft_remove_on_exit: args.nft_remove_on_exit,
        policy: PolicyConfig {
            enabled: args.network_policy,
            deny_unknown: match args.policy_deny_unknown {
                DenyUnknownArg::Auto => DenyUnknown::Auto,
                DenyUnknownArg::Always => DenyUnknown::Always,
                DenyUnknownArg::Never => DenyUnknown::Never,
            },
        },
        flows_socket: args.flows_socket,
        map_sizes: MapSizes {
            services: args.bpf_lb_map_max,
            backends: args.bpf_lb_map_max,
            rev_nat: args.bpf_lb_map_max,
            conntrack: args.bpf_ct_map_max,
            socket_rev_nat: args.bpf_sock_rev_map_max,
        },
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
