//! `fedtune run`: a whole course in one process.
//!
//! The config names the trainer. `lora` — the LLM fine-tuning course that is
//! fedtune's main job — needs the training core, which this build does not
//! have yet, and says so. `least-squares` is the kernel's numeric reference
//! task: linear regression on synthetic per-client data, with a known
//! centralized answer. It runs every part of the course machinery (sampling,
//! the wire codec, FedAvg, evaluation, cost accounting) in well under a second.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::run_llm;
use clap::Args;
use fedtune_kernel::course::{run_in_process, CourseReport, LeastSquaresTrainer, SyntheticSpec};
use fedtune_kernel::script::{ScriptAggregator, ScriptHost};
use fedtune_kernel::{Aggregator, ConfigDoc, CourseConfig, Event, FedAvg, MetricsLog};
use serde::{Deserialize, Serialize};

/// Arguments of `fedtune run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The course configuration (TOML).
    pub config: PathBuf,
    /// Override a config value: `--set federate.rounds=3` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Output directory (default: runs/<course>-<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the fully resolved configuration and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Print only the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress lines, only the final table.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the LoRA course in --out DIR from its newest checkpoint
    /// (the configuration must be the same, except for more rounds).
    #[arg(long)]
    pub resume: bool,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

/// `[trainer]`: what trains on the clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TrainerSection {
    /// `lora` (the LLM) or `least-squares` (the numeric reference task).
    kind: TrainerKind,
}

impl Default for TrainerSection {
    fn default() -> Self {
        Self {
            kind: TrainerKind::Lora,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum TrainerKind {
    Lora,
    LeastSquares,
}

/// `[least_squares]`: the numeric reference task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LeastSquaresSection {
    dim: usize,
    samples_per_client: usize,
    noise: f64,
    heterogeneity: f64,
    lr: f64,
    local_steps: usize,
    data_seed: u64,
}

/// `[broker]`: how `fedtune run` connects the course's parties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BrokerSection {
    /// `in-process` (one process, the embedded bus) or `nats` (a server
    /// process and one process per client, over a NATS broker).
    pub transport: Transport,
    /// The broker's URL for `nats`; unset: start a local nats-server with a
    /// user per party (as `fedtune broker config` writes it) for the run.
    pub url: Option<String>,
    /// A directory of credentials files (`server.json`, `client-N.json`) for `url`.
    pub credentials: Option<PathBuf>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            transport: Transport::InProcess,
            url: None,
            credentials: None,
        }
    }
}

/// See [`BrokerSection::transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Transport {
    InProcess,
    Nats,
}

impl Default for LeastSquaresSection {
    fn default() -> Self {
        let spec = SyntheticSpec::default();
        Self {
            dim: spec.dim,
            samples_per_client: spec.samples_per_client,
            noise: spec.noise,
            heterogeneity: spec.heterogeneity,
            lr: 0.1,
            local_steps: 5,
            data_seed: spec.seed,
        }
    }
}

/// The whole configuration as the run resolved it, written to `config.toml`.
#[derive(Debug, Serialize)]
struct Resolved<'a> {
    federate: &'a fedtune_kernel::config::CourseSection,
    wire: &'a fedtune_kernel::config::WireSection,
    aggregator: &'a fedtune_kernel::script::AggregatorSection,
    scripting: &'a fedtune_kernel::script::ScriptingSection,
    trainer: &'a TrainerSection,
    broker: &'a BrokerSection,
    least_squares: &'a LeastSquaresSection,
}

/// The resolved configuration of a LoRA course.
#[derive(Debug, Serialize)]
struct ResolvedLlm<'a> {
    federate: &'a fedtune_kernel::config::CourseSection,
    wire: &'a fedtune_kernel::config::WireSection,
    aggregator: &'a fedtune_kernel::script::AggregatorSection,
    scripting: &'a fedtune_kernel::script::ScriptingSection,
    trainer: &'a TrainerSection,
    broker: &'a BrokerSection,
    model: &'a run_llm::ModelSection,
    adapter: &'a run_llm::AdapterSection,
    lora: &'a fedtune_adapters::lora::LoraConfig,
    prompt: &'a fedtune_adapters::prompt::PromptConfig,
    offsite: &'a fedtune_adapters::offsite::OffsiteConfig,
    train: &'a run_llm::TrainSection,
    optim: &'a fedtune_adapters::train::TrainConfig,
    data: &'a fedtune_adapters::data::DataSpec,
    hooks: &'a fedtune_kernel::script::ScriptSection,
    pfl: &'a fedtune_adapters::round_robin::PflConfig,
    eval: &'a run_llm::EvalSection,
}

