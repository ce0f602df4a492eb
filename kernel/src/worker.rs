//! The worker event loop: receive, decode, dispatch by kind, send.
//!
//! Every FL participant — server or client, in-process or over NATS — is a
//! [`Worker`]: some state `S` plus handlers registered per [`MsgKind`]. The loop
//! owns all I/O; handlers are plain synchronous state transitions that read an
//! [`Envelope`] and queue replies on a [`Ctx`]. This keeps behaviours easy to
//! test and lets the loop stay responsive:
//!
//! - Heavy work (local training, evaluation) goes to [`Ctx::spawn_blocking`]. It
//!   runs on tokio's blocking pool, off the async executor, and the envelopes
//!   it returns are sent when it finishes — or, when addressed to this worker
//!   itself, dispatched to its handlers like any received message.
//! - Frames that fail to decode, belong to another course or claim a sender
//!   other than the one the transport saw are rejected and counted, never fatal;
//!   so are kinds with no handler.
//! - Shutdown is graceful: a [`ShutdownHandle`] (or a handler returning
//!   [`Flow::Stop`]) ends the loop; the cancel flag handed to blocking jobs is
//!   raised and the loop waits for them before it returns its state and stats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::bus::{Delivery, Subscription, Transport, TransportError};
use crate::codec::{self, CodecError, DecodeLimits, EncodeOptions};
use crate::message::{Envelope, MsgKind, Party};

/// Failure of a whole worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// Subscribing failed.
    #[error("{party} cannot subscribe: {source}")]
    Subscribe {
        party: Party,
        source: TransportError,
    },
    /// A handler hit an error it cannot recover from.
    #[error("{party}: {message}")]
    Fatal { party: Party, message: String },
    /// A blocking job failed or panicked.
    #[error("{party}: background job failed: {message}")]
    Job { party: Party, message: String },
}

/// What a handler tells the loop about one message.
#[derive(Debug, Error)]
pub enum HandlerError {
    /// The message is invalid (wrong round, shape mismatch, …): drop and count it.
    #[error("message rejected: {0}")]
    Reject(String),
    /// The worker cannot go on.
    #[error("{0}")]
    Fatal(String),
}

impl From<CodecError> for HandlerError {
    fn from(e: CodecError) -> Self {
        HandlerError::Fatal(format!("cannot encode a reply: {e}"))
    }
}

impl From<crate::message::BodyError> for HandlerError {
    fn from(e: crate::message::BodyError) -> Self {
        HandlerError::Fatal(format!("cannot write a message body: {e}"))
    }
}

/// Whether the `nth` occurrence of a repeated warning (a rejected message,
/// an evicted frame) is worth a log line: the first ten, then every power
/// of two, so a flood of garbage costs a few dozen lines, not one each.
pub fn worth_a_warning(nth: u64) -> bool {
    nth <= 10 || nth.is_power_of_two()
}

/// Whether the loop continues after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Stop the worker (after sending what the handler queued).
    Stop,
}

/// Result type of handlers.
pub type HandlerResult = Result<Flow, HandlerError>;

/// Error type of blocking jobs.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

type Handler<S> = Box<dyn FnMut(&mut S, Envelope, &mut Ctx) -> HandlerResult + Send>;
type StartHook<S> = Box<dyn FnOnce(&mut S, &mut Ctx) -> HandlerResult + Send>;
type Job = Box<dyn FnOnce() -> Result<Vec<Envelope>, JobError> + Send>;

/// Counters of one worker's traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Frames received and decoded.
    pub received: u64,
    /// Frames sent (one per recipient).
    pub sent: u64,
    /// Encoded bytes received.
    pub bytes_in: u64,
    /// Encoded bytes sent.
    pub bytes_out: u64,
    /// Frames dropped: undecodable, foreign course, forged sender, or refused by a handler.
    pub rejected: u64,
    /// Messages of a kind with no handler.
    pub unhandled: u64,
    /// Sends that failed (recipient unreachable).
    pub send_failures: u64,
}

/// What a handler sees of the loop: who it is, what the message cost, and where replies go.
pub struct Ctx {
    me: Party,
    course: String,
    encode: EncodeOptions,
    received_bytes: usize,
    outbox: Vec<(Vec<Party>, Bytes)>,
    local: Vec<Envelope>,
    jobs: Vec<Job>,
    timers: Vec<(Duration, Envelope)>,
    cancel: Arc<AtomicBool>,
}

