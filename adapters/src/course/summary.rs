//! What a finished course reports (`summary.json`): each client's held-out
//! loss before training and after the last round, the traffic, the time
//! and the memory — read back from the whole metrics file, so a resumed
//! course reports from its first round.

use std::collections::BTreeMap;
use std::path::Path;

use fedtune_kernel::config::Mode;
use fedtune_kernel::course::RoundEval;
use fedtune_kernel::{Event, Record};
use serde::Serialize;

use super::offsite::OffsiteSummary;
use super::{Context, Result};
use crate::eval::suite::TaskReport;

/// One client's line of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct ClientSummary {
    /// 1-based id.
    pub id: u32,
    /// Its name (meta label or number).
    pub name: String,
    /// Training examples.
    pub train_examples: usize,
    /// Test examples.
    pub test_examples: usize,
    /// Test loss before training.
    pub test_loss_before: Option<f64>,
    /// Test loss after the last round.
    pub test_loss_after: Option<f64>,
    /// Personalized courses: the `[eval]` tasks' scores with this client's
    /// own adapter (`adapter/client-N/`), on its own data where the task
    /// scores clients separately (`loss`), else overall.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub own_adapter_eval: BTreeMap<String, f64>,
}

/// `summary.json` of an LLM course.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The course name.
    pub course: String,
    /// The scenario.
    pub mode: Mode,
    /// Rounds.
    pub rounds: u64,
    /// Clients.
    pub clients: u32,
    /// Local steps per round.
    pub local_steps: usize,
    /// Passes over each client's data per round, when they replace `local_steps`.
    #[serde(skip_serializing_if = "is_zero")]
    pub local_epochs: usize,
    /// Sample-weighted mean of the clients' test losses.
    pub test_loss_before: Option<f64>,
    /// Sample-weighted mean of the clients' test losses after the last round.
    pub test_loss_after: Option<f64>,
    /// Unweighted mean over clients of their test loss after the last round
    /// (each with its personal adapter in personalized runs), as FS-LLM reports pFL.
    pub mean_client_test_loss_after: Option<f64>,
    /// Per client.
    pub per_client: Vec<ClientSummary>,
    /// Bytes clients sent.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
    /// Wall time of the run.
    pub wall_s: f64,
    /// Training FLOPs of every client over every round, counted from the
    /// model's shapes (`flops` in metrics.jsonl's train and round records).
    pub train_flops: f64,
    /// Peak resident memory.
    pub peak_rss_mib: Option<f64>,
    /// Where the final adapter is.
    pub adapter: String,
    /// The `[eval]` tasks' results on the final adapter (each client's, in local mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval: Vec<TaskReport>,
    /// FedOT: the emulator, and the adapter plugged back into the full model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offsite: Option<OffsiteSummary>,
    /// Differential privacy: what the course spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
    /// `federate.keep_best`: the best round and where its adapter is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSummary>,
}

/// The `best` part of `summary.json`.
#[derive(Debug, Serialize)]
pub struct BestSummary {
    /// The loss it follows (`val_loss`, …).
    pub key: String,
    /// The round with the lowest (0: the initial adapter).
    pub round: u64,
    /// Its value.
    pub loss: f64,
    /// Where that round's parameters are.
    pub params: String,
    /// The round after which early stopping ended the course, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early_after: Option<u64>,
}

