//! `fedtune server`: a course's server alone in this process, over NATS
//! (clients: `fedtune client`). It checkpoints every round and `--resume`
//! continues after the newest checkpoint, calling the roll so that running
//! clients rejoin.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use fedtune_adapters::course::process::{check_federated, server_process};
use fedtune_adapters::course::CourseFile;
use fedtune_adapters::progress::Observer;
use fedtune_kernel::course::{roll_call, server_worker_from};
use fedtune_kernel::Party;

use super::course_args::run_output;
use super::nats::{connect, run_guarded, runtime};
use crate::display::Display;

/// Arguments of `fedtune server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The course configuration (TOML), the same file every client uses.
    config: PathBuf,
    /// The NATS server, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    nats: String,
    /// The server's credentials file (from `fedtune broker config`); default $FEDTUNE_NATS_CREDS.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Override a config value (repeatable); clients need the same overrides.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Output directory (default: runs/<course>-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the course in --out DIR after its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Data root for public data (FedOT's emulator distillation); default
    /// $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Print only the final summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// Replace an earlier run in --out DIR (its files are deleted, nothing else).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// --out DIR was prepared by the `fedtune run` that started this process.
    #[arg(long, hide = true)]
    managed: bool,
}

/// `fedtune server`.
pub fn server(args: ServerArgs) -> Result<()> {
    let started = Instant::now();
    let course = CourseFile::load(&args.config, &args.set)?;
    check_federated(&course)?;
    let cfg = &course.cfg;
    let mut out = run_output(
        &course,
        args.out.as_deref(),
        (args.resume, args.overwrite),
        args.data_root.as_deref(),
    )?;
    out.managed = args.managed;
    let _lock = out.prepare(&course)?;
    let log = out.dir.join("server.log");
    crate::runlog::log_to_file(&log).with_context(|| format!("cannot write {}", log.display()))?;
    let display = Display::new(args.quiet || args.json).timed().shared();
    let process = server_process(&course, &out, display.clone())?;
    display.say(&format!(
        "course `{}`: waiting for {} clients at {}",
        cfg.course.name, cfg.course.clients, args.nats
    ));
    let (outcome, dropped) = runtime()?.block_on(async {
        let c = connect(&args.nats, &course, Party::Server, args.creds.as_deref()).await?;
        let mut worker = server_worker_from(process.setup, c.transport).on_start(roll_call);
        if let Some((weights, meta)) = process.base_model {
            worker.state_mut().set_base(weights, meta);
        }
        let outcome = run_guarded(worker, c.refusals).await?;
        anyhow::Ok((outcome, c.stats.rejected()))
    })?;
    display.finished();
    let state = outcome.state;
    ensure!(
        state.is_finished(),
        "the server stopped before the course finished ({:?})",
        outcome.reason
    );
    let results = state.into_results();
    // Rejected by the worker (undecodable, forged, out of step) or already
    // by the NATS receiver (malformed parts, evicted, cut off).
    let rejected = outcome.stats.rejected + dropped;
    let summary = process.end.finish(&results, rejected, started)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "course `{}` finished: {} rounds, {:.1} KB up, {:.1} KB down, {:.1} s; final {}\nresults in {}",
            summary.course,
            summary.rounds,
            summary.bytes_up as f64 / 1e3,
            summary.bytes_down as f64 / 1e3,
            summary.wall_s,
            summary
                .loss_last
                .iter()
                .map(|(s, l)| format!("{s} loss {l:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            out.dir.display()
        );
    }
    Ok(())
}
