//! `weir flows`: streams the NetworkPolicy decisions of one node's agent (its flow socket) or
//! of every node of a lab, as text lines or JSON records.
use std::{path::PathBuf, process::ExitCode, sync::mpsc};

use anyhow::{Context, bail};
use weir_proxy::policy::flows::{
    DEFAULT_FLOWS_SOCKET, FlowClient, FlowClientError, FlowMessage, FlowRequest, FlowVerdict,
};

#[derive(clap::Args)]
pub struct FlowsArgs {
    /// The agent's flow socket (its --flows-socket).
    #[arg(long, default_value = DEFAULT_FLOWS_SOCKET, conflicts_with = "lab")]
    socket: PathBuf,
    /// Merge the streams of every node of this lab (`weir lab up --name NAME`).
    #[arg(long)]
    lab: Option<String>,
    /// The lab's state directory [default: /var/lib/weir/lab/NAME].
    #[arg(long, requires = "lab")]
    state_dir: Option<PathBuf>,
    /// Only flows from or to this pod, NAMESPACE/POD.
    #[arg(long)]
    pod: Option<String>,
    /// Only allowed or only dropped flows.
    #[arg(long)]
    verdict: Option<FlowVerdict>,
    /// text (one line per flow) or json (one record per line).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Exit after this many flows (default: stream until interrupted).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Exit status for bad arguments (EX_USAGE).
const USAGE: u8 = 64;

pub fn run(args: FlowsArgs) -> anyhow::Result<ExitCode> {
    let request = FlowRequest { pod: args.pod.clone(), verdict: args.verdict };
    if let Err(why) = request.validate() {
        eprintln!("weir: error: --pod: {why}");
        return Ok(ExitCode::from(USAGE));
    }
    let sockets: Vec<(Option<String>, PathBuf)> = match &args.lab {
        None => vec![(None, args.socket.clone())],
        Some(name) => {
            let Some(plan) = crate::lab::recorded_plan(name, args.state_dir.clone())? else {
                return Ok(ExitCode::from(USAGE));
            };
            plan.nodes.iter().map(|n| (Some(n.name.clone()), n.flows_socket())).collect()
        }
    };
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for (node, socket) in &sockets {
        match FlowClient::connect(socket, &request) {
            Ok(client) => clients.push((node.clone().or(client.node.clone()), client)),
            Err(err) => failures.push(err),
        }
    }
    if clients.is_empty() {
        let first = failures.into_iter().next().context("no flow socket to read")?;
        match (&args.lab, &first) {
            (Some(lab), FlowClientError::Connect { .. }) => bail!(
                "{first}\n(no agent of lab {lab:?} serves flows: is the lab up? `weir lab status \
                 --name {lab}`)"
            ),
            _ => return Err(first.into()),
        }
    }
    for failure in &failures {
        eprintln!("weir flows: warning: {failure}; showing the other nodes");
    }
    let merged = clients.len() > 1;
    let (tx, rx) = mpsc::channel();
    for (node, mut client) in clients {
        let tx = tx.clone();
        std::thread::spawn(move || {
            loop {
                let message = client.next_message();
                let end = message.is_err();
                if tx.send((node.clone(), message)).is_err() || end {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut shown = 0u64;
    let mut open = sockets.len() - failures.len();
    while args.count.is_none_or(|count| shown < count) {
        let Ok((node, message)) = rx.recv() else { break };
        match message {
            Ok(FlowMessage::Flow(record)) => {
                shown += 1;
                match args.output {
                    Output::Json => println!("{}", serde_json::to_string(&record)?),
                    Output::Text if merged => {
                        println!("{} {}", node.as_deref().unwrap_or("?"), record.to_text())
                    }
                    Output::Text => println!("{}", record.to_text()),
                }
            }
            Ok(FlowMessage::Lost { records }) => eprintln!(
                "weir flows: {} lost {records} records (this client read too slowly)",
                node.as_deref().unwrap_or("the agent")
            ),
            Ok(FlowMessage::Ready { .. }) => {}
            Ok(FlowMessage::Error { message }) => bail!("the agent stopped the stream: {message}"),
            Err(err) => {
                eprintln!("weir flows: {err}");
                open -= 1;
                if open == 0 {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
