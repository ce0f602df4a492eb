//! The kernel's `LocalTrainer` port for adapter fine-tuning (LoRA, prompt
//! tuning, P-tuning, prefix-tuning) of the shared LLM.
//!
//! In simulation every client trains on the same frozen base model, taking
//! turns (the kernel's workers lock the shared trainer one call at a time).
//! [`RoundRobinTrainer`] holds that base once, behind an `Arc`, and one slot
//! per client: its adapter, its optimizer state and its data — so memory
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

use fedtune_kernel::course::{LocalTrainer, LocalUpdate, SplitEval, TrainContext, TrainerError};
use fedtune_kernel::ParamSet;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, AdapterSpec};
use crate::hooks::{HookScript, Proximal};
use crate::model::{Llama, ProjectionAdapter};
pub use crate::pfl::PflConfig;
use crate::pfl::{Anchor, FitAt, FitOp, PflScript};
use crate::train::{
    summed_token_loss, Batch, NoHooks, Stepper, StepperState, TrainConfig, TrainHooks,
};

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
    /// When positive, passes over the client's training data per round
    /// instead: `local_epochs × ⌈batches / grad_accum⌉` steps, so clients
    /// with more data take more steps (FS-LLM's `batch_or_epoch = "epoch"`).
    pub local_epochs: usize,
    /// Keep AdamW's moments across rounds instead of starting fresh.
    pub keep_optimizer_state: bool,
    /// Steps whose loss or gradient is not finite that a fit may skip (and
    /// go on with the next batch) before the client is said to diverge.
    pub retry_on_nan_loss: usize,
    /// Optimizer settings.
    pub optim: TrainConfig,
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self {
            local_steps: 10,
            local_epochs: 0,
            keep_optimizer_state: false,
            retry_on_nan_loss: 0,
            optim: TrainConfig::default(),
        }
    }
}

struct ClientSlot {
    data: ClientData,
    lora: Box<dyn Adapter>,
    stepper: Stepper,
    cursor: usize,
    /// The personal adapter of Ditto / pFedMe, from the first round on.
    personal: Option<Box<dyn Adapter>>,
    /// local_adapter: the client's own values of the local parts.
    local: Option<ParamSet>,
    personal_cursor: usize,
}

/// Told after every local optimizer step: client, step (1-based), steps this round, loss.
pub type StepProgress = Arc<dyn Fn(u32, usize, usize, f64) + Send + Sync>;

/// Adapter fine-tuning of one shared frozen model for many clients.
pub struct RoundRobinTrainer {
    model: Arc<Llama>,
    training: LocalTraining,
    clients: BTreeMap<u32, ClientSlot>,
    progress: Option<StepProgress>,
    hooks: Option<HookScript>,
    pfl: Option<PflScript>,
    /// The last `keep_local` pattern, compiled.
    local_re: Option<(String, regex::Regex)>,
    spec: AdapterSpec,
    seed: u64,
}

