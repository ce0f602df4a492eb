//! `fedtune eval TASK`: a benchmark on the base model or with an adapter.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::data::{self, collate, Tokenized};
use fedtune_adapters::eval::sandbox::{python_available, Limits};
use fedtune_adapters::eval::tasks::{self, Items, Task};
use fedtune_adapters::eval::{
    run_choices, run_generation, summarize, EvalModel, EvalOptions, ItemResult, ResultLog, Summary,
};
use fedtune_adapters::fetch::ensure_default_model;
use fedtune_adapters::generate::GenerationConfig;
use fedtune_adapters::model::{load_gguf, load_hf_dir, load_hf_tokenizer, Llama};
use fedtune_adapters::peft::load_adapter;
use fedtune_adapters::tokenizer::TextTokenizer;
use fedtune_adapters::train::summed_token_loss;
use fedtune_kernel::config::{ConfigDoc, CourseConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::run_llm::{course_data, LlmSections};

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
    /// The course config whose data split the `loss` task scores.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Which split of the config's data the `loss` task scores: test, val or train.
    #[arg(long, default_value = "test")]
    pub split: String,
}

/// A task as `fedtune eval` and `[eval] tasks` name it.
#[derive(Debug, Clone, PartialEq)]
pub enum Named {
    /// A benchmark.
    Task(Task),
    /// Held-out loss on a course config's data split.
    Loss,
}

/// Parses a task name; `helm-mini` is MMLU, NQ-open and OpenBookQA.
pub fn parse_tasks(name: &str) -> std::result::Result<Vec<Named>, String> {
    match name {
        "helm-mini" => Ok(vec![
            Named::Task(Task::Mmlu),
            Named::Task(Task::NqOpen),
            Named::Task(Task::OpenBookQa),
        ]),
        "loss" => Ok(vec![Named::Loss]),
        name => Task::parse(name).map(|t| vec![Named::Task(t)]),
    }
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
    /// Other figures (the `loss` task's perplexity and token count).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
    /// The results file.
    pub out: PathBuf,
}

/// A base model already in memory, its tokenizer and where it came from.
#[derive(Clone)]
pub struct Base {
    pub model: Arc<Llama>,
    pub tok: Arc<TextTokenizer>,
    pub path: PathBuf,
}

impl Base {
    /// The model file's (or directory's) name, as adapters record their base model.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Only the tokenizer of the model at `path` (or the default model's):
    /// GGUF metadata or a directory's `tokenizer.json`, no weights read.
    pub fn load_tokenizer(path: Option<&Path>, say: &dyn Fn(&str)) -> Result<TextTokenizer> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => ensure_default_model(say)?,
        };
        if !path.is_dir() {
            return Ok(TextTokenizer::from_gguf_path(&path)?);
        }
        load_hf_tokenizer(&path)?
            .with_context(|| format!("{} has no tokenizer.json", path.display()))
    }

    /// Loads the model at `path` — a GGUF file, or a Hugging Face directory
    /// with `config.json`, safetensors weights and `tokenizer.json` (as
    /// `fedtune model tiny` writes) — or the default model when `None`.
    pub fn load(path: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => ensure_default_model(say)?,
        };
        say(&format!("loading {}", path.display()));
        let context = || format!("loading the model {}", path.display());
        if path.is_dir() {
            let hf = load_hf_dir(&path, DType::F32, &Device::Cpu).with_context(context)?;
            let tok = hf
                .tokenizer
                .ok_or_else(|| anyhow::anyhow!("{} has no tokenizer.json", path.display()))?;
            return Ok(Self {
                model: Arc::new(hf.model),
                tok: Arc::new(tok),
                path,
            });
        }
        let loaded = load_gguf(&path, DType::F32, &Device::Cpu).with_context(context)?;
        Ok(Self {
            tok: Arc::new(TextTokenizer::from_gguf(&loaded.content)?),
            model: Arc::new(loaded.model),
            path,
        })
    }
}

