//! The kernel's `LocalTrainer` port for LoRA fine-tuning of the shared LLM.
//!
//! In simulation every client trains on the same frozen base model, taking
//! turns (the kernel's workers lock the shared trainer one call at a time).
//! [`RoundRobinTrainer`] holds that base once, behind an `Arc`, and one slot
//! per client: its LoRA factors, its optimizer state and its data — so memory
//! grows by one adapter (plus AdamW's two moments) per client, never by a
//! model. A distributed client process holds a trainer with a single slot.
//!
//! Each `train` call loads the global adapter into the client's factors, runs
//! `local_steps` optimizer steps over the client's batches (continuing where
//! the previous round stopped, wrapping around) and returns the new factors.
//! As in FederatedScope, the optimizer starts fresh every round unless
//! `keep_optimizer_state` is set.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::DType;
use fedtune_kernel::course::{LocalTrainer, LocalUpdate, SplitEval, TrainContext, TrainerError};
use fedtune_kernel::ParamSet;
use serde::{Deserialize, Serialize};

use crate::hooks::{HookScript, Proximal};
use crate::lora::{Lora, LoraConfig};
use crate::loss::counted_positions;
use crate::model::Llama;
use crate::train::{Batch, LoraStepper, NoHooks, TrainConfig, TrainHooks};

/// One client's data, already tokenized into batches.
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Training micro-batches.
    pub train: Vec<Batch>,
    /// Evaluation splits by name (`val`, `test`, …).
    pub eval: Vec<(String, Vec<Batch>)>,
    /// Training examples behind `train` (FedAvg's weight).
    pub n_samples: u64,
}

/// How a client trains locally each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalTraining {
    /// Optimizer steps per round.
    pub local_steps: usize,
    /// Keep AdamW's moments across rounds instead of starting fresh.
    pub keep_optimizer_state: bool,
    /// Optimizer settings.
    pub optim: TrainConfig,
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self {
            local_steps: 10,
            keep_optimizer_state: false,
            optim: TrainConfig::default(),
        }
    }
}

/// Personalized FL: which algorithm, and its knobs (the `[pfl]` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PflConfig {
    /// `none`, `ditto` or `pfedme`.
    pub algorithm: PflAlgorithm,
    /// λ, the pull of the personal adapter towards the global one: the
    /// personal objective is loss + λ/2 · ‖θ − w‖².
    pub lambda: f64,
    /// Ditto: optimizer steps on the personal adapter per round (default: `train.local_steps`).
    pub personal_steps: Option<usize>,
    /// Learning rate of the personal adapter (default: `optim.lr`).
    pub personal_lr: Option<f64>,
    /// pFedMe: steps K on the personal adapter per outer step; a round has
    /// `local_steps / K` outer steps, so the gradient budget stays `local_steps`.
    pub inner_steps: usize,
    /// pFedMe: the outer rate η of w ← w − η·λ·(w − θ).
    pub eta: f64,
    /// local_adapter: a regular expression over PEFT tensor names; the matching
    /// parts stay on the client (e.g. `"lora_B"`, or `"layers\\.(2[4-9])\\."`).
    pub local_params: String,
}

impl Default for PflConfig {
    fn default() -> Self {
        Self {
            algorithm: PflAlgorithm::None,
            lambda: 0.1,
            personal_steps: None,
            personal_lr: None,
            inner_steps: 2,
            eta: 1.0,
            local_params: String::new(),
        }
    }
}

/// A personalized-FL algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PflAlgorithm {
    /// Everyone uses the global adapter.
    None,
    /// Ditto (Li et al., 2021): train the global copy as usual, and a personal
    /// adapter with a proximal pull to the received global one; evaluate the personal one.
    Ditto,
    /// pFedMe (Dinh et al., 2020), with one local and one global adapter: the
    /// personal adapter θ approximately minimizes loss + λ/2‖θ − w‖² (K steps),
    /// then the local w moves towards it; w goes to the server, θ is evaluated.
    Pfedme,
    /// FedBN-style local parts: the adapter tensors named by `local_params`
    /// never leave the client; the rest is federated as usual.
    #[serde(rename = "local_adapter")]
    LocalAdapter,
}

