//! The server's side of a course: admit clients, run rounds, aggregate, evaluate, finish.
//!
//! The server is a [`Worker`] whose state is a small phase machine:
//!
//! ```text
//! Joining ──all clients joined──▶ [Evaluating 0] ─▶ Training r ─▶ [Evaluating r] ─▶ … ─▶ Finished
//! ```
//!
//! Each training round asks the course's strategy ([`Aggregator`]) who
//! trains and with what: by default `sample_clients` of the joined clients
//! (seeded by the course seed and the round, so a run is reproducible and a
//! resumed run samples the same clients), all sent `train` with the global
//! parameters in one message; a strategy may instead send each client its
//! own config and parameters (`plan_round` checks them first). The server
//! waits for one `update` from each, checks it against what that client was
//! sent, and aggregates them in client-id order.
//! Every `eval_every` rounds, and after the last, all clients evaluate the new
//! global parameters. Updates or metrics that do not belong to the current
//! step (wrong round, a client that was not asked, a second answer, mismatched
//! shapes) are rejected and counted without disturbing the round.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tracing::{info, info_span, warn};

use crate::aggregate::{
    check_payload, fill_from, split_extra, Aggregator, ClientEval, ClientUpdate, FitConfig,
    FitError, FitInstruction,
};
use crate::bus::Transport;
use crate::checkpoint::Checkpoints;
use crate::config::{CourseConfig, OnDivergence};
use crate::course::best::{BestRound, BestTracker};
use crate::course::protocol::{self, secagg as sa, AssignId, JoinIn, Step, Timeout};
use crate::course::secagg::{Next, ServerSession, Stage};
use crate::course::trainer::SplitEval;
use crate::message::{BodyError, Envelope, MsgKind, Party};
use crate::metrics::{Event, MetricsLog, Record};
use crate::params::{ParamError, ParamSet};
use crate::worker::{Ctx, Flow, HandlerError, HandlerResult, Worker};

/// The sample-weighted mean of one split's evaluation over all clients, after one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundEval {
    /// The round (0 = before training).
    pub round: u64,
    /// The split.
    pub split: String,
    /// Sample-weighted mean loss.
    pub loss: f64,
    /// Total samples.
    pub samples: u64,
}

/// What the server hands over when its course ends.
#[derive(Debug)]
pub struct ServerResults {
    /// The final global parameters.
    pub global: ParamSet,
    /// Every metrics record, in order.
    pub records: Vec<Record>,
    /// Sample-weighted evaluation means.
    pub evals: Vec<RoundEval>,
    /// The clients sampled in each round.
    pub sampled: Vec<(u64, Vec<u32>)>,
    /// With `federate.keep_best`: the best evaluated round.
    pub best: Option<BestRound>,
    /// The round after which early stopping ended the course, if it did.
    pub stopped_early: Option<u64>,
}

/// A request sent to one client and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Pending {
    sent_at: Instant,
    bytes_down: usize,
}

/// What the clients of a round were sent.
#[derive(Debug)]
enum Sent {
    /// All of them the global parameters, in one message.
    Broadcast,
    /// Each its own instruction, with the model part of its parameters
    /// (what its update must fit) when they are not the global ones.
    PerClient(BTreeMap<u32, (FitInstruction, Option<ParamSet>)>),
}

#[derive(Debug)]
enum Phase {
    Joining,
    Training {
        round: u64,
        sent: Sent,
        pending: BTreeMap<u32, Pending>,
        updates: Vec<ClientUpdate>,
        started: Instant,
        bytes_up: u64,
        bytes_down: u64,
        dropped: Vec<u32>,
        /// The secure-aggregation protocol of the round, when it is on.
        secagg: Option<Box<ServerSession>>,
    },
    Evaluating {
        round: u64,
        pending: BTreeMap<u32, Pending>,
        results: Vec<(u32, Vec<SplitEval>)>,
    },
    Finished,
}

/// Everything the server knows during a course; returned when it ends.
pub struct ServerState {
    cfg: CourseConfig,
    global: ParamSet,
    aggregator: Box<dyn Aggregator>,
    joined: BTreeSet<u32>,
    /// Clients dropped from a step for not answering in time; they take part
    /// again once they rejoin or answer.
    dropped: BTreeSet<u32>,
    phase: Phase,
    log: MetricsLog,
    evals: Vec<RoundEval>,
    sampled: Vec<(u64, Vec<u32>)>,
    last_evaluated: Option<u64>,
    started: Instant,
    /// Rounds already completed before this server started (a resumed course).
    start_round: u64,
    /// The frozen model every client gets when it joins (model pre-processing's result).
    base: Option<(ParamSet, crate::message::Meta)>,
    /// The client instance each client's base model went to: a repeated
    /// `join_in` from the same instance gets no second copy.
    base_sent: BTreeMap<u32, Option<u64>>,
    /// Where the global parameters are saved after rounds, if anywhere.
    checkpoints: Option<Checkpoints>,
    /// In one process, the trainer all clients share: its clients' own
    /// states go into every checkpoint.
    clients_of: Option<crate::course::trainer::SharedTrainer>,
    /// `federate.keep_best`'s tracker.
    best: Option<BestTracker>,
    /// The round after which early stopping ended the course.
    stopped_early: Option<u64>,
}

impl ServerState {
    /// The current (at the end: final) global parameters.
    pub fn global(&self) -> &ParamSet {
        &self.global
    }

    /// The metrics written so far.
    pub fn records(&self) -> &[Record] {
        self.log.records()
    }

    /// Sample-weighted evaluation means, in the order they happened.
    pub fn evals(&self) -> &[RoundEval] {
        &self.evals
    }

    /// The clients sampled in each training round.
    pub fn sampled(&self) -> &[(u64, Vec<u32>)] {
        &self.sampled
    }

    /// True once the last round was evaluated and `finish` went out.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Saves the clients' own states of `trainer` (the one every client of
    /// this process shares) with every checkpoint.
    pub fn save_clients_of(&mut self, trainer: crate::course::trainer::SharedTrainer) {
        self.clients_of = Some(trainer);
    }

    /// Sends every client `base` (with `meta`) in a `base_model` message when
    /// it joins: the course's pre-processed model (offsite-tuning's emulator).
    pub fn set_base(&mut self, base: ParamSet, meta: crate::message::Meta) {
        self.base = Some((base, meta));
    }

    /// Takes the pieces a course report is made of.
    pub fn into_results(self) -> ServerResults {
        ServerResults {
            global: self.global,
            records: self.log.into_records(),
            evals: self.evals,
            sampled: self.sampled,
            best: self.best.and_then(|b| b.best),
            stopped_early: self.stopped_early,
        }
    }
}

