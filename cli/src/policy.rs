//! `weir policy trace`: would a connection be allowed, and which NetworkPolicy rule decides.
//! Computed from the API's objects with the same compiler the agent programs the maps from.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use weir_policy::{Compiler, Endpoint, ObjectRef, Protocol, trace};

#[derive(clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Print the verdict for a new connection and the rule that decides it. Exit status: 0
    /// allowed, 3 denied, 64 bad arguments (unknown pod included), 1 other failures.
    Trace {
        /// kubeconfig of the cluster (default: the in-cluster service account).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Source pod, NAMESPACE/POD.
        #[arg(long)]
        from: String,
        /// Destination pod (NAMESPACE/POD) or IP address.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long)]
        port: u16,
        /// tcp, udp or sctp.
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
}

fn endpoint(text: &str, flag: &str) -> anyhow::Result<Endpoint> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Endpoint::Ip(ip));
    }
    match text.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
            Ok(Endpoint::Pod(ObjectRef::new(ns, pod)))
        }
        _ => bail!("{flag} {text:?}: write NAMESPACE/POD (or an IP address for --to)"),
    }
}

/// Exit status for a denied connection.
const DENIED: u8 = 3;
/// Exit status for bad arguments (sysexits' EX_USAGE).
const USAGE: u8 = 64;

fn usage(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("weir: error: {err}");
    ExitCode::from(USAGE)
}

pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let What::Trace { kubeconfig, from, to, port, proto } = args.what;
    let parsed = (|| -> anyhow::Result<_> {
        let from = endpoint(&from, "--from")?;
        let to = endpoint(&to, "--to")?;
        let protocol = Protocol::from_k8s(Some(&proto.to_ascii_uppercase()))
            .with_context(|| format!("--proto {proto:?}: use tcp, udp or sctp"))?;
        if port == 0 {
            bail!("--port 0: give a port from 1 to 65535");
        }
        Ok((from, to, protocol))
    })();
    let (from, to, protocol) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => return Ok(usage(format!("{err:#}"))),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cluster = runtime.block_on(async {
        let client = weir_proxy::agent::kube_client(kubeconfig.as_deref()).await?;
        weir_proxy::policy::source::list_cluster(&client)
            .await
            .context("listing namespaces, pods, network policies and nodes")
    })?;
    for problem in &cluster.problems {
        eprintln!("weir: warning: {problem}");
    }
    let compiled = Compiler::default().compile(&cluster, None);
    let verdict = match trace(&compiled, &from, &to, protocol, port) {
        Ok(verdict) => verdict,
        Err(err) => return Ok(usage(err)),
    };
    println!("{from} -> {to} {protocol}/{port}");
    println!("{verdict}");
    Ok(if verdict.allowed { ExitCode::SUCCESS } else { ExitCode::from(DENIED) })
}