impl PflConfig {
    /// Checks the knobs, naming the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(format!("pfl.lambda must be ≥ 0, got {}", self.lambda));
        }
        if self.inner_steps == 0 {
            return Err("pfl.inner_steps must be at least 1".into());
        }
        if self.personal_steps == Some(0) {
            return Err("pfl.personal_steps must be at least 1".into());
        }
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return Err(format!("pfl.eta must be > 0, got {}", self.eta));
        }
        if self.algorithm == PflAlgorithm::LocalAdapter {
            if self.local_params.is_empty() {
                return Err("pfl.local_params must name the local parts (a regular expression over tensor names, e.g. \"lora_B\")".into());
            }
            regex::Regex::new(&self.local_params)
                .map_err(|e| format!("pfl.local_params is not a valid regular expression: {e}"))?;
        }
        if let Some(lr) = self.personal_lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!("pfl.personal_lr must be > 0, got {lr}"));
            }
        }
        Ok(())
    }
}

struct ClientSlot {
    data: ClientData,
    lora: Lora,
    stepper: LoraStepper,
    cursor: usize,
    /// The personal adapter of Ditto / pFedMe, from the first round on.
    personal: Option<Lora>,
    /// local_adapter: the client's own values of the local parts.
    local: Option<ParamSet>,
    personal_cursor: usize,
}

/// Told after every local optimizer step: client, step (1-based), steps this round, loss.
pub type StepProgress = Arc<dyn Fn(u32, usize, usize, f64) + Send + Sync>;

/// LoRA fine-tuning of one shared frozen model for many clients.
pub struct RoundRobinTrainer {
    model: Arc<Llama>,
    training: LocalTraining,
    clients: BTreeMap<u32, ClientSlot>,
    progress: Option<StepProgress>,
    hooks: Option<HookScript>,
    pfl: PflConfig,
    /// `pfl.local_params`, compiled (local_adapter only).
    local_re: Option<regex::Regex>,
    lora_cfg: LoraConfig,
    seed: u64,
}

impl RoundRobinTrainer {
    /// A trainer over `model` for the clients in `data`, each with its own
    /// LoRA factors (seeded per client; the server's global adapter replaces
    /// them before any training).
    pub fn new(
        model: Arc<Llama>,
        lora: LoraConfig,
        training: LocalTraining,
        data: BTreeMap<u32, ClientData>,
        seed: u64,
    ) -> Result<Self, TrainerError> {
        if training.local_steps == 0 {
            return Err("local_steps must be at least 1".into());
        }
        let mut clients = BTreeMap::new();
        for (id, data) in data {
            if data.train.len() < training.optim.grad_accum {
                return Err(format!(
                    "client {id} has {} training batches, fewer than grad_accum = {}",
                    data.train.len(),
                    training.optim.grad_accum
                )
                .into());
            }
            let factors = Lora::new(
                model.config(),
                lora.clone(),
                seed ^ u64::from(id),
                model.dtype(),
                model.device(),
            )?;
            let stepper = LoraStepper::new(&factors, training.optim.clone())?;
            clients.insert(
                id,
                ClientSlot {
                    data,
                    lora: factors,
                    stepper,
                    cursor: 0,
                    personal: None,
                    local: None,
                    personal_cursor: 0,
                },
            );
        }
        Ok(Self {
            model,
            training,
            clients,
            progress: None,
            hooks: None,
            pfl: PflConfig::default(),
            local_re: None,
            lora_cfg: lora,
            seed,
        })
    }

