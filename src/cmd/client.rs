//! `fedtune client`: one client of a course alone in this process, over
//! NATS. It loads only its own part of the data; with FedOT only the
//! tokenizer, its model coming from the server.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Args;
use fedtune_adapters::course::process::client_process;
use fedtune_adapters::course::CourseFile;
use fedtune_adapters::progress::Observer;
use fedtune_kernel::course::client_worker;
use fedtune_kernel::worker::StopReason;
use fedtune_kernel::Party;

use super::nats::{connect, run_guarded, runtime};
use crate::display::Display;

/// Arguments of `fedtune client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The course configuration (TOML), the same file the server uses.
    config: PathBuf,
    /// The NATS server, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    nats: String,
    /// This client's id, 1..=federate.clients.
    #[arg(long)]
    id: u32,
    /// This client's credentials file; default $FEDTUNE_NATS_CREDS.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Override a config value (repeatable); the server needs the same overrides.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Keep what this client holds between rounds (AdamW's moments with
    /// train.keep_optimizer_state, pFL personal adapters, hook script state)
    /// in DIR/client-ID, so a restarted client trains on exactly as if it had
    /// never stopped. Without it a restarted client starts those afresh.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// `fedtune client`.
pub fn client(args: ClientArgs) -> Result<()> {
    let course = CourseFile::load(&args.config, &args.set)?;
    let cfg = &course.cfg;
    let id = args.id;
    let display = Display::new(args.quiet)
        .timed()
        .prefixed(format!("client {id}: "));
    let say = |line: &str| display.say(line);
    let trainer = client_process(&course, args.data_root.as_deref(), id, &say)?;
    say(&format!(
        "joining course `{}` at {}",
        cfg.course.name, args.nats
    ));
    let outcome = runtime()?.block_on(async {
        let c = connect(
            &args.nats,
            &course,
            Party::Client(id),
            args.creds.as_deref(),
        )
        .await?;
        let mut worker = client_worker(id, cfg, trainer, c.transport);
        if let Some(dir) = &args.state_dir {
            worker
                .state_mut()
                .keep_state_in(dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        run_guarded(worker, c.refusals).await
    })?;
    ensure!(
        outcome.reason == StopReason::Finished,
        "client {id} stopped before the course finished ({:?})",
        outcome.reason
    );
    say(&format!(
        "course finished; trained in rounds {:?}, {:.1} KB sent, {:.1} KB received",
        outcome.state.rounds_trained(),
        outcome.stats.bytes_out as f64 / 1e3,
        outcome.stats.bytes_in as f64 / 1e3
    ));
    Ok(())
}
