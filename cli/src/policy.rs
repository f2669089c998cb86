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
        /// Also evaluate the packet against the nodes' policy datapath (the destination pod's
        /// node for ingress, the source pod's node for egress): the pinned eBPF maps, or the
        /// nftables policy table. Report whether it agrees with the model. Needs --pin-dir or
        /// --nft-table (with --node), or --lab. Exit status 4 when they disagree.
        #[arg(long)]
        live: bool,
        /// The pin directory of the node whose maps to read (`weir agent --pin-dir`).
        #[arg(long, requires = "live", conflicts_with_all = ["lab", "nft_table"])]
        pin_dir: Option<PathBuf>,
        /// The nftables policy table of this node's network namespace to read (`weir agent
        /// --dataplane nftables --nft-policy-table`, default weir_policy).
        #[arg(long, requires = "live", conflicts_with = "lab", num_args = 0..=1,
              default_missing_value = weir_proxy::policy::nft::DEFAULT_TABLE)]
        nft_table: Option<String>,
        /// The node whose maps --pin-dir holds, or whose table --nft-table is.
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// Read the maps of every node of this lab (and its kubeconfig unless --kubeconfig
        /// or KUBECONFIG is given).
        #[arg(long, requires = "live")]
        lab: Option<String>,
        /// The lab's state directory [default: /var/lib/weir/lab/NAME].
        #[arg(long, requires = "lab")]
        state_dir: Option<PathBuf>,
    },
}

/// One node's policy datapath.
enum LiveSource {
    /// The eBPF maps pinned in this directory.
    Pinned(PathBuf),
    /// An nftables policy table, in this network namespace (`None`: this process's).
    Nft { netns: Option<String>, table: String },
}

impl std::fmt::Display for LiveSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveSource::Pinned(dir) => write!(f, "{}", dir.display()),
            LiveSource::Nft { netns: None, table } => write!(f, "nftables table inet {table}"),
            LiveSource::Nft { netns: Some(ns), table } => {
                write!(f, "nftables table inet {table} in namespace {ns}")
            }
        }
    }
}

/// Where the live datapath of each node is.
enum LiveMaps {
    /// One node's.
    Node { node: String, source: LiveSource },
    /// Node name -> its datapath.
    Lab(Vec<(String, LiveSource)>),
}

impl LiveMaps {
    fn source(&self, node: &str) -> Result<&LiveSource, String> {
        match self {
            LiveMaps::Node { node: given, source } if given == node => Ok(source),
            LiveMaps::Node { node: given, source } => {
                Err(format!("the pod runs on node {node}; {source} is node {given}'s"))
            }
            LiveMaps::Lab(nodes) => nodes
                .iter()
                .find(|(name, _)| name == node)
                .map(|(_, source)| source)
                .ok_or_else(|| format!("node {node} is not a node of the lab")),
        }
    }
}

/// Exit status when the live maps disagree with the model.
const DISAGREES: u8 = 4;