/// A loaded model, tokenizer and (optional) adapter.
pub struct Loaded {
    model: Arc<Llama>,
    tok: Arc<TextTokenizer>,
    adapter: Option<Box<dyn Adapter>>,
    model_path: PathBuf,
}

impl Loaded {
    /// Loads the model (default one if `path` is `None`) and the adapter in `adapter`.
    pub fn load(path: Option<&Path>, adapter: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        Self::with_adapter(Base::load(path, say)?, adapter, say)
    }

    /// `base` with the adapter in `adapter` (none: the base model alone).
    pub fn with_adapter(base: Base, adapter: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let Base {
            model,
            tok,
            path: model_path,
        } = base;
        let adapter = match adapter {
            None => None,
            Some(dir) => {
                let (spec, params) = load_adapter(dir)
                    .with_context(|| format!("loading the adapter {}", dir.display()))?;
                let lora = spec.build(&model, 0)?;
                lora.load_param_set(&params).with_context(|| {
                    format!("the adapter {} does not fit the model", dir.display())
                })?;
                lora.set_grad_enabled(false);
                say(&format!(
                    "adapter {} ({} parameters)",
                    dir.display(),
                    lora.num_parameters()
                ));
                say(&format!("adapter method {}", lora.peft_type()));
                Some(lora)
            }
        };
        Ok(Self {
            model,
            tok,
            adapter,
            model_path,
        })
    }

