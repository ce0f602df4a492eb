//! The training step: adapter updates with AdamW or SGD, accumulation, clipping, schedules, hooks.
//!
//! [`Stepper`] owns one client's optimizer state and applies optimizer
//! steps to that client's [`Adapter`] (LoRA, prompt tuning, P-tuning,
//! prefix-tuning) over a frozen, shared [`Llama`]. One step
//! consumes `grad_accum` micro-batches: each micro-batch's loss is divided by
//! `grad_accum` and back-propagated, gradients are summed, clipped to
//! `max_grad_norm` (global L2 norm), and the optimizer moves at the learning
//! rate the schedule gives for this step.
//!
//! Hook points fire in the order of DESIGN.md (`on_fit_start`,
//! `on_epoch_start`, `on_batch_start`, `on_batch_forward`,
//! `on_batch_backward`, `on_batch_end`, `on_epoch_end`, `on_fit_end`); a hook
//! sees the batch and the loss and may add a differentiable term to the loss
//! (FedProx, Ditto, distillation) or stop training.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use candle_nn::optim::{Optimizer, SGD};

use crate::optim::{AdamW, AdamWState, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::loss::counted_positions;
use crate::model::{Llama, ProjectionAdapter};

/// Which optimizer moves the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW (Loshchilov & Hutter), decoupled weight decay.
    AdamW,
    /// Plain stochastic gradient descent.
    Sgd,
}

/// How the learning rate evolves over a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The base rate throughout (after warm-up).
    Constant,
    /// Cosine decay from the base rate to zero at the last step (after warm-up).
    Cosine,
}

/// Local training hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Base learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW's β₁.
    pub beta1: f64,
    /// AdamW's β₂.
    pub beta2: f64,
    /// AdamW's ε.
    pub eps: f64,
    /// Global gradient-norm clip (none when unset).
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Steps of linear warm-up from 0 to the base rate.
    pub warmup_steps: usize,
    /// Schedule after warm-up.
    pub schedule: Schedule,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::AdamW,
            lr: 3e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: Some(1.0),
            grad_accum: 1,
            warmup_steps: 0,
            schedule: Schedule::Constant,
        }
    }
}

impl TrainConfig {
    /// The learning rate of step `step` (0-based) of a fit of `total` steps.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// One micro-batch: token ids and attention mask `(b, t)` (u32) and labels `(b, t)` (i64, −100 = ignored).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids.
    pub tokens: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Target ids aligned with `tokens`; −100 where no loss is taken.
    pub labels: Tensor,
}

/// The loss of `model` (with `adapter`) over `batches`, summed over counted
/// tokens: `(sum, tokens)`, whose ratio is the token-weighted mean loss.
pub fn summed_token_loss<'a>(
    model: &Llama,
    adapter: Option<&dyn ProjectionAdapter>,
    batches: impl IntoIterator<Item = &'a Batch>,
) -> Result<(f64, usize)> {
    let (mut sum, mut tokens) = (0.0, 0usize);
    for b in batches {
        let loss = model
            .causal_lm_loss(&b.tokens, Some(&b.attention_mask), &b.labels, adapter)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let n = counted_positions(&b.labels, model.config().vocab_size)?
            .0
            .len();
        sum += loss * n as f64;
        tokens += n;
    }
    Ok((sum, tokens))
}

/// What a hook sees and may change.
pub struct HookCtx<'a> {
    /// Optimizer steps taken so far in this fit.
    pub step: usize,
    /// Index of the micro-batch within the step.
    pub micro_batch: usize,
    /// The learning rate of this step.
    pub lr: f64,
    /// The current micro-batch.
    pub batch: &'a Batch,
    /// The adapter being trained.
    pub adapter: &'a dyn Adapter,
    /// The micro-batch's loss, once computed (before any added terms).
    pub loss: Option<f64>,
    extra: Option<Tensor>,
    stop: bool,
}

