//! `weir node` (the lab's node runtime) and the hidden `weir builtin web` / `weir builtin
//! agnhost` it execs for nginx/httpd and agnhost images: flags -> [`weir_node::Config`],
//! validated before anything starts (exit 64).
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

#[derive(clap::Args)]
pub struct NodeArgs {
    /// kubeconfig of the API server (HTTPS, CA in the file).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// This node's name (its Node object; pods with spec.nodeName = NAME run here).
    #[arg(long)]
    node_name: String,
    /// The node's address (Node InternalIP, pods' hostIP); `IPv4,IPv6` for a dual-stack node
    /// (the first is the primary), as kubelet's `--node-ip`.
    #[arg(long, value_delimiter = ',', required = true)]
    node_ip: Vec<IpAddr>,
    /// Kubelet API listener (plain HTTP); default <node-ip>:10250.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the runtime records pods, logs and sandboxes.
    #[arg(long)]
    state_dir: PathBuf,
    /// CNI plugin binaries.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// CNI configs (the first *.conflist by name is used).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// cgroup v2 directory; each pod gets <cgroup>/<pod uid>.
    #[arg(long)]
    cgroup: PathBuf,
    /// Prefix of every pod network namespace (/run/netns/<prefix><uid12>).
    #[arg(long)]
    netns_prefix: String,
    /// Nameserver of ClusterFirst pods.
    #[arg(long, default_value = "10.96.0.10")]
    cluster_dns: String,
    /// Cluster domain for the search path.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

#[derive(clap::Args)]
pub struct BuiltinArgs {
    #[command(subcommand)]
    command: Builtin,
}

#[derive(clap::Subcommand)]
enum Builtin {
    /// The built-in web server of nginx/httpd images.
    Web {
        /// Port to serve (repeatable).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        namespace: String,
    },
    /// The lab's agnhost (serve-hostname, connect, pause), with upstream's Go-style flags.
    Agnhost {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

const EXIT_BAD_CONFIG: u8 = 64;

pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let config = weir_node::Config {
        listen: args.listen.unwrap_or(SocketAddr::new(
            args.node_ip.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            10250,
        )),
        kubeconfig: args.kubeconfig,
        node_name: args.node_name,
        node_ips: args.node_ip,
        state_dir: args.state_dir,
        cni_bin_dir: args.cni_bin_dir,
        cni_conf_dir: args.cni_conf_dir,
        cgroup: args.cgroup,
        netns_prefix: args.netns_prefix,
        cluster_dns: args.cluster_dns,
        cluster_domain: args.cluster_domain,
        weir_binary: std::env::current_exe()?,
    };
    if let Err(err) = config.validate() {
        eprintln!("weir node: {err}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(weir_node::run(config))?;
    Ok(ExitCode::SUCCESS)
}

pub fn builtin(args: BuiltinArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Builtin::Web { ports, pod, namespace } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            runtime.block_on(weir_node::web::serve(&ports, pod, namespace))?;
        }
        Builtin::Agnhost { args } => return Ok(weir_node::agnhost::main(&args)),
    }
    Ok(ExitCode::SUCCESS)
}