/// How a course's server starts: its configuration, the global parameters
/// it starts from (after `completed` rounds, for a resumed course), how it
/// combines updates, where it logs and where it checkpoints.
pub struct ServerSetup {
    /// The course.
    pub cfg: CourseConfig,
    /// Rounds completed before this server starts (0: a fresh course).
    pub completed: u64,
    /// The global parameters after those rounds (the initial ones when fresh).
    pub global: ParamSet,
    /// How updates are combined.
    pub aggregator: Box<dyn Aggregator>,
    /// Where the course's records go.
    pub log: MetricsLog,
    /// Where the global parameters are saved after rounds (none: nowhere).
    pub checkpoints: Option<Checkpoints>,
    /// The checkpoint this server resumes from, if any.
    pub resumed_from: Option<PathBuf>,
    /// `federate.keep_best`'s tracker (restored with a checkpoint).
    pub best: Option<BestTracker>,
}

impl ServerSetup {
    /// A fresh course from `initial`, without checkpoints.
    pub fn new(
        cfg: CourseConfig,
        initial: ParamSet,
        aggregator: Box<dyn Aggregator>,
        log: MetricsLog,
    ) -> Self {
        // Central DP stands between the clients' updates and the strategy.
        let aggregator = crate::privacy::wrap(
            aggregator,
            &cfg.privacy,
            cfg.course.seed,
            cfg.course.clients,
            cfg.clients_per_round(),
        );
        // The configuration was validated: its key names a split.
        let best = cfg
            .course
            .keep_best
            .as_deref()
            .and_then(|key| BestTracker::new(key, cfg.course.early_stop_patience).ok());
        Self {
            cfg,
            completed: 0,
            global: initial,
            aggregator,
            log,
            checkpoints: None,
            resumed_from: None,
            best,
        }
    }

    /// Resumes after `completed` rounds, whose parameters are `global`
    /// (from a checkpoint): once every client has joined the server goes on
    /// with round `completed + 1` (evaluating first if round `completed` was
    /// due an evaluation). Client sampling is seeded per round, so the
    /// resumed rounds pick the clients an uninterrupted course would have picked.
    pub fn resumed(mut self, completed: u64, global: ParamSet) -> Self {
        self.completed = completed;
        self.global = global;
        self
    }

    /// Resumes from the checkpoint `restored`: its round and parameters,
    /// the strategy's saved state (restored here, into the strategy as the
    /// course runs it, differential privacy included) and, in one process,
    /// the clients' own states saved with it.
    pub fn resumed_from(
        mut self,
        restored: crate::checkpoint::Restored,
    ) -> Result<Self, crate::CheckpointError> {
        crate::checkpoint::Checkpoints::restore_aggregator(
            &restored.dir,
            self.aggregator.as_mut(),
        )?;
        if let Some(best) = self.best.as_mut() {
            crate::checkpoint::Checkpoints::restore_server_state(&restored.dir, |bytes| {
                best.restore(bytes)
            })?;
        }
        let dir = restored.dir;
        let mut me = self.resumed(restored.round, restored.params);
        me.resumed_from = Some(dir);
        Ok(me)
    }

    /// Checkpoints the global parameters as `checkpoints` says.
    pub fn with_checkpoints(mut self, checkpoints: Checkpoints) -> Self {
        self.checkpoints = Some(checkpoints);
        self
    }
}

/// Builds the server worker of a fresh course.
pub fn server_worker(
    cfg: CourseConfig,
    initial: ParamSet,
    aggregator: Box<dyn Aggregator>,
    log: MetricsLog,
    transport: Arc<dyn Transport>,
) -> Worker<ServerState> {
    server_worker_from(ServerSetup::new(cfg, initial, aggregator, log), transport)
}

/// Builds the server worker of a course as `setup` describes it.
pub fn server_worker_from(
    setup: ServerSetup,
    transport: Arc<dyn Transport>,
) -> Worker<ServerState> {
    let ServerSetup {
        cfg,
        completed,
        global,
        aggregator,
        log,
        checkpoints,
        resumed_from: _,
        best,
    } = setup;
    let name = cfg.course.name.clone();
    let limits = cfg.wire.limits();
    let encode = cfg.wire.encode_options();
    let state = ServerState {
        cfg,
        global,
        aggregator,
        joined: BTreeSet::new(),
        dropped: BTreeSet::new(),
        phase: Phase::Joining,
        log,
        evals: Vec::new(),
        sampled: Vec::new(),
        last_evaluated: None,
        started: Instant::now(),
        start_round: completed,
        base: None,
        base_sent: BTreeMap::new(),
        checkpoints,
        clients_of: None,
        best,
        stopped_early: None,
    };
    Worker::new(Party::Server, name, transport, state)
        .with_encoding(encode)
        .with_limits(limits)
        .on(MsgKind::JoinIn, on_join_in)
        .on(MsgKind::Update, on_update)
        .on(MsgKind::Metrics, on_metrics)
        .on(MsgKind::Custom(TIMEOUT.into()), on_timeout)
        .on(MsgKind::Custom(sa::KEYS.into()), |s, env, ctx| {
            on_secagg(s, env, ctx, Stage::Keys)
        })
        .on(MsgKind::Custom(sa::SHARES.into()), |s, env, ctx| {
            on_secagg(s, env, ctx, Stage::Shares)
        })
        .on(MsgKind::Custom(sa::MASKED.into()), |s, env, ctx| {
            on_secagg(s, env, ctx, Stage::Masked)
        })
        .on(MsgKind::Custom(sa::REVEAL.into()), |s, env, ctx| {
            on_secagg(s, env, ctx, Stage::Reveal)
        })
}

/// The kind of the server's own timer message (never accepted from others).
const TIMEOUT: &str = "timeout";

/// The kind a server sends every expected client when it starts, asking it
/// to (re)join: see [`roll_call`].
pub const ROLL_CALL: &str = "roll_call";

/// A start hook for a server that may find its clients already running (a
/// server process, above all one resumed after a crash): it asks every
/// expected client to join, so clients that joined the previous server
/// come back without waiting. Install with
/// `server_worker_from(..).on_start(roll_call)`.
pub fn roll_call(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    let env = Envelope::new(
        ctx.course(),
        0,
        Party::Server,
        (1..=s.cfg.course.clients).map(Party::Client).collect(),
        MsgKind::Custom(ROLL_CALL.into()),
    );
    ctx.send(env)?;
    Ok(Flow::Continue)
}

/// Arms the timeout of `step` of `round`, when the course has one.
fn arm_timeout(s: &ServerState, step: Step, round: u64, ctx: &mut Ctx) -> Result<(), HandlerError> {
    arm_timer(s, Timeout { step, stage: None }, round, ctx)
}

fn arm_timer(
    s: &ServerState,
    timer: Timeout,
    round: u64,
    ctx: &mut Ctx,
) -> Result<(), HandlerError> {
    if let Some(t) = s.cfg.course.round_timeout_s {
        let env = Envelope::new(
            ctx.course(),
            round,
            Party::Server,
            vec![Party::Server],
            MsgKind::Custom(TIMEOUT.into()),
        )
        .with_body(&timer)?;
        ctx.send_after(Duration::from_secs_f64(t), env);
    }
    Ok(())
}

