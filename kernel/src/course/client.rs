//! The client's side of a course: join, train on request, evaluate on request, stop on finish.
//!
//! Training and evaluation run on tokio's blocking pool through
//! [`Ctx::spawn_blocking`], so the client keeps handling messages (and
//! shutdown) while its trainer computes. The update it sends carries the
//! sample count that FedAvg weighs it by, the mean training loss, and the
//! seconds of compute it took.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn};

use super::kept::KeptState;
use crate::aggregate::{join_extra, split_extra};
use crate::bus::Transport;
use crate::config::CourseConfig;
use crate::course::protocol::{self, secagg as sa, AssignId, JoinIn};
use crate::course::secagg;
use crate::course::trainer::{
    derive_seed, LocalTrainer, LocalUpdate, SharedTrainer, TrainContext, TrainerError,
};
use crate::message::{Envelope, MsgKind, Party};
use crate::params::{ParamError, ParamSet};
use crate::worker::{Ctx, Flow, HandlerError, HandlerResult, JobError, Worker};

/// What a client keeps between messages; returned when it stops.
pub struct ClientState {
    id: u32,
    seed: u64,
    /// `[privacy]` when this client noises its own updates (local DP).
    local_dp: Option<crate::privacy::PrivacySection>,
    trainer: SharedTrainer,
    joined: bool,
    /// Tells this run of the client from an earlier one (a restarted
    /// process): the server sends a base model once per instance.
    instance: u64,
    join_attempts: u32,
    join_retry: Duration,
    latest_global: Option<ParamSet>,
    rounds_trained: Vec<u64>,
    /// The last training and evaluation asked for, and their answers once
    /// ready: a request repeated by the server (after this client rejoined,
    /// or a resumed server) is answered again without training twice.
    last_update: Answer,
    last_metrics: Answer,
    /// Where this client keeps its own state between fits, if anywhere.
    kept: Option<Arc<Mutex<KeptState>>>,
    /// Secure aggregation's round session, when it is on.
    secagg: Option<SecAggClient>,
}

/// What a client needs for secure aggregation.
#[derive(Clone)]
struct SecAggClient {
    slot: secagg::ClientSlot,
    /// The least threshold fraction this client accepts.
    fraction: f64,
    /// Clients a round (the ring's headroom).
    per_round: usize,
}

/// See [`ClientState::last_update`].
type Answer = Arc<Mutex<Option<Asked>>>;

struct Asked {
    round: u64,
    global: ParamSet,
    /// `None` while the job runs.
    reply: Option<Envelope>,
}

impl ClientState {
    /// This client's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Keeps what this client's trainer holds between fits in `dir` (see
    /// [`KeptState`]): a restarted client process picks up where it was.
    pub fn keep_state_in(&mut self, dir: &std::path::Path) -> Result<(), TrainerError> {
        self.kept = Some(Arc::new(Mutex::new(KeptState::new(dir, self.id)?)));
        Ok(())
    }

    /// True once the server assigned the id.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// The last global parameters received (at the end: the final ones).
    pub fn latest_global(&self) -> Option<&ParamSet> {
        self.latest_global.as_ref()
    }

    /// The rounds this client was asked to train in.
    pub fn rounds_trained(&self) -> &[u64] {
        &self.rounds_trained
    }
}

/// Builds the worker of client `id`.
pub fn client_worker(
    id: u32,
    cfg: &CourseConfig,
    trainer: SharedTrainer,
    transport: Arc<dyn Transport>,
) -> Worker<ClientState> {
    let state = ClientState {
        id,
        seed: cfg.course.seed,
        local_dp: (cfg.privacy.dp == crate::privacy::DpMode::Local).then(|| cfg.privacy.clone()),
        trainer,
        joined: false,
        instance: instance_id(id),
        join_attempts: 0,
        join_retry: Duration::from_secs_f64(cfg.course.join_retry_s),
        latest_global: None,
        rounds_trained: Vec::new(),
        last_update: Answer::default(),
        last_metrics: Answer::default(),
        kept: None,
        secagg: cfg.privacy.secure_aggregation.then(|| SecAggClient {
            slot: secagg::ClientSlot::default(),
            fraction: cfg.privacy.secagg_threshold,
            per_round: cfg.clients_per_round() as usize,
        }),
    };
    Worker::new(Party::Client(id), cfg.course.name.clone(), transport, state)
        .with_encoding(cfg.wire.encode_options())
        .with_limits(cfg.wire.limits())
        .on_start(|s, ctx| {
            ask_to_join(s, ctx)?;
            Ok(Flow::Continue)
        })
        .on(MsgKind::Custom(JOIN_RETRY.into()), on_join_retry)
        .on(
            MsgKind::Custom(super::server::ROLL_CALL.into()),
            on_roll_call,
        )
        .on(MsgKind::AssignId, on_assign_id)
        .on(MsgKind::BaseModel, on_base_model)
        .on(MsgKind::ModelPara, on_model_para)
        .on(MsgKind::Train, on_train)
        .on(MsgKind::Evaluate, on_evaluate)
        .on(MsgKind::Finish, on_finish)
        .on(MsgKind::Custom(sa::PEERS.into()), on_secagg_peers)
        .on(MsgKind::Custom(sa::INBOX.into()), on_secagg_inbox)
        .on(MsgKind::Custom(sa::UNMASK.into()), on_secagg_unmask)
}