const SECTIONS: [&str; 18] = [
    "adapter",
    "offsite",
    "prompt",
    "broker",
    "eval",
    "federate",
    "wire",
    "aggregator",
    "scripting",
    "hooks",
    "pfl",
    "trainer",
    "least_squares",
    "data",
    "model",
    "lora",
    "train",
    "optim",
];

/// What trains on the clients, with its sections.
pub(crate) enum Task {
    /// The LLM course.
    Lora(Box<run_llm::LlmSections>),
    /// The numeric reference task.
    LeastSquares(LeastSquaresSection),
}

/// A course configuration, read, overridden, checked and resolved.
pub(crate) struct Course {
    pub doc: ConfigDoc,
    pub cfg: CourseConfig,
    pub task: Task,
    /// Every section with its defaults filled in, as TOML (written to `config.toml`).
    pub resolved: String,
}

/// Reads `config`, applies the `--set` overrides and checks everything a
/// course needs before it starts, scripts included.
pub(crate) fn load_course(config: &Path, set: &[String]) -> Result<Course> {
    let mut doc = ConfigDoc::load(config)?;
    for arg in set {
        doc.apply_override(arg)?;
    }
    doc.check_sections(&SECTIONS)?;
    let cfg = CourseConfig::from_doc(&doc)?;
    // Find and compile the aggregator script now, so that --dry-run checks it too.
    build_aggregator(&doc, &cfg)?;
    let trainer: TrainerSection = doc.section("trainer")?;
    let broker: BrokerSection = doc.section("broker")?;
    if trainer.kind == TrainerKind::Lora {
        let llm = run_llm::LlmSections::from_doc(&doc)?;
        run_llm::check(&cfg, &llm)?;
        run_llm::check_hooks(&doc, &cfg, &llm)?;
        let resolved = toml::to_string(&ResolvedLlm {
            federate: &cfg.course,
            wire: &cfg.wire,
            aggregator: &cfg.aggregator,
            scripting: &cfg.scripting,
            trainer: &trainer,
            broker: &broker,
            model: &llm.model,
            adapter: &llm.adapter,
            lora: &llm.lora,
            prompt: &llm.prompt,
            offsite: &llm.offsite,
            train: &llm.train,
            optim: &llm.optim,
            data: &llm.data,
            hooks: &llm.hooks,
            pfl: &llm.pfl,
            eval: &llm.eval,
        })?;
        return Ok(Course {
            doc,
            cfg,
            task: Task::Lora(Box::new(llm)),
            resolved,
        });
    }
    let ls: LeastSquaresSection = doc.section("least_squares")?;
    if ls.dim == 0
        || ls.samples_per_client == 0
        || ls.local_steps == 0
        || ls.lr.is_nan()
        || ls.lr <= 0.0
    {
        bail!(
            "{}: [least_squares] dim, samples_per_client, local_steps and lr must be positive",
            doc.origin()
        );
    }
    let resolved = toml::to_string(&Resolved {
        federate: &cfg.course,
        wire: &cfg.wire,
        aggregator: &cfg.aggregator,
        scripting: &cfg.scripting,
        trainer: &trainer,
        broker: &broker,
        least_squares: &ls,
    })?;
    Ok(Course {
        doc,
        cfg,
        task: Task::LeastSquares(ls),
        resolved,
    })
}

impl Course {
    /// The `[broker]` section.
    pub fn broker(&self) -> Result<BrokerSection> {
        Ok(self.doc.section("broker")?)
    }
}