/// A step's time is up: drop the clients that have not answered and
/// complete the step if enough did, else wait another timeout.
fn on_timeout(s: &mut ServerState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    if env.from != Party::Server {
        return Err(HandlerError::Reject(
            "timeouts come only from the server's own timers".into(),
        ));
    }
    let timer = env
        .body::<Timeout>()
        .map_err(|e| HandlerError::Reject(e.to_string()))?;
    let step = timer.step;
    let min = s.cfg.course.min_clients as usize;
    let timeout = s.cfg.course.round_timeout_s.unwrap_or(0.0);
    match (&mut s.phase, step) {
        (Phase::Joining, Step::Join) => {
            let expected = s.cfg.course.clients as usize;
            if s.joined.len() >= min {
                warn!(
                    joined = s.joined.len(),
                    expected, "starting without every client after {timeout} s"
                );
                return start_course(s, ctx);
            }
            warn!(
                joined = s.joined.len(),
                min, "too few clients after {timeout} s; waiting on"
            );
            arm_timeout(s, Step::Join, 0, ctx)?;
        }
        (
            Phase::Training {
                round,
                pending,
                updates,
                dropped,
                ..
            },
            Step::Train,
        ) if *round == env.round => {
            let round = *round;
            let asked = pending.len() + updates.len();
            if updates.len() >= min.min(asked) {
                let late: Vec<u32> = std::mem::take(pending).into_keys().collect();
                warn!(round, clients = ?late, "dropped from the round: no update after {timeout} s");
                dropped.extend(&late);
                drop_clients(s, &late);
                return finish_round(s, ctx);
            }
            warn!(
                round,
                updates = updates.len(),
                min,
                "too few updates after {timeout} s; asking the others again"
            );
            let again: Vec<u32> = pending.keys().copied().collect();
            ask_again(s, (MsgKind::Train, round), &again, ctx)?;
            arm_timeout(s, Step::Train, round, ctx)?;
        }
        (
            Phase::Evaluating {
                round,
                pending,
                results,
            },
            Step::Eval,
        ) if *round == env.round => {
            let round = *round;
            let asked = pending.len() + results.len();
            if results.len() >= min.min(asked) {
                let late: Vec<u32> = std::mem::take(pending).into_keys().collect();
                warn!(round, clients = ?late, "dropped from the evaluation: no metrics after {timeout} s");
                drop_clients(s, &late);
                return finish_eval(s, ctx);
            }
            warn!(
                round,
                results = results.len(),
                min,
                "too few evaluations after {timeout} s; asking the others again"
            );
            let again: Vec<u32> = pending.keys().copied().collect();
            ask_again(s, (MsgKind::Evaluate, round), &again, ctx)?;
            arm_timeout(s, Step::Eval, round, ctx)?;
        }
        (
            Phase::Training {
                round,
                pending,
                dropped,
                secagg: Some(session),
                ..
            },
            Step::SecAgg,
        ) if *round == env.round && timer.stage == Some(session.stage() as u8) => {
            let round = *round;
            let late = session.drop_awaited();
            warn!(round, clients = ?late, "dropped from the round: no {} after {timeout} s", session.stage().awaits());
            for c in &late {
                pending.remove(c);
            }
            dropped.extend(&late);
            drop_clients(s, &late);
            return secagg_advance(s, ctx);
        }
        // A timer of a step that completed in time.
        _ => {}
    }
    Ok(Flow::Continue)
}

/// Sends the request of the current step again to `clients`: a request or
/// an answer lost on the way (a broker restart) is not waited for forever,
/// and a client that already answered answers again from its cache.
fn ask_again(
    s: &ServerState,
    (kind, round): (MsgKind, u64),
    clients: &[u32],
    ctx: &mut Ctx,
) -> Result<(), HandlerError> {
    if clients.is_empty() {
        return Ok(());
    }
    if let Phase::Training {
        sent: Sent::PerClient(sent),
        ..
    } = &s.phase
    {
        for c in clients {
            if let Some((instruction, _)) = sent.get(c) {
                ctx.send(train_request(ctx.course(), round, instruction, &s.global)?)?;
            }
        }
        return Ok(());
    }
    let env = Envelope::new(
        ctx.course(),
        round,
        Party::Server,
        clients.iter().map(|&c| Party::Client(c)).collect(),
        kind,
    )
    .with_payload(s.global.clone());
    ctx.send(env)?;
    Ok(())
}

/// The `train` message of one client's own instruction.
fn train_request(
    course: &str,
    round: u64,
    instruction: &FitInstruction,
    global: &ParamSet,
) -> Result<Envelope, HandlerError> {
    Ok(Envelope::new(
        course,
        round,
        Party::Server,
        vec![Party::Client(instruction.client)],
        MsgKind::Train,
    )
    .with_body(&protocol::Train {
        config: instruction.config.clone(),
    })?
    .with_payload(instruction.params.clone().unwrap_or_else(|| global.clone())))
}

fn drop_clients(s: &mut ServerState, ids: &[u32]) {
    for id in ids {
        s.joined.remove(id);
        s.dropped.insert(*id);
    }
}

/// A dropped client that answers is evidently back: it takes part from the next step.
fn readmit(s: &mut ServerState, id: u32) {
    if s.dropped.remove(&id) {
        s.joined.insert(id);
        info!(client = id, "a dropped client is back");
    }
}

/// Picks `k` of `ids` for `round`, reproducibly from `seed`; the result is sorted.
pub fn sample_clients(ids: &[u32], k: usize, seed: u64, round: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(round);
    let mut picked: Vec<u32> = rand::seq::index::sample(&mut rng, ids.len(), k.min(ids.len()))
        .into_iter()
        .map(|i| ids[i])
        .collect();
    picked.sort_unstable();
    picked
}

fn client_id(env: &Envelope) -> Result<u32, HandlerError> {
    match env.from {
        Party::Client(id) => Ok(id),
        Party::Server => Err(HandlerError::Reject("the server cannot be a client".into())),
    }
}

