//! Running a benchmark end to end: the task's items loaded, the model run
//! over them, the scores written to a results file (and item by item to a
//! log that an interrupted run resumes from), and a [`TaskReport`].
//!
//! `fedtune eval` and the `[eval]` tasks at the end of a course both come
//! through here; the held-out loss of a course's own data is the course's
//! business ([`crate::course::held_out`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::sandbox::{self, Limits};
use super::tasks::{self, Items, Task};
use super::{
    run_choices, run_generation, summarize, EvalModel, EvalOptions, GroupScore, ItemResult,
    ResultLog, Summary,
};
use crate::course::{Context, CourseError, Result};
use crate::generate::GenerationConfig;
use crate::progress::Observer;

/// A task as `fedtune eval` and `[eval] tasks` name it.
#[derive(Debug, Clone, PartialEq)]
pub enum Named {
    /// A benchmark.
    Task(Task),
    /// Held-out loss on a course config's data split.
    Loss,
}

/// Parses a task name; `helm-mini` is MMLU, NQ-open and OpenBookQA (not
/// FS-LLM's HELM-MINI, whose NaturalQuestions is open-book and scored by
/// F1, and which has IMDB: see docs/evaluation.md).
pub fn parse_tasks(name: &str) -> Result<Vec<Named>> {
    match name {
        "helm-mini" => Ok(vec![
            Named::Task(Task::Mmlu),
            Named::Task(Task::NqOpen),
            Named::Task(Task::OpenBookQa),
        ]),
        "loss" => Ok(vec![Named::Loss]),
        name => Ok(vec![Named::Task(
            Task::parse(name).map_err(CourseError::invalid)?,
        )]),
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
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupScore>,
    /// Other figures (the `loss` task's perplexity and token count).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    /// The results file.
    pub out: PathBuf,
}

/// Settings of one evaluation (beyond the task).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Evaluate the first N items only.
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Samples per generation item (pass@1 is estimated over them; 1 = greedy).
    pub samples: usize,
    /// Sampling temperature when `samples` > 1.
    pub temperature: f64,
    /// How long a HumanEval program may run.
    pub timeout: Duration,
    /// How HumanEval programs are isolated.
    pub sandbox: sandbox::Mode,
    /// Most new tokens per generation (default: the task's).
    pub max_new_tokens: Option<usize>,
    /// Where the data sets are.
    pub data_root: PathBuf,
    /// The adapter evaluated, as results name it.
    pub adapter: Option<PathBuf>,
}

/// A task's name as a file name.
pub fn file_name(task: &Task) -> String {
    match task {
        Task::Mc(p) => format!("mc-{}", p.file_stem().unwrap_or_default().to_string_lossy()),
        t => t.name(),
    }
}

/// When `tasks` run generated code: checks that the sandbox can run it in
/// `mode` and returns the line that tells the user how it will.
pub fn check_sandbox(tasks: &[Named], mode: sandbox::Mode) -> Result<Option<String>> {
    if !tasks.contains(&Named::Task(Task::HumanEval)) {
        return Ok(None);
    }
    sandbox::check(mode)
        .map(Some)
        .map_err(crate::course::CourseError::invalid)
}

/// Each benchmark's items (`None` for the loss task), after checking that
/// HumanEval can run its programs.
pub fn load_items(tasks: &[Named], s: &Settings) -> Result<Vec<Option<Items>>> {
    check_sandbox(tasks, s.sandbox)?;
    tasks
        .iter()
        .map(|named| match named {
            Named::Task(t) => tasks::load(t, &s.data_root, s.limit)
                .map(Some)
                .with_context(|| format!("loading {}", t.name())),
            Named::Loss => Ok(None),
        })
        .collect()
}

/// Writes `value` to `out` as pretty JSON, creating its folder.
pub fn write_json(out: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).context("writing the results")?;
    std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))
}