impl RoundRobinTrainer {
    /// A trainer over `model` for the clients in `data`, each with its own
    /// adapter of `spec` (seeded per client; the server's global adapter
    /// replaces it before any training). `spec` may be a [`crate::lora::LoraConfig`].
    pub fn new(
        model: Arc<Llama>,
        spec: impl Into<AdapterSpec>,
        training: LocalTraining,
        data: BTreeMap<u32, ClientData>,
        seed: u64,
    ) -> Result<Self, TrainerError> {
        if training.local_steps == 0 {
            return Err("local_steps must be at least 1".into());
        }
        let spec = spec.into();
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
            let factors = spec.build(&model, seed ^ u64::from(id))?;
            let stepper = Stepper::new(factors.as_ref(), training.optim.clone())?;
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
            pfl: None,
            local_re: None,
            spec,
            seed,
        })
    }

    /// Reports every local step to `progress`.
    pub fn with_progress(mut self, progress: StepProgress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Personalizes every client with the shipped or scripted algorithm `pfl`
    /// selects (paths relative to the working directory).
    pub fn with_personalization(self, pfl: PflConfig) -> Result<Self, TrainerError> {
        let script = PflScript::from_config(&pfl, &Default::default(), None)?;
        Ok(self.with_pfl_script(script))
    }

    /// Plans every client's fit with `script` (none: plain local training).
    pub fn with_pfl_script(mut self, script: Option<PflScript>) -> Self {
        self.pfl = script;
        self
    }

    /// Client `client`'s personal adapter, once it has one.
    pub fn personal_adapter(&self, client: u32) -> Result<Option<ParamSet>, TrainerError> {
        match self.clients.get(&client).and_then(|s| s.personal.as_ref()) {
            Some(p) => Ok(Some(p.to_param_set()?)),
            None => Ok(None),
        }
    }

    /// The adapter client `client` evaluates with once the course ends on
    /// `global`: its personal adapter (Ditto, pFedMe), or `global` with its
    /// own local parts (local_adapter, FedSA-LoRA's `keep_local`); `None`
    /// when it has neither and simply uses `global`.
    pub fn client_adapter(
        &self,
        client: u32,
        global: &ParamSet,
    ) -> Result<Option<ParamSet>, TrainerError> {
        let Some(slot) = self.clients.get(&client) else {
            return Ok(None);
        };
        Ok(match (&slot.personal, &slot.local) {
            (Some(p), _) => Some(p.to_param_set()?),
            (None, Some(local)) => Some(with_local(global, Some(local)).into_owned()),
            (None, None) => None,
        })
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

    /// The initial global adapter: a fresh one of `spec` from `seed`, as the server would make it.
    pub fn initial_adapter(
        model: &Llama,
        spec: impl Into<AdapterSpec>,
        seed: u64,
    ) -> Result<ParamSet, TrainerError> {
        Ok(spec.into().build(model, seed)?.to_param_set()?)
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
        let mut training = configured(&self.training, ctx)?;
        let slot = self
            .clients
            .get_mut(&client)
            .ok_or_else(|| format!("this trainer has no data for client {client}"))?;
        // Epochs: this client's passes over its data (a strategy's own
        // local_steps for this fit wins).
        if training.local_epochs > 0 && !ctx.config.contains_key("local_steps") {
            let per_epoch = slot
                .data
                .train
                .len()
                .div_ceil(training.optim.grad_accum.max(1));
            training.local_steps = training.local_epochs * per_epoch.max(1);
        }
        let plan = plan_fit(self.pfl.as_mut(), &training, (client, ctx.round), slot)?;
        let resized = fit_rank(
            slot,
            &self.model,
            &self.spec,
            global,
            self.seed ^ u64::from(client),
        )?;
        slot.lora
            .load_param_set(&with_local(global, slot.local.as_ref()))?;
        if resized || !training.keep_optimizer_state {
            slot.stepper = Stepper::new(slot.lora.as_ref(), training.optim.clone())?;
        }
        let mut bound = match self.hooks.as_mut() {
            Some(h) => {
                h.refresh();
                let at = (client, ctx.round, slot.data.n_samples, training.local_steps);
                Some(
                    h.bind(slot.lora.as_ref(), global, at)?
                        .with_fit(&ctx.extra, training.optim.lr),
                )
            }
            None => None,
        };
        let hooks: &mut dyn TrainHooks = match bound.as_mut() {
            Some(b) => b,
            None => &mut NoHooks,
        };
        hooks.on_fit_start(slot.lora.as_ref())?;
        let fit = Fit {
            model: &self.model,
            spec: &self.spec,
            seed: self.seed,
            training: &training,
            client,
            global,
            ctx,
        };
        let done = fit.run(&plan, slot, hooks, self.progress.as_ref())?;
        hooks.on_fit_end(slot.lora.as_ref())?;
        let extra = bound
            .as_mut()
            .and_then(|b| b.take_extra())
            .unwrap_or_default();
        let mut metrics = BTreeMap::new();
        if !done.personal_losses.is_empty() {
            metrics.insert("personal_loss".into(), mean(&done.personal_losses));
        }
        if done.skipped > 0 {
            metrics.insert("skipped_steps".into(), done.skipped as f64);
        }
        metrics.insert("flops".into(), done.flops);
        let steps_taken = done.losses.len();
        // The round's loss: of the sent adapter's steps, or the personal ones when it took none.
        let losses = if done.losses.is_empty() {
            done.personal_losses
        } else {
            done.losses
        };
        if let Some(&last) = losses.last() {
            metrics.insert("last_step_loss".to_string(), last);
        }
        let mut params = slot.lora.to_param_set()?;
        // Frozen tensors (and a residual, never trained) are as the server
        // sent them: they need not travel back.
        let residual = slot.lora.frozen_vars().into_iter().map(|(name, _)| name);
        for name in done.frozen.iter().cloned().chain(residual) {
            params.remove(&name);
        }
        if let Some(pattern) = &done.keep {
            let local = keep_local(&mut self.local_re, pattern, &mut params, global)?;
            metrics.insert("local_tensors".into(), local.len() as f64);
            slot.local = Some(local);
        }
        Ok(LocalUpdate {
            params,
            n_samples: slot.data.n_samples,
            loss: (!losses.is_empty()).then(|| mean(&losses)),
            metrics,
            local_steps: Some(steps_taken as u64),
            extra,
        })
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        _ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        let (model, spec, seed) = (self.model.clone(), self.spec.clone(), self.seed);
        let slot = self.slot(client)?;
        // Personalized runs evaluate each client with its own adapter, once it has one.
        let lora: &dyn Adapter = match &slot.personal {
            Some(p) => p.as_ref(),
            None => {
                fit_rank(slot, &model, &spec, global, seed ^ u64::from(client))?;
                slot.lora
                    .load_param_set(&with_local(global, slot.local.as_ref()))?;
                slot.lora.as_ref()
            }
        };
        lora.set_grad_enabled(false);
        let result = evaluate_splits(&model, lora, &slot.data.eval);
        lora.set_grad_enabled(true);
        result
    }

    fn save_client(&self, client: u32) -> Result<Option<Vec<u8>>, TrainerError> {
        let slot = self
            .clients
            .get(&client)
            .ok_or_else(|| format!("this trainer has no data for client {client}"))?;
        let state = SavedClient {
            stepper: self
                .training
                .keep_optimizer_state
                .then(|| slot.stepper.state())
                .transpose()?,
            personal: slot
                .personal
                .as_ref()
                .map(|p| p.to_param_set())
                .transpose()?,
            local: slot.local.clone(),
            hooks: match &self.hooks {
                Some(h) => h.save_client(client)?,
                None => None,
            },
            pfl: match &self.pfl {
                Some(p) => p.save_client(client)?,
                None => None,
            },
        };
        if state.is_empty() {
            return Ok(None);
        }
        Ok(Some(rmp_serde::to_vec_named(&state)?))
    }

    fn load_client(&mut self, client: u32, bytes: &[u8]) -> Result<(), TrainerError> {
        let state: SavedClient = rmp_serde::from_slice(bytes)
            .map_err(|e| format!("client {client}: not a saved client state: {e}"))?;
        let (model, spec, seed) = (self.model.clone(), self.spec.clone(), self.seed);
        let slot = self.slot(client)?;
        if let Some(s) = &state.stepper {
            slot.stepper.restore(s)?;
        }
        slot.personal = match &state.personal {
            Some(p) => {
                let adapter = spec.build(&model, seed ^ u64::from(client) ^ 0x5eed)?;
                adapter.load_param_set(p)?;
                Some(adapter)
            }
            None => None,
        };
        slot.local = state.local;
        if let (Some(h), Some(bytes)) = (self.hooks.as_mut(), &state.hooks) {
            h.load_client(client, bytes)?;
        }
        if let (Some(p), Some(bytes)) = (self.pfl.as_mut(), &state.pfl) {
            p.load_client(client, bytes)?;
        }
        Ok(())
    }
}

/// What of one client a checkpoint keeps (see [`LocalTrainer::save_client`]).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedClient {
    /// The optimizer, when it is kept across rounds.
    stepper: Option<StepperState>,
    /// The personal adapter of Ditto / pFedMe.
    personal: Option<ParamSet>,
    /// local_adapter's own values of the local parts.
    local: Option<ParamSet>,
    /// The hook script's `this` for this client.
    hooks: Option<Vec<u8>>,
    /// The pFL script's `this` for this client.
    pfl: Option<Vec<u8>>,
}