impl Ctx {
    /// This worker's party.
    pub fn me(&self) -> Party {
        self.me
    }

    /// The course this worker belongs to.
    pub fn course(&self) -> &str {
        &self.course
    }

    /// Encoded size of the message being handled (0 for messages from this worker's own jobs).
    pub fn received_bytes(&self) -> usize {
        self.received_bytes
    }

    /// The encoding used for outgoing messages.
    pub fn encode_options(&self) -> EncodeOptions {
        self.encode
    }

    /// Encodes `env` now and queues it for each of its recipients; returns the
    /// encoded size of one copy, so callers can account for bytes on the wire.
    pub fn send(&mut self, mut env: Envelope) -> Result<usize, CodecError> {
        // A frame for several parties carries no recipient list: the
        // transport addresses each copy, and listing every recipient in
        // every copy made a broadcast to n clients cost n² bytes.
        let to = std::mem::take(&mut env.to);
        if to.len() == 1 {
            env.to.clone_from(&to);
        }
        let frame = codec::encode(&env, self.encode)?;
        env.to = to;
        let len = frame.len();
        let (local, remote): (Vec<Party>, Vec<Party>) = env.to.iter().partition(|&&p| p == self.me);
        if !remote.is_empty() {
            self.outbox.push((remote, frame));
        }
        if !local.is_empty() {
            self.local.push(env);
        }
        Ok(len)
    }

    /// Runs `job` on the blocking pool; the envelopes it returns are sent when it finishes.
    pub fn spawn_blocking(
        &mut self,
        job: impl FnOnce() -> Result<Vec<Envelope>, JobError> + Send + 'static,
    ) {
        self.jobs.push(Box::new(job));
    }

    /// Sends `env` after `delay` (a timer): addressed to this worker, it is
    /// dispatched to its own handler then, as the server's round timeout and
    /// the client's join retry are. Timers still pending when the worker
    /// stops are dropped.
    pub fn send_after(&mut self, delay: Duration, env: Envelope) {
        self.timers.push((delay, env));
    }