    /// The model as evaluations see it.
    pub fn view(&self) -> EvalModel<'_> {
        EvalModel {
            model: &self.model,
            tok: &self.tok,
            adapter: self
                .adapter
                .as_deref()
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
    let tasks = parse_tasks(&args.task).map_err(anyhow::Error::msg)?;
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
    let doc = match (&args.config, tasks.contains(&Named::Loss)) {
        (Some(path), _) => Some(ConfigDoc::load(path)?),
        (None, true) => {
            bail!("the loss task scores a course's data: give its config with --config FILE")
        }
        (None, false) => None,
    };
    // Check python3 and load every task's items before the model: a missing file fails fast.
    let loaded_items = load_items(&tasks, &settings)?;
    let say = |line: &str| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };
    let loaded = Loaded::load(args.model.as_deref(), args.adapter.as_deref(), &say)?;
    let mut reports = Vec::new();
    for (named, items) in tasks.iter().zip(loaded_items) {
        let name = match named {
            Named::Task(t) => file_name(t),
            Named::Loss => format!("loss-{}", args.split),
        };
        let out = match (&args.out, tasks.len()) {
            (Some(p), 1) => p.clone(),
            (Some(p), _) => p.with_file_name(format!(
                "{}-{name}.json",
                p.file_stem().unwrap_or_default().to_string_lossy(),
            )),
            (None, _) => default_out(&name, args.adapter.as_deref()),
        };
        let report = match (named, items) {
            (Named::Task(task), Some(items)) => evaluate(&loaded, task, items, &settings, &out)?,
            _ => {
                let doc = doc.as_ref().expect("checked above");
                held_out_loss(&loaded, doc, &args.split, &settings, &out)?
            }
        };
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

/// Each benchmark's items (`None` for the loss task), after checking that
/// HumanEval can run its programs.
fn load_items(tasks: &[Named], s: &Settings) -> Result<Vec<Option<Items>>> {
    if tasks.contains(&Named::Task(Task::HumanEval)) {
        ensure!(
            python_available(),
            "humaneval runs the generated code with python3, which is not installed (apt-get install python3)"
        );
    }
    tasks
        .iter()
        .map(|named| match named {
            Named::Task(t) => tasks::load(t, &s.data_root, s.limit)
                .map(Some)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("loading {}", t.name())),
            Named::Loss => Ok(None),
        })
        .collect()
}

/// Runs the task(s) `name` with `loaded`, writing results to `dir/TASK.json`;
/// `doc` is the course whose test split the `loss` task scores.
pub fn run_named(
    loaded: &Loaded,
    name: &str,
    settings: &Settings,
    dir: &Path,
    doc: Option<&ConfigDoc>,
) -> Result<Vec<TaskReport>> {
    let tasks = parse_tasks(name).map_err(anyhow::Error::msg)?;
    let items = load_items(&tasks, settings)?;
    tasks
        .iter()
        .zip(items)
        .map(|(named, items)| match (named, items, doc) {
            (Named::Task(t), Some(items), _) => evaluate(
                loaded,
                t,
                items,
                settings,
                &dir.join(format!("{}.json", file_name(t))),
            ),
            (_, _, Some(doc)) => {
                held_out_loss(loaded, doc, "test", settings, &dir.join("loss-test.json"))
            }
            _ => bail!("the loss task needs a course config"),
        })
        .collect()
}

/// A task's name as a file name.
fn file_name(task: &Task) -> String {
    match task {
        Task::Mc(p) => format!("mc-{}", p.file_stem().unwrap_or_default().to_string_lossy()),
        t => t.name(),
    }
}

/// Token-weighted mean loss (and perplexity) of `split` of the course `doc`'s
/// data, per client and over all, with the loaded model and adapter.
pub fn held_out_loss(
    loaded: &Loaded,
    doc: &ConfigDoc,
    split: &str,
    s: &Settings,
    out: &Path,
) -> Result<TaskReport> {
    let started = Instant::now();
    let cfg = CourseConfig::from_doc(doc)?;
    let llm = LlmSections::from_doc(doc)?;
    let (fed, template) = course_data(doc, &cfg, &llm, &s.data_root)?;
    let mut left = s.limit.unwrap_or(usize::MAX);
    let (mut weighted, mut tokens, mut examples) = (0.0, 0usize, 0usize);
    let mut groups = std::collections::BTreeMap::new();
    let view = loaded.view();
    for c in &fed.clients {
        let idx = match split {
            "test" => &c.test,
            "val" => &c.val,
            "train" => &c.train,
            other => bail!("--split is test, val or train, not {other:?}"),
        };
        let idx = &idx[..idx.len().min(left)];
        left -= idx.len();
        let items = fed.tokenize(idx, &template, &loaded.tok, llm.data.max_tokens)?;
        let batches = items
            .chunks(s.batch.max(1))
            .map(|chunk| {
                let refs: Vec<&Tokenized> = chunk.iter().collect();
                collate(&refs, loaded.tok.eos_id, &Device::Cpu)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (c_weighted, c_tokens) = summed_token_loss(view.model, view.adapter, &batches)?;
        if c_tokens > 0 {
            groups.insert(
                format!("client {}", c.name),
                fedtune_adapters::eval::GroupScore {
                    items: items.len(),
                    score: c_weighted / c_tokens as f64,
                },
            );
        }
        weighted += c_weighted;
        tokens += c_tokens;
        examples += items.len();
    }
    ensure!(
        tokens > 0,
        "{}: the {split} split has no scored tokens",
        doc.origin()
    );
    let loss = weighted / tokens as f64;
    let seconds = started.elapsed().as_secs_f64();
    let report = TaskReport {
        task: format!("loss:{split}"),
        metric: "token-weighted mean loss (lower is better)".into(),
        score: loss,
        items: examples,
        resumed_items: 0,
        seconds,
        generated_tokens: 0,
        tokens_per_s: 0.0,
        items_per_s: examples as f64 / seconds.max(1e-9),
        groups,
        extra: [
            ("perplexity".to_string(), loss.exp()),
            ("tokens".to_string(), tokens as f64),
        ]
        .into(),
        out: out.to_path_buf(),
    };
    let full = serde_json::json!({
        "summary": report,
        "settings": {
            "config": doc.origin(),
            "split": split,
            "adapter": s.adapter.as_ref().map(|p| p.display().to_string()),
        },
    });
    write_json(out, &full)?;
    Ok(report)
}

fn write_json(out: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", out.display()))
}

fn default_out(name: &str, adapter: Option<&Path>) -> PathBuf {
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
        extra: Default::default(),
        out: out.to_path_buf(),
    };
    let full = serde_json::json!({ "summary": report, "settings": header, "items": results });
    write_json(out, &full)?;
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