/// The least-squares task's trainer, with every client's synthetic data.
pub(crate) fn least_squares_trainer(
    cfg: &CourseConfig,
    ls: &LeastSquaresSection,
) -> LeastSquaresTrainer {
    let spec = SyntheticSpec {
        clients: cfg.course.clients,
        samples_per_client: ls.samples_per_client,
        dim: ls.dim,
        noise: ls.noise,
        heterogeneity: ls.heterogeneity,
        seed: ls.data_seed,
    };
    LeastSquaresTrainer::synthetic(spec, ls.lr, ls.local_steps)
}

pub fn run(args: RunArgs) -> Result<()> {
    let course = load_course(&args.config, &args.set)?;
    if args.dry_run {
        print!("{}", course.resolved);
        return Ok(());
    }
    if course.broker()?.transport == Transport::Nats {
        return crate::distributed::run_processes(&course, &args);
    }
    let Course {
        doc,
        cfg,
        task,
        resolved,
    } = course;
    let ls = match task {
        Task::Lora(llm) => {
            if args.resume {
                let Some(dir) = &args.out else {
                    bail!("--resume needs --out DIR, the run directory to continue");
                };
                same_config_but_rounds(&dir.join("config.toml"), &resolved)?;
            }
            let out = args
                .out
                .unwrap_or_else(|| default_run_dir(&cfg.course.name));
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            std::fs::write(out.join("config.toml"), &resolved)?;
            crate::runlog::log_to_file(&out.join("run.log"))
                .with_context(|| format!("cannot write {}", out.join("run.log").display()))?;
            tracing::info!(config = %doc.origin(), out = %out.display(), "LoRA course starts");
            let log = MetricsLog::to_file(&out.join("metrics.jsonl"))
                .with_context(|| format!("cannot write metrics to {}", out.display()))?;
            return run_llm::run(
                &doc,
                &cfg,
                &llm,
                log,
                &run_llm::Output {
                    dir: out,
                    resume: args.resume,
                    data_root: args.data_root,
                    quiet: args.quiet,
                    json: args.json,
                },
            );
        }
        Task::LeastSquares(ls) => ls,
    };

    let out = args
        .out
        .unwrap_or_else(|| default_run_dir(&cfg.course.name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), &resolved)?;
    let log = MetricsLog::to_file(&out.join("metrics.jsonl"))
        .with_context(|| format!("cannot write metrics to {}", out.display()))?;
    let task = least_squares_trainer(&cfg, &ls);
    let initial = task.initial_params();
    let central_loss = task.global_train_loss(&task.centralized_solution()).ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(task)),
        build_aggregator(&doc, &cfg)?,
        log,
    ))?;
    let summary = summarize(&cfg, &report, central_loss);
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&report);
        println!(
            "\n{} rounds, {} clients ({} per round): {:.1} KB up, {:.1} KB down, {:.3} s wall",
            cfg.course.rounds,
            cfg.course.clients,
            cfg.clients_per_round(),
            summary.bytes_up as f64 / 1e3,
            summary.bytes_down as f64 / 1e3,
            report.wall_s
        );
        if let Some(c) = central_loss {
            println!("centralized least-squares training loss (the optimum): {c:.6}");
        }
        println!("results in {}", out.display());
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Summary {
    course: String,
    rounds: u64,
    clients: u32,
    /// Loss per split before training and after the last round.
    initial_loss: std::collections::BTreeMap<String, f64>,
    final_loss: std::collections::BTreeMap<String, f64>,
    centralized_train_loss: Option<f64>,
    bytes_up: u64,
    bytes_down: u64,
    wall_s: f64,
    rejected_messages: u64,
}

fn summarize(cfg: &CourseConfig, report: &CourseReport, central: Option<f64>) -> Summary {
    let rounds: Vec<&fedtune_kernel::Record> = report
        .records
        .iter()
        .filter(|r| r.event == Event::Round)
        .collect();
    let first_round = report.evals.first().map(|e| e.round);
    let last_round = report.evals.last().map(|e| e.round);
    let at = |round| losses_at(&report.evals, round);
    Summary {
        course: cfg.course.name.clone(),
        rounds: cfg.course.rounds,
        clients: cfg.course.clients,
        initial_loss: at(first_round),
        final_loss: at(last_round),
        centralized_train_loss: central,
        bytes_up: rounds.iter().map(|r| r.bytes_up).sum(),
        bytes_down: rounds.iter().map(|r| r.bytes_down).sum(),
        wall_s: report.wall_s,
        rejected_messages: report.server_stats.rejected,
    }
}