fn on_join_in(s: &mut ServerState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let id = client_id(&env)?;
    if id == 0 || id > s.cfg.course.clients {
        return Err(HandlerError::Reject(format!(
            "client id {id} is outside 1..={}",
            s.cfg.course.clients
        )));
    }
    let first_time = s.joined.insert(id);
    s.dropped.remove(&id);
    // The base model first: the client needs it before any request (once
    // per client instance; a join_in without one always gets it).
    let instance = env
        .body::<JoinIn>()
        .map_err(|e| HandlerError::Reject(e.to_string()))?
        .instance;
    let fresh = instance.is_none() || s.base_sent.get(&id) != Some(&instance);
    if let (Some((base, meta)), true) = (&s.base, fresh) {
        let mut env = Envelope::new(
            ctx.course(),
            0,
            Party::Server,
            vec![Party::Client(id)],
            MsgKind::BaseModel,
        )
        .with_payload(base.clone());
        env.meta = meta.clone();
        let bytes = ctx.send(env)?;
        s.base_sent.insert(id, instance);
        info!(client = id, bytes, "base model sent");
    }
    let reply = Envelope::new(
        ctx.course(),
        0,
        Party::Server,
        vec![Party::Client(id)],
        MsgKind::AssignId,
    )
    .with_body(&AssignId {
        client_id: id,
        rounds: s.cfg.course.rounds,
        clients: s.cfg.course.clients,
    })?;
    ctx.send(reply)?;
    if first_time {
        info!(
            client = id,
            joined = s.joined.len(),
            expected = s.cfg.course.clients,
            "client joined"
        );
    }
    // A client that restarted while the current step waited on it lost the
    // request: send it again — except past the key exchange of a secure
    // aggregation, whose secrets it lost: it leaves the round.
    if let Phase::Training {
        secagg: Some(session),
        pending,
        ..
    } = &mut s.phase
    {
        if session.stage() != Stage::Keys && session.drop_client(id) {
            pending.remove(&id);
            warn!(client = id, "client rejoined mid-round and lost its secure-aggregation secrets; it leaves the round");
            return secagg_if_complete(s, ctx);
        }
    }
    let lost = match &s.phase {
        Phase::Training { round, pending, .. } if pending.contains_key(&id) => {
            Some((MsgKind::Train, *round))
        }
        Phase::Evaluating { round, pending, .. } if pending.contains_key(&id) => {
            Some((MsgKind::Evaluate, *round))
        }
        _ => None,
    };
    if let Some((kind, round)) = lost {
        info!(client = id, round, %kind, "client rejoined mid-step; sending its request again");
        ask_again(s, (kind, round), &[id], ctx)?;
    }
    if matches!(s.phase, Phase::Joining) {
        if s.joined.len() == s.cfg.course.clients as usize {
            info!(
                clients = s.joined.len(),
                "all clients joined; the course starts"
            );
            return start_course(s, ctx);
        }
        if first_time && s.joined.len() == 1 {
            arm_timeout(s, Step::Join, 0, ctx)?;
        }
    }
    Ok(Flow::Continue)
}

/// Leaves the joining phase: the first evaluation or round (or, resumed, the next step).
fn start_course(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    s.started = Instant::now();
    if s.start_round > 0 {
        info!(round = s.start_round, "resuming after a completed round");
        return next_step(s, s.start_round, ctx);
    }
    if s.cfg.course.eval_before_training {
        begin_eval(s, 0, ctx)?;
    } else {
        begin_round(s, 1, ctx)?;
    }
    Ok(Flow::Continue)
}

fn begin_round(s: &mut ServerState, round: u64, ctx: &mut Ctx) -> Result<(), HandlerError> {
    let instructions = plan_round(s, round)?;
    let picked: Vec<u32> = instructions.iter().map(|i| i.client).collect();
    let _span = info_span!("round", n = round).entered();
    info!(clients = ?picked, "round starts");
    let now = Instant::now();
    let pending_of = |bytes: usize| Pending {
        sent_at: now,
        bytes_down: bytes,
    };
    let (sent, pending, bytes_down) = if instructions.iter().all(FitInstruction::is_plain) {
        // Everyone gets the global parameters: one message.
        let env = Envelope::new(
            ctx.course(),
            round,
            Party::Server,
            picked.iter().map(|&c| Party::Client(c)).collect(),
            MsgKind::Train,
        )
        .with_payload(s.global.clone());
        let bytes = ctx.send(env)?;
        let pending = picked.iter().map(|&c| (c, pending_of(bytes))).collect();
        (Sent::Broadcast, pending, bytes * picked.len())
    } else {
        let mut pending = BTreeMap::new();
        let mut sent = BTreeMap::new();
        let mut total = 0;
        for instruction in instructions {
            let bytes = ctx.send(train_request(ctx.course(), round, &instruction, &s.global)?)?;
            total += bytes;
            pending.insert(instruction.client, pending_of(bytes));
            let model = instruction.params.clone().map(|p| split_extra(p).0);
            sent.insert(instruction.client, (instruction, model));
        }
        (Sent::PerClient(sent), pending, total)
    };
    let secagg = s.cfg.privacy.secure_aggregation.then(|| {
        let t = crate::privacy::secagg::threshold(picked.len(), s.cfg.privacy.secagg_threshold);
        let len = crate::privacy::secagg::ring_len(&s.global);
        Box::new(ServerSession::new(round, &picked, t, len))
    });
    if secagg.is_some() && !matches!(sent, Sent::Broadcast) {
        return Err(HandlerError::Fatal(format!(
            "round {round}: the strategy ({}) sent clients parameters or settings of their own, but secure aggregation sums updates of one global model: use a strategy that sends everyone the global parameters",
            s.aggregator.name()
        )));
    }
    s.sampled.push((round, picked));
    let timer = match &secagg {
        Some(session) => Timeout {
            step: Step::SecAgg,
            stage: Some(session.stage() as u8),
        },
        None => Timeout {
            step: Step::Train,
            stage: None,
        },
    };
    s.phase = Phase::Training {
        round,
        sent,
        pending,
        updates: Vec::new(),
        started: now,
        bytes_up: 0,
        bytes_down: bytes_down as u64,
        dropped: Vec::new(),
        secagg,
    };
    arm_timer(s, timer, round, ctx)
}

/// A secure-aggregation message from a client: taken into the round's
/// protocol, which moves on once its stage is complete.
fn on_secagg(s: &mut ServerState, env: Envelope, ctx: &mut Ctx, stage: Stage) -> HandlerResult {
    let id = client_id(&env)?;
    let Phase::Training {
        round,
        secagg: Some(session),
        ..
    } = &mut s.phase
    else {
        return Err(HandlerError::Reject(
            "no secure-aggregation round is running".into(),
        ));
    };
    let round = *round;
    let reject = |e: crate::course::secagg::Refused| HandlerError::Reject(e.0);
    let body_err = |e: crate::message::BodyError| HandlerError::Reject(e.to_string());
    match stage {
        Stage::Keys => session.on_keys(env.round, id, env.body().map_err(body_err)?),
        Stage::Shares => session.on_shares(env.round, id, env.body().map_err(body_err)?),
        Stage::Reveal => session.on_reveal(env.round, id, env.body().map_err(body_err)?),
        Stage::Masked => {
            let body: sa::Masked = env.body().map_err(body_err)?;
            let failed = session
                .on_masked(env.round, id, &body, env.blob.as_deref())
                .map_err(reject)?;
            if let Some(reason) = failed {
                return failed_update(s, (&env, id, round), body.compute_s, &reason, ctx);
            }
            let Phase::Training {
                pending, bytes_up, ..
            } = &mut s.phase
            else {
                unreachable!("phase checked above");
            };
            let p = claim(pending, round, &env, id)?;
            *bytes_up += ctx.received_bytes() as u64;
            let mut r = Record::new(Event::Train, round, Some(id));
            r.split = Some("train".into());
            r.bytes_up = ctx.received_bytes() as u64;
            r.bytes_down = p.bytes_down as u64;
            r.compute_s = body.compute_s;
            r.wall_s = p.sent_at.elapsed().as_secs_f64();
            record(s, r)?;
            return secagg_if_complete(s, ctx);
        }
    }
    .map_err(reject)?;
    session.overhead_bytes += ctx.received_bytes() as u64;
    secagg_if_complete(s, ctx)
}

