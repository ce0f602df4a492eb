//! The searcher host: a Rhai script decides which configurations to try,
//! a pool of workers runs them, and a ledger keeps every finished trial.
//!
//! A searcher script defines `fn search(space, budget)`. It proposes work
//! with `suggest(config, rounds)`, which queues an *evaluation* — the
//! configuration's course run to `rounds` rounds — and returns its id at
//! once; `report(id)` waits for that evaluation and returns what it
//! measured; `evaluate(configs, rounds)` does both for a batch. Up to
//! `parallel` evaluations run at a time. The same configuration is one
//! *trial*: its evaluations share a directory (`trials/T0003/`), so a runner
//! that can continue a course (the LLM course resumes from its checkpoint)
//! pays only for the extra rounds when a searcher promotes it.
//!
//! Every finished evaluation is appended to `trials.jsonl`. With `resume`,
//! an evaluation whose configuration and rounds are in the ledger is not run
//! again: the script, seeded as before, is replayed and gets the recorded
//! result. A script's `search` may return the evaluation it picks as the
//! best (its id or report); otherwise the best is the lowest objective among
//! the evaluations with the most rounds.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::gp::{expected_improvement, Gp};
use super::space::{Config, Space};
use crate::script::{ScriptError, ScriptFile, ScriptHost, ScriptSource, ScriptingSection};

/// Why a search cannot start or stopped.
#[derive(Debug, Error)]
pub enum HpoError {
    /// The searcher script failed (the message names its file and line).
    #[error(transparent)]
    Script(#[from] ScriptError),
    /// The output directory or the ledger cannot be used.
    #[error("{0}")]
    Output(String),
}

/// What a search minimizes: a metric a trial reports, negated when larger is better.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// The metric's name (`loss`, `humaneval`, …).
    pub metric: String,
    /// Whether larger values are better.
    pub maximize: bool,
}

impl Objective {
    /// `loss` (minimized), `max:NAME` / `min:NAME`, or a bare name: minimized
    /// when it is a loss (`loss`, `train_loss`, the `loss:test` task),
    /// maximized otherwise (task scores).
    pub fn parse(text: &str) -> Self {
        let (metric, maximize) = match text.split_once(':') {
            Some(("max", m)) => (m, true),
            Some(("min", m)) => (m, false),
            _ => (text, !(text.ends_with("loss") || text.starts_with("loss:"))),
        };
        Self {
            metric: metric.to_string(),
            maximize,
        }
    }

    /// The value to minimize, from a trial's metrics.
    pub fn of(&self, metrics: &BTreeMap<String, f64>) -> Option<f64> {
        let v = *metrics.get(&self.metric)?;
        Some(if self.maximize { -v } else { v })
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = if self.maximize { "max" } else { "min" };
        write!(f, "{dir}:{}", self.metric)
    }
}

/// The budget a searcher script reads as `budget.NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// How many configurations to try (`--trials`).
    pub trials: u64,
    /// The most rounds one evaluation may run (`--budget-rounds`).
    pub rounds: u64,
    /// The fewest rounds a multi-fidelity searcher starts with.
    pub min_rounds: u64,
    /// Successive halving's reduction factor: keep the top 1/eta per rung.
    pub eta: u64,
    /// Seeds the searcher's random draws.
    pub seed: u64,
    /// More values for the script, read as `budget.NAME` (`--param NAME=VALUE`).
    #[serde(default)]
    pub params: toml::Table,
}

impl Budget {
    fn to_map(&self) -> Map {
        let mut m = Map::new();
        for (k, v) in [
            ("trials", self.trials),
            ("rounds", self.rounds),
            ("min_rounds", self.min_rounds),
            ("eta", self.eta),
            ("seed", self.seed),
        ] {
            m.insert(k.into(), Dynamic::from_int(v as i64));
        }
        for (k, v) in &self.params {
            m.insert(k.as_str().into(), crate::script::toml_to_dynamic(v));
        }
        m
    }
}

/// One evaluation for a runner to run.
#[derive(Debug, Clone)]
pub struct TrialJob {
    /// The evaluation's id (its order of suggestion).
    pub eval: u64,
    /// The configuration's trial id.
    pub trial: u64,
    /// The overrides.
    pub config: Config,
    /// Rounds to run the course to.
    pub rounds: u64,
    /// The trial's directory (shared by its evaluations).
    pub dir: PathBuf,
}

