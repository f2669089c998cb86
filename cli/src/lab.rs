//! `weir lab up | down | status`: the CLI over the weir-lab crate.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Args, Subcommand};
use weir_lab::{Dataplane, IpFamily, LabSpec, Overlay, plan, up::Binaries};

#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    action: LabAction,
}

#[derive(Args)]
struct Where {
    /// The lab's name; every namespace, cgroup and pin of the lab carries it.
    #[arg(long, default_value = "weir")]
    name: String,
    /// Where the lab keeps its state, logs and kubeconfig [default: /var/lib/weir/lab/NAME].
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the lab and return once it is ready (it keeps running in the background).
    Up {
        #[command(flatten)]
        at: Where,
        /// Worker nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Service load balancing backend of the agents: ebpf or nftables.
        #[arg(long, default_value = "ebpf")]
        dataplane: Dataplane,
        /// Pod traffic between nodes: vxlan or native (routes over the underlay).
        #[arg(long, default_value = "vxlan")]
        overlay: Overlay,
        /// Address families of nodes, pods and Services: ipv4, or dual (IPv4 and IPv6, IPv4
        /// primary), as kind's ipFamily.
        #[arg(long, default_value = "ipv4")]
        ip_family: IpFamily,
        /// Directory holding weir-cni [default: next to this weir binary].
        #[arg(long)]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Remove every namespace, link, pin, cgroup, process and file of the lab.
    Down {
        #[command(flatten)]
        at: Where,
    },
    /// Show the lab's daemons, agents' health, nodes, pods and services.
    Status {
        #[command(flatten)]
        at: Where,
    },
}

/// Exit code for bad arguments (EX_USAGE).
const EXIT_BAD_ARGS: u8 = 64;

pub fn run(args: LabArgs) -> Result<ExitCode> {
    match args.action {
        LabAction::Up { at, nodes, dataplane, overlay, ip_family, cni_bin_dir } => {
            let spec = LabSpec { name: at.name.clone(), nodes, dataplane, overlay, ip_family };
            let Some(lab) = lab_plan(spec, at.state_dir, false)? else {
                return Ok(ExitCode::from(EXIT_BAD_ARGS));
            };
            weir_lab::up::up(&lab, &Binaries::find(cni_bin_dir)?)?;
        }
        LabAction::Down { at } => {
            let Some(lab) = lab_plan(default_spec(&at.name), at.state_dir, true)? else {
                return Ok(ExitCode::from(EXIT_BAD_ARGS));
            };
            let removed = weir_lab::down::down(&lab)?;
            println!(
                "lab {:?} removed ({} processes stopped, {} network namespaces deleted)",
                lab.spec.name, removed.processes, removed.namespaces
            );
        }
        LabAction::Status { at } => {
            let Some(lab) = lab_plan(default_spec(&at.name), at.state_dir, true)? else {
                return Ok(ExitCode::from(EXIT_BAD_ARGS));
            };
            print!("{}", weir_lab::status::status(&lab)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan of the running lab `name` (the spec it recorded); None (after saying why) when
/// the name is invalid.
pub(crate) fn recorded_plan(
    name: &str,
    state_dir: Option<PathBuf>,
) -> Result<Option<plan::LabPlan>> {
    lab_plan(default_spec(name), state_dir, true)
}

fn default_spec(name: &str) -> LabSpec {
    LabSpec {
        name: name.to_string(),
        nodes: 1,
        dataplane: Dataplane::Ebpf,
        overlay: Overlay::Vxlan,
        ip_family: IpFamily::Ipv4,
    }
}

/// The plan for `spec`; with `recorded`, the spec a running lab recorded wins (so `down` and
/// `status` see every node). None (after saying why) when the spec is invalid.
fn lab_plan(
    spec: LabSpec,
    state_dir: Option<PathBuf>,
    recorded: bool,
) -> Result<Option<plan::LabPlan>> {
    if let Err(why) = plan::validate(&spec) {
        eprintln!("weir lab: {why}");
        return Ok(None);
    }
    let state_dir = state_dir.unwrap_or_else(|| weir_lab::default_state_dir(&spec.name));
    let spec = match weir_lab::state::load(&state_dir)? {
        Some(state) if recorded => state.spec,
        _ => spec,
    };
    Ok(Some(plan::plan(&spec, &state_dir)))
}
