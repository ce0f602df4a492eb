//! The `LocalTrainer` port: what a client does with the global parameters.
//!
//! The kernel drives the course; the trainer does the math. Adapters implement
//! this trait for real models (an LLM with a LoRA adapter, trained by candle);
//! the kernel's tests use [`super::LeastSquaresTrainer`]. One trainer object may
//! serve many simulated clients in turn — the client id is an argument — which
//! is how a simulation shares one frozen base model among all clients and only
//! swaps each client's adapter (round-robin).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::aggregate::FitConfig;
use crate::message::Meta;
use crate::params::ParamSet;

/// Errors a trainer reports; the kernel only shows them.
pub type TrainerError = Box<dyn std::error::Error + Send + Sync>;

/// One trainer shared by the clients of a process, used by one at a time.
pub type SharedTrainer = Arc<Mutex<dyn LocalTrainer>>;

/// What a trainer knows about the call it serves.
#[derive(Debug, Clone)]
pub struct TrainContext {
    /// The round (0 is the evaluation before training).
    pub round: u64,
    /// A seed for this client and round, derived from the course seed.
    pub seed: u64,
    /// Metadata the server attached to its request (per-round hyperparameters, …).
    pub meta: Meta,
    /// This client's configuration for the fit, from the strategy's
    /// `configure_fit` (empty: the course's own settings).
    pub config: FitConfig,
    /// Extra tensors the server sent with the parameters (control
    /// variates, …), names without the `extra/` prefix.
    pub extra: ParamSet,
    cancel: Arc<AtomicBool>,
}

impl TrainContext {
    /// A context; `cancel` is raised when the worker shuts down.
    pub fn new(round: u64, seed: u64, meta: Meta, cancel: Arc<AtomicBool>) -> Self {
        Self {
            round,
            seed,
            meta,
            config: FitConfig::new(),
            extra: ParamSet::new(),
            cancel,
        }
    }

    /// This context with the strategy's per-client `config` and `extra` tensors.
    pub fn with_fit(mut self, config: FitConfig, extra: ParamSet) -> Self {
        self.config = config;
        self.extra = extra;
        self
    }

    /// The configured value `key` as a number, if the strategy set one.
    pub fn config_f64(&self, key: &str) -> Option<f64> {
        self.config.get(key).and_then(serde_json::Value::as_f64)
    }

    /// True once the worker is shutting down: stop at the next step boundary.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// The result of local training.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalUpdate {
    /// Parameters after training (same names and shapes as the ones received).
    pub params: ParamSet,
    /// Training samples used (FedAvg's weight).
    pub n_samples: u64,
    /// Mean training loss, if the trainer tracks it.
    pub loss: Option<f64>,
    /// Further named metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Optimizer steps taken, if the trainer counts them.
    pub local_steps: Option<u64>,
    /// Extra tensors for the server (names without the `extra/` prefix).
    pub extra: ParamSet,
}

/// Evaluation of one data split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitEval {
    /// The split's name (`train`, `val`, `test`).
    pub split: String,
    /// Mean loss over the split.
    pub loss: f64,
    /// Number of samples in the split.
    pub samples: u64,
    /// Further named metrics (accuracy, …).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// Trains and evaluates on a client's local data.
pub trait LocalTrainer: Send {
    /// Trains from `global` on `client`'s data and returns the new parameters.
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError>;

    /// Evaluates `global` on `client`'s evaluation splits.
    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError>;

    /// Takes the frozen model the server sent `client` (a `base_model`
    /// message: its weights and, in `meta`, whatever describes them). A
    /// trainer that brings its own model refuses one.
    fn install_base(
        &mut self,
        client: u32,
        _base: &ParamSet,
        _meta: &crate::message::Meta,
    ) -> Result<(), TrainerError> {
        Err(format!("client {client}'s trainer takes no base model from the server").into())
    }

    /// What of client `client` shapes its next fits and is not in the global
    /// parameters (optimizer moments kept across rounds, personal adapters,
    /// script state), as bytes for a checkpoint; `None` when there is none.
    fn save_client(&self, client: u32) -> Result<Option<Vec<u8>>, TrainerError> {
        let _ = client;
        Ok(None)
    }

    /// Takes up what [`Self::save_client`] saved for `client`.
    fn load_client(&mut self, client: u32, bytes: &[u8]) -> Result<(), TrainerError> {
        let _ = bytes;
        Err(format!("client {client}'s trainer keeps no state to restore").into())
    }
}

/// A seed for one client in one round, so that runs are reproducible and no two
/// (client, round) pairs share a random stream.
pub fn derive_seed(course_seed: u64, client: u32, round: u64) -> u64 {
    // SplitMix64 finalizer over the three inputs.
    let mut z = course_seed
        ^ u64::from(client).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ round.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
