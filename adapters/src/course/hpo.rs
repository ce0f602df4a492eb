//! FedHPO's trials: each evaluation a course of this crate, every LLM trial
//! on the one base model this process loaded.
//!
//! [`CourseTrials`] is the kernel's [`TrialRunner`] for a course file: a
//! trial's configuration is a set of `--set` overrides laid over the file
//! (and the user's own `--set`s), run in the trial's directory to the
//! rounds asked. A promoted trial (more rounds of the same configuration)
//! continues its course from its newest checkpoint, which is exact: the
//! result is the one a fresh course of that many rounds gives. Before any
//! trial runs, [`CourseTrials::check_space`] lays every bound and choice of
//! the space over the course and refuses the space, naming the key, when
//! the course would refuse a value.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fedtune_kernel::config::{ConfigDoc, Mode};
use fedtune_kernel::hpo::{
    overrides, ClientOutcome, Config, Space, SpaceError, TrialError, TrialJob, TrialOutcome,
    TrialRunner,
};
use fedtune_kernel::{Checkpoints, Event, Record};

use super::config::{same_config_but_rounds, CourseFile, Task};
use super::numeric::run_least_squares;
use super::run::run_llm_on;
use super::run_dir::Output;
use super::{Base, CourseError, Result};
use crate::model::Placement;
use crate::progress::Silent;

/// Runs a course file's trials.
pub struct CourseTrials {
    /// The course file with the user's `--set`s applied.
    doc: ConfigDoc,
    data_root: Option<PathBuf>,
    /// Base models loaded so far, by path (`None`: the default model).
    bases: Mutex<BTreeMap<(Option<PathBuf>, Placement), Base>>,
    fingerprint: String,
    /// An LLM course (checkpointed every round, so trials can continue).
    llm: bool,
    say: Arc<dyn Fn(&str) + Send + Sync>,
}

