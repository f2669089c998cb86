//! `weir inspect services`: the live service maps as a table or JSON, read from the pins.
use std::path::PathBuf;

use anyhow::Context;
use weir_proxy::{agent::config::DEFAULT_PIN_DIR, inspect, maps::ServiceMaps};

#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Service frontends, their backends in slot order, and what happens when they have none.
    Services {
        /// The agent's pin directory.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let What::Services { pin_dir, output } = args.what;
    let maps = ServiceMaps::open_pinned(&pin_dir).with_context(|| {
        format!("no weir datapath pinned in {} (is the agent running here?)", pin_dir.display())
    })?;
    let rows = inspect::all_service_rows(&maps);
    match output {
        Output::Table => println!("{}", inspect::service_table(&rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
    }
    Ok(())
}
