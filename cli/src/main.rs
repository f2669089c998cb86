//! `weir`: the single binary users run. Subcommands arrive with their issues (agent, apiserver,
//! lab, inspect); each is a thin adapter over a library crate.
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Version => {
            println!(
                "weir {} (eBPF object: {} bytes)",
                env!("CARGO_PKG_VERSION"),
                weir_proxy::programs::OBJECT.len()
            );
        }
    }
    Ok(())
}