/// One client's result in an evaluation (per-client searchers use these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientOutcome {
    /// 1-based client id.
    pub id: u32,
    /// Its training examples.
    pub examples: u64,
    /// Its held-out loss after the last round.
    pub loss: f64,
}

/// What a runner measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrialOutcome {
    /// Named figures (`loss`, task scores, …).
    pub metrics: BTreeMap<String, f64>,
    /// Per client.
    pub clients: Vec<ClientOutcome>,
    /// Bytes clients sent.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
}

/// Why a trial's configuration was refused or its run failed: the
/// runner's own error (its chain of sources goes into the ledger).
pub type TrialError = Box<dyn std::error::Error + Send + Sync>;

/// Runs trials: the port between the searcher and what a course is.
pub trait TrialRunner: Send + Sync {
    /// Refuses a configuration the course cannot run, saying why (naming the key).
    fn check(&self, config: &Config) -> Result<(), TrialError>;
    /// Runs one evaluation to its end; an error is a failed trial (recorded, not fatal).
    fn run(&self, job: &TrialJob) -> Result<TrialOutcome, TrialError>;
    /// Identifies the course searched over: a resumed search must have the same.
    fn fingerprint(&self) -> String;
}

/// One line of `trials.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The evaluation's id.
    pub eval: u64,
    /// The configuration's trial id.
    pub trial: u64,
    /// Rounds the course ran.
    pub rounds: u64,
    /// The overrides.
    pub config: Config,
    /// The value minimized (`None` when the trial failed or lacks the metric).
    pub objective: Option<f64>,
    /// What the runner measured.
    pub metrics: BTreeMap<String, f64>,
    /// Per client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientOutcome>,
    /// Bytes clients sent.
    pub bytes_up: u64,
    /// Bytes the server sent.
    pub bytes_down: u64,
    /// Seconds it ran.
    pub wall_s: f64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Evaluation {
    fn to_map(&self) -> Map {
        let mut m = Map::new();
        let int = |v: u64| Dynamic::from_int(v as i64);
        m.insert("eval".into(), int(self.eval));
        m.insert("trial".into(), int(self.trial));
        m.insert("rounds".into(), int(self.rounds));
        m.insert(
            "config".into(),
            Dynamic::from_map(config_to_map(&self.config)),
        );
        m.insert(
            "objective".into(),
            Dynamic::from_float(self.objective.unwrap_or(f64::INFINITY)),
        );
        m.insert("ok".into(), Dynamic::from_bool(self.objective.is_some()));
        let metrics: Map = self
            .metrics
            .iter()
            .map(|(k, v)| (k.as_str().into(), Dynamic::from_float(*v)))
            .collect();
        m.insert("metrics".into(), Dynamic::from_map(metrics));
        let clients: Array = self
            .clients
            .iter()
            .map(|c| {
                let mut cm = Map::new();
                cm.insert("id".into(), Dynamic::from_int(i64::from(c.id)));
                cm.insert("examples".into(), int(c.examples));
                cm.insert("loss".into(), Dynamic::from_float(c.loss));
                Dynamic::from_map(cm)
            })
            .collect();
        m.insert("clients".into(), Dynamic::from_array(clients));
        m.insert("wall_s".into(), Dynamic::from_float(self.wall_s));
        m.insert(
            "error".into(),
            self.error.clone().map_or(Dynamic::UNIT, Dynamic::from),
        );
        m
    }
}

/// Hears each finished evaluation; `true` when this process ran it (not the ledger).
pub type OnEvaluation = Box<dyn Fn(&Evaluation, bool) + Send + Sync>;

/// Everything a search needs.
pub struct SearchSetup {
    /// What is varied.
    pub space: Space,
    /// Runs the trials.
    pub runner: Arc<dyn TrialRunner>,
    /// What is minimized.
    pub objective: Objective,
    /// The script's budget.
    pub budget: Budget,
    /// Evaluations run at a time.
    pub parallel: usize,
    /// The output directory (`trials.jsonl`, `search.json`, `trials/`).
    pub out: PathBuf,
    /// Continue the search in `out`, reusing its finished evaluations.
    pub resume: bool,
    /// With `resume`, run the evaluations that failed again instead of reusing their failure.
    pub retry_failed: bool,
    /// The searcher's name, as `search.json` records it.
    pub method: String,
    /// Called after each evaluation finishes (run now or reused).
    pub on_evaluation: OnEvaluation,
    /// A line from the searcher (`say(text)` in the script).
    pub on_say: Box<dyn Fn(&str) + Send + Sync>,
}