impl<'a> HookCtx<'a> {
    /// A context for calling hooks outside a step (benchmarks, tests of hooks).
    pub fn new(
        step: usize,
        micro_batch: usize,
        lr: f64,
        batch: &'a Batch,
        adapter: &'a dyn Adapter,
    ) -> Self {
        Self {
            step,
            micro_batch,
            lr,
            batch,
            adapter,
            loss: None,
            extra: None,
            stop: false,
        }
    }

    /// The loss term hooks added so far, if any.
    pub fn added_loss(&self) -> Option<&Tensor> {
        self.extra.as_ref()
    }

    /// Adds a differentiable scalar to this micro-batch's loss (only in `on_batch_forward`).
    pub fn add_loss(&mut self, term: Tensor) -> Result<()> {
        self.extra = Some(match self.extra.take() {
            Some(e) => (e + term)?,
            None => term,
        });
        Ok(())
    }

    /// Sets this step's learning rate (in `on_batch_start` of the first micro-batch).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Ends the fit after the current step.
    pub fn stop(&mut self) {
        self.stop = true;
    }
}

/// Trainer hook points, all no-ops unless overridden.
#[allow(unused_variables)]
pub trait TrainHooks {
    /// Before the first step.
    fn on_fit_start(&mut self, adapter: &dyn Adapter) -> Result<()> {
        Ok(())
    }
    /// Whether `on_fit_start` asked to stop before the first step.
    fn stop_requested(&self) -> bool {
        false
    }
    /// Before each pass over the data.
    fn on_epoch_start(&mut self, epoch: usize) -> Result<()> {
        Ok(())
    }
    /// Before a micro-batch's forward pass.
    fn on_batch_start(&mut self, ctx: &mut HookCtx) -> Result<()> {
        Ok(())
    }
    /// After the forward pass: `ctx.loss` is set; terms may be added with `ctx.add_loss`.
    fn on_batch_forward(&mut self, ctx: &mut HookCtx) -> Result<()> {
        Ok(())
    }
    /// After the backward pass of a micro-batch.
    fn on_batch_backward(&mut self, ctx: &mut HookCtx) -> Result<()> {
        Ok(())
    }
    /// After the optimizer step that closed this micro-batch's step (last micro-batch only).
    fn on_batch_end(&mut self, ctx: &mut HookCtx) -> Result<()> {
        Ok(())
    }
    /// After each pass over the data.
    fn on_epoch_end(&mut self, epoch: usize) -> Result<()> {
        Ok(())
    }
    /// After the last step.
    fn on_fit_end(&mut self, adapter: &dyn Adapter) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl TrainHooks for NoHooks {}

enum Optim {
    AdamW(AdamW),
    Sgd(SGD),
}

/// A [`Stepper`]'s state, as checkpoints keep it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepperState {
    /// Steps taken.
    pub steps_taken: usize,
    /// AdamW's step count and moments (none for SGD).
    pub adam: Option<AdamWState>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean LM loss over the step's micro-batches (without hook terms).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// A hook asked to stop.
    pub stop: bool,
    /// The loss (with any hook terms) or the gradient was not finite, so
    /// the step changed nothing: no parameter and no optimizer moment moved.
    pub skipped: bool,
}

/// One client's optimizer state, stepping its adapter.
pub struct Stepper {
    cfg: TrainConfig,
    optim: Optim,
    steps_taken: usize,
    /// The names of the variables that train, when not all of them do.
    trainable: Option<Vec<String>>,
}

impl Stepper {
    /// A fresh optimizer over `adapter`'s variables.
    pub fn new(adapter: &dyn Adapter, cfg: TrainConfig) -> Result<Self> {
        if cfg.grad_accum == 0 {
            candle_core::bail!("grad_accum must be at least 1")
        }
        Self::over(adapter.vars(), cfg)
    }

    fn over(vars: Vec<candle_core::Var>, cfg: TrainConfig) -> Result<Self> {
        let optim = match cfg.optimizer {
            OptimizerKind::AdamW => Optim::AdamW(AdamW::new(
                vars,
                ParamsAdamW {
                    lr: cfg.lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    weight_decay: cfg.weight_decay,
                },
            )?),
            OptimizerKind::Sgd => Optim::Sgd(SGD::new(vars, cfg.lr)?),
        };
        Ok(Self {
            cfg,
            optim,
            steps_taken: 0,
            trainable: None,
        })
    }

