//! `fedtune sweep`: one course over several seeds (and scenarios), as the
//! `grid` searcher over `federate.seed` and `federate.mode`; a table of
//! mean ± std per metric and mode (FS-LLM's Table 2 shape).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedtune_kernel::hpo::{
    run_search, Budget, Evaluation, Objective, SearchOutcome, SearchSetup, Space,
};

use super::hpo::{mean_std_cell, prepare, progress, script_source};

/// Arguments of `fedtune sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The course configuration (TOML).
    pub config: PathBuf,
    /// Seeds: federate.seed, federate.seed + 1, …
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Scenarios to run each seed in (FS-LLM's Table 2: fed,global,local).
    #[arg(long, value_delimiter = ',', default_value = "fed")]
    pub modes: Vec<String>,
    /// Override a config value: `--set federate.rounds=3` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Courses run at a time.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Output directory (default: runs/sweep-<course>-<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the sweep in --out DIR: finished courses are not run again.
    #[arg(long)]
    pub resume: bool,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

/// `fedtune sweep`.
pub fn sweep(args: SweepArgs) -> Result<()> {
    let p = prepare(
        &args.config,
        &args.set,
        (args.out.as_deref(), args.resume),
        args.data_root.as_deref(),
        "sweep",
    )?;
    if args.seeds == 0 || args.modes.is_empty() || args.parallel == 0 {
        bail!("--seeds, --modes and --parallel need at least one");
    }
    let first = p.course.cfg.course.seed;
    let seeds: Vec<String> = (0..args.seeds).map(|i| (first + i).to_string()).collect();
    let modes: Vec<String> = args
        .modes
        .iter()
        .map(|m| format!("\"{}\"", m.trim()))
        .collect();
    let text = format!(
        "\"federate.seed\" = {{ choice = [{}] }}\n\"federate.mode\" = {{ choice = [{}] }}\n",
        seeds.join(", "),
        modes.join(", ")
    );
    let space = Space::parse(&text, "--seeds/--modes")?;
    p.runner.check_space(&space)?;
    let rounds = p.course.cfg.course.rounds;
    let objective = Objective::parse("loss");
    let n = args.seeds * args.modes.len() as u64;
    eprintln!(
        "{n} courses of {} ({} seeds from {first} × modes {}), {rounds} rounds each; results in {}",
        args.config.display(),
        args.seeds,
        args.modes.join(","),
        p.out.display()
    );
    let setup = SearchSetup {
        space,
        runner: p.runner.clone(),
        objective: objective.clone(),
        budget: Budget {
            trials: n,
            rounds,
            min_rounds: 1,
            eta: 3,
            seed: 0,
            params: toml::Table::new(),
        },
        parallel: args.parallel,
        out: p.out.clone(),
        resume: args.resume,
        retry_failed: false,
        method: "sweep".into(),
        on_evaluation: progress(&objective),
        on_say: Box::new(|_| {}),
    };
    let outcome = run_search(setup, &script_source("grid")?)?;
    let table = sweep_table(&outcome, &args.modes);
    print!("\n{table}");
    let path = p.out.join("sweep.md");
    std::fs::write(
        &path,
        format!(
            "# Sweep of {} over {} seeds\n\n{table}",
            args.config.display(),
            args.seeds
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    println!("table in {}", path.display());
    Ok(())
}

/// Mean ± sample standard deviation over seeds of every metric, per mode.
fn sweep_table(o: &SearchOutcome, modes: &[String]) -> String {
    let mut metrics: Vec<String> = o
        .evaluations
        .iter()
        .flat_map(|e| e.metrics.keys().cloned())
        .collect();
    metrics.sort();
    metrics.dedup();
    let mut s = String::new();
    let _ = writeln!(s, "| mode | seeds | {} |", metrics.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(metrics.len()));
    for mode in modes {
        let runs: Vec<&Evaluation> = o
            .evaluations
            .iter()
            .filter(|e| e.config.get("federate.mode").and_then(|v| v.as_str()) == Some(mode.trim()))
            .collect();
        let failed = runs.iter().filter(|e| e.error.is_some()).count();
        let cells: Vec<String> = metrics
            .iter()
            .map(|m| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|e| e.metrics.get(m).copied())
                    .collect();
                mean_std_cell(&v)
            })
            .collect();
        let seeds = if failed > 0 {
            format!("{} ({failed} failed)", runs.len())
        } else {
            runs.len().to_string()
        };
        let _ = writeln!(s, "| {} | {seeds} | {} |", mode.trim(), cells.join(" | "));
    }
    s
}
