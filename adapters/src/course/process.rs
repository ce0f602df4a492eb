//! A course's server, or one of its clients, as a process of its own: what
//! each party needs, built from the course file. Connecting the party to
//! the others (NATS, in `fedtune-broker`) is the caller's business, so this
//! crate and the broker never meet.
//!
//! The server process owns the course: it checkpoints the global parameters
//! after every round (a crash loses at most the round in flight) and, with
//! `resume`, continues after the newest checkpoint. With FedOT it sends
//! every joining client the emulator, never the full model. Each client
//! process loads only its own part of the data (and, with FedOT, only the
//! tokenizer: its model comes from the server).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedtune_kernel::config::Mode;
use fedtune_kernel::course::{ServerResults, ServerSetup, SharedTrainer};
use fedtune_kernel::{Checkpoints, Meta, MetricsLog, MsgpackStore, ParamSet, ParamStore, Record};
use serde::Serialize;

use super::base::Base;
use super::config::{CourseFile, Task};
use super::offsite::{emulator, plug_in, BaseModelInfo, Trained};
use super::run_dir::Output;
use super::store::AdapterStore;
use super::summary::{losses_at, traffic, BestSummary, PrivacySummary};
use super::trainer::{client_process_trainer, offsite_client_trainer, trainer_error};
use super::{ensure, scripts, Context, Result};
use crate::adapter::AdapterSpec;
use crate::offsite::Emulator;
use crate::progress::Observer;
use crate::round_robin::RoundRobinTrainer;

/// A server process, ready to run.
pub struct ServerProcess {
    /// How its server worker starts (resumed, checkpointing every round).
    pub setup: ServerSetup,
    /// FedOT: the emulator's weights and description, for every joining client.
    pub base_model: Option<(ParamSet, Meta)>,
    /// What is done with the results when the course is over.
    pub end: ServerEnd,
}

/// What a server process keeps for the end of its course.
pub struct ServerEnd {
    course: String,
    rounds: u64,
    clients: u32,
    /// Rounds done before this process started.
    completed: u64,
    store: Arc<dyn ParamStore>,
    /// Whether the parameters are an adapter (else plain parameters).
    adapter: bool,
    /// FedOT: the emulator, what clients train on it and the full model, to plug the adapter into at the end.
    offsite: Option<(Emulator, AdapterSpec, Base)>,
    out: PathBuf,
    privacy: fedtune_kernel::privacy::PrivacySection,
    keep_best: Option<String>,
}

/// Fails unless `course` is federated (`mode = "fed"`): the only kind a
/// server and its clients run.
pub fn check_federated(course: &CourseFile) -> Result<()> {
    let mode = course.cfg.course.mode;
    ensure!(
        mode == Mode::Fed,
        "federate.mode in {}: a server runs federated courses (mode = \"fed\"); \
         run a {} course with `fedtune run`",
        course.doc.origin(),
        format!("{mode:?}").to_lowercase()
    );
    Ok(())
}

/// The server's side of a course, for a process of its own: the initial (or
/// resumed) global parameters, the aggregator with its restored state,
/// checkpoints every round, and FedOT's emulator. Records go to
/// `out/metrics.jsonl` and to `observer`.
pub fn server_process(
    course: &CourseFile,
    out: &Output,
    observer: Arc<dyn Observer>,
) -> Result<ServerProcess> {
    let cfg = &course.cfg;
    check_federated(course)?;
    let say = |line: &str| observer.say(line);
    let mut offsite = None;
    let (initial, store): (ParamSet, Arc<dyn ParamStore>) = match &course.task {
        Task::LeastSquares(ls) => (
            ls.trainer(cfg.course.clients).initial_params(),
            Arc::new(MsgpackStore),
        ),
        Task::Llm(llm) => {
            llm.model.device.open()?;
            let base = Base::load(course.model_path().as_deref(), &say)?
                .place(llm.model.placement(), &say)?;
            let root = crate::data::data_root(out.data_root.as_deref());
            let (model, spec) =
                match emulator(llm, (&base.model, &base.path), &base.tok, &root, &say)? {
                    Some((emu, spec, _)) => {
                        say(&format!(
                            "offsite-tuning: clients get an emulator of layers {:?}",
                            emu.kept
                        ));
                        let model = emu.model.clone();
                        offsite = Some((emu, spec.clone(), base.clone()));
                        (model, spec)
                    }
                    None => ((*base.model).clone(), llm.spec(&base.tok)?),
                };
            let initial = RoundRobinTrainer::initial_adapter(&model, &spec, cfg.course.seed)
                .map_err(trainer_error)?;
            let store = AdapterStore::new(spec, model.config().clone(), &base.file_name());
            (initial, Arc::new(store))
        }
    };
    // A server process checkpoints every round: a crash loses at most the round in flight.
    let checkpoints = Checkpoints::new(out.dir.join("checkpoints"), 1, store.clone())
        .with_tag(course.fingerprint()?);
    let aggregator = scripts::aggregator(course)?;
    let resumed = if out.resume {
        checkpoints.latest()?
    } else {
        None
    };
    if let Some(found) = &resumed {
        say(&format!("resuming after round {}", found.round));
    }
    let completed = resumed.as_ref().map_or(0, |r| r.round);
    let rounds = cfg.course.rounds;
    observer.course_started(rounds.saturating_sub(completed));
    let shown = observer.clone();
    let log = MetricsLog::to_file(&out.dir.join("metrics.jsonl"))
        .and_then(|log| log.with_tensorboard(&out.dir.join("tb")))
        .with_context(|| format!("cannot write metrics to {}", out.dir.display()))?
        .with_observer(Box::new(move |r: &Record| shown.record(r, rounds)));
    let mut setup = ServerSetup::new(cfg.clone(), initial, aggregator, log);
    if let Some(found) = resumed {
        setup = setup.resumed_from(found)?;
    }
    let base_model = match &offsite {
        Some((emu, _, _)) => Some(BaseModelInfo::message(emu)?),
        None => None,
    };
    Ok(ServerProcess {
        setup: setup.with_checkpoints(checkpoints),
        base_model,
        end: ServerEnd {
            course: cfg.course.name.clone(),
            rounds,
            clients: cfg.course.clients,
            completed,
            store,
            adapter: matches!(course.task, Task::Llm(_)),
            offsite,
            out: out.dir.clone(),
            privacy: cfg.privacy.clone(),
            keep_best: cfg.course.keep_best.clone(),
        },
    })
}