    /// Reports every local step to `progress`.
    pub fn with_progress(mut self, progress: StepProgress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Personalizes every client with `pfl` (Ditto or pFedMe).
    pub fn with_personalization(mut self, pfl: PflConfig) -> Result<Self, TrainerError> {
        pfl.validate()?;
        self.local_re = if pfl.algorithm == PflAlgorithm::LocalAdapter {
            Some(regex::Regex::new(&pfl.local_params)?)
        } else {
            None
        };
        self.pfl = pfl;
        Ok(self)
    }

    /// Client `client`'s personal adapter, once it has one.
    pub fn personal_adapter(&self, client: u32) -> Result<Option<ParamSet>, TrainerError> {
        match self.clients.get(&client).and_then(|s| s.personal.as_ref()) {
            Some(p) => Ok(Some(p.to_param_set()?)),
            None => Ok(None),
        }
    }

    /// Runs `hooks` around every client's local training.
    pub fn with_hooks(mut self, hooks: HookScript) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// The hook script, if any.
    pub fn hooks(&self) -> Option<&HookScript> {
        self.hooks.as_ref()
    }

    /// The initial global adapter: fresh LoRA factors from `seed`, as the server would make them.
    pub fn initial_adapter(
        model: &Llama,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<ParamSet, TrainerError> {
        Ok(Lora::new(
            model.config(),
            lora.clone(),
            seed,
            model.dtype(),
            model.device(),
        )?
        .to_param_set()?)
    }

    fn slot(&mut self, client: u32) -> Result<&mut ClientSlot, TrainerError> {
        self.clients
            .get_mut(&client)
            .ok_or_else(|| format!("this trainer has no data for client {client}").into())
    }
}

impl LocalTrainer for RoundRobinTrainer {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        let model = self.model.clone();
        let training = self.training.clone();
        let progress = self.progress.clone();
        let slot = self
            .clients
            .get_mut(&client)
            .ok_or_else(|| format!("this trainer has no data for client {client}"))?;
        slot.lora
            .load_param_set(&with_local(global, slot.local.as_ref()))?;
        if !training.keep_optimizer_state {
            slot.stepper = LoraStepper::new(&slot.lora, training.optim.clone())?;
        }
        let mut bound = match self.hooks.as_mut() {
            Some(h) => {
                h.refresh();
                let at = (client, ctx.round, slot.data.n_samples, training.local_steps);
                Some(h.bind(&slot.lora, global, at)?)
            }
            None => None,
        };
        let hooks: &mut dyn TrainHooks = match bound.as_mut() {
            Some(b) => b,
            None => &mut NoHooks,
        };
        hooks.on_fit_start(&slot.lora)?;
        let accum = training.optim.grad_accum;
        let pfl = &self.pfl;
        let personal_steps = pfl.personal_steps.unwrap_or(training.local_steps);
        let budget = match pfl.algorithm {
            PflAlgorithm::Ditto => training.local_steps + personal_steps,
            _ => training.local_steps,
        };
        let mut done = 0;
        let mut report = |loss: f64| {
            done += 1;
            if let Some(p) = &progress {
                p(client, done, budget, loss);
            }
        };
        let mut metrics = BTreeMap::new();
        let personal_optim = TrainConfig {
            lr: pfl.personal_lr.unwrap_or(training.optim.lr),
            ..training.optim.clone()
        };
        let losses = match pfl.algorithm {
            PflAlgorithm::None | PflAlgorithm::Ditto | PflAlgorithm::LocalAdapter => {
                let losses = run_steps(
                    &model,
                    &slot.lora,
                    &mut slot.stepper,
                    (&slot.data.train, &mut slot.cursor, accum),
                    training.local_steps,
                    hooks,
                    ctx,
                    &mut report,
                )?;
                if pfl.algorithm == PflAlgorithm::Ditto {
                    // The personal adapter: its own steps, pulled towards the received global one.
                    let personal = personal_adapter(
                        &mut slot.personal,
                        &model,
                        &self.lora_cfg,
                        self.seed,
                        client,
                        global,
                    )?;
                    let mut stepper = LoraStepper::new(personal, personal_optim)?;
                    let mut prox = Proximal::new(personal, global, pfl.lambda)?;
                    let p_losses = run_steps(
                        &model,
                        personal,
                        &mut stepper,
                        (&slot.data.train, &mut slot.personal_cursor, accum),
                        personal_steps,
                        &mut prox,
                        ctx,
                        &mut report,
                    )?;
                    metrics.insert("personal_loss".into(), mean(&p_losses));
                }
                losses
            }
            PflAlgorithm::Pfedme => {
                let theta = personal_adapter(
                    &mut slot.personal,
                    &model,
                    &self.lora_cfg,
                    self.seed,
                    client,
                    global,
                )?;
                let mut stepper = LoraStepper::new(theta, personal_optim)?;
                let outer = (training.local_steps / pfl.inner_steps).max(1);
                let rate = pfl.eta * pfl.lambda;
                let mut losses = Vec::new();
                for _ in 0..outer {
                    // θ ≈ argmin loss(θ) + λ/2‖θ − w‖², K steps from where θ is.
                    let w = slot.lora.to_param_set()?;
                    let mut prox = Proximal::new(theta, &w, pfl.lambda)?;
                    losses.extend(run_steps(
                        &model,
                        theta,
                        &mut stepper,
                        (&slot.data.train, &mut slot.cursor, accum),
                        pfl.inner_steps,
                        &mut prox,
                        ctx,
                        &mut report,
                    )?);
                    // w ← w − η·λ·(w − θ)
                    for ((_, wv), (_, tv)) in slot.lora.named_vars().iter().zip(theta.named_vars())
                    {
                        let moved =
                            (wv.as_tensor() - ((wv.as_tensor() - tv.as_tensor())? * rate)?)?;
                        wv.set(&moved)?;
                    }
                }
                metrics.insert("personal_loss".into(), mean(&losses));
                losses
            }
        };
        hooks.on_fit_end(&slot.lora)?;
        metrics.insert(
            "last_step_loss".to_string(),
            *losses.last().unwrap_or(&f64::NAN),
        );
        let mut params = slot.lora.to_param_set()?;
        if let Some(local_re) = &self.local_re {
            // Keep the local parts; send the server back its own values for them.
            let mut local = ParamSet::new();
            let names: Vec<String> = params
                .names()
                .filter(|n| local_re.is_match(n))
                .map(String::from)
                .collect();
            for name in names {
                let mine = params.remove(&name).expect("listed above");
                local.insert_tensor(name.clone(), mine);
                let theirs = global.get(&name).expect("same names as the global adapter");
                params.insert_tensor(name, theirs.clone());
            }
            metrics.insert("local_tensors".into(), local.len() as f64);
            slot.local = Some(local);
        }
        Ok(LocalUpdate {
            params,
            n_samples: slot.data.n_samples,
            loss: Some(mean(&losses)),
            metrics,
        })
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        _ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        let model = self.model.clone();
        let personalized = self.pfl.algorithm != PflAlgorithm::None;
        let slot = self.slot(client)?;
        // Personalized runs evaluate each client with its own adapter, once it has one.
        let lora = match (&slot.personal, personalized) {
            (Some(p), true) => p,
            _ => {
                slot.lora
                    .load_param_set(&with_local(global, slot.local.as_ref()))?;
                &slot.lora
            }
        };
        lora.set_grad_enabled(false);
        let result = evaluate_splits(&model, lora, &slot.data.eval);
        lora.set_grad_enabled(true);
        result
    }
}

/// `global` with the client's local parts laid over it.
fn with_local<'a>(
    global: &'a ParamSet,
    local: Option<&ParamSet>,
) -> std::borrow::Cow<'a, ParamSet> {
    match local {
        Some(local) => {
            let mut merged = global.clone();
            for (name, t) in local.iter() {
                merged.insert_tensor(name, t.clone());
            }
            std::borrow::Cow::Owned(merged)
        }
        None => std::borrow::Cow::Borrowed(global),
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The client's personal adapter, created from `global` the first time.
fn personal_adapter<'a>(
    slot: &'a mut Option<Lora>,
    model: &Llama,
    cfg: &LoraConfig,
    seed: u64,
    client: u32,
    global: &ParamSet,
) -> Result<&'a Lora, TrainerError> {
    if slot.is_none() {
        let p = Lora::new(
            model.config(),
            cfg.clone(),
            seed ^ u64::from(client) ^ 0x5eed,
            model.dtype(),
            model.device(),
        )?;
        p.load_param_set(global)?;
        *slot = Some(p);
    }
    Ok(slot.as_ref().expect("just set"))
}