/// What a finished search leaves.
#[derive(Debug, Clone)]
pub struct SearchOutcome {
    /// Every evaluation, in the order suggested.
    pub evaluations: Vec<Evaluation>,
    /// The best one (see the module docs).
    pub best: Option<Evaluation>,
    /// Evaluations run by this process (the rest came from the ledger).
    pub ran: usize,
}

/// The file a search's evaluations are appended to.
pub const LEDGER: &str = "trials.jsonl";
/// The file that pins what a search in a directory is.
const META: &str = "search.json";

/// What must not change when a search is resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SearchMeta {
    method: String,
    space: String,
    objective: Objective,
    budget: Budget,
    course: String,
}

/// Runs the searcher `source` over `setup`'s space until its `search` returns.
pub fn run_search(setup: SearchSetup, source: &ScriptSource) -> Result<SearchOutcome, HpoError> {
    let limits = ScriptingSection {
        // A search is one long call: room for its own loops, still bounded.
        max_operations: 2_000_000_000,
        max_call_levels: 64,
        ..Default::default()
    };
    let (cached, trial_of) = prepare_out(&setup)?;
    let ledger = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(setup.out.join(LEDGER))
        .map_err(|e| {
            HpoError::Output(format!(
                "cannot write {}: {e}",
                setup.out.join(LEDGER).display()
            ))
        })?;
    let used: BTreeSet<u64> = trial_of.values().copied().collect();
    let sched = Arc::new(Scheduler {
        runner: setup.runner.clone(),
        objective: setup.objective.clone(),
        out: setup.out.clone(),
        state: Mutex::new(State {
            slots: Vec::new(),
            cached,
            trial_of,
            used,
            busy: HashSet::new(),
            closing: false,
            ran: 0,
        }),
        changed: Condvar::new(),
        ledger: Mutex::new(ledger),
        on_evaluation: setup.on_evaluation,
    });
    let rng = Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(setup.budget.seed)));
    let space = Arc::new(setup.space);
    let host = {
        let (sched, rng, space) = (sched.clone(), rng.clone(), space.clone());
        let on_say = setup.on_say;
        ScriptHost::with_api(&limits, move |engine| {
            register(engine, sched, rng, space, on_say)
        })
    };
    let script = ScriptFile::from_source(&host, source)?;
    script.require_fn("search", 2)?;
    let workers: Vec<_> = (0..setup.parallel.max(1))
        .map(|_| {
            let sched = sched.clone();
            std::thread::spawn(move || sched.work())
        })
        .collect();
    let handle = SpaceHandle {
        space: space.clone(),
    };
    let mut state = Dynamic::UNIT;
    let result = host.call(
        &script,
        "search",
        &mut state,
        (handle, setup.budget.to_map()),
        "search",
    );
    // Whatever was suggested runs to its end (it is recorded for a resume),
    // unless the script failed: then only the running evaluations finish.
    sched.close(result.is_err());
    for w in workers {
        let _ = w.join();
    }
    let picked = result?;
    let state = sched
        .state
        .lock()
        .map_err(|_| HpoError::Output("a trial worker panicked".into()))?;
    let evaluations: Vec<Evaluation> = state
        .slots
        .iter()
        .filter_map(|s| match s {
            Slot::Done(e) => Some(e.clone()),
            _ => None,
        })
        .collect();
    let best = pick_best(&picked, &evaluations);
    Ok(SearchOutcome {
        evaluations,
        best,
        ran: state.ran,
    })
}