/// Each split's sample-weighted loss at `round`.
pub(crate) fn losses_at(
    evals: &[fedtune_kernel::course::RoundEval],
    round: Option<u64>,
) -> std::collections::BTreeMap<String, f64> {
    evals
        .iter()
        .filter(|e| Some(e.round) == round)
        .map(|e| (e.split.clone(), e.loss))
        .collect()
}

fn print_table(report: &CourseReport) {
    let splits: std::collections::BTreeSet<&str> =
        report.evals.iter().map(|e| e.split.as_str()).collect();
    print!("{:>5}", "round");
    for s in &splits {
        print!("  {:>12}", format!("{s} loss"));
    }
    println!("  {:>10}  {:>10}", "KB up", "KB down");
    let mut rounds: Vec<u64> = report.evals.iter().map(|e| e.round).collect();
    rounds.dedup();
    for round in rounds {
        print!("{round:>5}");
        for s in &splits {
            match report
                .evals
                .iter()
                .find(|e| e.round == round && e.split == *s)
            {
                Some(e) => print!("  {:>12.6}", e.loss),
                None => print!("  {:>12}", "-"),
            }
        }
        let rec = report
            .records
            .iter()
            .find(|r| r.event == Event::Round && r.round == round);
        match rec {
            Some(r) => println!(
                "  {:>10.1}  {:>10.1}",
                r.bytes_up as f64 / 1e3,
                r.bytes_down as f64 / 1e3
            ),
            None => println!("  {:>10}  {:>10}", "-", "-"),
        }
    }
}

/// Refuses to resume a run whose configuration changed in anything but
/// `federate.rounds` (more rounds is how a finished course is extended).
pub(crate) fn same_config_but_rounds(previous: &Path, resolved: &str) -> Result<()> {
    let old = std::fs::read_to_string(previous)
        .with_context(|| format!("--resume: cannot read {}", previous.display()))?;
    let strip = |text: &str| -> Result<toml::Table> {
        let mut t: toml::Table = text.parse()?;
        if let Some(toml::Value::Table(f)) = t.get_mut("federate") {
            f.remove("rounds");
        }
        Ok(t)
    };
    if strip(&old)? != strip(resolved)? {
        bail!(
            "--resume: the configuration differs from {} (only federate.rounds may change)",
            previous.display()
        );
    }
    Ok(())
}

/// `runs/<course>-<UTC timestamp>`.
pub(crate) fn default_run_dir(course: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Path::new("runs").join(format!("{course}-{}", utc_timestamp(secs)))
}

/// `YYYYMMDD-HHMMSS` in UTC (civil-from-days, after Howard Hinnant).
fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The configured aggregator: native FedAvg, or the `[aggregator]` script,
/// found relative to the working directory or the config file.
pub fn build_aggregator(doc: &ConfigDoc, cfg: &CourseConfig) -> Result<Box<dyn Aggregator>> {
    let config_dir = std::path::Path::new(doc.origin()).parent();
    let source = cfg
        .aggregator
        .resolve(config_dir)
        .map_err(|message| doc.key_error("aggregator.script", message))?;
    let Some(source) = source else {
        return Ok(Box::new(FedAvg));
    };
    let host = ScriptHost::new(&cfg.scripting);
    let aggregator = ScriptAggregator::new(host, &source, &cfg.aggregator.params)?;
    tracing::info!(script = aggregator.origin(), "aggregation by script");
    Ok(Box::new(aggregator))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "19700101-000000");
        assert_eq!(utc_timestamp(951_782_400), "20000229-000000");
        assert_eq!(utc_timestamp(1_795_563_330), "20261124-233530");
    }
}
