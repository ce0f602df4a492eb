//! `fedtune eval TASK`: a benchmark on the base model or with an adapter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use clap::Args;
use fedtune_adapters::course::held_out::held_out_loss;
use fedtune_adapters::course::{Base, CourseFile, Loaded};
use fedtune_adapters::data;
use fedtune_adapters::eval::sandbox;
use fedtune_adapters::eval::suite::{
    check_sandbox, evaluate, file_name, load_items, parse_tasks, Named, Settings,
};
use fedtune_adapters::model::{Compute, DeviceSpec, Placement};
use fedtune_adapters::progress::Observer;

use crate::display::Display;

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
    /// How HumanEval's generated code is isolated: strict (namespaces, a
    /// minimal read-only root, Landlock, seccomp; refuses to run where the
    /// kernel lacks one) or basic (rlimits only: the code runs with your
    /// rights). See docs/sandbox.md.
    #[arg(long, default_value = "strict")]
    pub sandbox: sandbox::Mode,
    /// Most new tokens per generation (default: the task's).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// A GGUF model file, a Hugging Face directory or id (`hf:ORG/NAME[@REV]`)
    /// (default: --config's `[model] path`, else SmolLM2-135M-Instruct,
    /// fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A FedOT emulator directory (what `offsite.emulator_path` saved):
    /// evaluate on it instead of the full model, as FS-LLM's `eval_type =
    /// "emu"` does, usually with the course's `adapter-emulator/`. --model
    /// names the full model it was made from (checked), whose tokenizer it uses.
    #[arg(long)]
    pub emulator: Option<PathBuf>,
    /// Where the data sets are (default: $FEDTUNE_DATA_ROOT, ./data, ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Print nothing but the result.
    #[arg(long)]
    pub quiet: bool,
    /// The course config whose data split the `loss` task scores.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The frozen weights' dtype: f32, bf16, int8 or auto (default: --config's
    /// `[model] compute`, else f32).
    #[arg(long)]
    pub compute: Option<Compute>,
    /// Where the model runs: cpu, cuda or cuda:N (default: --config's
    /// `[model] device`, else cpu).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Which split of the config's data the `loss` task scores: test, val or train.
    #[arg(long, default_value = "test")]
    pub split: String,
}

/// `--compute` and `--device`, else the course's own, else f32 on the CPU.
fn placement(args: &EvalArgs, course: Option<&CourseFile>) -> Placement {
    let own = course.and_then(|c| c.llm().ok()).map(|l| l.model.clone());
    Placement {
        compute: args
            .compute
            .or(own.as_ref().map(|m| m.compute))
            .unwrap_or_default(),
        device: args
            .device
            .or(own.as_ref().map(|m| m.device))
            .unwrap_or_default(),
    }
}

/// `fedtune eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.samples >= 1, "--samples must be at least 1");
    let tasks = parse_tasks(&args.task)?;
    let settings = Settings {
        limit: args.limit,
        batch: args.batch,
        samples: args.samples,
        temperature: args.temperature,
        timeout: Duration::from_secs(args.timeout.max(1)),
        sandbox: args.sandbox,
        max_new_tokens: args.max_new_tokens,
        data_root: data::data_root(args.data_root.as_deref()),
        adapter: args.adapter.clone(),
    };
    let course = match (&args.config, tasks.contains(&Named::Loss)) {
        (Some(path), _) => Some(CourseFile::load(path, &[])?),
        (None, true) => {
            bail!("the loss task scores a course's data: give its config with --config FILE")
        }
        (None, false) => None,
    };
    // A device that cannot be used fails now, before any data or model is read.
    let placement = placement(&args, course.as_ref());
    placement.device.open()?;
    // Check the sandbox and load every task's items before the model: a
    // missing file or protection fails fast.
    let sandbox_line = check_sandbox(&tasks, settings.sandbox)?;
    let loaded_items = load_items(&tasks, &settings)?;
    let display = Display::new(args.quiet);
    let say = |line: &str| display.say(line);
    if let Some(line) = sandbox_line {
        say(&line);
    }
    // --model, else the course's own model (the loss task scores its data).
    let model = args
        .model
        .clone()
        .or_else(|| course.as_ref().and_then(CourseFile::model_path));
    let loaded = match &args.emulator {
        // FedOT's emulator is trained and scored in f32.
        Some(dir) => Loaded::with_adapter(
            Base::emulator(dir, model.as_deref(), &say)?.place(
                Placement {
                    compute: Compute::F32,
                    ..placement
                },
                &say,
            )?,
            args.adapter.as_deref(),
            &say,
        )?,
        None => Loaded::load(model.as_deref(), args.adapter.as_deref(), placement, &say)?,
    };
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
            (None, _) => default_out(&name, args.emulator.is_some(), args.adapter.as_deref()),
        };
        let report = match (named, items, &course) {
            (Named::Task(task), Some(items), _) => evaluate(
                (&loaded.view(), loaded.model_path()),
                task,
                items,
                &settings,
                &out,
                &display,
            )?,
            (_, _, Some(course)) => held_out_loss(&loaded, course, &args.split, &settings, &out)?,
            _ => bail!("the loss task needs --config FILE"),
        };
        say(&format!(
            "{}: {} = {:.4} over {} items ({:.1} s, {:.1} tokens/s); results in {}",
            report.task,
            report.metric,
            report.score,
            report.items,
            report.seconds,
            report.tokens_per_s,
            report.out.display()
        ));
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
            "note": "not FS-LLM's HELM-MINI: NaturalQuestions is closed-book here (exact match the score, F1 beside it), the paper's is open-book scored by F1, and IMDB is not available; compare per task",
        })
    };
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(())
}

/// `runs/eval/TASK[-emulator][-ADAPTER].json`, the adapter named by its last
/// two path parts.
fn default_out(name: &str, emulator: bool, adapter: Option<&Path>) -> PathBuf {
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
    let on = if emulator { "-emulator" } else { "" };
    PathBuf::from("runs/eval").join(format!("{name}{on}{who}.json"))
}