/// Runs `task` over `items` with the model `view` (read from `model_path`),
/// writing items to `out`.items.jsonl as they are scored and the whole
/// result to `out`; progress goes to `observer`.
pub fn evaluate(
    (view, model_path): (&EvalModel, &Path),
    task: &Task,
    items: Items,
    s: &Settings,
    out: &Path,
    observer: &dyn Observer,
) -> Result<TaskReport> {
    let started = Instant::now();
    let generation = generation_config(&items, s);
    let header = log_header(task, model_path, s, &generation)?;
    let items_path = out.with_extension("items.jsonl");
    let mut log = ResultLog::open(&items_path, &header).context("opening the results log")?;
    let resumed = log.finished();
    let ids = items.ids();
    if resumed > 0 {
        observer.say(&format!(
            "{}: {} items done by an earlier run are kept ({})",
            task.name(),
            resumed.min(ids.len()),
            items_path.display()
        ));
    }
    let opts = EvalOptions {
        batch: s.batch,
        generation,
        samples: s.samples,
        sandbox: Limits {
            timeout: s.timeout,
            mode: s.sandbox,
            ..Limits::default()
        },
    };
    let mut generated = 0;
    let name = task.name();
    let mut on_item = |done: usize, total: usize, tokens: usize| {
        generated = tokens;
        observer.items(&name, done, total, tokens, started.elapsed().as_secs_f64());
    };
    match &items {
        Items::Gen {
            prefixes,
            items: list,
            ..
        } => {
            let limits = opts.sandbox;
            let mut score = |item: &super::GenItem,
                             gens: &[crate::generate::Generation]|
             -> candle_core::Result<ItemResult> {
                tasks::score(task, item, gens, &limits).map_err(candle_core::Error::msg)
            };
            run_generation(
                view,
                prefixes,
                list,
                &opts,
                &mut log,
                &mut score,
                &mut on_item,
            )
            .with_context(|| format!("evaluating {name}"))?;
        }
        Items::Choice {
            prefixes,
            items: list,
        } => run_choices(view, prefixes, list, &opts, &mut log, &mut on_item)
            .with_context(|| format!("evaluating {name}"))?,
    }
    observer.finished();
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
        extra: item_means(&results, &[tasks::F1]),
        out: out.to_path_buf(),
    };
    let mut settings = header;
    settings["model"] = model_path.display().to_string().into();
    settings["adapter"] = s.adapter.as_ref().map(|p| p.display().to_string()).into();
    let full = serde_json::json!({ "summary": report, "settings": settings, "items": results });
    write_json(out, &full)?;
    Ok(report)
}

/// How `items` are generated under settings `s` (greedy unless sampling
/// several answers).
fn generation_config(items: &Items, s: &Settings) -> GenerationConfig {
    let (stop, default_max) = match items {
        Items::Gen {
            stop,
            max_new_tokens,
            ..
        } => (stop.clone(), *max_new_tokens),
        Items::Choice { .. } => (Vec::new(), 0),
    };
    GenerationConfig {
        max_new_tokens: s.max_new_tokens.unwrap_or(default_max),
        temperature: if s.samples > 1 { s.temperature } else { 0.0 },
        top_p: 0.95,
        seed: 0,
        stop,
        ignore_eos: false,
    }
}

/// The results log's header: an interrupted evaluation resumes only with
/// the same model and adapter — the same bytes, wherever they lie — and
/// the same settings.
fn log_header(
    task: &Task,
    model_path: &Path,
    s: &Settings,
    generation: &GenerationConfig,
) -> Result<serde_json::Value> {
    let digest = |p: &Path| {
        crate::fetch::content_digest(p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(serde_json::json!({
        "task": task.name(),
        "model_sha256": digest(model_path)?,
        "adapter_sha256": s.adapter.as_deref().map(digest).transpose()?,
        "samples": s.samples,
        "temperature": generation.temperature,
        "max_new_tokens": generation.max_new_tokens,
        // Items scored by an earlier rule are not mixed in: GSM8K's answer
        // was the last number until FS-LLM's extraction replaced it.
        "scoring": matches!(task, Task::Gsm8k).then_some("fs-llm-clean-answer"),
    }))
}

/// The mean over `results` of each numeric item detail in `names` that
/// every item has (NQ-open's F1 beside its exact match).
fn item_means(results: &[ItemResult], names: &[&str]) -> BTreeMap<String, f64> {
    names
        .iter()
        .filter_map(|&name| {
            let values: Option<Vec<f64>> = results
                .iter()
                .map(|r| r.detail.get(name).and_then(|v| v.as_f64()))
                .collect();
            let values = values.filter(|v| !v.is_empty())?;
            Some((
                name.to_string(),
                values.iter().sum::<f64>() / values.len() as f64,
            ))
        })
        .collect()
}

#[cfg(test)]
mod item_mean_tests {
    use super::*;

    #[test]
    fn a_detail_every_item_has_is_averaged_and_others_left_out() {
        let item = |f1: Option<f64>| ItemResult {
            id: "x".into(),
            score: 0.0,
            group: None,
            prediction: String::new(),
            gold: String::new(),
            detail: f1
                .map(|v| BTreeMap::from([(tasks::F1.to_string(), serde_json::json!(v))]))
                .unwrap_or_default(),
        };
        let all = [item(Some(1.0)), item(Some(0.5)), item(Some(0.0))];
        assert_eq!(item_means(&all, &[tasks::F1])[tasks::F1], 0.5);
        let some = [item(Some(1.0)), item(None)];
        assert!(item_means(&some, &[tasks::F1]).is_empty());
        assert!(item_means(&[], &[tasks::F1]).is_empty());
    }
}