/// Moves the round's secure aggregation on if its stage is complete.
fn secagg_if_complete(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    match &s.phase {
        Phase::Training {
            secagg: Some(session),
            ..
        } if session.complete() => secagg_advance(s, ctx),
        _ => Ok(Flow::Continue),
    }
}

/// Sends the next stage's messages of the round's secure aggregation, or,
/// once the sum is known, aggregates it.
fn secagg_advance(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    let Phase::Training {
        round,
        secagg: Some(session),
        updates,
        ..
    } = &mut s.phase
    else {
        return Ok(Flow::Continue);
    };
    let round = *round;
    let (out, next) = session
        .advance(ctx.course(), &s.global)
        .map_err(|e| HandlerError::Fatal(format!("round {round}: {e}")))?;
    for env in out {
        session.overhead_bytes += ctx.send(env)? as u64;
    }
    match next {
        Next::Wait => {
            let stage = Some(session.stage() as u8);
            arm_timer(
                s,
                Timeout {
                    step: Step::SecAgg,
                    stage,
                },
                round,
                ctx,
            )?;
            Ok(Flow::Continue)
        }
        Next::Done(sum) => {
            info!(
                round,
                clients = ?session.survivors(),
                "secure aggregation: the sum is unmasked"
            );
            updates.push(ClientUpdate {
                client: 0,
                n_samples: sum.n_samples,
                params: sum.params,
                train_loss: Some(sum.loss),
                ..ClientUpdate::default()
            });
            finish_round(s, ctx)
        }
    }
}

/// The strategy's decisions for round `round`: who trains, with what.
/// Anything it returns that the course cannot use ends the course.
fn plan_round(s: &mut ServerState, round: u64) -> Result<Vec<FitInstruction>, HandlerError> {
    let name = s.aggregator.name().to_string();
    let fatal = |hook: &str, e: String| {
        HandlerError::Fatal(format!(
            "round {round}: the strategy's {hook} ({name}) failed: {e}"
        ))
    };
    s.aggregator
        .on_round_start(round)
        .map_err(|e| fatal("on_round_start", e.to_string()))?;
    let ids: Vec<u32> = s.joined.iter().copied().collect();
    let default = sample_clients(
        &ids,
        s.cfg.clients_per_round() as usize,
        s.cfg.course.seed,
        round,
    );
    let mut picked = s
        .aggregator
        .sample(round, &ids, default)
        .map_err(|e| fatal("sample", e.to_string()))?;
    picked.sort_unstable();
    picked.dedup();
    if let Some(c) = picked.iter().find(|c| !s.joined.contains(c)) {
        return Err(fatal(
            "sample",
            format!("it picked client {c}, which has not joined (joined: {ids:?})"),
        ));
    }
    if picked.is_empty() {
        return Err(fatal("sample", "it picked no client".into()));
    }
    let mut instructions = s
        .aggregator
        .configure_fit(&s.global, &picked, round)
        .map_err(|e| fatal("configure_fit", e.to_string()))?;
    instructions.sort_by_key(|i| i.client);
    for pair in instructions.windows(2) {
        if pair[0].client == pair[1].client {
            return Err(fatal(
                "configure_fit",
                format!("two instructions for client {}", pair[0].client),
            ));
        }
    }
    for i in &instructions {
        if !picked.contains(&i.client) {
            return Err(fatal(
                "configure_fit",
                format!(
                    "an instruction for client {}, which is not among this round's {picked:?}",
                    i.client
                ),
            ));
        }
        if let Some(p) = &i.params {
            check_payload(&s.global, p)
                .and_then(|()| p.check_finite().map_err(crate::aggregate::FitError::from))
                .map_err(|e| {
                    fatal(
                        "configure_fit",
                        format!("client {}'s parameters: {e}", i.client),
                    )
                })?;
        }
    }
    if instructions.is_empty() {
        return Err(fatal("configure_fit", "it asked no client to train".into()));
    }
    Ok(instructions)
}

fn begin_eval(s: &mut ServerState, round: u64, ctx: &mut Ctx) -> Result<(), HandlerError> {
    let env = Envelope::new(
        ctx.course(),
        round,
        Party::Server,
        s.joined.iter().map(|&c| Party::Client(c)).collect(),
        MsgKind::Evaluate,
    )
    .with_payload(s.global.clone());
    let bytes = ctx.send(env)?;
    let now = Instant::now();
    s.phase = Phase::Evaluating {
        round,
        pending: s
            .joined
            .iter()
            .map(|&c| {
                (
                    c,
                    Pending {
                        sent_at: now,
                        bytes_down: bytes,
                    },
                )
            })
            .collect(),
        results: Vec::new(),
    };
    arm_timeout(s, Step::Eval, round, ctx)
}

/// Takes `id` out of the pending set of the step for `round`, or explains why the answer does not fit.
fn claim(
    pending: &mut BTreeMap<u32, Pending>,
    round: u64,
    env: &Envelope,
    id: u32,
) -> Result<Pending, HandlerError> {
    if env.round != round {
        return Err(HandlerError::Reject(format!(
            "{} for round {} arrived during round {round}",
            env.kind, env.round
        )));
    }
    pending.remove(&id).ok_or_else(|| {
        HandlerError::Reject(format!(
            "client {id} was not asked for a {} in round {round}, or already answered",
            env.kind
        ))
    })
}

fn record(s: &mut ServerState, r: Record) -> Result<(), HandlerError> {
    s.log
        .push(r)
        .map_err(|e| HandlerError::Fatal(format!("cannot write metrics: {e}")))
}

/// Why a client's answer cannot be used.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("update without a positive `n_samples`")]
    NoSamples,
    #[error("update without parameters")]
    NoParameters,
    #[error("update does not match the parameters the client was sent: {0}")]
    Misfit(FitError),
    #[error(
        "its extra tensors hold {extra} values, more than twice the {params} of the parameters"
    )]
    ExtraSize { extra: usize, params: usize },
    #[error("its extra tensors hold {0}")]
    ExtraNonFinite(ParamError),
    #[error("{0} splits (at most {MAX_SPLITS})")]
    Splits(usize),
    #[error("split `{0}` has a non-finite loss")]
    SplitLoss(String),
    #[error(
        "{what} name {name:?} is empty, longer than {MAX_NAME} bytes or holds control characters"
    )]
    Name { what: &'static str, name: String },
    #[error("{0} metrics (at most {MAX_METRICS})")]
    Metrics(usize),
    #[error("metric `{name}` = {value}, not a finite number")]
    MetricValue { name: String, value: f64 },
}