/// `n` optimizer steps of `lora` over `data` (micro-batches from `cursor`,
/// `accum` per step, wrapping around); stops early when a hook asks.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    model: &Llama,
    lora: &Lora,
    stepper: &mut LoraStepper,
    (data, cursor, accum): (&[Batch], &mut usize, usize),
    n: usize,
    hooks: &mut dyn TrainHooks,
    ctx: &TrainContext,
    report: &mut dyn FnMut(f64),
) -> Result<Vec<f64>, TrainerError> {
    let mut losses = Vec::with_capacity(n);
    for step in 0..n {
        if ctx.is_cancelled() {
            return Err("training cancelled".into());
        }
        let len = data.len();
        let micro: Vec<Batch> = (0..accum)
            .map(|k| data[(*cursor + k) % len].clone())
            .collect();
        *cursor = (*cursor + accum) % len;
        let r = stepper.step(model, lora, &micro, (step, n), hooks)?;
        losses.push(r.loss);
        report(r.loss);
        if r.stop {
            break;
        }
    }
    Ok(losses)
}

/// Token-weighted mean loss of each split.
fn evaluate_splits(
    model: &Llama,
    lora: &Lora,
    splits: &[(String, Vec<Batch>)],
) -> Result<Vec<SplitEval>, TrainerError> {
    let mut out = Vec::new();
    for (split, batches) in splits {
        let (mut weighted, mut tokens, mut samples) = (0.0, 0usize, 0u64);
        for b in batches {
            let loss = model
                .causal_lm_loss(&b.tokens, Some(&b.attention_mask), &b.labels, Some(lora))?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let n = counted_positions(&b.labels, model.config().vocab_size)?
                .0
                .len();
            weighted += loss * n as f64;
            tokens += n;
            samples += b.tokens.dim(0)? as u64;
        }
        if tokens == 0 {
            continue;
        }
        let loss = weighted / tokens as f64;
        let mut metrics = BTreeMap::new();
        metrics.insert("perplexity".to_string(), loss.exp());
        metrics.insert("tokens".to_string(), tokens as f64);
        out.push(SplitEval {
            split: split.clone(),
            loss,
            samples,
            metrics,
        });
    }
    Ok(out)
}