impl BestSummary {
    /// From the course's `keep_best` and what the server kept.
    pub fn new(
        key: &str,
        best: &fedtune_kernel::course::best::BestRound,
        stopped_early_after: Option<u64>,
        params: &std::path::Path,
    ) -> Self {
        Self {
            key: key.to_string(),
            round: best.round,
            loss: best.loss,
            params: params.display().to_string(),
            stopped_early_after,
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The `privacy` part of `summary.json`.
#[derive(Debug, Serialize)]
pub struct PrivacySummary {
    /// "central" or "local".
    pub dp: String,
    /// ε after the last round (local DP: each client's, had it taken part in every round).
    pub epsilon: Option<f64>,
    /// δ.
    pub delta: f64,
    /// σ / C.
    pub noise_multiplier: f64,
    /// The clip norm of the last round (it moves with adaptive clipping).
    pub clip_norm: f64,
    /// Secure aggregation: what it cost, when it was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggSummary>,
}

/// The `privacy.secure_aggregation` part of `summary.json`.
#[derive(Debug, Serialize)]
pub struct SecAggSummary {
    /// Bytes of the protocol's own messages over all rounds (keys, sealed
    /// shares, reveals, the server's relays), apart from the masked updates.
    pub overhead_bytes: u64,
    /// Seconds the server spent removing masks, over all rounds.
    pub unmask_s: f64,
    /// Clients that left a round mid-protocol and were recovered from.
    pub left: u64,
}

impl PrivacySummary {
    /// From the course's `[privacy]` and the last round's record.
    pub fn from_records(
        cfg: &fedtune_kernel::privacy::PrivacySection,
        records: &[Record],
    ) -> Option<Self> {
        if !cfg.enabled() && !cfg.secure_aggregation {
            return None;
        }
        let rounds = || records.iter().filter(|r| r.event == Event::Round);
        let last = rounds().next_back();
        let metric = |k: &str| last.and_then(|r| r.extra.get(k).copied());
        let total = |k: &str| rounds().filter_map(|r| r.extra.get(k)).sum::<f64>();
        Some(Self {
            dp: cfg.dp.name().into(),
            epsilon: metric("dp_epsilon"),
            delta: cfg.delta,
            noise_multiplier: cfg.noise_multiplier,
            clip_norm: metric("dp_clip_norm").unwrap_or(cfg.clip_norm),
            secure_aggregation: cfg.secure_aggregation.then(|| SecAggSummary {
                overhead_bytes: total("secagg_overhead_bytes") as u64,
                unmask_s: total("secagg_unmask_s"),
                left: total("secagg_left") as u64,
            }),
        })
    }
}

impl Summary {
    /// The sample-weighted mean over clients of `f` (clients without a value left out).
    pub fn weighted_mean(
        clients: &[ClientSummary],
        f: fn(&ClientSummary) -> Option<f64>,
    ) -> Option<f64> {
        let (mut num, mut den) = (0.0, 0.0);
        for s in clients {
            if let Some(v) = f(s) {
                num += v * s.test_examples as f64;
                den += s.test_examples as f64;
            }
        }
        (den > 0.0).then(|| num / den)
    }

    /// The unweighted mean over clients of their last test loss.
    pub fn mean_after(clients: &[ClientSummary]) -> Option<f64> {
        let after: Vec<f64> = clients.iter().filter_map(|c| c.test_loss_after).collect();
        (!after.is_empty()).then(|| after.iter().sum::<f64>() / after.len() as f64)
    }
}

/// Every record of a metrics file.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))
        })
        .collect()
}

/// The first and last evaluated loss of `split` for `client`.
pub fn split_losses(records: &[Record], client: u32, split: &str) -> (Option<f64>, Option<f64>) {
    let evals: Vec<&Record> = records
        .iter()
        .filter(|r| {
            r.event == Event::Eval && r.client == Some(client) && r.split.as_deref() == Some(split)
        })
        .collect();
    (
        evals.first().and_then(|r| r.loss),
        evals.last().and_then(|r| r.loss),
    )
}

/// Bytes up and down over every round's record.
pub fn traffic(records: &[Record]) -> (u64, u64) {
    records
        .iter()
        .filter(|r| r.event == Event::Round)
        .fold((0, 0), |(u, d), r| (u + r.bytes_up, d + r.bytes_down))
}

/// Each split's sample-weighted loss at `round`.
pub fn losses_at(evals: &[RoundEval], round: Option<u64>) -> BTreeMap<String, f64> {
    evals
        .iter()
        .filter(|e| Some(e.round) == round)
        .map(|e| (e.split.clone(), e.loss))
        .collect()
}