/// What is wrong with an update, if anything: its body, its parameters'
/// names and shapes (as the strategy judges them against what the client
/// was `sent`), its extra tensors, its sample count.
/// Returns the body and, unless the client reports a failure, its
/// parameters split into the model's and the extra tensors.
fn check_update(
    env: &Envelope,
    payload: Option<ParamSet>,
    sent: &ParamSet,
    strategy: &dyn Aggregator,
) -> Result<(protocol::Update, Option<(ParamSet, ParamSet)>), Unusable> {
    let body: protocol::Update = env.body()?;
    if body.failed.is_some() {
        return Ok((body, None));
    }
    if body.n_samples == 0 {
        return Err(Unusable::NoSamples);
    }
    check_reported(&body.metrics)?;
    let params = payload.ok_or(Unusable::NoParameters)?;
    let (model, extra) = split_extra(params);
    strategy
        .check_update(sent, &model)
        .map_err(Unusable::Misfit)?;
    // Extra tensors (control variates) are the strategy's to read, but
    // bounded: at most twice the model's size, and finite.
    if extra.num_elements() > 2 * sent.num_elements().max(1) {
        return Err(Unusable::ExtraSize {
            extra: extra.num_elements(),
            params: sent.num_elements(),
        });
    }
    extra.check_finite().map_err(Unusable::ExtraNonFinite)?;
    Ok((body, Some((model, extra))))
}

/// What is wrong with an evaluation answer, if anything: its body, the
/// number and names of its splits, their losses and metrics.
fn check_metrics(env: &Envelope) -> Result<protocol::Metrics, Unusable> {
    let m: protocol::Metrics = env.body()?;
    if m.results.len() > MAX_SPLITS {
        return Err(Unusable::Splits(m.results.len()));
    }
    for e in &m.results {
        check_name("split", &e.split)?;
        if !e.loss.is_finite() {
            return Err(Unusable::SplitLoss(e.split.clone()));
        }
        check_reported(&e.metrics)?;
    }
    Ok(m)
}

/// The most splits one evaluation answer may report.
const MAX_SPLITS: usize = 16;
/// The most named metrics one record may carry.
const MAX_METRICS: usize = 64;
/// The longest split or metric name.
const MAX_NAME: usize = 64;

/// A split's or metric's name, as it will stand in metrics.jsonl.
fn check_name(what: &'static str, name: &str) -> Result<(), Unusable> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(Unusable::Name {
            what,
            name: name.chars().take(MAX_NAME).collect(),
        });
    }
    Ok(())
}

/// The named metrics a client reports, before any reaches the records: a
/// few, with short names (what a client sends becomes lines in the run
/// directory, so it is bounded; a non-finite value is written as null).
fn check_reported(metrics: &BTreeMap<String, f64>) -> Result<(), Unusable> {
    if metrics.len() > MAX_METRICS {
        return Err(Unusable::Metrics(metrics.len()));
    }
    metrics.iter().try_for_each(|(name, value)| {
        check_name("metric", name)?;
        // metrics.jsonl is JSON: a NaN or infinity would be written as null
        // and the run's records could not be read back.
        if value.is_finite() {
            Ok(())
        } else {
            Err(Unusable::MetricValue {
                name: name.clone(),
                value: *value,
            })
        }
    })
}

fn on_update(s: &mut ServerState, mut env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let id = client_id(&env)?;
    readmit(s, id);
    let Phase::Training {
        round,
        pending,
        sent,
        secagg,
        ..
    } = &mut s.phase
    else {
        return Err(HandlerError::Reject("no training round is running".into()));
    };
    if secagg.is_some() {
        return Err(HandlerError::Reject(
            "secure aggregation is on: updates come masked, as secagg_masked".into(),
        ));
    }
    let round = *round;
    // Validate everything before claiming, so a bad update leaves the round as it was.
    let awaited = env.round == round && pending.contains_key(&id);
    let (config, sent_model) = match sent {
        Sent::PerClient(sent) => match sent.get(&id) {
            Some((i, model)) => (i.config.clone(), model.as_ref().unwrap_or(&s.global)),
            None => (FitConfig::new(), &s.global),
        },
        Sent::Broadcast => (FitConfig::new(), &s.global),
    };
    let payload = env.payload.take();
    let (body, parts) = match check_update(&env, payload, sent_model, s.aggregator.as_ref()) {
        Ok(checked) => checked,
        // The answer this round waits for, but unusable: a failed answer,
        // never a silence the round would wait on forever.
        Err(problem) if awaited => {
            let reason =
                format!("client {id}: its update for round {round} cannot be used: {problem}");
            return failed_update(s, (&env, id, round), 0.0, &reason, ctx);
        }
        Err(problem) => return Err(HandlerError::Reject(problem.to_string())),
    };
    if let Some(reason) = &body.failed {
        return failed_update(s, (&env, id, round), body.compute_s, reason, ctx);
    }
    let (params, extra) = parts.expect("an update that did not fail has parameters");
    // What the client left out, it did not change.
    let params = fill_from(params, sent_model);
    let n_samples = body.n_samples;
    let (local_steps, train_loss) = (body.local_steps, body.train_loss);
    let Phase::Training { pending, .. } = &mut s.phase else {
        unreachable!("phase checked above");
    };
    let p = claim(pending, round, &env, id)?;
    let mut r = Record::new(Event::Train, round, Some(id));
    r.split = Some("train".into());
    r.loss = body.train_loss;
    r.samples = Some(n_samples);
    r.bytes_up = ctx.received_bytes() as u64;
    r.bytes_down = p.bytes_down as u64;
    r.compute_s = body.compute_s;
    r.wall_s = p.sent_at.elapsed().as_secs_f64();
    r.extra = body.metrics.clone();
    let bytes_up_now = r.bytes_up;
    record(s, r)?;
    let Phase::Training {
        pending,
        updates,
        bytes_up,
        ..
    } = &mut s.phase
    else {
        unreachable!("phase checked above");
    };
    *bytes_up += bytes_up_now;
    updates.push(ClientUpdate {
        client: id,
        n_samples,
        params,
        local_steps,
        train_loss,
        metrics: body.metrics,
        extra,
        config,
    });
    if !pending.is_empty() {
        return Ok(Flow::Continue);
    }
    finish_round(s, ctx)
}