/// A number that differs between runs of a client (its id, process and start time).
fn instance_id(id: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish()
}

/// The kind of the client's own join-retry timer.
const JOIN_RETRY: &str = "join_retry";

/// Sends `join_in` and arms a retry: over a broker, a `join_in` sent before
/// the server subscribed is lost, so the client asks again until accepted.
fn ask_to_join(s: &mut ClientState, ctx: &mut Ctx) -> Result<(), HandlerError> {
    send_join_in(s, ctx)?;
    s.join_attempts += 1;
    if s.join_attempts == 1 {
        info!(client = s.id, "asked to join");
    } else if s.join_attempts.is_multiple_of(10) {
        warn!(
            client = s.id,
            attempts = s.join_attempts,
            "the server has not answered yet; still asking to join"
        );
    }
    let me = ctx.me();
    let retry = Envelope::new(
        ctx.course(),
        0,
        me,
        vec![me],
        MsgKind::Custom(JOIN_RETRY.into()),
    );
    ctx.send_after(s.join_retry, retry);
    Ok(())
}

fn on_join_retry(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    if env.from != ctx.me() {
        return Err(HandlerError::Reject(
            "join retries come only from the client's own timer".into(),
        ));
    }
    if !s.joined {
        ask_to_join(s, ctx)?;
    }
    Ok(Flow::Continue)
}

/// A (possibly restarted) server asks its clients to join: answer, once.
fn on_roll_call(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    from_server(&env)?;
    info!(client = s.id, "the server called the roll; joining");
    send_join_in(s, ctx)?;
    Ok(Flow::Continue)
}

fn send_join_in(s: &ClientState, ctx: &mut Ctx) -> Result<usize, HandlerError> {
    let join = Envelope::new(
        ctx.course(),
        0,
        ctx.me(),
        vec![Party::Server],
        MsgKind::JoinIn,
    )
    .with_body(&JoinIn {
        instance: Some(s.instance),
    })?;
    Ok(ctx.send(join)?)
}

/// Whether the request in `env` repeats the last one in `answer`; if so, the
/// answer is sent again when it is ready (or will go out when its job ends).
fn repeated(
    answer: &Answer,
    round: u64,
    global: &ParamSet,
    ctx: &mut Ctx,
) -> Result<bool, HandlerError> {
    let mut slot = answer
        .lock()
        .map_err(|_| HandlerError::Fatal("a job panicked holding the answer cache".into()))?;
    match slot.as_ref() {
        Some(a) if a.round == round && &a.global == global => {
            if let Some(reply) = &a.reply {
                info!(round, kind = %reply.kind, "a repeated request; sending the same answer again");
                ctx.send(reply.clone())?;
            }
            Ok(true)
        }
        _ => {
            *slot = Some(Asked {
                round,
                global: global.clone(),
                reply: None,
            });
            Ok(false)
        }
    }
}

/// Keeps `reply` as the answer to the request it answers.
fn remember(answer: &Answer, reply: &Envelope) {
    if let Ok(mut slot) = answer.lock() {
        if let Some(a) = slot.as_mut().filter(|a| a.round == reply.round) {
            a.reply = Some(reply.clone());
        }
    }
}

fn from_server(env: &Envelope) -> Result<(), HandlerError> {
    if env.from == Party::Server {
        Ok(())
    } else {
        Err(HandlerError::Reject(format!(
            "{} may only come from the server",
            env.kind
        )))
    }
}

fn on_assign_id(s: &mut ClientState, env: Envelope, _ctx: &mut Ctx) -> HandlerResult {
    from_server(&env)?;
    let assigned = env
        .body::<AssignId>()
        .map_err(|e| HandlerError::Reject(e.to_string()))?;
    if assigned.client_id != s.id {
        return Err(HandlerError::Reject(format!(
            "assign_id for another id ({})",
            assigned.client_id
        )));
    }
    s.joined = true;
    Ok(Flow::Continue)
}

