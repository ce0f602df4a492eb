//! `fedtune eval TASK`: a benchmark on the base model or with an adapter.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use fedtune_adapters::data;
use fedtune_adapters::eval::sandbox::{python_available, Limits};
use fedtune_adapters::eval::tasks::{self, Items, Task};
use fedtune_adapters::eval::{
    run_choices, run_generation, summarize, EvalModel, EvalOptions, ItemResult, ResultLog, Summary,
};
use fedtune_adapters::fetch::ensure_default_model;
use fedtune_adapters::generate::GenerationConfig;
use fedtune_adapters::lora::Lora;
use fedtune_adapters::model::{load_gguf, Llama};
use fedtune_adapters::peft::load_lora;
use fedtune_adapters::tokenizer::TextTokenizer;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// `fedtune eval` arguments.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// gsm8k, humaneval, mmlu, openbookqa, nq-open, helm-mini (MMLU + NQ-open
    /// + OpenBookQA), or mc:FILE.jsonl (`question`, `choices`, `answer`).
    pub task: String,
    /// A PEFT adapter directory (as `fedtune run` writes under `adapter/`); the base model without.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Evaluate the first N items only (per task for helm-mini).
    #[arg(long)]
    pub limit: Option<usize>,
    /// The results file (JSON); items also stream to FILE.items.jsonl, from
    /// which an interrupted run resumes. Default: runs/eval/TASK[-ADAPTER].json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Samples per generation item (pass@1 is estimated over them; 1 = greedy).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature when --samples > 1.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Seconds a HumanEval program may run.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Most new tokens per generation (default: the task's).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// A GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the data sets are (default: $FEDTUNE_DATA_ROOT, ./data, ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Print nothing but the result.
    #[arg(long)]
    pub quiet: bool,
}

/// One task's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    /// The task.
    pub task: String,
    /// What `score` means.
    pub metric: String,
    /// The mean score.
    pub score: f64,
    /// Items scored.
    pub items: usize,
    /// Items taken from an earlier, interrupted run.
    pub resumed_items: usize,
    /// Seconds this run took.
    pub seconds: f64,
    /// Tokens generated this run.
    pub generated_tokens: usize,
    /// Generated tokens per second this run.
    pub tokens_per_s: f64,
    /// Items per second this run.
    pub items_per_s: f64,
    /// Per group (MMLU subjects).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub groups: std::collections::BTreeMap<String, fedtune_adapters::eval::GroupScore>,
    /// The results file.
    pub out: PathBuf,
}

/// A loaded model, tokenizer and (optional) adapter.
pub struct Loaded {
    model: Llama,
    tok: TextTokenizer,
    lora: Option<Lora>,
    model_path: PathBuf,
}

impl Loaded {
    /// Loads the model (default one if `path` is `None`) and the adapter in `adapter`.
    pub fn load(path: Option<&Path>, adapter: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let model_path = match path {
            Some(p) => p.to_path_buf(),
            None => ensure_default_model(say)?,
        };
        say(&format!("loading {}", model_path.display()));
        let loaded = load_gguf(&model_path, DType::F32, &Device::Cpu)
            .with_context(|| format!("loading the model {}", model_path.display()))?;
        let tok = TextTokenizer::from_gguf(&loaded.content)?;
        let model = loaded.model;
        let lora = match adapter {
            None => None,
            Some(dir) => {
                let (cfg, params) = load_lora(dir)
                    .with_context(|| format!("loading the adapter {}", dir.display()))?;
                let lora = Lora::new(model.config(), cfg, 0, model.dtype(), model.device())?;
                lora.load_param_set(&params).with_context(|| {
                    format!("the adapter {} does not fit the model", dir.display())
                })?;
                lora.set_grad_enabled(false);
                say(&format!(
                    "adapter {} ({} parameters)",
                    dir.display(),
                    lora.num_parameters()
                ));
                Some(lora)
            }
        };
        Ok(Self {
            model,
            tok,
            lora,
            model_path,
        })
    }

