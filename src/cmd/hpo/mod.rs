//! `fedtune hpo`: hyperparameter search over whole courses.
//!
//! It and `fedtune sweep` (one course over several seeds, [`super::sweep`])
//! run trials through `fedtune_adapters::course::hpo::CourseTrials`
//! (one loaded base model for every trial) under the kernel's searcher
//! host; a sweep is the `grid` searcher over `federate.seed` (and
//! `federate.mode`). This file parses, prints one line per finished
//! evaluation and writes `best.toml`; [`report`] writes `report.md` and its
//! charts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedtune_adapters::course::hpo::CourseTrials;
use fedtune_adapters::course::CourseFile;
use fedtune_kernel::hpo::{
    run_search, Budget, Domain, Evaluation, Objective, OnEvaluation, Param, SearchOutcome,
    SearchSetup, Space, BUILT_IN,
};
use fedtune_kernel::script::{ScriptSection, ScriptSource};

use super::course_args::default_run_dir;

mod report;

/// Arguments of `fedtune hpo`.
#[derive(Debug, Args)]
pub struct HpoArgs {
    /// The course configuration (TOML) whose hyperparameters are searched.
    pub config: PathBuf,
    /// The search space (TOML): config path = { log-uniform | uniform | int | choice = … }.
    #[arg(long)]
    pub space: PathBuf,
    /// The searcher: random, grid, sha, hyperband, bo, fts, flora, or a .rhai file.
    #[arg(long, default_value = "random")]
    pub method: String,
    /// Configurations to try.
    #[arg(long, default_value_t = 12)]
    pub trials: u64,
    /// The most rounds a trial runs (default: the config's federate.rounds).
    #[arg(long)]
    pub budget_rounds: Option<u64>,
    /// The rounds multi-fidelity searchers start with (sha, hyperband) and
    /// the clients' local courses last (fts, flora).
    #[arg(long, default_value_t = 1)]
    pub min_rounds: u64,
    /// Successive halving keeps the best 1/eta per rung.
    #[arg(long, default_value_t = 3)]
    pub eta: u64,
    /// What to minimize: loss (held-out loss after the last round), a task
    /// score such as humaneval or gsm8k (maximized), or min:NAME / max:NAME.
    #[arg(long, default_value = "loss")]
    pub objective: String,
    /// A second metric the report ranks against the objective (default: the first task score).
    #[arg(long)]
    pub score: Option<String>,
    /// Trials run at a time (each its own adapters and optimizer; one base model).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Seeds the searcher's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A value for the searcher script, read as `budget.NAME` (repeatable; TOML values).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// After the search, re-run its K best configurations over --seeds seeds.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Seeds for --top-k: federate.seed, federate.seed + 1, …
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Override a config value for every trial: `--set federate.clients=4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Output directory (default: runs/hpo-<course>-<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the search in --out DIR: finished trials are not run again.
    #[arg(long)]
    pub resume: bool,
    /// With --resume, run the trials that failed again (after fixing what failed them).
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

/// Output directory, log and trial runner shared by both commands.
pub(super) struct Prepared {
    pub(super) course: CourseFile,
    pub(super) runner: Arc<CourseTrials>,
    pub(super) out: PathBuf,
}

pub(super) fn prepare(
    config: &Path,
    set: &[String],
    (out, resume): (Option<&Path>, bool),
    data_root: Option<&Path>,
    kind: &str,
) -> Result<Prepared> {
    let course = CourseFile::load(config, set)?;
    if resume && out.is_none() {
        bail!("--resume needs --out DIR, the search to continue");
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_run_dir(&format!("{kind}-{}", course.cfg.course.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let log = out.join(format!("{kind}.log"));
    crate::runlog::log_to_file(&log).with_context(|| format!("cannot write {}", log.display()))?;
    let started = Instant::now();
    let say: Arc<dyn Fn(&str) + Send + Sync> =
        Arc::new(move |line: &str| eprintln!("[{:7.1} s] {line}", started.elapsed().as_secs_f64()));
    let runner = Arc::new(CourseTrials::new(
        &course,
        data_root.map(Path::to_path_buf),
        say,
    )?);
    Ok(Prepared {
        course,
        runner,
        out,
    })
}

/// Prints a line per finished evaluation.
pub(super) fn progress(objective: &Objective) -> OnEvaluation {
    let started = Instant::now();
    let metric = objective.metric.clone();
    Box::new(move |e: &Evaluation, ran: bool| {
        let config: Vec<String> = e
            .config
            .iter()
            .map(|(k, v)| format!("{k}={}", short(v)))
            .collect();
        let value = match (&e.error, e.metrics.get(&metric)) {
            (Some(why), _) => format!("failed: {why}"),
            (None, Some(v)) => format!("{metric} {v:.4}"),
            (None, None) => format!("no {metric}"),
        };
        let how = if ran {
            format!("{:.1} s", e.wall_s)
        } else {
            "from the ledger".into()
        };
        eprintln!(
            "[{:7.1} s] eval {:>3} (trial {}, {} rounds, {how}): {value}  {}",
            started.elapsed().as_secs_f64(),
            e.eval,
            e.trial,
            e.rounds,
            config.join(" ")
        );
    })
}

/// A value as a short string (4 significant digits for floats).
fn short(v: &toml::Value) -> String {
    match v {
        toml::Value::Float(f) => format!("{f:.4e}").replace("e0", "").replace(".0000", ""),
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn script_source(method: &str) -> Result<ScriptSource> {
    let section = ScriptSection {
        script: Some(method.to_string()),
        params: toml::Table::new(),
    };
    Ok(section
        .resolve_in(None, &BUILT_IN)?
        .expect("a script is named"))
}

/// `fedtune hpo`.
pub fn hpo(args: HpoArgs) -> Result<()> {
    let p = prepare(
        &args.config,
        &args.set,
        (args.out.as_deref(), args.resume),
        args.data_root.as_deref(),
        "hpo",
    )?;
    let space = Space::load(&args.space)?;
    p.runner.check_space(&space)?;
    if args.trials == 0 || args.eta < 2 || args.min_rounds == 0 || args.parallel == 0 {
        bail!("--trials, --min-rounds and --parallel must be at least 1, --eta at least 2");
    }
    let rounds = args.budget_rounds.unwrap_or(p.course.cfg.course.rounds);
    if args.min_rounds > rounds {
        bail!(
            "--min-rounds {} exceeds --budget-rounds {rounds}",
            args.min_rounds
        );
    }
    let source = script_source(&args.method)?;
    let objective = Objective::parse(&args.objective);
    eprintln!(
        "searching {} keys of {} with `{}` ({} trials, up to {rounds} rounds each, {} at a time) for the {} {}; results in {}",
        space.dims(),
        args.config.display(),
        args.method,
        args.trials,
        args.parallel,
        if objective.maximize { "highest" } else { "lowest" },
        objective.metric,
        p.out.display()
    );
    let setup = SearchSetup {
        space: space.clone(),
        runner: p.runner.clone(),
        objective: objective.clone(),
        budget: Budget {
            trials: args.trials,
            rounds,
            min_rounds: args.min_rounds,
            eta: args.eta,
            seed: args.seed,
            params: parse_params(&args.params)?,
        },
        parallel: args.parallel,
        out: p.out.clone(),
        resume: args.resume,
        retry_failed: args.retry_failed,
        method: args.method.clone(),
        on_evaluation: progress(&objective),
        on_say: Box::new(|line| eprintln!("  {line}")),
    };
    let started = Instant::now();
    let outcome = run_search(setup, &source)?;
    let Some(best) = &outcome.best else {
        bail!(
            "every trial failed; see {} for why",
            p.out.join("trials.jsonl").display()
        );
    };
    let best_toml = write_best(&p, best, &objective, rounds)?;
    let score = args.score.clone().or_else(|| report::first_score(&outcome));
    let report = report::write_report(
        &p.out,
        &outcome,
        (&args.method, &space),
        &objective,
        score.as_deref(),
    )?;
    if let Some(k) = args.top_k {
        let table = reseed_top(
            &p,
            (&outcome, &space),
            (k, args.seeds, rounds),
            (&objective, score.as_deref()),
            args.parallel,
        )?;
        print!("\n{table}");
        let mut md = std::fs::read_to_string(&report).unwrap_or_default();
        md.push_str(&format!(
            "\n## The {k} best over {} seeds\n\n{table}",
            args.seeds
        ));
        std::fs::write(&report, md)
            .with_context(|| format!("cannot write {}", report.display()))?;
    }
    let total: f64 = outcome.evaluations.iter().map(|e| e.wall_s).sum();
    println!(
        "\n{} evaluations ({} run now, {:.0} s of trials, {:.0} s wall)",
        outcome.evaluations.len(),
        outcome.ran,
        total,
        started.elapsed().as_secs_f64()
    );
    print_best(best, &objective);
    println!(
        "runnable configuration in {}\nreport in {}",
        best_toml.display(),
        report.display()
    );
    Ok(())
}

/// `DIR/best.toml`: the best configuration as a course file one can run.
fn write_best(
    p: &Prepared,
    best: &Evaluation,
    objective: &Objective,
    rounds: u64,
) -> Result<PathBuf> {
    let path = p.out.join("best.toml");
    let text = p.runner.resolved(&best.config, rounds)?;
    let value = best
        .metrics
        .get(&objective.metric)
        .copied()
        .unwrap_or(f64::NAN);
    std::fs::write(&path, format!("# The best configuration of the search in {} (evaluation {}, trial {}, {} rounds: {} {value:.6}).\n# Run it: fedtune run {}\n\n{text}",
        p.out.display(), best.eval, best.trial, best.rounds, objective.metric, path.display()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The best evaluation and its configuration, on standard output.
fn print_best(best: &Evaluation, objective: &Objective) {
    println!(
        "best: evaluation {} (trial {}, {} rounds): {} {:.6}",
        best.eval,
        best.trial,
        best.rounds,
        objective.metric,
        best.metrics
            .get(&objective.metric)
            .copied()
            .unwrap_or(f64::NAN)
    );
    for (k, v) in &best.config {
        println!("  {k} = {v}");
    }
}

/// `--param NAME=VALUE`s as a table (values read as TOML, else as strings).
fn parse_params(params: &[String]) -> Result<toml::Table> {
    let mut t = toml::Table::new();
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--param {p}: expected NAME=VALUE");
        };
        let value = format!("v = {}", v.trim())
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(v.trim().to_string()));
        t.insert(k.trim().to_string(), value);
    }
    Ok(t)
}

/// Re-runs the `k` best configurations (at the most rounds) over `seeds`
/// seeds in `DIR/top-k/`; a table of mean ± std per configuration.
fn reseed_top(
    p: &Prepared,
    (o, space): (&SearchOutcome, &Space),
    (k, seeds, rounds): (usize, u64, u64),
    (objective, score): (&Objective, Option<&str>),
    parallel: usize,
) -> Result<String> {
    if space.params.iter().any(|q| q.key == "federate.seed") {
        bail!("--top-k re-runs over federate.seed, which the space already varies");
    }
    let top = report::top_rounds(o);
    let mut best: Vec<&Evaluation> = o
        .evaluations
        .iter()
        .filter(|e| e.objective.is_some() && Some(e.rounds) == top)
        .collect();
    best.sort_by(|a, b| {
        a.objective
            .partial_cmp(&b.objective)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    best.truncate(k);
    let first = p.course.cfg.course.seed;
    let seed_values: Vec<toml::Value> = (0..seeds)
        .map(|i| toml::Value::Integer((first + i) as i64))
        .collect();
    let mut reseed_space = space.clone();
    reseed_space.params.push(Param {
        key: "federate.seed".into(),
        domain: Domain::Choice(seed_values.clone()),
    });
    reseed_space.params.sort_by(|a, b| a.key.cmp(&b.key));
    let configs: Vec<toml::Value> = best
        .iter()
        .map(|e| {
            toml::Value::Table(
                e.config
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        })
        .collect();
    eprintln!(
        "re-running the {} best configurations over {seeds} seeds, {rounds} rounds each",
        best.len()
    );
    let setup = SearchSetup {
        space: reseed_space,
        runner: p.runner.clone(),
        objective: objective.clone(),
        budget: Budget {
            trials: (best.len() as u64) * seeds,
            rounds,
            min_rounds: 1,
            eta: 3,
            seed: 0,
            params: toml::Table::from_iter([
                ("configs".to_string(), toml::Value::Array(configs)),
                ("seeds".to_string(), toml::Value::Array(seed_values)),
            ]),
        },
        parallel,
        out: p.out.join("top-k"),
        resume: true,
        retry_failed: false,
        method: "reseed".into(),
        on_evaluation: progress(objective),
        on_say: Box::new(|line| eprintln!("  {line}")),
    };
    let again = run_search(setup, &script_source("reseed")?)?;
    let metrics: Vec<&str> = std::iter::once(objective.metric.as_str())
        .chain(score)
        .collect();
    let mut s = String::new();
    writeln!(
        s,
        "| rank | configuration | seeds | {} |",
        metrics.join(" | ")
    )?;
    writeln!(s, "|---|---|---|{}", "---|".repeat(metrics.len()))?;
    for (rank, e) in best.iter().enumerate() {
        let runs: Vec<&Evaluation> = again
            .evaluations
            .iter()
            .filter(|r| e.config.iter().all(|(k, v)| r.config.get(k) == Some(v)))
            .collect();
        let config: Vec<String> = e
            .config
            .iter()
            .map(|(k, v)| format!("{k}={}", short(v)))
            .collect();
        let cells: Vec<String> = metrics
            .iter()
            .map(|m| {
                let v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.metrics.get(*m).copied())
                    .collect();
                mean_std_cell(&v)
            })
            .collect();
        writeln!(
            s,
            "| {} | {} | {} | {} |",
            rank + 1,
            config.join(" "),
            runs.len(),
            cells.join(" | ")
        )?;
    }
    Ok(s)
}

/// `mean ± std` for a table, `-` without values.
pub(super) fn mean_std_cell(v: &[f64]) -> String {
    mean_std(v).map_or("-".into(), |(mean, sd)| format!("{mean:.4} ± {sd:.4}"))
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_deviation() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[2.0]), Some((2.0, 0.0)));
        assert_eq!(mean_std(&[]), None);
    }

    #[test]
    fn short_values_read_well() {
        assert_eq!(short(&toml::Value::Float(0.000123456)), "1.2346e-4");
        assert_eq!(short(&toml::Value::Integer(16)), "16");
        assert_eq!(short(&toml::Value::String("fed".into())), "fed");
    }
}
