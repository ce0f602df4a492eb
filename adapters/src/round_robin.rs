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

use crate::hooks::HookScript;
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

struct ClientSlot {
    data: ClientData,
    lora: Lora,
    stepper: LoraStepper,
    cursor: usize,
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
                },
            );
        }
        Ok(Self {
            model,
            training,
            clients,
            progress: None,
            hooks: None,
        })
    }

    /// Reports every local step to `progress`.
    pub fn with_progress(mut self, progress: StepProgress) -> Self {
        self.progress = Some(progress);
        self
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
        slot.lora.load_param_set(global)?;
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
        let mut losses = Vec::with_capacity(training.local_steps);
        for step in 0..training.local_steps {
            if ctx.is_cancelled() {
                return Err("training cancelled".into());
            }
            let n = slot.data.train.len();
            let micro: Vec<Batch> = (0..accum)
                .map(|k| slot.data.train[(slot.cursor + k) % n].clone())
                .collect();
            slot.cursor = (slot.cursor + accum) % n;
            let report = slot.stepper.step(
                &model,
                &slot.lora,
                &micro,
                (step, training.local_steps),
                hooks,
            )?;
            losses.push(report.loss);
            if let Some(p) = &progress {
                p(client, step + 1, training.local_steps, report.loss);
            }
            if report.stop {
                break;
            }
        }
        hooks.on_fit_end(&slot.lora)?;
        let mut metrics = BTreeMap::new();
        metrics.insert(
            "last_step_loss".to_string(),
            *losses.last().unwrap_or(&f64::NAN),
        );
        Ok(LocalUpdate {
            params: slot.lora.to_param_set()?,
            n_samples: slot.data.n_samples,
            loss: Some(losses.iter().sum::<f64>() / losses.len() as f64),
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
        let slot = self.slot(client)?;
        slot.lora.load_param_set(global)?;
        slot.lora.set_grad_enabled(false);
        let result = evaluate_splits(&model, &slot.lora, &slot.data.eval);
        slot.lora.set_grad_enabled(true);
        result
    }
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