impl SavedClient {
    fn is_empty(&self) -> bool {
        self.stepper.is_none()
            && self.personal.is_none()
            && self.local.is_none()
            && self.hooks.is_none()
            && self.pfl.is_none()
    }
}

/// The course's local training as the strategy configured it for this fit:
/// `local_steps` and `lr` from the server's per-client config.
fn configured(training: &LocalTraining, ctx: &TrainContext) -> Result<LocalTraining, TrainerError> {
    let mut t = training.clone();
    if let Some(v) = ctx.config.get("local_steps") {
        t.local_steps = v
            .as_u64()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or_else(|| {
                format!("the strategy's local_steps = {v} is not a step count in 1..=1000000")
            })? as usize;
    }
    if let Some(v) = ctx.config.get("lr") {
        t.optim.lr = v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("the strategy's lr = {v} is not a positive number"))?;
    }
    Ok(t)
}

/// Rebuilds the client's LoRA adapter at the rank of `params` when the
/// strategy sends it another rank (FlexLoRA, HetLoRA); true if it did.
fn fit_rank(
    slot: &mut ClientSlot,
    model: &Llama,
    spec: &AdapterSpec,
    params: &ParamSet,
    seed: u64,
) -> Result<bool, TrainerError> {
    let AdapterSpec::Lora(cfg) = spec else {
        return Ok(false);
    };
    let Some(pair) = fedtune_kernel::aggregate::lora_pairs(params)
        .into_iter()
        .next()
    else {
        return Ok(false);
    };
    let Some((_, mine)) = slot
        .lora
        .named_vars()
        .into_iter()
        .find(|(name, _)| *name == pair.a)
    else {
        return Ok(false);
    };
    let (current, inputs) = (mine.dims()[0], mine.dims()[1]);
    // Only a lora_A of this module's inputs sets the rank: its values are
    // in the payload, so the rank is bounded by the message size. Anything
    // else is refused by the load that follows.
    let wanted = match params.get(&pair.a).map(|a| a.shape()) {
        Some(&[r, i]) if i == inputs && r > 0 => r,
        _ => return Ok(false),
    };
    if wanted == current {
        return Ok(false);
    }
    let resized = AdapterSpec::Lora(crate::lora::LoraConfig {
        r: wanted,
        ..cfg.clone()
    });
    slot.lora = resized.build(model, seed)?;
    Ok(true)
}

