//! The kernel's numeric reference course (`trainer.kind = "least-squares"`):
//! linear regression on synthetic per-client data, with a known centralized
//! answer. It runs every part of the course machinery — sampling, the wire
//! codec, the aggregator, evaluation, cost accounting — in well under a second.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedtune_kernel::course::{run_in_process, CourseReport, LeastSquaresSection};
use fedtune_kernel::MetricsLog;
use serde::Serialize;

use super::config::CourseFile;
use super::run_dir::Output;
use super::summary::{losses_at, traffic, PrivacySummary};
use super::{scripts, Context, Result};

/// `summary.json` of a numeric course.
#[derive(Debug, Serialize)]
pub struct NumericSummary {
    /// The course name.
    pub course: String,
    /// Rounds.
    pub rounds: u64,
    /// Clients.
    pub clients: u32,
    /// Loss per split before training.
    pub initial_loss: BTreeMap<String, f64>,
    /// Loss per split after the last round.
    pub final_loss: BTreeMap<String, f64>,
    /// The centralized least-squares training loss (the optimum).
    pub centralized_train_loss: Option<f64>,
    /// Bytes clients sent.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
    /// Wall time.
    pub wall_s: f64,
    /// Messages the server rejected.
    pub rejected_messages: u64,
    /// Differential privacy: what the course spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
}

/// Runs the numeric course `ls` of `course` in this process, writing into
/// `out.dir` (see [`Output::prepare`]); returns the course's report (for a
/// table per round) and its summary, also written to `summary.json`.
pub fn run_least_squares(
    course: &CourseFile,
    ls: &LeastSquaresSection,
    out: &Output,
) -> Result<(CourseReport, NumericSummary)> {
    let cfg = &course.cfg;
    let log = MetricsLog::to_file(&out.dir.join("metrics.jsonl"))
        .and_then(|log| log.with_tensorboard(&out.dir.join("tb")))
        .with_context(|| format!("cannot write metrics to {}", out.dir.display()))?;
    let task = ls.trainer(cfg.course.clients);
    let initial = task.initial_params();
    let central_loss = task.global_train_loss(&task.centralized_solution()).ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the course's runtime")?;
    let report = runtime.block_on(run_in_process(
        cfg,
        initial,
        Arc::new(Mutex::new(task)),
        scripts::aggregator(course)?,
        log,
    ))?;
    let (bytes_up, bytes_down) = traffic(&report.records);
    let summary = NumericSummary {
        course: cfg.course.name.clone(),
        rounds: cfg.course.rounds,
        clients: cfg.course.clients,
        initial_loss: losses_at(&report.evals, report.evals.first().map(|e| e.round)),
        final_loss: losses_at(&report.evals, report.evals.last().map(|e| e.round)),
        centralized_train_loss: central_loss,
        bytes_up,
        bytes_down,
        wall_s: report.wall_s,
        rejected_messages: report.server_stats.rejected,
        privacy: PrivacySummary::from_records(&cfg.privacy, &report.records),
    };
    let text = serde_json::to_string_pretty(&summary).context("writing the summary")?;
    let path = out.dir.join("summary.json");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((report, summary))
}
