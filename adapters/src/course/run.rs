//! The LLM course in one process: federated fine-tuning of the model's
//! adapter, every simulated client sharing one frozen base model.
//!
//! The model is loaded once and shared by every simulated client (the
//! round-robin trainer swaps adapters and optimizer state in). `mode` picks
//! the scenario of FS-LLM's Table 2: `fed` runs the course as configured;
//! `global` gives one client everyone's training data (the centralized
//! reference) and the same total number of optimizer steps per round as the
//! federated clients take together; `local` runs one single-client course
//! per client, with no aggregation. In every mode each client's test split is
//! evaluated before training and after the last round, so the three
//! scenarios compare directly.
//!
//! A run directory holds `config.toml` (the resolved configuration),
//! `metrics.jsonl`, `checkpoints/`, `adapter/` and `summary.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedtune_kernel::checkpoint::Restored;
use fedtune_kernel::config::{CourseConfig, Mode};
use fedtune_kernel::course::{run_in_process_from, CourseReport, ServerSetup, SharedTrainer};
use fedtune_kernel::metrics::peak_rss_mib;
use fedtune_kernel::{Aggregator, Checkpoints, FedAvg, MetricsLog, ParamSet, Record};

use super::base::Base;
use super::config::{CourseFile, LlmConfig};
use super::data::{batches, client_data, course_data, prepare, Prepared};
use super::held_out::evaluate_at_end;
use super::offsite::{emulator, plug_in, OffsiteSummary, Trained};
use super::run_dir::Output;
use super::store::AdapterStore;
use super::summary::{
    read_records, split_losses, traffic, BestSummary, ClientSummary, PrivacySummary, Summary,
};
use super::trainer::{fed_trainer, plain_trainer, trainer_error};
use super::{ensure, scripts, Context, CourseError, Result};
use crate::adapter::AdapterSpec;
use crate::data::Tokenized;
use crate::eval::suite::{check_sandbox, parse_tasks};
use crate::model::Llama;
use crate::offsite::{Distilled, Emulator};
use crate::progress::Observer;
use crate::round_robin::{ClientData, LocalTraining, RoundRobinTrainer, StepProgress};
use crate::train::Batch;

/// Everything a scenario needs, built once.
struct Setup<'a> {
    course: &'a CourseFile,
    llm: &'a LlmConfig,
    base: Base,
    /// The model clients train (the emulator, with FedOT).
    model: Arc<Llama>,
    spec: AdapterSpec,
    prepared: Vec<Prepared>,
    store: AdapterStore,
    out: &'a Output,
    observer: Arc<dyn Observer>,
    runtime: tokio::runtime::Runtime,
    log: Arc<Mutex<MetricsLog>>,
    /// The configuration's fingerprint, on every checkpoint.
    fingerprint: String,
}

/// Where a course starts: from the initial adapter, or after a completed round.
enum Start {
    Fresh(ParamSet),
    After(Box<Restored>),
}

/// Runs the LLM course of `course` in this process, writing into `out.dir`
/// (prepared by [`Output::prepare`], whose lock the caller holds); returns
/// what `summary.json` holds.
pub fn run_llm(course: &CourseFile, out: &Output, observer: Arc<dyn Observer>) -> Result<Summary> {
    run_llm_on(course, out, observer, None)
}