impl CourseTrials {
    /// Trials of `course`; `say` hears the lines worth telling (a model loading).
    pub fn new(
        course: &CourseFile,
        data_root: Option<PathBuf>,
        say: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Self> {
        Ok(Self {
            doc: course.doc.clone(),
            data_root,
            bases: Mutex::new(BTreeMap::new()),
            fingerprint: course.fingerprint()?,
            llm: matches!(course.task, Task::Llm(_)),
            say,
        })
    }

    /// The course of `config` run to `rounds` rounds. Every trial checkpoints
    /// each round, so that a promoted trial can continue its course.
    pub fn course(&self, config: &Config, rounds: u64) -> Result<CourseFile> {
        let mut doc = self.doc_for(config, rounds)?;
        if self.llm {
            doc.apply_override("federate.save_every=1")?;
        }
        let course = CourseFile::from_doc(doc)?;
        if matches!(course.task, Task::LeastSquares(_)) && course.cfg.course.mode != Mode::Fed {
            return Err(CourseError::invalid(
                "federate.mode: the numeric least-squares course runs in mode \"fed\" only",
            ));
        }
        Ok(course)
    }

    /// Refuses a space one of whose bounds or choices the course would
    /// refuse, naming the key, before any trial runs.
    pub fn check_space(&self, space: &Space) -> Result<(), SpaceError> {
        for (key, value) in space.extremes() {
            let one = Config::from([(key.clone(), value.clone())]);
            if let Err(e) = self.course(&one, 1) {
                return Err(SpaceError {
                    origin: space.origin.clone(),
                    key,
                    message: format!("the course refuses {value}: {e}"),
                });
            }
        }
        Ok(())
    }

    /// The runnable configuration of `config` at `rounds` rounds (`best.toml`).
    pub fn resolved(&self, config: &Config, rounds: u64) -> Result<String> {
        CourseFile::from_doc(self.doc_for(config, rounds)?)?.resolved()
    }

    /// The course file with `config`'s overrides and `rounds` rounds.
    fn doc_for(&self, config: &Config, rounds: u64) -> Result<ConfigDoc> {
        let mut doc = self.doc.clone();
        for arg in overrides(config) {
            doc.apply_override(&arg)?;
        }
        doc.apply_override(&format!("federate.rounds={rounds}"))?;
        Ok(doc)
    }

    /// The base model of `course` in its placement (dtype and device),
    /// loaded and placed once per path and placement, not once per trial.
    fn base(&self, course: &CourseFile) -> Result<Base> {
        let key = match &course.task {
            Task::Llm(llm) => (course.model_path(), llm.model.placement()),
            Task::LeastSquares(_) => (course.model_path(), Placement::default()),
        };
        let mut bases = self
            .bases
            .lock()
            .map_err(|_| CourseError::invalid("a trial panicked while loading the model"))?;
        if let Some(b) = bases.get(&key) {
            return Ok(b.clone());
        }
        let say = |line: &str| (self.say)(line);
        let base = Base::load(key.0.as_deref(), &say)?.place(key.1, &say)?;
        bases.insert(key, base.clone());
        Ok(base)
    }

    fn run_course(&self, job: &TrialJob) -> Result<TrialOutcome> {
        let course = self.course(&job.config, job.rounds)?;
        // Continue the trial's course when its directory holds fewer rounds
        // of this very configuration (a local-mode run is one course per
        // client and always starts afresh).
        let done = Checkpoints::newest_round(&job.dir.join("checkpoints"));
        let resume = matches!(course.task, Task::Llm(_))
            && course.cfg.course.mode != Mode::Local
            && done.is_some_and(|d| d < job.rounds)
            && same_config_but_rounds(&job.dir.join("config.toml"), &course.resolved()?).is_ok();
        if resume {
            tracing::info!(
                trial = job.trial,
                "trial continues its course from round {} to {}",
                done.unwrap_or(0),
                job.rounds
            );
        }
        let out = Output {
            dir: job.dir.clone(),
            resume,
            overwrite: !resume,
            data_root: self.data_root.clone(),
            managed: false,
        };
        let _lock = out.prepare(&course)?;
        match &course.task {
            Task::Llm(_) => {
                let base = self.base(&course)?;
                let s = run_llm_on(&course, &out, Arc::new(Silent), Some(&base))?;
                let mut metrics = BTreeMap::new();
                let mut put = |k: &str, v: Option<f64>| {
                    if let Some(v) = v {
                        metrics.insert(k.to_string(), v);
                    }
                };
                put("loss", s.test_loss_after);
                put("loss_before", s.test_loss_before);
                put("mean_client_loss", s.mean_client_test_loss_after);
                // A task's score (each client's, averaged, in local mode).
                let mut scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                for t in &s.eval {
                    scores.entry(t.task.clone()).or_default().push(t.score);
                }
                for (task, v) in scores {
                    metrics.insert(task, v.iter().sum::<f64>() / v.len() as f64);
                }
                let clients = s
                    .per_client
                    .iter()
                    .filter_map(|c| {
                        Some(ClientOutcome {
                            id: c.id,
                            examples: c.train_examples as u64,
                            loss: c.test_loss_after?,
                        })
                    })
                    .collect();
                Ok(TrialOutcome {
                    metrics,
                    clients,
                    bytes_up: s.bytes_up,
                    bytes_down: s.bytes_down,
                })
            }
            Task::LeastSquares(ls) => {
                let (report, s) = run_least_squares(&course, ls, &out)?;
                let mut metrics: BTreeMap<String, f64> = s
                    .final_loss
                    .iter()
                    .map(|(split, v)| (format!("{split}_loss"), *v))
                    .collect();
                if let Some(v) = s.final_loss.get("test").or(s.final_loss.get("train")) {
                    metrics.insert("loss".into(), *v);
                }
                Ok(TrialOutcome {
                    metrics,
                    clients: numeric_clients(&report.records),
                    bytes_up: s.bytes_up,
                    bytes_down: s.bytes_down,
                })
            }
        }
    }
}

/// Each client's test loss at the numeric course's last evaluation, with
/// its training examples, from the course's records.
fn numeric_clients(records: &[Record]) -> Vec<ClientOutcome> {
    let last = records
        .iter()
        .filter(|r| r.event == Event::Eval)
        .map(|r| r.round)
        .max();
    let at_last = |split: &str| -> BTreeMap<u32, (f64, u64)> {
        records
            .iter()
            .filter(|r| {
                r.event == Event::Eval && Some(r.round) == last && r.split.as_deref() == Some(split)
            })
            .filter_map(|r| Some((r.client?, (r.loss?, r.samples.unwrap_or(0)))))
            .collect()
    };
    let train = at_last("train");
    at_last("test")
        .into_iter()
        .map(|(id, (loss, _))| ClientOutcome {
            id,
            examples: train.get(&id).map_or(0, |t| t.1),
            loss,
        })
        .collect()
}

impl TrialRunner for CourseTrials {
    fn check(&self, config: &Config) -> std::result::Result<(), TrialError> {
        self.course(config, 1)?;
        Ok(())
    }

    fn run(&self, job: &TrialJob) -> std::result::Result<TrialOutcome, TrialError> {
        Ok(self.run_course(job)?)
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}
