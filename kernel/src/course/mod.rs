//! The FL course: server and client behaviours, the trainer port, and the in-process runner.
//!
//! A course is a server [`Worker`](crate::worker::Worker) and N client workers
//! exchanging the messages of [`crate::message`] over a
//! [`Transport`](crate::bus::Transport). The same behaviours run in one process
//! (simulation, [`run_in_process`]) or across machines; only the transport
//! differs.

pub mod best;
mod client;
mod kept;
mod least_squares;
pub mod protocol;
pub mod secagg;
mod server;
mod trainer;

pub use client::{client_worker, ClientState};
pub use least_squares::{LeastSquaresSection, LeastSquaresTrainer, SyntheticSpec};
pub use server::{
    roll_call, sample_clients, server_worker, server_worker_from, RoundEval, ServerResults,
    ServerSetup, ServerState, ROLL_CALL,
};
pub use trainer::{
    derive_seed, LocalTrainer, LocalUpdate, SharedTrainer, SplitEval, TrainContext, TrainerError,
};

use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use tokio::task::JoinSet;

use crate::aggregate::Aggregator;
use crate::bus::{InProcTransport, Transport, TransportError};
use crate::config::CourseConfig;
use crate::message::Party;
use crate::metrics::{MetricsLog, Record};
use crate::params::ParamSet;
use crate::worker::{ShutdownHandle, StopReason, WorkerError, WorkerStats};

/// Why a course did not complete.
#[derive(Debug, Error)]
pub enum CourseError {
    /// The transport refused a subscription.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A worker failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The server stopped before the last round.
    #[error("the server stopped before the course finished ({0:?})")]
    Incomplete(StopReason),
    /// A worker task panicked.
    #[error("a worker panicked: {0}")]
    Panicked(String),
}

/// What a finished course produced.
#[derive(Debug)]
pub struct CourseReport {
    /// The final global parameters.
    pub final_params: ParamSet,
    /// Every metrics record, in order.
    pub records: Vec<Record>,
    /// Sample-weighted evaluation means per round and split.
    pub evals: Vec<RoundEval>,
    /// The clients sampled in each round.
    pub sampled: Vec<(u64, Vec<u32>)>,
    /// The server's traffic counters.
    pub server_stats: WorkerStats,
    /// Each client's traffic counters.
    pub client_stats: Vec<(u32, WorkerStats)>,
    /// Wall time of the whole course.
    pub wall_s: f64,
    /// With `federate.keep_best`: the best evaluated round and its parameters.
    pub best: Option<best::BestRound>,
    /// The round after which early stopping ended the course, if it did.
    pub stopped_early: Option<u64>,
}

impl CourseReport {
    /// The sample-weighted loss of `split` at each evaluated round.
    pub fn loss_curve(&self, split: &str) -> Vec<(u64, f64)> {
        self.evals
            .iter()
            .filter(|e| e.split == split)
            .map(|e| (e.round, e.loss))
            .collect()
    }
}

enum Finished {
    Server(Box<ServerState>, WorkerStats, StopReason),
    Client(u32, WorkerStats),
}

/// Runs a whole course in this process: one server and `cfg.course.clients`
/// clients on an [`InProcTransport`], all clients sharing `trainer` in turn.
pub async fn run_in_process(
    cfg: &CourseConfig,
    initial: ParamSet,
    trainer: SharedTrainer,
    aggregator: Box<dyn Aggregator>,
    log: MetricsLog,
) -> Result<CourseReport, CourseError> {
    let setup = ServerSetup::new(cfg.clone(), initial, aggregator, log);
    run_in_process_from(setup, trainer).await
}

/// [`run_in_process`] for a server set up as `setup` says (resumed,
/// checkpointing).
pub async fn run_in_process_from(
    setup: ServerSetup,
    trainer: SharedTrainer,
) -> Result<CourseReport, CourseError> {
    let bus: Arc<dyn Transport> = Arc::new(InProcTransport::new());
    let transports = Transports {
        server: bus.clone(),
        clients: (1..=setup.cfg.course.clients)
            .map(|id| (id, bus.clone()))
            .collect(),
    };
    run_on(setup, trainer, transports).await
}