/// The script's choice (an id or a report), or the lowest objective among
/// the evaluations with the most rounds.
fn pick_best(picked: &Dynamic, evaluations: &[Evaluation]) -> Option<Evaluation> {
    let id = picked.as_int().ok().or_else(|| {
        picked
            .read_lock::<Map>()
            .and_then(|m| m.get("eval").and_then(|v| v.as_int().ok()))
    });
    if let Some(e) = id.and_then(|id| evaluations.iter().find(|e| e.eval as i64 == id)) {
        return Some(e.clone());
    }
    let ok = || evaluations.iter().filter(|e| e.objective.is_some());
    let top = ok().map(|e| e.rounds).max()?;
    ok().filter(|e| e.rounds == top)
        .min_by(|a, b| {
            a.objective
                .partial_cmp(&b.objective)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .cloned()
}

type Cached = HashMap<(String, u64), Evaluation>;

/// Checks the output directory; with `resume`, reads the ledger.
fn prepare_out(setup: &SearchSetup) -> Result<(Cached, BTreeMap<String, u64>), HpoError> {
    let out = &setup.out;
    let io = |what: &str, p: &Path, e: std::io::Error| {
        HpoError::Output(format!("cannot {what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(out).map_err(|e| io("create", out, e))?;
    let meta = SearchMeta {
        method: setup.method.clone(),
        space: format!("{:?}", setup.space.params),
        objective: setup.objective.clone(),
        budget: setup.budget.clone(),
        course: setup.runner.fingerprint(),
    };
    let meta_path = out.join(META);
    let ledger_path = out.join(LEDGER);
    let mut cached = Cached::new();
    let mut trial_of = BTreeMap::new();
    // A search that stopped before any evaluation finished (a script that
    // failed at once) holds nothing to keep.
    let held = std::fs::metadata(&ledger_path).is_ok_and(|m| m.len() > 0);
    if !setup.resume {
        if held {
            return Err(HpoError::Output(format!(
                "{} already holds a search; continue it with --resume, or choose another --out",
                out.display()
            )));
        }
    } else if held && meta_path.exists() {
        let text = std::fs::read_to_string(&meta_path).map_err(|e| io("read", &meta_path, e))?;
        let old: SearchMeta = serde_json::from_str(&text)
            .map_err(|e| HpoError::Output(format!("{}: {e}", meta_path.display())))?;
        let differs = [
            ("the searcher", old.method != meta.method),
            ("the space", old.space != meta.space),
            ("the objective", old.objective != meta.objective),
            (
                "the budget (--trials, --budget-rounds, --min-rounds, --eta, --seed)",
                old.budget != meta.budget,
            ),
            ("the course configuration", old.course != meta.course),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(HpoError::Output(format!(
                "--resume: {what} differs from the search in {}; a resumed search must be the same search",
                out.display()
            )));
        }
        if ledger_path.exists() {
            let text =
                std::fs::read_to_string(&ledger_path).map_err(|e| io("read", &ledger_path, e))?;
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Evaluation>(line) {
                    Ok(e) if setup.retry_failed && e.error.is_some() => {}
                    Ok(e) => {
                        trial_of.insert(config_key(&e.config), e.trial);
                        cached.insert((config_key(&e.config), e.rounds), e);
                    }
                    // A kill while the last line was written leaves half a line.
                    Err(_) if i + 1 == lines.len() => {
                        tracing::warn!(
                            "{}:{}: a half-written line, ignored",
                            ledger_path.display(),
                            i + 1
                        )
                    }
                    Err(e) => {
                        return Err(HpoError::Output(format!(
                            "{}:{}: not an evaluation: {e}",
                            ledger_path.display(),
                            i + 1
                        )))
                    }
                }
            }
            // Rewrite without the half line, so appends start on a fresh line.
            let mut good: Vec<&Evaluation> = cached.values().collect();
            good.sort_by_key(|e| e.eval);
            let mut text = String::new();
            for e in good {
                text.push_str(
                    &serde_json::to_string(e).map_err(|e| HpoError::Output(e.to_string()))?,
                );
                text.push('\n');
            }
            std::fs::write(&ledger_path, text).map_err(|e| io("write", &ledger_path, e))?;
        }
    }
    let text = serde_json::to_string_pretty(&meta).map_err(|e| HpoError::Output(e.to_string()))?;
    std::fs::write(&meta_path, text).map_err(|e| io("write", &meta_path, e))?;
    Ok((cached, trial_of))
}

/// A configuration's identity: its canonical JSON.
fn config_key(config: &Config) -> String {
    serde_json::to_string(config).unwrap_or_default()
}

enum Slot {
    Waiting(TrialJob),
    Running,
    Done(Evaluation),
}

struct State {
    slots: Vec<Slot>,
    cached: Cached,
    trial_of: BTreeMap<String, u64>,
    /// Trial ids taken: a new configuration gets the smallest free one, so
    /// a resumed search, replayed in the same order, gives each
    /// configuration its directory of before.
    used: BTreeSet<u64>,
    /// Trials with an evaluation running (their directory is in use).
    busy: HashSet<u64>,
    closing: bool,
    ran: usize,
}

struct Scheduler {
    runner: Arc<dyn TrialRunner>,
    objective: Objective,
    out: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
    ledger: Mutex<std::fs::File>,
    on_evaluation: OnEvaluation,
}

/// Why a searcher's `suggest` or `report` is refused.
#[derive(Debug, Error)]
enum SchedulerError {
    #[error("a trial worker panicked")]
    Poisoned,
    #[error("rounds must be at least 1")]
    NoRounds,
    #[error("no evaluation {0} was suggested")]
    Unknown(i64),
    #[error("{}", chain(.0.as_ref()))]
    Refused(TrialError),
}

impl From<SchedulerError> for Box<EvalAltResult> {
    fn from(e: SchedulerError) -> Self {
        e.to_string().into()
    }
}

/// An error and its sources, joined by `: `.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl Scheduler {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, SchedulerError> {
        self.state.lock().map_err(|_| SchedulerError::Poisoned)
    }

    /// Queues `config` at `rounds`; its id.
    fn suggest(&self, config: Config, rounds: u64) -> Result<u64, SchedulerError> {
        if rounds == 0 {
            return Err(SchedulerError::NoRounds);
        }
        self.runner
            .check(&config)
            .map_err(SchedulerError::Refused)?;
        let key = config_key(&config);
        let mut st = self.lock()?;
        let eval = st.slots.len() as u64;
        let trial = match st.trial_of.get(&key) {
            Some(&t) => t,
            None => {
                let t = (0..).find(|t| !st.used.contains(t)).expect("a free id");
                st.used.insert(t);
                st.trial_of.insert(key.clone(), t);
                t
            }
        };
        if let Some(found) = st.cached.get(&(key, rounds)) {
            let mut e = found.clone();
            e.eval = eval;
            (self.on_evaluation)(&e, false);
            st.slots.push(Slot::Done(e));
        } else {
            st.slots.push(Slot::Waiting(TrialJob {
                eval,
                trial,
                config,
                rounds,
                dir: self.out.join("trials").join(format!("T{trial:04}")),
            }));
            self.changed.notify_all();
        }
        Ok(eval)
    }

    /// Waits for evaluation `id`.
    fn report(&self, id: i64) -> Result<Evaluation, SchedulerError> {
        let mut st = self.lock()?;
        let slot = usize::try_from(id)
            .ok()
            .filter(|&i| i < st.slots.len())
            .ok_or(SchedulerError::Unknown(id))?;
        loop {
            if let Slot::Done(e) = &st.slots[slot] {
                return Ok(e.clone());
            }
            st = self
                .changed
                .wait(st)
                .map_err(|_| SchedulerError::Poisoned)?;
        }
    }

    /// Stops taking work once the queue is empty (at once with `abort`).
    fn close(&self, abort: bool) {
        if let Ok(mut st) = self.state.lock() {
            st.closing = true;
            if abort {
                for s in &mut st.slots {
                    if matches!(s, Slot::Waiting(_)) {
                        *s = Slot::Running;
                    }
                }
            }
        }
        self.changed.notify_all();
    }

    /// A worker: takes the first waiting evaluation whose trial is free.
    fn work(&self) {
        loop {
            let job = {
                let Ok(mut st) = self.state.lock() else {
                    return;
                };
                loop {
                    let busy = &st.busy;
                    let mut seen = HashSet::new();
                    // An evaluation waits behind an earlier one of its trial.
                    let next = st.slots.iter().position(|s| match s {
                        Slot::Waiting(j) => seen.insert(j.trial) && !busy.contains(&j.trial),
                        _ => false,
                    });
                    if let Some(i) = next {
                        let Slot::Waiting(job) = std::mem::replace(&mut st.slots[i], Slot::Running)
                        else {
                            unreachable!("found waiting")
                        };
                        st.busy.insert(job.trial);
                        break job;
                    }
                    let waiting = st.slots.iter().any(|s| matches!(s, Slot::Waiting(_)));
                    if st.closing && !waiting {
                        return;
                    }
                    st = match self.changed.wait(st) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                }
            };
            let started = Instant::now();
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runner.run(&job)))
                    .unwrap_or_else(|_| Err("the trial panicked".into()));
            let wall_s = started.elapsed().as_secs_f64();
            let e = match result {
                Ok(o) => {
                    let objective = self.objective.of(&o.metrics).filter(|v| v.is_finite());
                    let error = objective.is_none().then(|| {
                        format!(
                            "the course reported no finite `{}` (it reported: {})",
                            self.objective.metric,
                            o.metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    });
                    Evaluation {
                        eval: job.eval,
                        trial: job.trial,
                        rounds: job.rounds,
                        config: job.config,
                        objective,
                        metrics: o.metrics,
                        clients: o.clients,
                        bytes_up: o.bytes_up,
                        bytes_down: o.bytes_down,
                        wall_s,
                        error,
                    }
                }
                Err(why) => Evaluation {
                    eval: job.eval,
                    trial: job.trial,
                    rounds: job.rounds,
                    config: job.config,
                    objective: None,
                    metrics: BTreeMap::new(),
                    clients: Vec::new(),
                    bytes_up: 0,
                    bytes_down: 0,
                    wall_s,
                    error: Some(chain(why.as_ref())),
                },
            };
            if let Ok(mut f) = self.ledger.lock() {
                let line = serde_json::to_string(&e).unwrap_or_default();
                if let Err(err) = writeln!(f, "{line}").and_then(|()| f.flush()) {
                    tracing::error!("cannot append to {}: {err}", LEDGER);
                }
            }
            (self.on_evaluation)(&e, true);
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            st.busy.remove(&e.trial);
            st.ran += 1;
            let slot = e.eval as usize;
            st.slots[slot] = Slot::Done(e);
            self.changed.notify_all();
        }
    }
}

/// The space as the script sees it.
#[derive(Clone)]
struct SpaceHandle {
    space: Arc<Space>,
}

/// A fitted GP as the script sees it.
#[derive(Clone)]
struct GpHandle(Arc<Gp>);

type Rhai<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(message: impl Into<String>) -> Rhai<T> {
    Err(message.into().into())
}

/// The searcher API.
fn register(
    engine: &mut Engine,
    sched: Arc<Scheduler>,
    rng: Arc<Mutex<ChaCha8Rng>>,
    space: Arc<Space>,
    on_say: Box<dyn Fn(&str) + Send + Sync>,
) {
    register_space(engine, rng.clone());
    register_trials(engine, sched, space);
    register_gp(engine, rng);
    engine.register_fn("say", move |text: &str| on_say(text));
    engine.register_fn("top", |reports: Array, k: i64| -> Rhai<Array> {
        let mut ranked = ranked(&reports)?;
        ranked.truncate(usize::try_from(k).unwrap_or(0));
        Ok(ranked.into_iter().map(|(_, _, r)| r).collect())
    });
    engine.register_fn("best_of", |reports: Array| -> Rhai<Dynamic> {
        Ok(ranked(&reports)?
            .into_iter()
            .find(|(o, _, _)| o.is_finite())
            .map_or(Dynamic::UNIT, |(_, _, r)| r))
    });
}

/// The space's API: sampling, grids, unit-cube coordinates, random numbers.
fn register_space(engine: &mut Engine, rng: Arc<Mutex<ChaCha8Rng>>) {
    engine.register_type_with_name::<SpaceHandle>("Space");
    let r = rng.clone();
    engine.register_fn("sample", move |s: &mut SpaceHandle| -> Map {
        let mut rng = r.lock().expect("the rng is never poisoned");
        config_to_map(&s.space.sample(&mut *rng))
    });
    engine.register_fn("grid", |s: &mut SpaceHandle, points: i64| -> Rhai<Array> {
        let points = usize::try_from(points)
            .ok()
            .filter(|p| (1..=1000).contains(p));
        let Some(points) = points else {
            return fail("grid(points): points is 1 to 1000");
        };
        let combos: f64 = s
            .space
            .params
            .iter()
            .map(|p| match &p.domain {
                super::Domain::Choice(v) => v.len() as f64,
                _ => points as f64,
            })
            .product();
        if combos > 100_000.0 {
            return fail(format!("grid({points}) has {combos} points; use fewer"));
        }
        Ok(s.space
            .grid(points)
            .iter()
            .map(|c| Dynamic::from_map(config_to_map(c)))
            .collect())
    });
    engine.register_get("dims", |s: &mut SpaceHandle| s.space.dims() as i64);
    engine.register_get("keys", |s: &mut SpaceHandle| -> Array {
        s.space
            .params
            .iter()
            .map(|p| Dynamic::from(p.key.clone()))
            .collect()
    });
    engine.register_fn("to_unit", |s: &mut SpaceHandle, c: Map| -> Rhai<Array> {
        let config = map_to_config(&c)?;
        match s.space.to_unit(&config) {
            Some(u) => Ok(u.into_iter().map(Dynamic::from_float).collect()),
            None => fail("to_unit: the configuration lacks a key of the space, or a value is of the wrong type"),
        }
    });
    engine.register_fn("from_unit", |s: &mut SpaceHandle, u: Array| -> Rhai<Map> {
        let u = floats(&u, "from_unit")?;
        if u.len() != s.space.dims() {
            return fail(format!(
                "from_unit: {} coordinates for a space of {} keys",
                u.len(),
                s.space.dims()
            ));
        }
        Ok(config_to_map(&s.space.from_unit(&u)))
    });
    let r = rng.clone();
    engine.register_fn("random", move || -> f64 {
        r.lock().expect("the rng is never poisoned").random()
    });
    engine.register_fn("random_unit", move |s: &mut SpaceHandle| -> Array {
        let mut rng = rng.lock().expect("the rng is never poisoned");
        (0..s.space.dims())
            .map(|_| Dynamic::from_float(rng.random()))
            .collect()
    });
}

/// A script's configuration map as a configuration holding every key of
/// `space` (`what`: the function asking, for the message).
fn full_config(space: &Space, c: &Map, what: &str) -> Rhai<Config> {
    let config = map_to_config(c)?;
    match space.params.iter().find(|p| !config.contains_key(&p.key)) {
        Some(p) => fail(format!(
            "{what}: a configuration lacks the space's key `{}`",
            p.key
        )),
        None => Ok(config),
    }
}

/// Running evaluations: `suggest`, `report`, and `evaluate` for both at once.
fn register_trials(engine: &mut Engine, sched: Arc<Scheduler>, space: Arc<Space>) {
    let sc = sched.clone();
    let sp = space.clone();
    engine.register_fn("suggest", move |c: Map, rounds: i64| -> Rhai<i64> {
        let config = full_config(&sp, &c, "suggest")?;
        let rounds =
            u64::try_from(rounds).map_err(|_| "suggest: rounds must be positive".to_string())?;
        Ok(sc.suggest(config, rounds)? as i64)
    });
    let sc = sched.clone();
    engine.register_fn("report", move |id: i64| -> Rhai<Map> {
        Ok(sc.report(id)?.to_map())
    });
    engine.register_fn(
        "evaluate",
        move |configs: Array, rounds: i64| -> Rhai<Array> {
            let rounds = u64::try_from(rounds)
                .map_err(|_| "evaluate: rounds must be positive".to_string())?;
            let mut ids = Vec::new();
            for c in &configs {
                let Some(m) = c.read_lock::<Map>() else {
                    return fail("evaluate: expects an array of configuration maps");
                };
                ids.push(sched.suggest(full_config(&space, &m, "evaluate")?, rounds)?);
            }
            ids.into_iter()
                .map(|id| Ok(Dynamic::from_map(sched.report(id as i64)?.to_map())))
                .collect()
        },
    );
}

/// At most `limit` points, each an array of floats (`what`: the function
/// asking, for the message).
fn points(xs: &Array, limit: usize, what: &str) -> Rhai<Vec<Vec<f64>>> {
    if xs.len() > limit {
        return fail(format!("{what}: at most {limit} points"));
    }
    xs.iter()
        .map(|x| match x.read_lock::<Array>() {
            Some(a) => floats(&a, what),
            None => fail(format!("{what}: each point is an array of floats")),
        })
        .collect()
}

/// The Gaussian process: fit, predict, expected improvement, posterior draws.
fn register_gp(engine: &mut Engine, rng: Arc<Mutex<ChaCha8Rng>>) {
    engine.register_type_with_name::<GpHandle>("Gp");
    engine.register_fn("gp_fit", |xs: Array, ys: Array| -> Rhai<GpHandle> {
        let ys = floats(&ys, "gp_fit")?;
        // An exact GP is cubic in its points.
        let xs = points(&xs, 2000, "gp_fit")?;
        Gp::fit(&xs, &ys)
            .map(|g| GpHandle(Arc::new(g)))
            .map_err(|e| format!("gp_fit: {e}").into())
    });
    engine.register_fn("predict", |g: &mut GpHandle, x: Array| -> Rhai<Map> {
        let (mean, std) = g.0.predict(&floats(&x, "predict")?);
        let mut m = Map::new();
        m.insert("mean".into(), Dynamic::from_float(mean));
        m.insert("std".into(), Dynamic::from_float(std));
        Ok(m)
    });
    engine.register_fn("ei", |g: &mut GpHandle, x: Array, best: f64| -> Rhai<f64> {
        let (mean, std) = g.0.predict(&floats(&x, "ei")?);
        Ok(expected_improvement(mean, std, best))
    });
    engine.register_fn(
        "sample",
        move |g: &mut GpHandle, xs: Array| -> Rhai<Array> {
            let pts = points(&xs, 2000, "sample")?;
            let mut rng = rng.lock().expect("the rng is never poisoned");
            match g.0.sample(&pts, &mut *rng) {
                Ok(v) => Ok(v.into_iter().map(Dynamic::from_float).collect()),
                Err(e) => fail(format!("sample: {e}")),
            }
        },
    );
    engine.register_fn("expected_improvement", expected_improvement);
}

/// Reports sorted by objective (failed ones last), ties by evaluation id.
fn ranked(reports: &Array) -> Rhai<Vec<(f64, i64, Dynamic)>> {
    let mut out = Vec::with_capacity(reports.len());
    for r in reports {
        let Some(m) = r.read_lock::<Map>() else {
            return fail("expected an array of reports (the maps report() returns)");
        };
        let objective = m.get("objective").and_then(|v| v.as_float().ok());
        let eval = m.get("eval").and_then(|v| v.as_int().ok());
        let (Some(objective), Some(eval)) = (objective, eval) else {
            return fail("a report lacks `objective` or `eval`");
        };
        let objective = if objective.is_nan() {
            f64::INFINITY
        } else {
            objective
        };
        out.push((objective, eval, r.clone()));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(out)
}

/// An array of finite numbers.
fn floats(a: &Array, doing: &str) -> Rhai<Vec<f64>> {
    a.iter()
        .map(|v| {
            let x = v
                .as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map_err(|t| format!("{doing}: expected numbers, found {t}"))?;
            if !x.is_finite() {
                return fail(format!("{doing}: {x} is not a finite number"));
            }
            Ok(x)
        })
        .collect()
}

/// A configuration as a script map.
pub fn config_to_map(config: &Config) -> Map {
    config
        .iter()
        .map(|(k, v)| (k.as_str().into(), crate::script::toml_to_dynamic(v)))
        .collect()
}

/// A script map as a configuration.
fn map_to_config(m: &Map) -> Rhai<Config> {
    m.iter()
        .map(|(k, v)| Ok((k.to_string(), dynamic_to_toml(v, k)?)))
        .collect()
}

fn dynamic_to_toml(v: &Dynamic, key: &str) -> Rhai<toml::Value> {
    if let Ok(i) = v.as_int() {
        return Ok(toml::Value::Integer(i));
    }
    if let Ok(f) = v.as_float() {
        if !f.is_finite() {
            return fail(format!("`{key}` = {f} is not a finite number"));
        }
        return Ok(toml::Value::Float(f));
    }
    if let Ok(b) = v.as_bool() {
        return Ok(toml::Value::Boolean(b));
    }
    if v.is_string() {
        return Ok(toml::Value::String(v.to_string()));
    }
    if let Some(a) = v.read_lock::<Array>() {
        return a
            .iter()
            .map(|x| dynamic_to_toml(x, key))
            .collect::<Rhai<Vec<_>>>()
            .map(toml::Value::Array);
    }
    fail(format!(
        "`{key}`: a configuration value is a number, string, bool or array, not {}",
        v.type_name()
    ))
}
