//! `weir dns`: flags -> [`DnsConfig`], validated before any socket is bound (exit 64 on bad
//! configuration), then the DNS server on a tokio runtime.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use weir_dns::{
    DnsError,
    config::{self, DnsConfig},
};

#[derive(clap::Args)]
pub struct DnsArgs {
    /// kubeconfig of the API server; without it the configuration is inferred ($KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// UDP and TCP address to answer on; port 0 picks one free port for both (printed).
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The cluster domain the records are served under.
    #[arg(long, default_value = config::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Server for names outside the cluster domain, IP or IP:PORT (repeatable, tried in
    /// order). Without one such names are REFUSED.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<SocketAddr>,
}

fn parse_upstream(value: &str) -> Result<SocketAddr, String> {
    config::parse_upstream(value).map_err(|e| e.to_string())
}

/// Exit code for configuration errors (EX_USAGE), before anything was started.
const EXIT_BAD_CONFIG: u8 = 64;

pub fn run(args: DnsArgs) -> anyhow::Result<ExitCode> {
    let config = DnsConfig {
        kubeconfig: args.kubeconfig,
        listen: args.listen,
        cluster_domain: args.cluster_domain,
        upstreams: args.upstreams,
    };
    if let Err(err) = config.validate() {
        eprintln!("weir dns: {err}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match runtime.block_on(weir_dns::run(config)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err @ (DnsError::Config(_) | DnsError::Kubeconfig { .. } | DnsError::Infer(_))) => {
            eprintln!("weir dns: {:#}", anyhow::Error::new(err));
            Ok(ExitCode::from(EXIT_BAD_CONFIG))
        }
        Err(err) => Err(anyhow::Error::new(err).context("weir dns")),
    }
}