    /// From now on only `adapter`'s variables named in `trainable` train;
    /// the others keep their values and take no part in the gradient norm.
    /// The optimizer starts afresh over them (unless they are the ones it
    /// already steps).
    pub fn restrict(&mut self, adapter: &dyn Adapter, trainable: &[String]) -> Result<()> {
        if self.trainable.as_deref() == Some(trainable) {
            return Ok(());
        }
        let vars = adapter
            .named_vars()
            .into_iter()
            .filter(|(name, _)| trainable.contains(name))
            .map(|(_, v)| v)
            .collect();
        let steps_taken = self.steps_taken;
        *self = Self::over(vars, self.cfg.clone())?;
        self.steps_taken = steps_taken;
        self.trainable = Some(trainable.to_vec());
        Ok(())
    }

    /// The variables of `adapter` this stepper trains.
    fn vars_of(&self, adapter: &dyn Adapter) -> Vec<candle_core::Var> {
        match &self.trainable {
            None => adapter.vars(),
            Some(names) => adapter
                .named_vars()
                .into_iter()
                .filter(|(name, _)| names.contains(name))
                .map(|(_, v)| v)
                .collect(),
        }
    }

    /// Steps taken since creation.
    pub fn steps_taken(&self) -> usize {
        self.steps_taken
    }

    /// What a later step depends on: the steps taken and AdamW's moments.
    pub fn state(&self) -> Result<StepperState> {
        Ok(StepperState {
            steps_taken: self.steps_taken,
            adam: match &self.optim {
                Optim::AdamW(o) => Some(o.state()?),
                Optim::Sgd(_) => None,
            },
        })
    }

    /// Takes up `state` (of a stepper of the same optimizer over the same shapes).
    pub fn restore(&mut self, state: &StepperState) -> Result<()> {
        match (&mut self.optim, &state.adam) {
            (Optim::AdamW(o), Some(a)) => o.restore(a)?,
            (Optim::Sgd(_), None) => {}
            _ => candle_core::bail!("the saved optimizer state is of another optimizer"),
        }
        self.steps_taken = state.steps_taken;
        Ok(())
    }