/// [`run_llm`] on a base model already loaded (`base`; `None` loads the
/// course's): a search's trials share one.
pub fn run_llm_on(
    course: &CourseFile,
    out: &Output,
    observer: Arc<dyn Observer>,
    base: Option<&Base>,
) -> Result<Summary> {
    let started = Instant::now();
    let llm = course.llm()?;
    let cfg = &course.cfg;
    ensure!(
        cfg.course.keep_best.is_none() || cfg.course.mode == Mode::Fed,
        "`federate.keep_best` is for mode = \"fed\"; this course is {:?}, whose evaluation splits are per client",
        cfg.course.mode
    );
    // Build the aggregator first: a broken script fails before the model loads.
    let aggregator = match cfg.course.mode {
        Mode::Fed => Some(scripts::aggregator(course)?),
        _ => {
            warn_unused_scripts(course, llm);
            None
        }
    };
    let say = |line: &str| observer.say(line);
    // A device that cannot be used fails before any data or model is read.
    llm.model.device.open()?;
    // Generated code at the end runs in the sandbox: a machine that cannot
    // run it fails now, not after the training.
    for name in &llm.eval.tasks {
        if let Some(line) = check_sandbox(&parse_tasks(name)?, llm.eval.sandbox)? {
            say(&line);
        }
    }
    let base = match base {
        Some(b) => b.clone(),
        None => Base::load(course.model_path().as_deref(), &say)?,
    }
    .place(llm.model.placement(), &say)?;
    let prepared = tokenized_clients(course, out, &base, &say)?;
    // FedOT trains on the emulator; the full model stays for the final evaluation.
    let emulated = emulator(
        llm,
        (&base.model, &base.path),
        &base.tok,
        &out.data_root(),
        &say,
    )?;
    let (model, spec) = match &emulated {
        Some((emu, spec, _)) => {
            say(&format!(
                "offsite-tuning: emulator of {} of {} layers ({:?}), LoRA in layers {:?}",
                emu.kept.len(),
                base.model.config().num_hidden_layers,
                emu.kept,
                llm.offsite.adapter_layers(emu.kept.len())
            ));
            (Arc::new(emu.model.clone()), spec.clone())
        }
        None => (base.model.clone(), llm.spec(&base.tok)?),
    };
    let store = AdapterStore::new(spec.clone(), model.config().clone(), &base.file_name());
    let log = MetricsLog::to_file(&out.dir.join("metrics.jsonl"))
        .and_then(|log| log.with_tensorboard(&out.dir.join("tb")))
        .with_context(|| format!("cannot write metrics to {}", out.dir.display()))?;
    let setup = Setup {
        course,
        llm,
        base,
        model,
        spec,
        prepared,
        store,
        out,
        observer: observer.clone(),
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the course's runtime")?,
        log: Arc::new(Mutex::new(log)),
        fingerprint: course.fingerprint()?,
    };
    let total_rounds = match cfg.course.mode {
        Mode::Local => cfg.course.rounds * setup.prepared.len() as u64,
        _ => cfg.course.rounds,
    };
    observer.course_started(total_rounds);
    let adapter_dir = out.dir.join("adapter");
    let (offsite, best) = match cfg.course.mode {
        Mode::Fed => setup.fed(
            aggregator.expect("built for fed mode"),
            emulated.as_ref(),
            &adapter_dir,
        )?,
        Mode::Global => (setup.global(emulated.as_ref(), &adapter_dir)?, None),
        Mode::Local => (setup.local(emulated.as_ref(), &adapter_dir)?, None),
    };
    let mut summary = setup.summarize(&adapter_dir, offsite, started)?;
    summary.best = best;
    observer.finished();
    let text = serde_json::to_string_pretty(&summary).context("writing the summary")?;
    let path = out.dir.join("summary.json");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(summary)
}

/// The course's data, split over its clients and tokenized, with a line
/// saying what was read (and what was left out).
fn tokenized_clients(
    course: &CourseFile,
    out: &Output,
    base: &Base,
    say: &dyn Fn(&str),
) -> Result<Vec<Prepared>> {
    let (fed, template) = course_data(course, &out.data_root())?;
    let prepared = prepare(&fed, &template, &base.tok, course.llm()?.data.max_tokens)?;
    if let Some((line, why)) = fed.skipped.first() {
        say(&format!(
            "{}: {} malformed records left out (data.skip_bad_records), the first at line {line}: {why}",
            fed.path.display(),
            fed.skipped.len()
        ));
    }
    say(&format!(
        "{}: {} examples over {} clients ({}), template `{}`",
        fed.path.display(),
        fed.examples.len(),
        prepared.len(),
        prepared
            .iter()
            .map(|p| format!("{} {}", p.name, p.train.len()))
            .collect::<Vec<_>>()
            .join(", "),
        template.name
    ));
    Ok(prepared)
}