/// The server's frozen model: installed before anything else is handled
/// (the next request needs it), so here rather than on the blocking pool.
fn on_base_model(s: &mut ClientState, env: Envelope, _ctx: &mut Ctx) -> HandlerResult {
    from_server(&env)?;
    let base = env
        .payload
        .as_ref()
        .ok_or_else(|| HandlerError::Reject("base_model without weights".into()))?;
    let started = Instant::now();
    let mut trainer = s
        .trainer
        .lock()
        .map_err(|_| HandlerError::Fatal("the shared trainer panicked earlier".into()))?;
    trainer.install_base(s.id, base, &env.meta).map_err(|e| {
        HandlerError::Fatal(format!("client {}: cannot take the base model: {e}", s.id))
    })?;
    info!(
        client = s.id,
        tensors = base.len(),
        params = base.num_elements(),
        seconds = started.elapsed().as_secs_f64(),
        "base model installed"
    );
    Ok(Flow::Continue)
}

fn on_model_para(s: &mut ClientState, env: Envelope, _ctx: &mut Ctx) -> HandlerResult {
    from_server(&env)?;
    s.latest_global = Some(
        env.payload
            .ok_or_else(|| HandlerError::Reject("model_para without parameters".into()))?,
    );
    Ok(Flow::Continue)
}

/// The context and shared trainer a job needs, taken from a server request.
fn job_inputs(
    s: &ClientState,
    env: &Envelope,
    ctx: &Ctx,
) -> Result<(ParamSet, TrainContext), HandlerError> {
    from_server(env)?;
    let global = env
        .payload
        .clone()
        .ok_or_else(|| HandlerError::Reject(format!("{} without parameters", env.kind)))?;
    let tctx = TrainContext::new(
        env.round,
        derive_seed(s.seed, s.id, env.round),
        env.meta.clone(),
        ctx.cancel_flag(),
    );
    Ok((global, tctx))
}

/// A client's training or evaluation that failed, as the server hears it.
#[derive(Debug, thiserror::Error)]
#[error("client {id}: {what} in round {round} failed: {error}")]
struct JobFailed {
    id: u32,
    round: u64,
    what: &'static str,
    error: TrainerError,
}