/// Each party's transport: one shared bus in process, or one NATS
/// connection per party.
pub struct Transports {
    /// The server's.
    pub server: Arc<dyn Transport>,
    /// Each client's, by id (1..=clients).
    pub clients: std::collections::BTreeMap<u32, Arc<dyn Transport>>,
}

/// Runs a whole course in this process with each party on its own
/// transport: [`run_in_process_from`] on any medium (e.g. NATS, one
/// connection per party, as separate processes would use).
pub async fn run_on(
    setup: ServerSetup,
    trainer: SharedTrainer,
    transports: Transports,
) -> Result<CourseReport, CourseError> {
    let cfg = setup.cfg.clone();
    let cfg = &cfg;
    // A resumed course gives its clients back what they kept (in one process).
    if let Some(dir) = &setup.resumed_from {
        let states = crate::checkpoint::Checkpoints::client_states(dir)
            .map_err(|e| TransportError::Other(e.to_string()))?;
        let mut t = trainer
            .lock()
            .map_err(|_| TransportError::Other("the shared trainer panicked".into()))?;
        for (id, bytes) in states {
            t.load_client(id, &bytes).map_err(|e| {
                TransportError::Other(format!(
                    "restoring client {id}'s state from {}: {e}",
                    dir.display()
                ))
            })?;
        }
    }
    if let Some(id) = (1..=cfg.course.clients).find(|id| !transports.clients.contains_key(id)) {
        return Err(TransportError::Other(format!("no transport for client {id}")).into());
    }
    let started = Instant::now();
    let transport = transports.server.clone();
    let (shutdown, signal) = ShutdownHandle::new();
    let mut tasks = JoinSet::new();

    // The server subscribes before any client exists, so no join_in is lost.
    let mut server = server_worker_from(setup, transport.clone());
    server.state_mut().save_clients_of(trainer.clone());
    let server_sub = transport.subscribe(Party::Server).await?;
    let server_signal = signal.clone();
    tasks.spawn(async move {
        let out = server.run_subscribed(server_sub, server_signal).await?;
        Ok::<_, WorkerError>(Finished::Server(Box::new(out.state), out.stats, out.reason))
    });
    for id in 1..=cfg.course.clients {
        let transport = transports.clients[&id].clone();
        let worker = client_worker(id, cfg, trainer.clone(), transport);
        let client_signal = signal.clone();
        tasks.spawn(async move {
            let out = worker.run(client_signal).await?;
            Ok(Finished::Client(id, out.stats))
        });
    }

    let mut server_out = None;
    let mut client_stats = Vec::new();
    let mut failure: Option<CourseError> = None;
    while let Some(joined) = tasks.join_next().await {
        let result = match joined {
            Ok(r) => r.map_err(CourseError::from),
            Err(e) => Err(CourseError::Panicked(e.to_string())),
        };
        match result {
            Ok(Finished::Server(state, stats, reason)) => server_out = Some((state, stats, reason)),
            Ok(Finished::Client(id, stats)) => client_stats.push((id, stats)),
            Err(e) => {
                // One failure ends the course: stop everyone else, keep the first error.
                shutdown.trigger();
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let (state, server_stats, reason) = server_out.expect("the server task reported");
    if !state.is_finished() {
        return Err(CourseError::Incomplete(reason));
    }
    client_stats.sort_by_key(|(id, _)| *id);
    let results = state.into_results();
    Ok(CourseReport {
        final_params: results.global,
        records: results.records,
        evals: results.evals,
        sampled: results.sampled,
        best: results.best,
        stopped_early: results.stopped_early,
        server_stats,
        client_stats,
        wall_s: started.elapsed().as_secs_f64(),
    })
}