    /// The model as evaluations see it.
    pub fn view(&self) -> EvalModel<'_> {
        EvalModel {
            model: &self.model,
            tok: &self.tok,
            adapter: self
                .lora
                .as_ref()
                .map(|l| l as &dyn fedtune_adapters::model::ProjectionAdapter),
        }
    }
}

/// Settings of one evaluation (beyond the task).
#[derive(Debug, Clone)]
pub struct Settings {
    pub limit: Option<usize>,
    pub batch: usize,
    pub samples: usize,
    pub temperature: f64,
    pub timeout: Duration,
    pub max_new_tokens: Option<usize>,
    pub data_root: PathBuf,
    pub quiet: bool,
    pub adapter: Option<PathBuf>,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.samples >= 1, "--samples must be at least 1");
    let tasks: Vec<Task> = match args.task.as_str() {
        "helm-mini" => vec![Task::Mmlu, Task::NqOpen, Task::OpenBookQa],
        name => vec![Task::parse(name).map_err(anyhow::Error::msg)?],
    };
    let settings = Settings {
        limit: args.limit,
        batch: args.batch,
        samples: args.samples,
        temperature: args.temperature,
        timeout: Duration::from_secs(args.timeout.max(1)),
        max_new_tokens: args.max_new_tokens,
        data_root: data::data_root(args.data_root.as_deref()),
        quiet: args.quiet,
        adapter: args.adapter.clone(),
    };
    if tasks.contains(&Task::HumanEval) {
        ensure!(
            python_available(),
            "humaneval runs the generated code with python3, which is not installed (apt-get install python3)"
        );
    }
    // Load every task's items before the model: a missing file fails fast.
    let loaded_items = tasks
        .iter()
        .map(|t| {
            tasks::load(t, &settings.data_root, settings.limit)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("loading {}", t.name()))
        })
        .collect::<Result<Vec<_>>>()?;
    let say = |line: &str| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };
    let loaded = Loaded::load(args.model.as_deref(), args.adapter.as_deref(), &say)?;
    let mut reports = Vec::new();
    for (task, items) in tasks.iter().zip(loaded_items) {
        let out = match (&args.out, tasks.len()) {
            (Some(p), 1) => p.clone(),
            (Some(p), _) => p.with_file_name(format!(
                "{}-{}.json",
                p.file_stem().unwrap_or_default().to_string_lossy(),
                task.name()
            )),
            (None, _) => default_out(task, args.adapter.as_deref()),
        };
        let report = evaluate(&loaded, task, items, &settings, &out)?;
        if !args.quiet {
            eprintln!(
                "{}: {} = {:.4} over {} items ({:.1} s, {:.1} tokens/s); results in {}",
                report.task,
                report.metric,
                report.score,
                report.items,
                report.seconds,
                report.tokens_per_s,
                report.out.display()
            );
        }
        reports.push(report);
    }
    let printed = if reports.len() == 1 {
        serde_json::to_value(&reports[0])?
    } else {
        let mean = reports.iter().map(|r| r.score).sum::<f64>() / reports.len() as f64;
        serde_json::json!({
            "task": args.task,
            "metric": "mean score",
            "score": mean,
            "tasks": reports,
            "note": "HELM-MINI without IMDB, which is not available here",
        })
    };
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(())
}

fn default_out(task: &Task, adapter: Option<&Path>) -> PathBuf {
    let name = match task {
        Task::Mc(p) => format!("mc-{}", p.file_stem().unwrap_or_default().to_string_lossy()),
        t => t.name(),
    };
    let who = match adapter {
        Some(dir) => format!(
            "-{}",
            dir.canonicalize()
                .unwrap_or_else(|_| dir.to_path_buf())
                .components()
                .rev()
                .take(2)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("-")
        ),
        None => String::new(),
    };
    PathBuf::from("runs/eval").join(format!("{name}{who}.json"))
}