/// Says which configured scripts a `global` or `local` course leaves unused.
fn warn_unused_scripts(course: &CourseFile, llm: &LlmConfig) {
    let mode = course.cfg.course.mode;
    if llm.pfl.enabled() {
        tracing::warn!(
            "pfl.algorithm is ignored in {mode:?} mode: personalization needs a federation"
        );
    }
    if course.cfg.aggregator.script.is_some() {
        tracing::warn!(
            "aggregator.script is ignored in {mode:?} mode: one client, nothing to combine"
        );
    }
}

impl Setup<'_> {
    fn seed(&self) -> u64 {
        self.course.cfg.course.seed
    }

    fn pad(&self) -> u32 {
        self.base.tok.eos_id
    }

    fn batch(&self, items: &[Tokenized], size: usize, shuffle: Option<u64>) -> Result<Vec<Batch>> {
        batches(items, size, shuffle, self.pad())
    }

    fn progress(&self) -> StepProgress {
        let o = self.observer.clone();
        Arc::new(move |client, step, steps, loss| o.step(client, step, steps, loss))
    }

    /// The checkpoints of a course, under `checkpoints/` (`checkpoints/SUB/` when `sub` is set).
    fn checkpoints(&self, sub: Option<&str>) -> Checkpoints {
        let mut dir = self.out.dir.join("checkpoints");
        if let Some(sub) = sub {
            dir = dir.join(sub);
        }
        Checkpoints::new(
            dir,
            self.course.cfg.course.save_every,
            Arc::new(self.store.clone()),
        )
        .with_tag(self.fingerprint.clone())
    }

    /// Where the course starts: fresh from the seeded initial adapter, or
    /// (with `--resume`) after the newest checkpoint.
    fn start(&self) -> Result<Start> {
        let initial = RoundRobinTrainer::initial_adapter(&self.model, &self.spec, self.seed())
            .map_err(trainer_error)?;
        if !self.out.resume {
            return Ok(Start::Fresh(initial));
        }
        ensure!(
            self.course.cfg.course.mode != Mode::Local,
            "--resume continues fed and global courses; a local run is one course per client"
        );
        let checkpoints = self.checkpoints(None);
        Ok(match checkpoints.latest()? {
            Some(found) => {
                self.observer.say(&format!(
                    "resuming after round {} from {}",
                    found.round,
                    checkpoints.dir().display()
                ));
                Start::After(Box::new(found))
            }
            None => Start::Fresh(initial),
        })
    }

    /// Runs one course on the in-process bus, logging to the run's log;
    /// records of a single-client course run for client `as_client` are
    /// logged under that id.
    fn course(
        &self,
        cfg: &CourseConfig,
        (start, checkpoints): (Start, Checkpoints),
        trainer: RoundRobinTrainer,
        aggregator: Box<dyn Aggregator>,
        as_client: Option<u32>,
    ) -> Result<(CourseReport, Arc<Mutex<RoundRobinTrainer>>)> {
        let shared = self.log.clone();
        let observer = self.observer.clone();
        let rounds = cfg.course.rounds;
        let relay = MetricsLog::in_memory().with_observer(Box::new(move |r: &Record| {
            let mut r = r.clone();
            if let (Some(id), Some(_)) = (as_client, r.client) {
                r.client = Some(id);
            }
            observer.record(&r, rounds);
            if let Ok(mut log) = shared.lock() {
                if let Err(e) = log.push(r) {
                    observer.say(&format!("warning: cannot write metrics: {e}"));
                }
            }
        }));
        let trainer = Arc::new(Mutex::new(trainer.with_progress(self.progress())));
        let shared: SharedTrainer = trainer.clone();
        let setup = match start {
            Start::Fresh(p) => ServerSetup::new(cfg.clone(), p, aggregator, relay),
            // The strategy's saved state comes back with the checkpoint.
            Start::After(found) => {
                ServerSetup::new(cfg.clone(), found.params.clone(), aggregator, relay)
                    .resumed_from(*found)?
            }
        };
        let setup = setup.with_checkpoints(checkpoints);
        let report = self.runtime.block_on(run_in_process_from(setup, shared))?;
        Ok((report, trainer))
    }

    /// Personalized courses: each client's own adapter (personal, or the
    /// global one with its local parts) as `adapter_dir/client-N/`.
    fn write_client_adapters(
        &self,
        trainer: &Mutex<RoundRobinTrainer>,
        global: &ParamSet,
        adapter_dir: &Path,
    ) -> Result<()> {
        let trainer = trainer
            .lock()
            .map_err(|_| CourseError::invalid("the trainer panicked during the course"))?;
        let mut written = 0;
        for id in 1..=self.course.cfg.course.clients {
            if let Some(own) = trainer.client_adapter(id, global).map_err(trainer_error)? {
                self.store
                    .write(&adapter_dir.join(format!("client-{id}")), &own)?;
                written += 1;
            }
        }
        if written > 0 {
            self.observer.say(&format!(
                "{written} clients' own adapters in {}/client-N",
                adapter_dir.display()
            ));
        }
        Ok(())
    }

    /// The federated scenario; with FedOT, also the adapter plugged into
    /// the full model; with `keep_best`, the best round's adapter too.
    fn fed(
        &self,
        aggregator: Box<dyn Aggregator>,
        emulated: Option<&(Emulator, AdapterSpec, Distilled)>,
        adapter_dir: &Path,
    ) -> Result<(Option<OffsiteSummary>, Option<BestSummary>)> {
        let data: BTreeMap<u32, ClientData> = self
            .prepared
            .iter()
            .enumerate()
            .map(|(c, p)| {
                let d = client_data(p, c as u64, self.llm, self.seed(), self.pad())?;
                Ok((c as u32 + 1, d))
            })
            .collect::<Result<_>>()?;
        let trainer = fed_trainer(self.course, (self.model.clone(), &self.spec), data)?;
        let start = (self.start()?, self.checkpoints(None));
        let (report, trainer) = self.course(&self.course.cfg, start, trainer, aggregator, None)?;
        // With FedOT the best is the emulator's adapter, as `adapter-emulator/` is.
        let best_name = match emulated {
            Some(_) => "adapter-emulator-best",
            None => "adapter-best",
        };
        let best = report
            .best
            .as_ref()
            .map(|b| -> Result<BestSummary> {
                let dir = self.out.dir.join(best_name);
                self.store.write(&dir, &b.params)?;
                let key = self
                    .course
                    .cfg
                    .course
                    .keep_best
                    .as_deref()
                    .unwrap_or_default();
                Ok(BestSummary::new(key, b, report.stopped_early, &dir))
            })
            .transpose()?;
        let offsite = self.save_adapters(emulated, &[(&report.final_params, None)], adapter_dir)?;
        if emulated.is_none() {
            self.write_client_adapters(&trainer, &report.final_params, adapter_dir)?;
        }
        Ok((offsite, best))
    }

    /// Saves each adapter a scenario trained — `(params, Some(client))` for
    /// a client's own, `(params, None)` for the course's — under
    /// `adapter_dir` (`client-N/` for a client's). With FedOT (or LocalOT)
    /// they were trained on the emulator: each goes under
    /// `adapter-emulator/` as it is and under `adapter_dir` plugged into the
    /// full model, where it is scored (a client's on its own test split, the
    /// course's on all).
    fn save_adapters(
        &self,
        emulated: Option<&(Emulator, AdapterSpec, Distilled)>,
        trained: &[(&ParamSet, Option<u32>)],
        adapter_dir: &Path,
    ) -> Result<Option<OffsiteSummary>> {
        let sub = |dir: &Path, client: Option<u32>| match client {
            Some(id) => dir.join(format!("client-{id}")),
            None => dir.to_path_buf(),
        };
        let Some((emu, emu_spec, distilled)) = emulated else {
            for (params, client) in trained {
                self.store.write(&sub(adapter_dir, *client), params)?;
            }
            return Ok(None);
        };
        let test: Vec<Vec<Batch>> = self
            .prepared
            .iter()
            .map(|p| self.batch(&p.test, self.llm.train.eval_batch_size, None))
            .collect::<Result<_>>()?;
        let dirs: Vec<PathBuf> = trained
            .iter()
            .map(|(params, client)| {
                self.store.write(
                    &sub(&self.out.dir.join("adapter-emulator"), *client),
                    params,
                )?;
                Ok(sub(adapter_dir, *client))
            })
            .collect::<Result<_>>()?;
        let plugged: Vec<Trained<'_>> = trained
            .iter()
            .zip(&dirs)
            .map(|((params, client), dir)| Trained {
                params,
                dir,
                test: match client {
                    Some(id) => &test[*id as usize - 1..*id as usize],
                    None => &test,
                },
                client: *client,
            })
            .collect();
        let mut summary = plug_in(
            &self.base.model,
            emu,
            emu_spec,
            &plugged,
            &self.base.file_name(),
        )?;
        summary.distilled = (distilled.steps > 0).then(|| distilled.clone());
        Ok(Some(summary))
    }

    /// The global scenario: one client with everyone's training data,
    /// evaluated on each client's test split.
    fn global(
        &self,
        emulated: Option<&(Emulator, AdapterSpec, Distilled)>,
        adapter_dir: &Path,
    ) -> Result<Option<OffsiteSummary>> {
        let all_train: Vec<Tokenized> =
            self.prepared.iter().flat_map(|p| p.train.clone()).collect();
        let mut eval = Vec::new();
        for (c, p) in self.prepared.iter().enumerate() {
            if !p.test.is_empty() {
                eval.push((
                    format!("test:{}", c + 1),
                    self.batch(&p.test, self.llm.train.eval_batch_size, None)?,
                ));
            }
        }
        let one = ClientData {
            train: self.batch(&all_train, self.llm.train.batch_size, Some(self.seed()))?,
            eval,
            n_samples: all_train.len() as u64,
        };
        let cfg = &self.course.cfg;
        let training = self.llm.local_training();
        let g_training = LocalTraining {
            local_steps: training.local_steps * cfg.clients_per_round() as usize,
            ..training
        };
        let trainer = plain_trainer(
            self.course,
            (self.model.clone(), &self.spec),
            g_training,
            BTreeMap::from([(1, one)]),
        )?;
        let start = (self.start()?, self.checkpoints(None));
        let (report, _) =
            self.course(&single_client(cfg), start, trainer, Box::new(FedAvg), None)?;
        self.save_adapters(emulated, &[(&report.final_params, None)], adapter_dir)
    }

    /// The local scenario: one single-client course per client, with no
    /// aggregation (with `[offsite]`, LocalOT: each client tunes the emulator alone).
    fn local(
        &self,
        emulated: Option<&(Emulator, AdapterSpec, Distilled)>,
        adapter_dir: &Path,
    ) -> Result<Option<OffsiteSummary>> {
        let l_cfg = single_client(&self.course.cfg);
        let initial = match self.start()? {
            Start::Fresh(p) => p,
            Start::After(found) => found.params,
        };
        let mut trained = Vec::new();
        for (c, p) in self.prepared.iter().enumerate() {
            let id = c as u32 + 1;
            self.observer
                .say(&format!("local training of client {id} ({})", p.name));
            let data = client_data(p, c as u64, self.llm, self.seed(), self.pad())?;
            let trainer = plain_trainer(
                self.course,
                (self.model.clone(), &self.spec),
                self.llm.local_training(),
                BTreeMap::from([(1, data)]),
            )?;
            let start = (
                Start::Fresh(initial.clone()),
                self.checkpoints(Some(&format!("client-{id}"))),
            );
            let (report, _) = self.course(&l_cfg, start, trainer, Box::new(FedAvg), Some(id))?;
            // Saved as soon as it is trained (an interrupted local run keeps
            // the clients done); with FedOT all are plugged in at the end.
            if emulated.is_none() {
                self.save_adapters(None, &[(&report.final_params, Some(id))], adapter_dir)?;
            } else {
                trained.push((report.final_params, Some(id)));
            }
        }
        let trained: Vec<(&ParamSet, Option<u32>)> = trained.iter().map(|(p, c)| (p, *c)).collect();
        self.save_adapters(emulated, &trained, adapter_dir)
    }

    /// The summary, from the whole metrics file: a resumed course's
    /// "before" was logged by the run it continues.
    fn summarize(
        &self,
        adapter_dir: &Path,
        offsite: Option<OffsiteSummary>,
        started: Instant,
    ) -> Result<Summary> {
        let cfg = &self.course.cfg;
        let records = read_records(&self.out.dir.join("metrics.jsonl"))?;
        // The full model (with FedOT, `model` is the emulator; the adapter in
        // `adapter/` is the full model's).
        let eval = evaluate_at_end(
            self.course,
            &self.base,
            adapter_dir,
            (&self.out.dir, &self.out.data_root()),
            self.observer.as_ref(),
        )?;
        let per_client: Vec<ClientSummary> = self
            .prepared
            .iter()
            .enumerate()
            .map(|(c, p)| {
                let id = c as u32 + 1;
                let (before, after) = match cfg.course.mode {
                    Mode::Global => split_losses(&records, 1, &format!("test:{id}")),
                    _ => split_losses(&records, id, "test"),
                };
                // Its own adapter's scores: on its own group where the task has one.
                let prefix = format!("client-{id}/");
                let own_adapter_eval = eval
                    .iter()
                    .filter_map(|r| {
                        let task = r.task.strip_prefix(&prefix)?;
                        let group = r.groups.get(&format!("client {}", p.name));
                        Some((task.to_string(), group.map_or(r.score, |g| g.score)))
                    })
                    .collect();
                ClientSummary {
                    id,
                    name: p.name.clone(),
                    train_examples: p.train.len(),
                    test_examples: p.test.len(),
                    test_loss_before: before,
                    test_loss_after: after,
                    own_adapter_eval,
                }
            })
            .collect();
        let (bytes_up, bytes_down) = traffic(&records);
        Ok(Summary {
            course: cfg.course.name.clone(),
            mode: cfg.course.mode,
            rounds: cfg.course.rounds,
            clients: cfg.course.clients,
            local_steps: self.llm.train.local_steps,
            local_epochs: self.llm.train.local_epochs,
            test_loss_before: Summary::weighted_mean(&per_client, |s| s.test_loss_before),
            test_loss_after: Summary::weighted_mean(&per_client, |s| s.test_loss_after),
            mean_client_test_loss_after: Summary::mean_after(&per_client),
            per_client,
            bytes_up,
            bytes_down,
            wall_s: started.elapsed().as_secs_f64(),
            train_flops: records
                .iter()
                .filter(|r| r.event == fedtune_kernel::Event::Train)
                .filter_map(|r| r.extra.get("flops"))
                .sum(),
            peak_rss_mib: peak_rss_mib(),
            adapter: adapter_dir.display().to_string(),
            eval,
            offsite,
            privacy: PrivacySummary::from_records(&cfg.privacy, &records),
            best: None,
        })
    }
}

/// `cfg` as a course of one client (the global and local scenarios).
fn single_client(cfg: &CourseConfig) -> CourseConfig {
    let mut one = cfg.clone();
    one.course.clients = 1;
    one.course.sample_clients = None;
    one
}