    /// Raised when the worker is shutting down; long jobs should poll it and stop early.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}

/// Triggers a graceful shutdown of the workers holding its [`Shutdown`] receivers.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

/// The receiving end of a shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl ShutdownHandle {
    /// A new signal and its first receiver.
    pub fn new() -> (Self, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Self(Arc::new(tx)), Shutdown(rx))
    }

    /// Another receiver of this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    /// Asks every worker holding a receiver to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A signal that never fires.
    pub fn never() -> Self {
        // With its sender dropped, `wait` knows nobody can trigger it and pends forever.
        let (_, rx) = watch::channel(false);
        Shutdown(rx)
    }

    async fn wait(&mut self) {
        // An error means every sender is gone: nobody can trigger any more, so wait forever.
        if self.0.wait_for(|&stop| stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a worker's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A handler returned [`Flow::Stop`].
    Finished,
    /// The shutdown signal fired.
    Shutdown,
    /// The transport closed the subscription.
    Disconnected,
}

/// A worker's state and counters after its loop ended.
#[derive(Debug)]
pub struct WorkerOutcome<S> {
    /// The behaviour's final state.
    pub state: S,
    /// Traffic counters.
    pub stats: WorkerStats,
    /// Why it stopped.
    pub reason: StopReason,
}

/// One participant: state, handlers per message kind, and the loop that drives them.
pub struct Worker<S> {
    me: Party,
    course: String,
    transport: Arc<dyn Transport>,
    encode: EncodeOptions,
    limits: DecodeLimits,
    handlers: HashMap<MsgKind, Handler<S>>,
    on_start: Option<StartHook<S>>,
    state: S,
}

impl<S: Send + 'static> Worker<S> {
    /// A worker for `me` in `course`, with no handlers yet.
    pub fn new(
        me: Party,
        course: impl Into<String>,
        transport: Arc<dyn Transport>,
        state: S,
    ) -> Self {
        Self {
            me,
            course: course.into(),
            transport,
            encode: EncodeOptions::default(),
            limits: DecodeLimits::default(),
            handlers: HashMap::new(),
            on_start: None,
            state,
        }
    }

    /// This worker's party.
    pub fn party(&self) -> Party {
        self.me
    }

    /// The behaviour's state, before the loop runs (to configure it).
    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    /// Registers what the worker does once subscribed, before any message
    /// arrives (a client sends `join_in` here).
    pub fn on_start(
        mut self,
        start: impl FnOnce(&mut S, &mut Ctx) -> HandlerResult + Send + 'static,
    ) -> Self {
        self.on_start = Some(Box::new(start));
        self
    }

    /// Sets how outgoing messages are encoded.
    pub fn with_encoding(mut self, encode: EncodeOptions) -> Self {
        self.encode = encode;
        self
    }

    /// Sets the bounds applied to incoming frames.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Registers the handler for one kind of message (replacing any earlier one).
    pub fn on(
        mut self,
        kind: MsgKind,
        handler: impl FnMut(&mut S, Envelope, &mut Ctx) -> HandlerResult + Send + 'static,
    ) -> Self {
        self.handlers.insert(kind, Box::new(handler));
        self
    }

    /// Subscribes, runs the start hook, then loops until stopped.
    pub async fn run(self, shutdown: Shutdown) -> Result<WorkerOutcome<S>, WorkerError> {
        let sub =
            self.transport
                .subscribe(self.me)
                .await
                .map_err(|source| WorkerError::Subscribe {
                    party: self.me,
                    source,
                })?;
        self.run_subscribed(sub, shutdown).await
    }

    /// Like [`Worker::run`], on a subscription made beforehand (so that others
    /// can already reach this worker before its loop starts).
    pub async fn run_subscribed(
        self,
        mut sub: Subscription,
        shutdown: Shutdown,
    ) -> Result<WorkerOutcome<S>, WorkerError> {
        let mut worker = self;
        let on_start = worker.on_start.take();
        let mut lp = Loop {
            w: worker,
            stats: WorkerStats::default(),
            jobs: JoinSet::new(),
            timers: JoinSet::new(),
            cancel: Arc::new(AtomicBool::new(false)),
        };
        let mut shutdown = shutdown;
        let mut reason = None;
        if let Some(start) = on_start {
            let mut ctx = lp.ctx(0);
            let flow = start(&mut lp.w.state, &mut ctx).map_err(|e| lp.fatal(e.to_string()))?;
            if lp.flush(ctx).await? == Flow::Stop || flow == Flow::Stop {
                reason = Some(StopReason::Finished);
            }
        }
        while reason.is_none() {
            tokio::select! {
                biased;
                _ = shutdown.wait() => reason = Some(StopReason::Shutdown),
                Some(done) = lp.jobs.join_next(), if !lp.jobs.is_empty() => {
                    let envelopes = match done {
                        Ok(Ok(envs)) => envs,
                        Ok(Err(e)) => return Err(WorkerError::Job { party: lp.w.me, message: e.to_string() }),
                        Err(e) => return Err(WorkerError::Job { party: lp.w.me, message: e.to_string() }),
                    };
                    let mut ctx = lp.ctx(0);
                    for env in envelopes {
                        ctx.send(env).map_err(|e| lp.fatal(format!("cannot encode a job's message: {e}")))?;
                    }
                    if lp.flush(ctx).await? == Flow::Stop {
                        reason = Some(StopReason::Finished);
                    }
                }
                Some(fired) = lp.timers.join_next(), if !lp.timers.is_empty() => {
                    let Ok(env) = fired else { continue };
                    let mut ctx = lp.ctx(0);
                    ctx.send(env).map_err(|e| lp.fatal(format!("cannot encode a timer's message: {e}")))?;
                    if lp.flush(ctx).await? == Flow::Stop {
                        reason = Some(StopReason::Finished);
                    }
                }
                delivery = sub.recv() => match delivery {
                    None => reason = Some(StopReason::Disconnected),
                    Some(d) => {
                        if lp.receive(d).await? == Flow::Stop {
                            reason = Some(StopReason::Finished);
                        }
                    }
                },
            }
        }
        lp.cancel.store(true, Ordering::SeqCst);
        lp.timers.abort_all();
        while let Some(done) = lp.jobs.join_next().await {
            if let Ok(Err(e)) = done {
                debug!(party = %lp.w.me, "job ended during shutdown: {e}");
            }
        }
        Ok(WorkerOutcome {
            state: lp.w.state,
            stats: lp.stats,
            reason: reason.unwrap_or(StopReason::Finished),
        })
    }
}