/// The operations of client `client`'s fit in `round`: the pFL script's
/// plan, or plain local training.
fn plan_fit(
    pfl: Option<&mut PflScript>,
    training: &LocalTraining,
    (client, round): (u32, u64),
    slot: &ClientSlot,
) -> Result<Vec<FitOp>, TrainerError> {
    let plain = || {
        vec![FitOp::Train {
            steps: training.local_steps,
        }]
    };
    Ok(match pfl {
        Some(script) => script
            .plan(FitAt {
                round,
                client,
                local_steps: training.local_steps,
                samples: slot.data.n_samples,
                lr: training.optim.lr,
                has_personal: slot.personal.is_some(),
            })?
            .unwrap_or_else(plain),
        None => plain(),
    })
}

/// What one client's fit runs with.
struct Fit<'a> {
    model: &'a Llama,
    spec: &'a AdapterSpec,
    seed: u64,
    training: &'a LocalTraining,
    client: u32,
    global: &'a ParamSet,
    ctx: &'a TrainContext,
}

/// What a fit's plan produced.
struct FitDone {
    /// Losses of the sent adapter's steps.
    losses: Vec<f64>,
    /// Losses of the personal adapter's steps.
    personal_losses: Vec<f64>,
    /// The `keep_local` pattern, if the plan set one.
    keep: Option<String>,
    /// Steps skipped because their loss or gradient was not finite.
    skipped: usize,
    /// The sent adapter's tensors that `freeze`/`train_only` kept from training.
    frozen: Vec<String>,
    /// FLOPs of every step taken, skipped ones included ([`crate::flops`]).
    flops: f64,
}