/// Runs `task` over `items`, writing items to `out`.items.jsonl as they are
/// scored and the whole result to `out`.
pub fn evaluate(
    loaded: &Loaded,
    task: &Task,
    items: Items,
    s: &Settings,
    out: &Path,
) -> Result<TaskReport> {
    let started = Instant::now();
    let (stop, default_max) = match &items {
        Items::Gen {
            stop,
            max_new_tokens,
            ..
        } => (stop.clone(), *max_new_tokens),
        Items::Choice { .. } => (Vec::new(), 0),
    };
    let generation = GenerationConfig {
        max_new_tokens: s.max_new_tokens.unwrap_or(default_max),
        temperature: if s.samples > 1 { s.temperature } else { 0.0 },
        top_p: 0.95,
        seed: 0,
        stop,
    };
    let header = serde_json::json!({
        "task": task.name(),
        "model": loaded.model_path.display().to_string(),
        "adapter": s.adapter.as_ref().map(|p| p.display().to_string()),
        "samples": s.samples,
        "temperature": generation.temperature,
        "max_new_tokens": generation.max_new_tokens,
    });
    let items_path = out.with_extension("items.jsonl");
    let mut log = ResultLog::open(&items_path, &header).map_err(anyhow::Error::msg)?;
    let resumed = log.finished();
    let ids = items.ids();
    let bar = progress_bar(s.quiet, ids.len() as u64, &task.name());
    if resumed > 0 && !s.quiet {
        eprintln!(
            "{}",
            format_args!(
                "{}: {} items done by an earlier run are kept ({})",
                task.name(),
                resumed.min(ids.len()),
                items_path.display()
            )
        );
    }
    let opts = EvalOptions {
        batch: s.batch,
        generation,
        samples: s.samples,
        sandbox: Limits {
            timeout: s.timeout,
            ..Limits::default()
        },
    };
    let view = loaded.view();
    let mut generated = 0;
    let lines = !s.quiet && bar.is_hidden();
    let mut on_item = |done: usize, total: usize, tokens: usize| {
        generated = tokens;
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.1} tok/s", tokens as f64 / secs));
        // Without a terminal, a line at every tenth of the way.
        if lines && done > 0 && done % (total / 10).max(1) == 0 {
            eprintln!(
                "{}: {done}/{total} items, {secs:.0} s, {:.1} tokens/s",
                task.name(),
                tokens as f64 / secs
            );
        }
    };
    match &items {
        Items::Gen {
            prefixes,
            items: list,
            ..
        } => {
            let limits = opts.sandbox;
            let mut score = |item: &fedtune_adapters::eval::GenItem,
                             gens: &[fedtune_adapters::generate::Generation]|
             -> candle_core::Result<ItemResult> {
                tasks::score(task, item, gens, &limits).map_err(candle_core::Error::msg)
            };
            run_generation(
                &view,
                prefixes,
                list,
                &opts,
                &mut log,
                &mut score,
                &mut on_item,
            )?;
        }
        Items::Choice {
            prefixes,
            items: list,
        } => run_choices(&view, prefixes, list, &opts, &mut log, &mut on_item)?,
    }
    bar.finish_and_clear();
    let results = log.results(&ids);
    let Summary {
        items: n,
        score,
        groups,
    } = summarize(&results);
    let seconds = started.elapsed().as_secs_f64();
    let report = TaskReport {
        task: task.name(),
        metric: task.metric().to_string(),
        score,
        items: n,
        resumed_items: resumed.min(n),
        seconds,
        generated_tokens: generated,
        tokens_per_s: generated as f64 / seconds.max(1e-9),
        items_per_s: (n - resumed.min(n)) as f64 / seconds.max(1e-9),
        groups,
        out: out.to_path_buf(),
    };
    let full = serde_json::json!({ "summary": report, "settings": header, "items": results });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&full)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(report)
}

fn progress_bar(quiet: bool, len: u64, name: &str) -> ProgressBar {
    let target = if !quiet && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    ProgressBar::with_draw_target(Some(len), target)
        .with_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} items  {elapsed_precise} (eta {eta})  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        )
        .with_prefix(name.to_string())
}