/// Runs `work` on the shared trainer; returns its result — or why it
/// failed, naming the client, the round and what failed, for the server to
/// hear — and the seconds it took. Only a trainer that panicked earlier is
/// an error of the job itself.
fn with_trainer<T>(
    trainer: &SharedTrainer,
    (id, round, what): (u32, u64, &'static str),
    work: impl FnOnce(&mut dyn LocalTrainer) -> Result<T, TrainerError>,
) -> Result<(Result<T, JobFailed>, f64), JobError> {
    let started = Instant::now();
    let mut guard = trainer
        .lock()
        .map_err(|_| "the shared trainer panicked earlier")?;
    let out = work(&mut *guard).map_err(|error| JobFailed {
        id,
        round,
        what,
        error,
    });
    if let Err(reason) = &out {
        warn!("{reason}; reporting it to the server");
    }
    Ok((out, started.elapsed().as_secs_f64()))
}

/// Why an update must not be sent: non-finite parameters or loss (a
/// diverged training), as the server will hear it.
fn unfit(update: &LocalUpdate, id: u32, round: u64) -> Option<String> {
    let diverged = |what: String| {
        Some(format!(
            "client {id}: training in round {round} diverged: {what} (lower the learning rate, or set federate.on_divergence = \"skip-client\")"
        ))
    };
    if let Err(e) = update.params.check_finite() {
        return diverged(format!("the update holds {e}"));
    }
    if let Err(e) = update.extra.check_finite() {
        return diverged(format!("its extra tensors hold {e}"));
    }
    match update.loss {
        Some(loss) if !loss.is_finite() => diverged(format!("the mean training loss is {loss}")),
        _ => None,
    }
}

fn reply(course: String, id: u32, round: u64, kind: MsgKind) -> Envelope {
    Envelope::new(course, round, Party::Client(id), vec![Party::Server], kind)
}

fn on_train(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let (sent, tctx) = job_inputs(s, &env, ctx)?;
    // Secure aggregation: a new key exchange for every request; the
    // training of the round runs once.
    let secagg = match &s.secagg {
        Some(sa) => {
            let (keys, start) = secagg::begin(&sa.slot, ctx.course(), env.round, s.id)
                .map_err(|e| HandlerError::Fatal(format!("client {}: {e}", s.id)))?;
            ctx.send(keys)?;
            if !start {
                return Ok(Flow::Continue);
            }
            Some(sa.clone())
        }
        None => None,
    };
    if secagg.is_none() && repeated(&s.last_update, env.round, &sent, ctx)? {
        return Ok(Flow::Continue);
    }
    // The strategy's instruction for this client: its configuration, and
    // the extra tensors that came beside the parameters.
    let config = env
        .body::<protocol::Train>()
        .map_err(|e| HandlerError::Reject(e.to_string()))?
        .config;
    let (global, extra) = split_extra(sent);
    let (id, round) = (s.id, env.round);
    let local_dp = match s.local_dp.clone() {
        Some(p) => {
            let seed = crate::privacy::local_noise_seed(&p, s.seed, id, round).map_err(|e| {
                HandlerError::Fatal(format!(
                    "client {id}: no OS randomness for the local DP noise: {e}"
                ))
            })?;
            Some((p, seed))
        }
        None => None,
    };
    s.rounds_trained.push(round);
    s.latest_global = Some(global.clone());
    let job = TrainJob {
        id,
        round,
        course: ctx.course().to_string(),
        trainer: s.trainer.clone(),
        kept: s.kept.clone(),
        tctx: tctx.with_fit(config, extra),
        global,
        local_dp,
        secagg,
        answer: s.last_update.clone(),
    };
    ctx.spawn_blocking(move || job.run());
    Ok(Flow::Continue)
}

/// A round's local training, as it runs on a blocking thread.
struct TrainJob {
    id: u32,
    round: u64,
    course: String,
    trainer: SharedTrainer,
    kept: Option<Arc<Mutex<KeptState>>>,
    tctx: TrainContext,
    global: ParamSet,
    local_dp: Option<(crate::privacy::PrivacySection, u64)>,
    secagg: Option<SecAggClient>,
    answer: Answer,
}

impl TrainJob {
    fn run(self) -> Result<Vec<Envelope>, JobError> {
        let (id, round) = (self.id, self.round);
        let _span = info_span!("train", client = id, round).entered();
        let (update, compute_s) = self.train()?;
        // The update, or why it must not be sent (judged once, here).
        let update = update
            .map_err(|e| e.to_string())
            .and_then(|(u, unfit)| unfit.map_or(Ok(u), Err))
            .and_then(|u| {
                self.privatize(u)
                    .map_err(|e| format!("client {id}: local DP: {e}"))
            });
        if let Some(sa) = &self.secagg {
            // The update leaves only masked, once the peers' shares are here.
            let ready = match update {
                Ok(update) => {
                    let params = crate::aggregate::fill_from(update.params, &self.global);
                    secagg::ring_update(
                        update.n_samples,
                        update.loss,
                        &params,
                        &self.global,
                        sa.per_round,
                    )
                    .map(|x| (x, compute_s))
                    .map_err(|e| (format!("client {id}: round {round}: {e}"), compute_s))
                }
                Err(failure) => Err((failure, compute_s)),
            };
            return Ok(secagg::trained(&sa.slot, &self.course, round, ready)
                .map(secagg::MaskJob::run)
                .into_iter()
                .collect());
        }
        let reply = reply(self.course, id, round, MsgKind::Update);
        let reply = match update {
            Ok(update) => reply
                .with_body(&protocol::Update {
                    n_samples: update.n_samples,
                    compute_s,
                    train_loss: update.loss,
                    local_steps: update.local_steps,
                    // JSON has no NaN: a non-finite metric would arrive as
                    // null and spoil the whole body.
                    metrics: update
                        .metrics
                        .into_iter()
                        .filter(|(_, v)| v.is_finite())
                        .collect(),
                    failed: None,
                })?
                .with_payload(join_extra(update.params, &update.extra)),
            // A failed training sends its reason, never parameters.
            Err(failure) => reply.with_body(&protocol::Update {
                n_samples: 0,
                compute_s,
                train_loss: None,
                local_steps: None,
                metrics: Default::default(),
                failed: Some(failure),
            })?,
        };
        remember(&self.answer, &reply);
        Ok(vec![reply])
    }

    /// The trained update and why it must not be sent, if it must not
    /// (or why training failed), and the seconds it took; the client's
    /// kept state taken up before and saved after a fit that may be sent.
    #[allow(clippy::type_complexity)]
    fn train(&self) -> Result<(Result<(LocalUpdate, Option<String>), JobFailed>, f64), JobError> {
        let (id, round) = (self.id, self.round);
        with_trainer(&self.trainer, (id, round, "training"), |t| {
            let mut kept = match &self.kept {
                Some(k) => Some(k.lock().map_err(|_| "the client's state keeper panicked")?),
                None => None,
            };
            if let Some(k) = kept.as_mut() {
                k.before(t, id, round)?;
            }
            let trained = t.train(id, &self.global, &self.tctx).map(|u| {
                let unfit = unfit(&u, id, round);
                (u, unfit)
            });
            if let Some(k) = kept.as_mut() {
                match &trained {
                    Ok((_, None)) => k.after(t, id, round)?,
                    _ => k.lost(),
                }
            }
            trained
        })
    }

    /// Local DP: `update` clipped and noised here, before it leaves.
    fn privatize(&self, mut update: LocalUpdate) -> Result<LocalUpdate, ParamError> {
        if let Some((privacy, seed)) = &self.local_dp {
            update.params =
                crate::privacy::privatize_local(&update.params, &self.global, privacy, *seed)?;
        }
        Ok(update)
    }
}

fn on_evaluate(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let (global, tctx) = job_inputs(s, &env, ctx)?;
    if repeated(&s.last_metrics, env.round, &global, ctx)? {
        return Ok(Flow::Continue);
    }
    let answer = s.last_metrics.clone();
    let (id, round, trainer) = (s.id, env.round, s.trainer.clone());
    let course = ctx.course().to_string();
    ctx.spawn_blocking(move || {
        let _span = info_span!("evaluate", client = id, round).entered();
        let (results, compute_s) = with_trainer(&trainer, (id, round, "evaluation"), |t| {
            t.evaluate(id, &global, &tctx)
        })?;
        let body = match results {
            Ok(results) if results.iter().all(|r| r.loss.is_finite()) => protocol::Metrics {
                results,
                compute_s,
                failed: None,
            },
            Ok(results) => protocol::Metrics {
                results: Vec::new(),
                compute_s,
                failed: Some(format!(
                    "client {id}: evaluation in round {round} gave non-finite losses ({})",
                    results
                        .iter()
                        .map(|r| format!("{} {}", r.split, r.loss))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            Err(reason) => protocol::Metrics {
                results: Vec::new(),
                compute_s,
                failed: Some(reason.to_string()),
            },
        };
        let reply = reply(course, id, round, MsgKind::Metrics).with_body(&body)?;
        remember(&answer, &reply);
        Ok(vec![reply])
    });
    Ok(Flow::Continue)
}

/// The secure-aggregation session of this client, or a rejection.
fn secagg_slot(s: &ClientState, env: &Envelope) -> Result<SecAggClient, HandlerError> {
    from_server(env)?;
    s.secagg.clone().ok_or_else(|| {
        HandlerError::Reject(format!(
            "{} but this client's course has no secure aggregation",
            env.kind
        ))
    })
}

fn on_secagg_peers(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let sa = secagg_slot(s, &env)?;
    let shares = secagg::on_peers(&sa.slot, ctx.course(), &env, sa.fraction)
        .map_err(|e| HandlerError::Reject(format!("{}: {e}", env.kind)))?;
    ctx.send(shares)?;
    Ok(Flow::Continue)
}

fn on_secagg_inbox(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let sa = secagg_slot(s, &env)?;
    let job = secagg::on_inbox(&sa.slot, ctx.course(), &env)
        .map_err(|e| HandlerError::Reject(format!("{}: {e}", env.kind)))?;
    if let Some(job) = job {
        // Masking costs a ChaCha stream per peer: off the message loop.
        ctx.spawn_blocking(move || Ok(vec![job.run()]));
    }
    Ok(Flow::Continue)
}

fn on_secagg_unmask(s: &mut ClientState, env: Envelope, ctx: &mut Ctx) -> HandlerResult {
    let sa = secagg_slot(s, &env)?;
    let reveal = secagg::on_unmask(&sa.slot, ctx.course(), &env)
        .map_err(|e| HandlerError::Reject(format!("{}: {e}", env.kind)))?;
    ctx.send(reveal)?;
    Ok(Flow::Continue)
}

fn on_finish(s: &mut ClientState, env: Envelope, _ctx: &mut Ctx) -> HandlerResult {
    from_server(&env)?;
    if let Some(params) = env.payload {
        s.latest_global = Some(params);
    }
    info!(client = s.id, "course finished");
    Ok(Flow::Stop)
}
