//! Scoring what a course trained: the held-out loss of the course's own
//! data (the `loss` task), and the `[eval]` tasks run on the final adapter
//! when a course ends.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use fedtune_kernel::config::Mode;

use super::base::{Base, Loaded};
use super::config::CourseFile;
use super::data::course_data;
use super::{ensure, Context, CourseError, Result};
use crate::data::{collate, Tokenized};
use crate::eval::suite::{
    evaluate, file_name, load_items, parse_tasks, write_json, Named, Settings, TaskReport,
};
use crate::eval::GroupScore;
use crate::progress::Observer;
use crate::train::summed_token_loss;

/// Token-weighted mean loss (and perplexity) of `split` (test, val or
/// train) of the course's data, per client and over all, with `loaded`.
pub fn held_out_loss(
    loaded: &Loaded,
    course: &CourseFile,
    split: &str,
    s: &Settings,
    out: &Path,
) -> Result<TaskReport> {
    let started = Instant::now();
    let llm = course.llm()?;
    let (fed, template) = course_data(course, &s.data_root)?;
    let mut left = s.limit.unwrap_or(usize::MAX);
    let (mut weighted, mut tokens, mut examples) = (0.0, 0usize, 0usize);
    let mut groups = std::collections::BTreeMap::new();
    let view = loaded.view();
    for c in &fed.clients {
        let idx = match split {
            "test" => &c.test,
            "val" => &c.val,
            "train" => &c.train,
            other => {
                return Err(CourseError::invalid(format!(
                    "--split is test, val or train, not {other:?}"
                )))
            }
        };
        let idx = &idx[..idx.len().min(left)];
        left -= idx.len();
        let items = fed
            .tokenize(idx, &template, loaded.tok(), llm.data.max_tokens)
            .context("tokenizing the held-out data")?;
        let batches = items
            .chunks(s.batch.max(1))
            .map(|chunk| {
                let refs: Vec<&Tokenized> = chunk.iter().collect();
                collate(&refs, loaded.tok().eos_id, &Device::Cpu)
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .context("collating the held-out data")?;
        let (c_weighted, c_tokens) = summed_token_loss(view.model, view.adapter, &batches)
            .context("scoring the held-out data")?;
        if c_tokens > 0 {
            groups.insert(
                format!("client {}", c.name),
                GroupScore {
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
        course.doc.origin()
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
            "config": course.doc.origin(),
            "split": split,
            "adapter": s.adapter.as_ref().map(|p| p.display().to_string()),
        },
    });
    write_json(out, &full)?;
    Ok(report)
}

/// Runs the task(s) `name` with `loaded`, writing results to `dir/TASK.json`;
/// `course` is the course whose test split the `loss` task scores.
pub fn run_named(
    loaded: &Loaded,
    name: &str,
    settings: &Settings,
    dir: &Path,
    course: Option<&CourseFile>,
    observer: &dyn Observer,
) -> Result<Vec<TaskReport>> {
    let tasks = parse_tasks(name)?;
    let items = load_items(&tasks, settings)?;
    tasks
        .iter()
        .zip(items)
        .map(|(named, items)| match (named, items, course) {
            (Named::Task(t), Some(items), _) => evaluate(
                (&loaded.view(), loaded.model_path()),
                t,
                items,
                settings,
                &dir.join(format!("{}.json", file_name(t))),
                observer,
            ),
            (_, _, Some(course)) => held_out_loss(
                loaded,
                course,
                "test",
                settings,
                &dir.join("loss-test.json"),
            ),
            _ => Err(CourseError::invalid("the loss task needs a course config")),
        })
        .collect()
}

/// Runs the `[eval]` tasks on the final adapter in `adapter_dir` (and on
/// each client's own, in local mode and in personalized courses) with the course's `base` model, writing results
/// under `out/eval/`.
pub fn evaluate_at_end(
    course: &CourseFile,
    base: &Base,
    adapter_dir: &Path,
    (out, data_root): (&Path, &Path),
    observer: &dyn Observer,
) -> Result<Vec<TaskReport>> {
    let llm = course.llm()?;
    if llm.eval.tasks.is_empty() {
        return Ok(Vec::new());
    }
    let cfg = &course.cfg;
    let adapters: Vec<(String, PathBuf)> = match cfg.course.mode {
        Mode::Local => (1..=cfg.course.clients)
            .map(|c| {
                (
                    format!("client-{c}/"),
                    adapter_dir.join(format!("client-{c}")),
                )
            })
            .collect(),
        // The global adapter, and in personalized courses each client's own.
        _ => std::iter::once((String::new(), adapter_dir.to_path_buf()))
            .chain((1..=cfg.course.clients).filter_map(|c| {
                let dir = adapter_dir.join(format!("client-{c}"));
                dir.join("adapter_model.safetensors")
                    .is_file()
                    .then(|| (format!("client-{c}/"), dir))
            }))
            .collect(),
    };
    let settings = Settings {
        limit: llm.eval.limit,
        batch: llm.eval.batch,
        samples: 1,
        temperature: 0.0,
        timeout: std::time::Duration::from_secs(llm.eval.timeout_s.max(1)),
        sandbox: llm.eval.sandbox,
        max_new_tokens: None,
        data_root: data_root.to_path_buf(),
        adapter: None,
    };
    let say = |line: &str| observer.say(line);
    let mut reports = Vec::new();
    for (who, dir) in adapters {
        // The course's own base model, with the adapter it trained.
        let loaded = Loaded::with_adapter(base.clone(), Some(&dir), &say)?;
        let settings = Settings {
            adapter: Some(dir.clone()),
            ..settings.clone()
        };
        for name in &llm.eval.tasks {
            observer.say(&format!("evaluating {who}{name}"));
            let eval_dir = out.join("eval").join(who.trim_end_matches('/'));
            let mut found = run_named(&loaded, name, &settings, &eval_dir, Some(course), observer)?;
            for r in &mut found {
                r.task = format!("{who}{}", r.task);
            }
            reports.extend(found);
        }
    }
    Ok(reports)
}