/// Records client `id`'s failed answer to `round` (which it claims) and
/// applies the failure policy.
fn failed_update(
    s: &mut ServerState,
    (env, id, round): (&Envelope, u32, u64),
    compute_s: f64,
    reason: &str,
    ctx: &mut Ctx,
) -> HandlerResult {
    let Phase::Training { pending, .. } = &mut s.phase else {
        return Err(HandlerError::Reject("no training round is running".into()));
    };
    let p = claim(pending, round, env, id)?;
    let mut r = Record::new(Event::Train, round, Some(id));
    r.split = Some("train".into());
    r.bytes_up = ctx.received_bytes() as u64;
    r.bytes_down = p.bytes_down as u64;
    r.compute_s = compute_s;
    r.wall_s = p.sent_at.elapsed().as_secs_f64();
    r.extra.insert("failed".into(), 1.0);
    record(s, r)?;
    client_failed(s, id, reason, ctx)
}

/// Client `id` reported that its part of the current step failed (it is no
/// longer pending): end the course, or go on without it, as
/// `federate.on_divergence` says.
fn client_failed(s: &mut ServerState, id: u32, reason: &str, ctx: &mut Ctx) -> HandlerResult {
    let (round, training) = match &s.phase {
        Phase::Training { round, .. } => (*round, true),
        Phase::Evaluating { round, .. } => (*round, false),
        _ => return Ok(Flow::Continue),
    };
    if s.cfg.course.on_divergence == OnDivergence::Fail {
        return Err(HandlerError::Fatal(format!(
            "round {round}: {reason} (federate.on_divergence = \"fail\"; \"skip-client\" goes on without the client)"
        )));
    }
    warn!(
        round,
        client = id,
        "{reason}; the step goes on without this client"
    );
    let done = match &mut s.phase {
        Phase::Training {
            secagg: Some(_), ..
        } => return secagg_if_complete(s, ctx),
        Phase::Training {
            pending, dropped, ..
        } => {
            dropped.push(id);
            pending.is_empty()
        }
        Phase::Evaluating { pending, .. } => pending.is_empty(),
        _ => false,
    };
    match (done, training) {
        (false, _) => Ok(Flow::Continue),
        (true, true) => finish_round(s, ctx),
        (true, false) => finish_eval(s, ctx),
    }
}

fn finish_round(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    let Phase::Training {
        round,
        updates,
        started,
        bytes_up,
        bytes_down,
        dropped,
        secagg,
        ..
    } = std::mem::replace(&mut s.phase, Phase::Joining)
    else {
        unreachable!("called when a training round completes");
    };
    if updates.is_empty() {
        return Err(HandlerError::Fatal(format!(
            "round {round}: no client delivered an update (failed: {dropped:?})"
        )));
    }
    let mut updates = updates;
    updates.sort_by_key(|u| u.client);
    let global = s
        .aggregator
        .aggregate(&s.global, &updates, round)
        .map_err(|e| {
            HandlerError::Fatal(format!(
                "round {round}: {} failed: {e}",
                s.aggregator.name()
            ))
        })?;
    global
        .check_finite()
        .map_err(|e| HandlerError::Fatal(format!("round {round}: aggregation produced {e}")))?;
    s.global = global;
    let round_metrics = s.aggregator.on_round_end(&s.global, round).map_err(|e| {
        HandlerError::Fatal(format!(
            "round {round}: the strategy's on_round_end ({}) failed: {e}",
            s.aggregator.name()
        ))
    })?;
    check_reported(&round_metrics)
        .map_err(|e| HandlerError::Fatal(format!("round {round}: on_round_end returned {e}")))?;
    if let Some(cp) = s.checkpoints.as_ref().filter(|cp| cp.due(round)) {
        // A checkpoint that cannot be written must not pass unnoticed.
        let clients = client_states(s)?;
        let server_state = s
            .best
            .as_ref()
            .map(BestTracker::to_bytes)
            .transpose()
            .map_err(|e| HandlerError::Fatal(format!("round {round}: {e}")))?;
        cp.write(
            round,
            &s.global,
            updates.len(),
            s.aggregator.as_ref(),
            &clients,
            server_state.as_deref(),
        )
        .map_err(|e| HandlerError::Fatal(format!("round {round}: {e}")))?;
    }
    let mut r = Record::new(Event::Round, round, None);
    r.samples = Some(updates.iter().map(|u| u.n_samples).sum());
    r.bytes_up = bytes_up;
    r.bytes_down = bytes_down;
    r.wall_s = started.elapsed().as_secs_f64();
    r.extra.insert("clients".into(), updates.len() as f64);
    if let Some(session) = &secagg {
        // The sample-weighted mean training loss, from the unmasked sum.
        r.loss = updates[0].train_loss;
        r.extra
            .insert("clients".into(), session.survivors().len() as f64);
        r.extra.insert(
            "secagg_overhead_bytes".into(),
            session.overhead_bytes as f64,
        );
        r.extra.insert("secagg_unmask_s".into(), session.unmask_s);
        r.extra
            .insert("secagg_left".into(), session.left.len() as f64);
    }
    if !dropped.is_empty() {
        r.extra.insert("dropped".into(), dropped.len() as f64);
    }
    // The clients' training FLOPs, when their trainers count them.
    let flops: f64 = updates.iter().filter_map(|u| u.metrics.get("flops")).sum();
    if flops > 0.0 {
        r.extra.insert("flops".into(), flops);
    }
    r.extra.insert("global_norm".into(), s.global.l2_norm());
    r.extra.extend(round_metrics);
    record(s, r)?;
    info!(round, clients = updates.len(), "round aggregated");
    next_step(s, round, ctx)
}

/// In one process, every client's own state, to go into a checkpoint.
fn client_states(s: &ServerState) -> Result<Vec<(u32, Vec<u8>)>, HandlerError> {
    let Some(trainer) = &s.clients_of else {
        return Ok(Vec::new());
    };
    let trainer = trainer
        .lock()
        .map_err(|_| HandlerError::Fatal("the shared trainer panicked earlier".into()))?;
    let mut out = Vec::new();
    for id in 1..=s.cfg.course.clients {
        let saved = trainer
            .save_client(id)
            .map_err(|e| HandlerError::Fatal(format!("saving client {id}'s state: {e}")))?;
        out.extend(saved.map(|bytes| (id, bytes)));
    }
    Ok(out)
}

/// After round `round` is aggregated (or, for round 0, evaluated): evaluate, train on, or finish.
fn next_step(s: &mut ServerState, round: u64, ctx: &mut Ctx) -> HandlerResult {
    let c = &s.cfg.course;
    let evaluated = s.last_evaluated == Some(round);
    let due = round > 0 && (round.is_multiple_of(c.eval_every) || round == c.rounds);
    if due && !evaluated {
        begin_eval(s, round, ctx)?;
        return Ok(Flow::Continue);
    }
    if round < c.rounds {
        begin_round(s, round + 1, ctx)?;
        return Ok(Flow::Continue);
    }
    finish_course(s, round, ctx)
}