impl Fit<'_> {
    /// Runs `plan`'s operations in order on `slot`.
    fn run(
        &self,
        plan: &[FitOp],
        slot: &mut ClientSlot,
        hooks: &mut dyn TrainHooks,
        progress: Option<&StepProgress>,
    ) -> Result<FitDone, TrainerError> {
        let accum = self.training.optim.grad_accum;
        let budget: usize = plan.iter().map(FitOp::steps).sum();
        self.place(plan, slot);
        let mut done = 0;
        let client = self.client;
        let mut report = |loss: f64| {
            done += 1;
            if let Some(p) = progress {
                p(client, done, budget, loss);
            }
        };
        let mut out = FitDone {
            losses: Vec::new(),
            personal_losses: Vec::new(),
            keep: None,
            skipped: 0,
            frozen: Vec::new(),
            flops: 0.0,
        };
        let mut retries = Retries {
            left: self.training.retry_on_nan_loss,
            used: 0,
        };
        if hooks.stop_requested() {
            // `ctx.stop()` in on_fit_start: this fit takes no step.
            return Ok(out);
        }
        // One optimizer for the personal adapter per fit (new when the rate changes).
        let mut personal_stepper: Option<(f64, Stepper)> = None;
        for op in plan {
            match op {
                FitOp::Train { steps } => out.losses.extend(run_steps(
                    self.model,
                    slot.lora.as_ref(),
                    &mut slot.stepper,
                    (&slot.data.train, &mut slot.cursor, accum),
                    *steps,
                    hooks,
                    (self.ctx, &mut retries, &mut out.flops),
                    &mut report,
                )?),
                FitOp::TrainPersonal {
                    steps,
                    lambda,
                    anchor,
                    lr,
                } => {
                    let theta = personal_adapter(
                        &mut slot.personal,
                        self.model,
                        self.spec,
                        self.seed,
                        client,
                        self.global,
                    )?;
                    let lr = lr.unwrap_or(self.training.optim.lr);
                    let stepper = match &mut personal_stepper {
                        Some((rate, stepper)) if *rate == lr => stepper,
                        _ => {
                            let optim = TrainConfig {
                                lr,
                                ..self.training.optim.clone()
                            };
                            &mut personal_stepper.insert((lr, Stepper::new(theta, optim)?)).1
                        }
                    };
                    let mut prox = match anchor {
                        Anchor::Global => Proximal::new(theta, self.global, *lambda)?,
                        Anchor::Local => Proximal::new(theta, &slot.lora.to_param_set()?, *lambda)?,
                    };
                    out.personal_losses.extend(run_steps(
                        self.model,
                        theta,
                        stepper,
                        (&slot.data.train, &mut slot.personal_cursor, accum),
                        *steps,
                        &mut prox,
                        (self.ctx, &mut retries, &mut out.flops),
                        &mut report,
                    )?);
                }
                FitOp::PullToPersonal { rate } => pull_to_personal(slot, *rate)?,
                FitOp::Trainable { pattern, only } => {
                    out.frozen = restrict_training(slot, pattern, *only)?;
                }
                FitOp::KeepLocal { pattern } => out.keep = Some(pattern.clone()),
            }
        }
        out.skipped = retries.used;
        Ok(out)
    }

    /// Puts `slot`'s data cursors where this fit's data picks up — where a
    /// client that trained `plan` in every earlier round would be, from the
    /// round alone, not from what this process happens to remember, so a
    /// restarted client or a resumed course trains on exactly the batches
    /// an uninterrupted one would (a client left out of some rounds skips
    /// their batches) — and reseeds its dropout from this client's and
    /// round's seed, not from the process's history.
    fn place(&self, plan: &[FitOp], slot: &mut ClientSlot) {
        let accum = self.training.optim.grad_accum;
        let (sent, personal): (usize, usize) = plan.iter().fold((0, 0), |(a, b), op| match op {
            FitOp::Train { steps } => (a + steps, b),
            FitOp::TrainPersonal { steps, .. } => (a, b + steps),
            _ => (a, b),
        });
        let len = slot.data.train.len();
        let earlier = self.ctx.round.saturating_sub(1);
        slot.cursor = position(earlier, sent * accum, len);
        slot.personal_cursor = position(earlier, personal * accum, len);
        slot.lora.reseed(self.ctx.seed);
        if let Some(p) = &slot.personal {
            p.reseed(self.ctx.seed ^ 0x5eed);
        }
    }
}

/// Trains only the adapter tensors `pattern` matches (`only`) or all but
/// them (`freeze`); the names kept from training.
fn restrict_training(
    slot: &mut ClientSlot,
    pattern: &str,
    only: bool,
) -> Result<Vec<String>, TrainerError> {
    let re = regex::Regex::new(pattern)?;
    let (trainable, frozen): (Vec<String>, Vec<String>) = slot
        .lora
        .named_vars()
        .into_iter()
        .map(|(name, _)| name)
        .partition(|name| re.is_match(name) == only);
    if trainable.is_empty() {
        return Err(format!(
            "{}({pattern:?}) leaves no tensor of the adapter to train",
            if only { "train_only" } else { "freeze" }
        )
        .into());
    }
    slot.stepper.restrict(slot.lora.as_ref(), &trainable)?;
    Ok(frozen)
}

/// The batch a walk of `per_fit` batches a fit over `len` batches reaches after `fits` fits.
fn position(fits: u64, per_fit: usize, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    ((u128::from(fits) * per_fit as u128) % len as u128) as usize
}

/// `w ← w − rate·(w − θ)`: moves the sent adapter towards the personal one.
fn pull_to_personal(slot: &ClientSlot, rate: f64) -> Result<(), TrainerError> {
    let theta = slot
        .personal
        .as_ref()
        .ok_or("pull_to_personal: this client has no personal adapter yet")?;
    for ((_, wv), (_, tv)) in slot.lora.named_vars().iter().zip(theta.named_vars()) {
        let moved = (wv.as_tensor() - ((wv.as_tensor() - tv.as_tensor())? * rate)?)?;
        wv.set(&moved)?;
    }
    Ok(())
}