    /// One optimizer step over `micro_batches` (`grad_accum` of them), step
    /// `step` of a fit of `total_steps` (for the schedule).
    pub fn step(
        &mut self,
        model: &Llama,
        adapter: &dyn Adapter,
        micro_batches: &[Batch],
        (step, total_steps): (usize, usize),
        hooks: &mut dyn TrainHooks,
    ) -> Result<StepReport> {
        if micro_batches.len() != self.cfg.grad_accum {
            candle_core::bail!(
                "a step takes grad_accum = {} micro-batches, got {}",
                self.cfg.grad_accum,
                micro_batches.len()
            )
        }
        let mut lr = self.cfg.lr_at(step, total_steps);
        let vars = self.vars_of(adapter);
        let mut summed: HashMap<TensorId, Tensor> = HashMap::new();
        let mut last: Option<GradStore> = None;
        let mut loss_sum = 0.0;
        let mut stop = false;
        let n = micro_batches.len();
        for (i, batch) in micro_batches.iter().enumerate() {
            let mut ctx = HookCtx::new(step, i, lr, batch, adapter);
            hooks.on_batch_start(&mut ctx)?;
            if i == 0 {
                // A hook may set the step's learning rate before the first forward.
                lr = ctx.lr;
            }
            adapter.set_training(true);
            let loss = model.causal_lm_loss(
                &batch.tokens,
                Some(&batch.attention_mask),
                &batch.labels,
                Some(adapter as &dyn ProjectionAdapter),
            );
            adapter.set_training(false);
            let loss = loss?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            ctx.loss = Some(value);
            hooks.on_batch_forward(&mut ctx)?;
            let total = match ctx.extra.take() {
                Some(extra) => (loss + extra)?,
                None => loss,
            };
            let grads = (total / n as f64)?.backward()?;
            for v in &vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let acc = match summed.remove(&v.as_tensor().id()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    summed.insert(v.as_tensor().id(), acc);
                }
            }
            hooks.on_batch_backward(&mut ctx)?;
            loss_sum += value;
            stop |= ctx.stop;
            last = Some(grads);
        }
        let mut grads = last.expect("at least one micro-batch");
        let mut sq = 0.0;
        for g in summed.values() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        let loss = loss_sum / n as f64;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            // A non-finite update is never applied: the caller decides
            // whether to go on with the next batch or give up.
            return Ok(StepReport {
                loss,
                grad_norm,
                lr,
                stop,
                skipped: true,
            });
        }
        let clip = match self.cfg.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        for v in &vars {
            if let Some(g) = summed.remove(&v.as_tensor().id()) {
                let g = if clip < 1.0 { (g * clip)? } else { g };
                grads.insert(v.as_tensor(), g);
            }
        }
        match &mut self.optim {
            Optim::AdamW(o) => {
                o.set_learning_rate(lr);
                o.step(&grads)?;
            }
            Optim::Sgd(o) => {
                o.set_learning_rate(lr);
                o.step(&grads)?;
            }
        }
        self.steps_taken += 1;
        let mut ctx = HookCtx::new(step, n - 1, lr, &micro_batches[n - 1], adapter);
        ctx.loss = Some(loss);
        ctx.stop = stop;
        hooks.on_batch_end(&mut ctx)?;
        Ok(StepReport {
            loss,
            grad_norm,
            lr,
            stop: ctx.stop,
            skipped: false,
        })
    }
}

/// Runs `epochs` passes over `batches` (micro-batches, `grad_accum` per step;
/// a trailing remainder smaller than that is skipped), calling every hook
/// point, until done or a hook stops it. Returns one report per step.
pub fn fit(
    model: &Llama,
    adapter: &dyn Adapter,
    stepper: &mut Stepper,
    batches: &[Batch],
    epochs: usize,
    hooks: &mut dyn TrainHooks,
) -> Result<Vec<StepReport>> {
    let per_epoch = batches.len() / stepper.cfg.grad_accum;
    if per_epoch == 0 {
        candle_core::bail!(
            "{} micro-batches are fewer than grad_accum = {}",
            batches.len(),
            stepper.cfg.grad_accum
        )
    }
    let total = per_epoch * epochs;
    let mut reports = Vec::with_capacity(total);
    hooks.on_fit_start(adapter)?;
    if hooks.stop_requested() {
        hooks.on_fit_end(adapter)?;
        return Ok(reports);
    }
    'epochs: for epoch in 0..epochs {
        hooks.on_epoch_start(epoch)?;
        for chunk in batches.chunks_exact(stepper.cfg.grad_accum) {
            let report = stepper.step(model, adapter, chunk, (reports.len(), total), hooks)?;
            reports.push(report);
            if report.stop {
                hooks.on_epoch_end(epoch)?;
                break 'epochs;
            }
        }
        hooks.on_epoch_end(epoch)?;
    }
    hooks.on_fit_end(adapter)?;
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_hold_or_decay() {
        let cfg = TrainConfig {
            lr: 1.0,
            warmup_steps: 4,
            ..TrainConfig::default()
        };
        assert_eq!(cfg.lr_at(0, 10), 0.25);
        assert_eq!(cfg.lr_at(3, 10), 1.0);
        assert_eq!(cfg.lr_at(9, 10), 1.0);
        let cos = TrainConfig {
            schedule: Schedule::Cosine,
            ..cfg
        };
        assert_eq!(cos.lr_at(4, 10), 1.0);
        assert!((cos.lr_at(7, 10) - 0.5).abs() < 1e-12);
        assert!(cos.lr_at(9, 10) < 0.1);
    }
}