/// A worker while its loop runs: the worker plus what only a running loop has.
struct Loop<S> {
    w: Worker<S>,
    stats: WorkerStats,
    jobs: JoinSet<Result<Vec<Envelope>, JobError>>,
    timers: JoinSet<Envelope>,
    cancel: Arc<AtomicBool>,
}

impl<S: Send + 'static> Loop<S> {
    fn ctx(&self, received_bytes: usize) -> Ctx {
        Ctx {
            me: self.w.me,
            course: self.w.course.clone(),
            encode: self.w.encode,
            received_bytes,
            outbox: Vec::new(),
            local: Vec::new(),
            jobs: Vec::new(),
            timers: Vec::new(),
            cancel: self.cancel.clone(),
        }
    }

    /// Counts a rejected message; whether it is worth a log line.
    fn count_rejection(&mut self) -> bool {
        self.stats.rejected += 1;
        worth_a_warning(self.stats.rejected)
    }

    fn fatal(&self, message: String) -> WorkerError {
        WorkerError::Fatal {
            party: self.w.me,
            message,
        }
    }

    /// Decodes and checks one frame, then dispatches it.
    async fn receive(&mut self, d: Delivery) -> Result<Flow, WorkerError> {
        self.stats.bytes_in += d.frame.len() as u64;
        let env = match codec::decode(&d.frame, &self.w.limits) {
            Ok(env) => env,
            Err(e) => {
                if self.count_rejection() {
                    warn!(party = %self.w.me, from = %d.from, rejected = self.stats.rejected, "dropped an undecodable frame: {e}");
                }
                return Ok(Flow::Continue);
            }
        };
        self.stats.received += 1;
        if env.course != self.w.course {
            if self.count_rejection() {
                warn!(party = %self.w.me, from = %d.from, rejected = self.stats.rejected, "dropped a message of course `{}`", env.course);
            }
            return Ok(Flow::Continue);
        }
        if env.from != d.from {
            if self.count_rejection() {
                warn!(party = %self.w.me, from = %d.from, rejected = self.stats.rejected, "dropped a message claiming to come from {}", env.from);
            }
            return Ok(Flow::Continue);
        }
        self.dispatch(env, d.frame.len()).await
    }

    /// Runs the handler for `env` (and, in turn, for any messages it addresses to this worker).
    async fn dispatch(
        &mut self,
        env: Envelope,
        received_bytes: usize,
    ) -> Result<Flow, WorkerError> {
        let mut ctx = self.ctx(received_bytes);
        let Some(handler) = self.w.handlers.get_mut(&env.kind) else {
            self.stats.unhandled += 1;
            debug!(party = %self.w.me, kind = %env.kind, from = %env.from, "no handler for this kind");
            return Ok(Flow::Continue);
        };
        let kind = env.kind.clone();
        let from = env.from;
        let flow = match handler(&mut self.w.state, env, &mut ctx) {
            Ok(flow) => flow,
            Err(HandlerError::Reject(reason)) => {
                if self.count_rejection() {
                    warn!(party = %self.w.me, %kind, %from, rejected = self.stats.rejected, "message rejected: {reason}");
                }
                Flow::Continue
            }
            Err(HandlerError::Fatal(message)) => return Err(self.fatal(message)),
        };
        let after = self.flush(ctx).await?;
        Ok(if flow == Flow::Stop {
            Flow::Stop
        } else {
            after
        })
    }

    /// Sends what a handler queued, starts its jobs, and handles its messages to self.
    async fn flush(&mut self, ctx: Ctx) -> Result<Flow, WorkerError> {
        for (recipients, frame) in ctx.outbox {
            for to in recipients {
                match self.w.transport.send(self.w.me, to, frame.clone()).await {
                    Ok(()) => {
                        self.stats.sent += 1;
                        self.stats.bytes_out += frame.len() as u64;
                    }
                    Err(e) => {
                        self.stats.send_failures += 1;
                        warn!(party = %self.w.me, %to, "send failed: {e}");
                    }
                }
            }
        }
        for job in ctx.jobs {
            self.jobs.spawn_blocking(job);
        }
        for (delay, env) in ctx.timers {
            self.timers.spawn(async move {
                tokio::time::sleep(delay).await;
                env
            });
        }
        for env in ctx.local {
            if Box::pin(self.dispatch(env, 0)).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcTransport;
    use crate::codec::encode;

    fn env(from: Party, to: Party, kind: MsgKind) -> Envelope {
        Envelope::new("c", 0, from, vec![to], kind)
    }

    /// A client-like worker that counts pings, answers them from a blocking job,
    /// and stops on `finish`.
    fn pinger(bus: &InProcTransport) -> Worker<u32> {
        Worker::new(Party::Client(1), "c", Arc::new(bus.clone()), 0u32)
            .on(MsgKind::Custom("ping".into()), |count, e, ctx| {
                *count += 1;
                let me = ctx.me();
                let to = e.from;
                ctx.spawn_blocking(move || Ok(vec![env(me, to, MsgKind::Custom("pong".into()))]));
                Ok(Flow::Continue)
            })
            .on(MsgKind::Finish, |_, _, _| Ok(Flow::Stop))
    }

    #[tokio::test]
    async fn bad_frames_are_counted_and_the_loop_goes_on() {
        let bus = InProcTransport::new();
        let mut server = bus.subscribe(Party::Server).await.unwrap();
        let worker = tokio::spawn(pinger(&bus).run(Shutdown::never()));
        tokio::task::yield_now().await;
        let me = Party::Client(1);
        let send = |from: Party, e: &Envelope| {
            let bus = bus.clone();
            let frame = encode(e, EncodeOptions::default()).unwrap();
            async move { bus.send(from, me, frame).await.unwrap() }
        };
        // Wait until the worker has subscribed.
        while bus
            .send(Party::Server, me, Bytes::from_static(b"garbage"))
            .await
            .is_err()
        {
            tokio::task::yield_now().await;
        }
        send(
            Party::Server,
            &env(Party::Server, me, MsgKind::Custom("ping".into())),
        )
        .await;
        // Forged sender, foreign course, unknown kind.
        send(
            Party::Client(2),
            &env(Party::Server, me, MsgKind::Custom("ping".into())),
        )
        .await;
        let mut foreign = env(Party::Server, me, MsgKind::Custom("ping".into()));
        foreign.course = "other".into();
        send(Party::Server, &foreign).await;
        send(
            Party::Server,
            &env(Party::Server, me, MsgKind::Custom("mystery".into())),
        )
        .await;
        let pong = server.recv().await.unwrap();
        let pong = codec::decode(&pong.frame, &DecodeLimits::default()).unwrap();
        assert_eq!(pong.kind, MsgKind::Custom("pong".into()));
        send(Party::Server, &env(Party::Server, me, MsgKind::Finish)).await;
        let outcome = worker.await.unwrap().unwrap();
        assert_eq!(outcome.reason, StopReason::Finished);
        assert_eq!(outcome.state, 1, "only the genuine ping counts");
        assert_eq!(outcome.stats.rejected, 3);
        assert_eq!(outcome.stats.unhandled, 1);
        assert_eq!(outcome.stats.received, 5);
        assert_eq!(outcome.stats.sent, 1);
    }

    #[tokio::test]
    async fn shutdown_signal_stops_the_loop_and_raises_the_cancel_flag() {
        let bus = InProcTransport::new();
        let (handle, shutdown) = ShutdownHandle::new();
        let seen = Arc::new(AtomicBool::new(false));
        let seen_in_job = seen.clone();
        let worker =
            Worker::new(Party::Server, "c", Arc::new(bus.clone()), ()).on_start(move |_, ctx| {
                let cancel = ctx.cancel_flag();
                ctx.spawn_blocking(move || {
                    while !cancel.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    seen_in_job.store(true, Ordering::SeqCst);
                    Ok(vec![])
                });
                Ok(Flow::Continue)
            });
        let task = tokio::spawn(worker.run(shutdown));
        handle.trigger();
        let outcome = task.await.unwrap().unwrap();
        assert_eq!(outcome.reason, StopReason::Shutdown);
        assert!(
            seen.load(Ordering::SeqCst),
            "the job saw the cancel flag before the worker returned"
        );
    }

    #[tokio::test]
    async fn messages_to_self_are_dispatched_locally() {
        let bus = InProcTransport::new();
        let worker = Worker::new(
            Party::Server,
            "c",
            Arc::new(bus.clone()),
            Vec::<String>::new(),
        )
        .on(MsgKind::Custom("step".into()), |log, e, ctx| {
            log.push(format!("step {}", e.round));
            if e.round < 3 {
                let me = ctx.me();
                let next = Envelope::new(
                    "c",
                    e.round + 1,
                    me,
                    vec![me],
                    MsgKind::Custom("step".into()),
                );
                ctx.spawn_blocking(move || Ok(vec![next]));
                Ok(Flow::Continue)
            } else {
                Ok(Flow::Stop)
            }
        })
        .on_start(|_, ctx| {
            let me = ctx.me();
            ctx.send(Envelope::new(
                "c",
                0,
                me,
                vec![me],
                MsgKind::Custom("step".into()),
            ))?;
            Ok(Flow::Continue)
        });
        let outcome = worker.run(Shutdown::never()).await.unwrap();
        assert_eq!(outcome.state, vec!["step 0", "step 1", "step 2", "step 3"]);
        assert_eq!(outcome.stats.sent, 0, "nothing crossed the transport");
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_after_their_delay_and_die_with_the_worker() {
        let bus = InProcTransport::new();
        let tick = MsgKind::Custom("tick".into());
        let t0 = tokio::time::Instant::now();
        let worker = Worker::new(Party::Server, "c", Arc::new(bus), Vec::<(u64, u128)>::new())
            .on(tick.clone(), move |log, e, ctx| {
                log.push((e.round, t0.elapsed().as_millis()));
                if e.round == 2 {
                    // A timer armed but never due before the stop: dropped.
                    let me = ctx.me();
                    let late = Envelope::new("c", 99, me, vec![me], MsgKind::Custom("tick".into()));
                    ctx.send_after(Duration::from_secs(3600), late);
                    return Ok(Flow::Stop);
                }
                Ok(Flow::Continue)
            })
            .on_start(move |_, ctx| {
                let me = ctx.me();
                for (round, ms) in [(2, 300), (1, 100)] {
                    let env =
                        Envelope::new("c", round, me, vec![me], MsgKind::Custom("tick".into()));
                    ctx.send_after(Duration::from_millis(ms), env);
                }
                Ok(Flow::Continue)
            });
        let outcome = worker.run(Shutdown::never()).await.unwrap();
        assert_eq!(outcome.state, vec![(1, 100), (2, 300)]);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the pending timer did not hold the worker"
        );
    }

    #[test]
    fn a_broadcast_frame_does_not_grow_with_its_recipients() {
        let mut sizes = Vec::new();
        for n in [2u32, 20_000] {
            let mut ctx = Ctx {
                me: Party::Server,
                course: "c".into(),
                encode: EncodeOptions::default(),
                received_bytes: 0,
                outbox: Vec::new(),
                local: Vec::new(),
                jobs: Vec::new(),
                timers: Vec::new(),
                cancel: Arc::new(AtomicBool::new(false)),
            };
            let env = Envelope::new(
                "c",
                1,
                Party::Server,
                (1..=n).map(Party::Client).collect(),
                MsgKind::Evaluate,
            );
            sizes.push(ctx.send(env).unwrap());
            assert_eq!(
                ctx.outbox[0].0.len(),
                n as usize,
                "every recipient still gets it"
            );
        }
        assert_eq!(sizes[0], sizes[1], "{sizes:?}");
    }

    #[tokio::test]
    async fn a_failing_job_fails_the_worker_with_its_message() {
        let bus = InProcTransport::new();
        let worker = Worker::new(Party::Client(4), "c", Arc::new(bus), ()).on_start(|_, ctx| {
            ctx.spawn_blocking(|| Err("out of memory".into()));
            Ok(Flow::Continue)
        });
        let err = worker.run(Shutdown::never()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "client 4: background job failed: out of memory"
        );
    }
}