/// Takes the tensors whose names match `pattern` out of `params` (the
/// client keeps them; they are not sent, and the server takes its own values
/// for them); `compiled` caches the last pattern's regular expression.
fn keep_local(
    compiled: &mut Option<(String, regex::Regex)>,
    pattern: &str,
    params: &mut ParamSet,
    global: &ParamSet,
) -> Result<ParamSet, TrainerError> {
    if compiled.as_ref().map(|(p, _)| p.as_str()) != Some(pattern) {
        *compiled = Some((pattern.to_string(), regex::Regex::new(pattern)?));
    }
    let re = &compiled.as_ref().expect("just set").1;
    let mut local = ParamSet::new();
    let names: Vec<String> = params
        .names()
        .filter(|n| re.is_match(n))
        .map(String::from)
        .collect();
    for name in names {
        if global.get(&name).is_none() {
            return Err(format!("keep_local: the global adapter has no `{name}`").into());
        }
        let mine = params.remove(&name).expect("listed above");
        local.insert_tensor(name, mine);
    }
    Ok(local)
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
    slot: &'a mut Option<Box<dyn Adapter>>,
    model: &Llama,
    spec: &AdapterSpec,
    seed: u64,
    client: u32,
    global: &ParamSet,
) -> Result<&'a dyn Adapter, TrainerError> {
    if slot.is_none() {
        let p = spec.build(model, seed ^ u64::from(client) ^ 0x5eed)?;
        p.load_param_set(global)?;
        *slot = Some(p);
    }
    Ok(slot.as_deref().expect("just set"))
}

/// How many non-finite steps a fit may still skip, and how many it did.
struct Retries {
    left: usize,
    used: usize,
}

/// `n` optimizer steps of `lora` over `data` (micro-batches from `cursor`,
/// `accum` per step, wrapping around); stops early when a hook asks. A step
/// whose loss or gradient is not finite changes nothing; it is skipped while
/// `retries` allow, and is the client's divergence after that.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    model: &Llama,
    lora: &dyn Adapter,
    stepper: &mut Stepper,
    (data, cursor, accum): (&[Batch], &mut usize, usize),
    n: usize,
    hooks: &mut dyn TrainHooks,
    (ctx, retries, flops): (&TrainContext, &mut Retries, &mut f64),
    report: &mut dyn FnMut(f64),
) -> Result<Vec<f64>, TrainerError> {
    let mut losses = Vec::with_capacity(n);
    let trainable = lora.num_parameters();
    for step in 0..n {
        if ctx.is_cancelled() {
            return Err("training cancelled".into());
        }
        let len = data.len();
        let micro: Vec<Batch> = (0..accum)
            .map(|k| data[(*cursor + k) % len].clone())
            .collect();
        *cursor = (*cursor + accum) % len;
        for b in &micro {
            let (rows, cols) = b.tokens.dims2()?;
            *flops += crate::flops::training_step(model.config(), trainable, rows, cols).total();
        }
        let r = stepper.step(model, lora, &micro, (step, n), hooks)?;
        if r.skipped {
            if retries.left == 0 {
                let what = if r.loss.is_finite() {
                    format!("the gradient norm is {}", r.grad_norm)
                } else {
                    format!("the loss is {}", r.loss)
                };
                let skipped = match retries.used {
                    0 => String::new(),
                    k => format!(", after {k} skipped step(s)"),
                };
                return Err(format!(
                    "{what} at local step {} of {n}{skipped} (lower optim.lr, check the [hooks] script's added terms, or let train.retry_on_nan_loss skip such steps)",
                    step + 1
                )
                .into());
            }
            retries.left -= 1;
            retries.used += 1;
            tracing::warn!(
                step = step + 1,
                loss = r.loss,
                grad_norm = r.grad_norm,
                "a step with a non-finite loss or gradient was skipped (train.retry_on_nan_loss)"
            );
            continue;
        }
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
    lora: &dyn Adapter,
    splits: &[(String, Vec<Batch>)],
) -> Result<Vec<SplitEval>, TrainerError> {
    let mut out = Vec::new();
    for (split, batches) in splits {
        let (weighted, tokens) =
            summed_token_loss(model, Some(lora as &dyn ProjectionAdapter), batches)?;
        let samples = batches
            .iter()
            .map(|b| b.tokens.dim(0).map(|n| n as u64))
            .sum::<candle_core::Result<u64>>()?;
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