/// What `fedtune server` writes to `summary.json`.
#[derive(Debug, Serialize)]
pub struct ServerSummary {
    /// The course name.
    pub course: String,
    /// Rounds.
    pub rounds: u64,
    /// Clients.
    pub clients: u32,
    /// The round this run started after (0: a fresh course).
    pub resumed_after: u64,
    /// Sample-weighted loss per split before training (or at the resumed round).
    pub loss_first: BTreeMap<String, f64>,
    /// Sample-weighted loss per split after the last round.
    pub loss_last: BTreeMap<String, f64>,
    /// Every evaluation: round, split, loss, samples.
    pub evals: Vec<EvalRow>,
    /// Clients that took part in each round.
    pub sampled: Vec<(u64, Vec<u32>)>,
    /// Bytes clients sent.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
    /// Messages the server rejected.
    pub rejected_messages: u64,
    /// Wall time.
    pub wall_s: f64,
    /// Where the final parameters are.
    pub params: String,
    /// Differential privacy: what the course spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
    /// `federate.keep_best`: the best round and where its parameters are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<BestSummary>,
}

/// One evaluation of [`ServerSummary::evals`].
#[derive(Debug, Serialize)]
pub struct EvalRow {
    /// The round.
    pub round: u64,
    /// The split.
    pub split: String,
    /// Sample-weighted loss.
    pub loss: f64,
    /// Samples.
    pub samples: u64,
}

impl ServerEnd {
    /// After the course: saves the final parameters (with FedOT, the
    /// emulator's adapter and the one plugged into the full model) and
    /// writes `summary.json`.
    pub fn finish(
        self,
        results: &ServerResults,
        rejected: u64,
        started: Instant,
    ) -> Result<ServerSummary> {
        let name = match (self.adapter, &self.offsite) {
            (true, None) => "adapter",
            (true, Some(_)) => "adapter-emulator",
            (false, _) => "final",
        };
        let save = |dir: &std::path::Path, params: &ParamSet| -> Result<()> {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            self.store.save(dir, params)?;
            Ok(())
        };
        let params_path = self.out.join(name);
        save(&params_path, &results.global)?;
        let best = match (&results.best, &self.keep_best) {
            (Some(b), Some(key)) => {
                let dir = self.out.join(format!("{name}-best"));
                save(&dir, &b.params)?;
                Some(BestSummary::new(key, b, results.stopped_early, &dir))
            }
            _ => None,
        };
        if let Some((emu, spec, full)) = &self.offsite {
            // The adapter plugged into the full model (no test data here: the clients evaluate).
            let trained = Trained {
                params: &results.global,
                dir: &self.out.join("adapter"),
                test: &[],
                client: None,
            };
            plug_in(&full.model, emu, spec, &[trained], &full.file_name())?;
        }
        let (bytes_up, bytes_down) = traffic(&results.records);
        let summary = ServerSummary {
            course: self.course.clone(),
            rounds: self.rounds,
            clients: self.clients,
            resumed_after: self.completed,
            loss_first: losses_at(&results.evals, results.evals.first().map(|e| e.round)),
            loss_last: losses_at(&results.evals, results.evals.last().map(|e| e.round)),
            evals: results
                .evals
                .iter()
                .map(|e| EvalRow {
                    round: e.round,
                    split: e.split.clone(),
                    loss: e.loss,
                    samples: e.samples,
                })
                .collect(),
            sampled: results.sampled.clone(),
            bytes_up,
            bytes_down,
            rejected_messages: rejected,
            wall_s: started.elapsed().as_secs_f64(),
            params: params_path.display().to_string(),
            privacy: PrivacySummary::from_records(&self.privacy, &results.records),
            best,
        };
        let text = serde_json::to_string_pretty(&summary).context("writing the summary")?;
        let path = self.out.join("summary.json");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(summary)
    }
}

/// The trainer of client `id` of `course` in a process of its own.
pub fn client_process(
    course: &CourseFile,
    data_root: Option<&std::path::Path>,
    id: u32,
    say: &dyn Fn(&str),
) -> Result<SharedTrainer> {
    let cfg = &course.cfg;
    ensure!(
        (1..=cfg.course.clients).contains(&id),
        "--id {id} is outside 1..={} (federate.clients in {})",
        cfg.course.clients,
        course.doc.origin()
    );
    Ok(match &course.task {
        Task::LeastSquares(ls) => Arc::new(Mutex::new(ls.trainer(cfg.course.clients))),
        // FedOT: the tokenizer only; the weights come from the server.
        Task::Llm(llm) if llm.offsite.enabled => {
            let tok = Base::load_tokenizer(course.model_path().as_deref(), say)?;
            Arc::new(Mutex::new(offsite_client_trainer(
                course, &tok, data_root, id,
            )?))
        }
        Task::Llm(llm) => {
            llm.model.device.open()?;
            let base = Base::load(course.model_path().as_deref(), say)?
                .place(llm.model.placement(), say)?;
            Arc::new(Mutex::new(client_process_trainer(
                course, &base, data_root, id,
            )?))
        }
    })
}