/// Checks each enforced side against its node's maps; returns whether every checked side
/// agrees.
fn check_live(
    compiled: &weir_policy::Compiled,
    maps: &LiveMaps,
    from: &Endpoint,
    to: &Endpoint,
    verdict: &weir_policy::Verdict,
    protocol: Protocol,
    port: u16,
) -> bool {
    use weir_proxy::policy::live::{
        EGRESS as DIR_EGRESS, INGRESS as DIR_INGRESS, PinnedPolicyMaps, disagreement, evaluate,
    };

    // The family traced: that of an address given, else IPv4 when both pods have one.
    let has_v4 = |e: &Endpoint| match e {
        Endpoint::Ip(ip) => ip.is_ipv4(),
        Endpoint::Pod(pod) => {
            compiled.pods.get(pod).is_some_and(|p| p.ips.iter().any(|ip| ip.is_ipv4()))
        }
    };
    let ipv6 = match (from, to) {
        (Endpoint::Ip(ip), _) | (_, Endpoint::Ip(ip)) => ip.is_ipv6(),
        _ => !(has_v4(from) && has_v4(to)),
    };
    // (pod, address of the family, node) of a partner.
    let locate = |e: &Endpoint| -> (Option<weir_policy::PodRef>, Option<IpAddr>, Option<String>) {
        let pod = match e {
            Endpoint::Pod(pod) => Some(pod.clone()),
            Endpoint::Ip(ip) => compiled.pod_ips.get(ip).cloned(),
        };
        let entry = pod.as_ref().and_then(|p| compiled.pods.get(p));
        let ip = match e {
            Endpoint::Ip(ip) => Some(*ip),
            Endpoint::Pod(_) => {
                entry.and_then(|p| p.ips.iter().find(|ip| ip.is_ipv6() == ipv6).copied())
            }
        };
        (pod, ip, entry.and_then(|p| p.node.clone()))
    };
    let (src, dst) = (locate(from), locate(to));
    println!("live maps:");
    let mut all_agree = true;
    for (what, direction, model, (pod, endpoint, node), peer) in [
        ("egress of the source", DIR_EGRESS, &verdict.egress, &src, dst.1),
        ("ingress of the destination", DIR_INGRESS, &verdict.ingress, &dst, src.1),
    ] {
        let checked = (|| -> Result<String, String> {
            if matches!(model, weir_policy::Side::NotEnforced) {
                return Err("not checked: the model enforces nothing on this side".into());
            }
            let (Some(pod), Some(node)) = (pod, node) else {
                return Err("not checked: not a pod scheduled on a node".into());
            };
            let (Some(endpoint), Some(peer)) = (endpoint, peer) else {
                let family = if ipv6 { "IPv6" } else { "IPv4" };
                return Err(format!("not checked: the partners have no {family} addresses both"));
            };
            let source = maps.source(node).map_err(|why| format!("not checked: {why}"))?;
            let where_ = format!("{pod} on node {node} ({source})");
            let (live, why) = match source {
                LiveSource::Pinned(pin_dir) => {
                    let opened = PinnedPolicyMaps::open(pin_dir)
                        .map_err(|err| format!("{where_}: cannot read the maps: {err:#}"))?;
                    let live =
                        evaluate(&opened, direction, *endpoint, peer, protocol.number(), port)
                            .map_err(|err| format!("{where_}: lookup failed: {err:#}"))?;
                    let why = disagreement(model, &live, *endpoint, peer, direction);
                    (live.to_string(), why)
                }
                LiveSource::Nft { netns, table } => {
                    use weir_proxy::policy::nft::live;
                    let read = || live::TableView::read(table);
                    let view = match netns {
                        None => read().map_err(anyhow::Error::from),
                        Some(ns) => weir_lab::host::in_netns(ns, read)
                            .and_then(|r| r.map_err(anyhow::Error::from)),
                    }
                    .map_err(|err| format!("{where_}: cannot read the table: {err:#}"))?;
                    let direction = if direction == DIR_EGRESS {
                        weir_policy::Direction::Egress
                    } else {
                        weir_policy::Direction::Ingress
                    };
                    let live =
                        live::evaluate(&view, direction, *endpoint, peer, protocol.number(), port);
                    let why = live::disagreement(model, &live, direction);
                    (live.to_string(), why)
                }
            };
            Ok(match why {
                None => format!("{where_}: agrees ({live})"),
                Some(why) => {
                    all_agree = false;
                    format!("{where_}: DISAGREES: {why}")
                }
            })
        })();
        match checked {
            Ok(line) | Err(line) => println!("  {what}: {line}"),
        }
    }
    all_agree
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
    let What::Trace {
        mut kubeconfig,
        from,
        to,
        port,
        proto,
        live,
        pin_dir,
        nft_table,
        node,
        lab,
        state_dir,
    } = args.what;
    let local = pin_dir
        .map(LiveSource::Pinned)
        .or(nft_table.map(|table| LiveSource::Nft { netns: None, table }));
    let live_maps = match (live, local, lab) {
        (false, ..) => None,
        (true, Some(source), None) => match node {
            Some(node) => Some(LiveMaps::Node { node, source }),
            None => {
                return Ok(usage(
                    "--pin-dir and --nft-table need --node NAME (the node whose datapath it is)",
                ));
            }
        },
        (true, None, Some(lab)) => {
            let Some(plan) = crate::lab::recorded_plan(&lab, state_dir)? else {
                return Ok(ExitCode::from(USAGE));
            };
            kubeconfig.get_or_insert_with(|| plan.kubeconfig());
            let nftables = plan.spec.dataplane == weir_lab::Dataplane::Nftables;
            Some(LiveMaps::Lab(
                plan.nodes
                    .iter()
                    .map(|n| {
                        let source = if nftables {
                            LiveSource::Nft {
                                netns: Some(n.netns.clone()),
                                table: weir_proxy::policy::nft::DEFAULT_TABLE.into(),
                            }
                        } else {
                            LiveSource::Pinned(n.pin_dir.clone())
                        };
                        (n.name.clone(), source)
                    })
                    .collect(),
            ))
        }
        (true, ..) => {
            return Ok(usage(
                "--live needs --pin-dir DIR or --nft-table [NAME] with --node NAME, or --lab NAME",
            ));
        }
    };
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
    if let Some(maps) = &live_maps
        && !check_live(&compiled, maps, &from, &to, &verdict, protocol, port)
    {
        return Ok(ExitCode::from(DISAGREES));
    }
    Ok(if verdict.allowed { ExitCode::SUCCESS } else { ExitCode::from(DENIED) })
}