/// Ends the course after `round`: every client gets `finish` with the final parameters.
fn finish_course(s: &mut ServerState, round: u64, ctx: &mut Ctx) -> HandlerResult {
    // Dropped clients hear of the end too, so a slow one does not wait forever.
    let env = Envelope::new(
        ctx.course(),
        round,
        Party::Server,
        s.joined
            .union(&s.dropped)
            .map(|&c| Party::Client(c))
            .collect(),
        MsgKind::Finish,
    )
    .with_payload(s.global.clone());
    ctx.send(env)?;
    s.phase = Phase::Finished;
    info!(
        rounds = round,
        wall_s = s.started.elapsed().as_secs_f64(),
        "course finished"
    );
    Ok(Flow::Stop)
}

fn on_metrics(s: &mut ServerState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let id = client_id(&env)?;
    readmit(s, id);
    let Phase::Evaluating { round, pending, .. } = &mut s.phase else {
        return Err(HandlerError::Reject("no evaluation is running".into()));
    };
    let round = *round;
    let awaited = env.round == round && pending.contains_key(&id);
    let checked = check_metrics(&env);
    let protocol::Metrics {
        results: splits,
        compute_s,
        failed,
    } = match checked {
        Ok(m) => m,
        // The answer this evaluation waits for, but unusable: a failed answer.
        Err(problem) if awaited => {
            claim(pending, round, &env, id)?;
            let reason =
                format!("client {id}: its evaluation of round {round} cannot be used: {problem}");
            return client_failed(s, id, &reason, ctx);
        }
        Err(problem) => return Err(HandlerError::Reject(problem.to_string())),
    };
    if let Some(reason) = failed {
        claim(pending, round, &env, id)?;
        return client_failed(s, id, &reason, ctx);
    }
    let p = claim(pending, round, &env, id)?;
    for (i, split) in splits.iter().enumerate() {
        let mut r = Record::new(Event::Eval, round, Some(id));
        r.split = Some(split.split.clone());
        r.loss = Some(split.loss);
        r.samples = Some(split.samples);
        r.extra = split.metrics.clone();
        // Costs belong to the exchange, not to each split: count them once.
        if i == 0 {
            r.bytes_up = ctx.received_bytes() as u64;
            r.bytes_down = p.bytes_down as u64;
            r.compute_s = compute_s;
            r.wall_s = p.sent_at.elapsed().as_secs_f64();
        }
        record(s, r)?;
    }
    let Phase::Evaluating {
        pending, results, ..
    } = &mut s.phase
    else {
        unreachable!("phase checked above");
    };
    results.push((id, splits));
    if !pending.is_empty() {
        return Ok(Flow::Continue);
    }
    finish_eval(s, ctx)
}

/// Every evaluation is in (or the rest timed out): record the means and go on.
fn finish_eval(s: &mut ServerState, ctx: &mut Ctx) -> HandlerResult {
    let Phase::Evaluating {
        round, mut results, ..
    } = std::mem::replace(&mut s.phase, Phase::Joining)
    else {
        unreachable!("phase checked above");
    };
    // Sum in client-id order, not arrival order: floating-point addition is
    // not associative, and the same course must report the same mean.
    results.sort_by_key(|(id, _)| *id);
    // Sample-weighted mean per split: the loss over the union of the clients' data.
    let mut by_split: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for (_, splits) in &results {
        for e in splits {
            let acc = by_split.entry(e.split.clone()).or_default();
            acc.0 += e.loss * e.samples as f64;
            acc.1 += e.samples;
        }
    }
    let mut losses = BTreeMap::new();
    for (split, (weighted, samples)) in by_split {
        let loss = if samples > 0 {
            weighted / samples as f64
        } else {
            f64::NAN
        };
        let mut r = Record::new(Event::Eval, round, None);
        r.split = Some(split.clone());
        r.loss = Some(loss);
        r.samples = Some(samples);
        record(s, r)?;
        info!(round, split = %split, loss, samples, "evaluation");
        losses.insert(split.clone(), loss);
        s.evals.push(RoundEval {
            round,
            split,
            loss,
            samples,
        });
    }
    let per_client: Vec<ClientEval> = results
        .iter()
        .flat_map(|(client, splits)| {
            splits.iter().map(|e| ClientEval {
                client: *client,
                split: e.split.clone(),
                loss: e.loss,
                samples: e.samples,
                metrics: e.metrics.clone(),
            })
        })
        .collect();
    let metrics = s
        .aggregator
        .aggregate_evaluate(&per_client, round)
        .map_err(|e| {
            HandlerError::Fatal(format!(
                "round {round}: the strategy's aggregate_evaluate ({}) failed: {e}",
                s.aggregator.name()
            ))
        })?;
    if !metrics.is_empty() {
        check_reported(&metrics).map_err(|e| {
            HandlerError::Fatal(format!("round {round}: aggregate_evaluate returned {e}"))
        })?;
        // The strategy's own view of the evaluation, as one record.
        let mut r = Record::new(Event::Eval, round, None);
        r.split = Some(STRATEGY_SPLIT.into());
        r.extra = metrics;
        record(s, r)?;
    }
    s.last_evaluated = Some(round);
    if let Some(best) = s.best.as_mut() {
        let improved = best
            .observe(round, &losses, &s.global)
            .map_err(|e| HandlerError::Fatal(format!("round {round}: {e}")))?;
        if improved {
            info!(round, "the best evaluation so far");
        }
        if best.should_stop() && round < s.cfg.course.rounds {
            info!(
                round,
                best = best.best.as_ref().map(|b| b.round),
                "early stop: {} evaluations without improvement",
                best.stale
            );
            s.stopped_early = Some(round);
            return finish_course(s, round, ctx);
        }
    }
    next_step(s, round, ctx)
}

/// The split name of the record holding what `aggregate_evaluate` returned.
pub const STRATEGY_SPLIT: &str = "strategy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_reproducible_sized_and_varies_by_round() {
        let ids: Vec<u32> = (1..=10).collect();
        let a = sample_clients(&ids, 4, 7, 3);
        assert_eq!(a, sample_clients(&ids, 4, 7, 3));
        assert_eq!(a.len(), 4);
        assert!(
            a.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats: {a:?}"
        );
        let rounds: BTreeSet<Vec<u32>> = (1..=20).map(|r| sample_clients(&ids, 4, 7, r)).collect();
        assert!(rounds.len() > 10, "rounds draw different subsets");
        assert_eq!(
            sample_clients(&ids, 99, 7, 1),
            ids,
            "asking for more than exist takes all"
        );
    }

    #[test]
    fn sampling_is_close_to_uniform() {
        // 10 ids, 3 per round, 3,000 rounds: each id is expected 900 times
        // (binomial sd ≈ 25); allow 5 sd.
        let ids: Vec<u32> = (1..=10).collect();
        let mut counts = BTreeMap::new();
        for round in 0..3000 {
            for id in sample_clients(&ids, 3, 11, round) {
                *counts.entry(id).or_insert(0u32) += 1;
            }
        }
        for (id, n) in counts {
            assert!((775..=1025).contains(&n), "client {id} sampled {n} times");
        }
    }
}
