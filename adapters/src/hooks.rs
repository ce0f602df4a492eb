//! Trainer hooks as Rhai scripts (`scripts/hooks/*.rhai`).
//!
//! A hook script defines any of `on_fit_start`, `on_batch_start`,
//! `on_batch_forward`, `on_batch_backward`, `on_batch_end`, `on_fit_end`, each
//! taking one argument, the context `ctx`:
//!
//! | read | |
//! |---|---|
//! | `ctx.round`, `ctx.client` | the round and the client training |
//! | `ctx.step`, `ctx.total_steps`, `ctx.micro_batch` | where in the local fit |
//! | `ctx.loss` | the micro-batch's LM loss (`()` before the forward) |
//! | `ctx.lr`, `ctx.samples` | learning rate, the client's training examples |
//!
//! | do | |
//! |---|---|
//! | `ctx.add_loss(term)` | add a differentiable term to this micro-batch's loss (`on_batch_forward`) |
//! | `ctx.prox_sq_norm()` | the term ‖w − w_global‖² over the adapter (FedProx, Ditto, pFedMe) |
//! | `ctx.sq_norm()` | the term ‖w‖² (L2 regularization) |
//! | `ctx.set_lr(x)` | this step's learning rate (`on_batch_start`) |
//! | `ctx.stop()` | end local training after this step |
//! | `ctx.linear(p)` | the term Σ ⟨w, p⟩ over the adapter tensors `p` names (its gradient is `p`: SCAFFOLD's correction) |
//! | `ctx.params()`, `ctx.global()` | the adapter as it stands, and as the server sent it, as `ParamSet`s |
//! | `ctx.extra` | the extra tensors the server sent with the adapter (names without `extra/`) |
//! | `ctx.send_extra(p)` | send `p` back to the server beside the adapter, as extra tensors (`on_fit_end`) |
//!
//! Terms combine with numbers (`mu / 2.0 * ctx.prox_sq_norm()`, `a + b`) and
//! `value(term)` reads one. Tensors never cross into the script. As with
//! aggregators, `this` is a map kept per client across rounds, `this.hp`
//! holds `[hooks.params]`, the file reloads when it changes (from the next
//! round), and errors name file and line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Result, Tensor, Var};
use fedtune_kernel::script::rhai::{Dynamic, Engine, EvalAltResult, Map, Position};
use fedtune_kernel::script::state::StateError;
use fedtune_kernel::script::{
    OnScriptError, ScriptError, ScriptFile, ScriptHost, ScriptLoadError, ScriptSection,
    ScriptSource, ScriptingSection,
};
use fedtune_kernel::ParamSet;

use crate::adapter::Adapter;
use crate::train::{HookCtx, TrainHooks};

/// The hook scripts shipped in `scripts/hooks/`.
pub const BUILT_IN_HOOKS: [(&str, &str); 3] = [
    ("fedprox", include_str!("../scripts/hooks/fedprox.rhai")),
    ("scaffold", include_str!("../scripts/hooks/scaffold.rhai")),
    (
        "early_stop",
        include_str!("../scripts/hooks/early_stop.rhai"),
    ),
];

const HOOK_POINTS: [&str; 6] = [
    "on_fit_start",
    "on_batch_start",
    "on_batch_forward",
    "on_batch_backward",
    "on_batch_end",
    "on_fit_end",
];

/// A differentiable scalar that a hook adds to the loss.
#[derive(Clone)]
pub struct LossTerm(Tensor);

impl LossTerm {
    fn map(
        &self,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> std::result::Result<Self, Box<EvalAltResult>> {
        f(&self.0).map(LossTerm).map_err(script_err)
    }

    fn value(&self) -> std::result::Result<f64, Box<EvalAltResult>> {
        self.0
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(script_err)
    }
}

fn script_err(e: impl std::fmt::Display) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(e.to_string()),
        Position::NONE,
    ))
}

/// What a hook sees: a handle the script may copy, read and act through.
#[derive(Clone)]
pub struct HookContext(Arc<Mutex<CtxData>>);

#[derive(Clone, Default)]
struct CtxData {
    phase: &'static str,
    round: u64,
    client: u32,
    step: usize,
    total_steps: usize,
    micro_batch: usize,
    loss: Option<f64>,
    lr: f64,
    samples: u64,
    /// The adapter's variables and the anchor (the global adapter) by the same order.
    vars: Arc<Vec<Var>>,
    names: Arc<Vec<String>>,
    anchor: Arc<Vec<Tensor>>,
    /// The global adapter and the extra tensors, as the server sent them.
    global: Arc<ParamSet>,
    extra: Arc<ParamSet>,
    added: Option<Tensor>,
    set_lr: Option<f64>,
    stop: bool,
    /// What `ctx.send_extra` set.
    send_extra: Option<ParamSet>,
}

impl HookContext {
    fn lock(&self) -> MutexGuard<'_, CtxData> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_loss(&mut self, term: LossTerm) -> std::result::Result<(), Box<EvalAltResult>> {
        let mut d = self.lock();
        if d.phase != "on_batch_forward" {
            return Err(script_err(format!(
                "ctx.add_loss works in on_batch_forward, not in {}",
                d.phase
            )));
        }
        d.added = Some(match d.added.take() {
            Some(prev) => (prev + term.0).map_err(script_err)?,
            None => term.0,
        });
        Ok(())
    }

    /// `Σ ⟨w, p⟩` over the adapter's tensors that `p` names.
    fn linear(&mut self, p: ParamSet) -> std::result::Result<LossTerm, Box<EvalAltResult>> {
        let d = self.lock();
        let mut total: Option<Tensor> = None;
        for (name, t) in p.iter() {
            let i = d.names.iter().position(|n| n == name).ok_or_else(|| {
                script_err(format!("ctx.linear: the adapter has no tensor `{name}`"))
            })?;
            let v = d.vars[i].as_tensor();
            if v.dims() != t.shape() {
                return Err(script_err(format!(
                    "ctx.linear: `{name}` has shape {:?}, the adapter's {:?}",
                    t.shape(),
                    v.dims()
                )));
            }
            let term = Tensor::from_slice(t.data(), t.shape(), v.device())
                .and_then(|c| c.to_dtype(v.dtype()))
                .and_then(|c| (v * c)?.sum_all())
                .map_err(script_err)?;
            total = Some(match total {
                Some(prev) => (prev + term).map_err(script_err)?,
                None => term,
            });
        }
        total
            .map(LossTerm)
            .ok_or_else(|| script_err("ctx.linear: the ParamSet is empty"))
    }

    /// The adapter's current values.
    fn params(&mut self) -> std::result::Result<ParamSet, Box<EvalAltResult>> {
        let d = self.lock();
        let mut out = ParamSet::new();
        for (name, v) in d.names.iter().zip(d.vars.iter()) {
            let t = v.as_tensor();
            let data = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(script_err)?;
            out.insert(name.clone(), t.dims().to_vec(), data)
                .map_err(script_err)?;
        }
        Ok(out)
    }

    fn sum_sq(&self, minus_anchor: bool) -> std::result::Result<LossTerm, Box<EvalAltResult>> {
        let d = self.lock();
        let anchor = minus_anchor.then_some(&d.anchor[..]);
        sq_distance(&d.vars, anchor)
            .map(LossTerm)
            .map_err(script_err)
    }
}

/// `Σ ‖v − a‖²` over matching variables and anchors (`Σ ‖v‖²` without
/// anchors): a differentiable scalar.
pub fn sq_distance(vars: &[Var], anchor: Option<&[Tensor]>) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (i, v) in vars.iter().enumerate() {
        let t = v.as_tensor();
        let diff = match anchor {
            Some(a) => (t - &a[i])?,
            None => t.clone(),
        };
        let s = diff.sqr()?.sum_all()?;
        total = Some(match total {
            Some(prev) => (prev + s)?,
            None => s,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("the adapter has no parameters".into()))
}

/// The adapter's variables (PEFT-name order) and `anchor`'s tensors in the same order.
pub fn anchor_tensors(adapter: &dyn Adapter, anchor: &ParamSet) -> Result<(Vec<Var>, Vec<Tensor>)> {
    let named = adapter.named_vars();
    let mut tensors = Vec::with_capacity(named.len());
    for (name, var) in &named {
        let t = anchor
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the anchor adapter lacks {name}")))?;
        tensors.push(Tensor::from_slice(t.data(), t.shape(), var.device())?.to_dtype(var.dtype())?);
    }
    Ok((named.into_iter().map(|(_, v)| v).collect(), tensors))
}

/// The native proximal term `mu/2 · ‖w − anchor‖²` as trainer hooks (Ditto's
/// and pFedMe's personal objectives).
pub struct Proximal {
    mu: f64,
    vars: Vec<Var>,
    anchor: Vec<Tensor>,
}

impl Proximal {
    /// The term for `adapter`'s variables around `anchor`.
    pub fn new(adapter: &dyn Adapter, anchor: &ParamSet, mu: f64) -> Result<Self> {
        let (vars, anchor) = anchor_tensors(adapter, anchor)?;
        Ok(Self { mu, vars, anchor })
    }
}

impl TrainHooks for Proximal {
    fn on_batch_forward(&mut self, ctx: &mut HookCtx) -> Result<()> {
        if self.mu != 0.0 {
            let term = (sq_distance(&self.vars, Some(&self.anchor))? * (self.mu / 2.0))?;
            ctx.add_loss(term)?;
        }
        Ok(())
    }
}

/// Registers the hook context and loss terms on a script engine.
pub fn register_hook_api(engine: &mut Engine) {
    engine.register_type_with_name::<HookContext>("HookCtx");
    engine.register_type_with_name::<LossTerm>("LossTerm");
    engine.register_get("phase", |c: &mut HookContext| c.lock().phase.to_string());
    engine.register_get("round", |c: &mut HookContext| c.lock().round as i64);
    engine.register_get("client", |c: &mut HookContext| i64::from(c.lock().client));
    engine.register_get("step", |c: &mut HookContext| c.lock().step as i64);
    engine.register_get("total_steps", |c: &mut HookContext| {
        c.lock().total_steps as i64
    });
    engine.register_get("micro_batch", |c: &mut HookContext| {
        c.lock().micro_batch as i64
    });
    engine.register_get("samples", |c: &mut HookContext| c.lock().samples as i64);
    engine.register_get("lr", |c: &mut HookContext| c.lock().lr);
    engine.register_get("loss", |c: &mut HookContext| match c.lock().loss {
        Some(l) => Dynamic::from(l),
        None => Dynamic::UNIT,
    });
    engine.register_fn("add_loss", HookContext::add_loss);
    engine.register_fn("set_lr", |c: &mut HookContext, lr: f64| {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(script_err(format!(
                "ctx.set_lr({lr}): the rate must be finite and ≥ 0"
            )));
        }
        let mut d = c.lock();
        d.set_lr = Some(lr);
        d.lr = lr;
        Ok(())
    });
    engine.register_fn("stop", |c: &mut HookContext| c.lock().stop = true);
    engine.register_fn("linear", HookContext::linear);
    engine.register_fn("params", HookContext::params);
    engine.register_fn("global", |c: &mut HookContext| (*c.lock().global).clone());
    engine.register_get("extra", |c: &mut HookContext| (*c.lock().extra).clone());
    engine.register_fn("send_extra", |c: &mut HookContext, p: ParamSet| {
        let mut d = c.lock();
        if d.phase != "on_fit_end" {
            return Err(script_err(format!(
                "ctx.send_extra works in on_fit_end, not in {}",
                d.phase
            )));
        }
        p.check_finite()
            .map_err(|e| script_err(format!("ctx.send_extra: {e}")))?;
        d.send_extra = Some(p);
        Ok(())
    });
    engine.register_fn("prox_sq_norm", |c: &mut HookContext| c.sum_sq(true));
    engine.register_fn("sq_norm", |c: &mut HookContext| c.sum_sq(false));
    engine.register_fn("*", |t: &mut LossTerm, x: f64| t.map(|t| t * x));
    engine.register_fn("*", |x: f64, t: LossTerm| t.map(|t| t * x));
    engine.register_fn("/", |t: &mut LossTerm, x: f64| t.map(|t| t / x));
    engine.register_fn("+", |a: &mut LossTerm, b: LossTerm| a.map(|a| a + &b.0));
    engine.register_fn("value", |t: &mut LossTerm| t.value());
    engine.register_fn("to_string", |t: &mut LossTerm| match t.value() {
        Ok(v) => format!("LossTerm({v})"),
        Err(_) => "LossTerm(?)".to_string(),
    });
}

/// A script run for each client: compiled once, a `this` map per client
/// (holding `this.hp`), reloaded when its file changes, and the
/// `on_script_error` policy applied to every call. Trainer hooks and pFL
/// scripts both run this way.
pub(crate) struct PerClientScript {
    host: ScriptHost,
    script: ScriptFile,
    hp: Map,
    states: BTreeMap<u32, Dynamic>,
    failures: u64,
}

impl PerClientScript {
    /// Client `client`'s `this` (without `this.hp`), as bytes; `None` before its first call.
    pub(crate) fn save_client(
        &self,
        client: u32,
    ) -> std::result::Result<Option<Vec<u8>>, StateError> {
        self.states
            .get(&client)
            .map(fedtune_kernel::script::state::save_state)
            .transpose()
    }

    /// Gives client `client` back the `this` [`Self::save_client`] saved.
    pub(crate) fn load_client(
        &mut self,
        client: u32,
        bytes: &[u8],
    ) -> std::result::Result<(), StateError> {
        let state = fedtune_kernel::script::state::load_state(bytes)?;
        self.states.insert(client, state);
        Ok(())
    }

    pub(crate) fn new(
        scripting: &ScriptingSection,
        source: &ScriptSource,
        hp: Map,
        api: impl FnOnce(&mut Engine),
    ) -> std::result::Result<Self, ScriptError> {
        let host = ScriptHost::with_api(scripting, api);
        let script = ScriptFile::from_source(&host, source)?;
        Ok(Self {
            host,
            script,
            hp,
            states: BTreeMap::new(),
            failures: 0,
        })
    }

    pub(crate) fn file(&self) -> &ScriptFile {
        &self.script
    }

    /// Re-reads an edited file; `true` when a new version is now in force.
    pub(crate) fn refresh(&mut self) -> bool {
        match self.script.refresh(&self.host) {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!("{e}; the previous version of the script stays in force");
                false
            }
        }
    }

    /// Calls `name(args)` with `client`'s `this`. `Ok(None)`: the call failed
    /// and was skipped (policy `skip`); `Err`: it failed and the course stops.
    pub(crate) fn call(
        &mut self,
        client: u32,
        name: &str,
        args: impl fedtune_kernel::script::rhai::FuncArgs,
        doing: &str,
    ) -> std::result::Result<Option<Dynamic>, ScriptError> {
        let state = self
            .states
            .entry(client)
            .or_insert_with(|| Dynamic::from_map(Map::new()));
        if let Some(mut map) = state.write_lock::<Map>() {
            map.insert("hp".into(), Dynamic::from_map(self.hp.clone()));
        }
        match self.host.call(&self.script, name, state, args, doing) {
            Ok(out) => Ok(Some(out)),
            Err(e) => match self.host.policy() {
                OnScriptError::Fail => Err(e),
                OnScriptError::Skip => {
                    self.failures += 1;
                    tracing::warn!("{e}; skipped (scripting.on_script_error = \"skip\")");
                    Ok(None)
                }
            },
        }
    }
}

/// A loaded hook script with per-client state.
pub struct HookScript {
    inner: PerClientScript,
    defined: [bool; 6],
}

impl HookScript {
    /// Loads the script of `section` (`Ok(None)` when none is set).
    pub fn from_config(
        section: &ScriptSection,
        scripting: &ScriptingSection,
        config_dir: Option<&std::path::Path>,
    ) -> std::result::Result<Option<Self>, ScriptLoadError> {
        let Some(source) = section.resolve_in(config_dir, &BUILT_IN_HOOKS)? else {
            return Ok(None);
        };
        Ok(Some(Self::new(scripting, &source, section.hp())?))
    }

    /// Compiles `source`; it must define at least one hook point.
    pub fn new(
        scripting: &ScriptingSection,
        source: &ScriptSource,
        hp: Map,
    ) -> std::result::Result<Self, ScriptError> {
        let inner = PerClientScript::new(scripting, source, hp, register_hook_api)?;
        let mut me = Self {
            inner,
            defined: [false; 6],
        };
        me.scan()?;
        Ok(me)
    }

    fn scan(&mut self) -> std::result::Result<(), ScriptError> {
        for (i, name) in HOOK_POINTS.iter().enumerate() {
            self.defined[i] = self.inner.file().has_fn(name, 1);
        }
        if self.defined.iter().any(|&d| d) {
            return Ok(());
        }
        Err(ScriptError::unplaced(
            self.origin(),
            format!(
                "the script defines no hook (one of {}, each with one parameter, ctx)",
                HOOK_POINTS.join(", ")
            ),
            "loading",
        ))
    }

    /// The script, as errors name it.
    pub fn origin(&self) -> &str {
        self.inner.file().origin()
    }

    /// Client `client`'s script state, as bytes (see [`PerClientScript`]).
    pub fn save_client(&self, client: u32) -> std::result::Result<Option<Vec<u8>>, StateError> {
        self.inner.save_client(client)
    }

    /// Gives client `client` back its saved script state.
    pub fn load_client(
        &mut self,
        client: u32,
        bytes: &[u8],
    ) -> std::result::Result<(), StateError> {
        self.inner.load_client(client, bytes)
    }

    /// Hook calls that failed and were skipped (`on_script_error = "skip"`).
    pub fn failures(&self) -> u64 {
        self.inner.failures
    }

    /// Picks up an edited script file (call between rounds).
    pub fn refresh(&mut self) {
        if self.inner.refresh() {
            match self.scan() {
                Ok(()) => tracing::info!(
                    script = self.origin(),
                    "hook script changed on disk: the new version runs from now on"
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    /// Hooks for one client's local fit in `round`, anchored at `global`.
    pub fn bind<'a>(
        &'a mut self,
        adapter: &dyn Adapter,
        global: &ParamSet,
        (client, round, samples, total_steps): (u32, u64, u64, usize),
    ) -> Result<BoundHooks<'a>> {
        let (vars, anchor) = anchor_tensors(adapter, global)?;
        let base = CtxData {
            round,
            client,
            samples,
            total_steps,
            vars: Arc::new(vars),
            names: Arc::new(adapter.named_vars().into_iter().map(|(n, _)| n).collect()),
            anchor: Arc::new(anchor),
            global: Arc::new(global.clone()),
            ..CtxData::default()
        };
        Ok(BoundHooks {
            script: self,
            base,
            stop_at_start: false,
            send_extra: None,
        })
    }
}

/// A [`HookScript`] bound to one client's fit: the [`TrainHooks`] the stepper calls.
pub struct BoundHooks<'a> {
    script: &'a mut HookScript,
    base: CtxData,
    /// `ctx.stop()` was called in `on_fit_start`: the fit takes no step.
    stop_at_start: bool,
    /// What `on_fit_end` sent back with `ctx.send_extra`.
    send_extra: Option<ParamSet>,
}

impl BoundHooks<'_> {
    /// These hooks see `extra`, the tensors the server sent beside the
    /// adapter, and `lr`, the fit's learning rate, outside the batch hooks too.
    pub fn with_fit(mut self, extra: &ParamSet, lr: f64) -> Self {
        self.base.extra = Arc::new(extra.clone());
        self.base.lr = lr;
        self
    }

    /// The extra tensors `on_fit_end` sent back, if any.
    pub fn take_extra(&mut self) -> Option<ParamSet> {
        self.send_extra.take()
    }

    /// Calls hook `point` with a context built from `fill`; returns what the script did.
    fn call(&mut self, point: usize, fill: impl FnOnce(&mut CtxData)) -> Result<Option<CtxData>> {
        if !self.script.defined[point] {
            return Ok(None);
        }
        let mut data = self.base.clone();
        data.phase = HOOK_POINTS[point];
        fill(&mut data);
        let ctx = HookContext(Arc::new(Mutex::new(data)));
        let doing = format!(
            "{}, round {}, client {}, step {}",
            HOOK_POINTS[point],
            self.base.round,
            self.base.client,
            ctx.lock().step
        );
        let done = self
            .script
            .inner
            .call(self.base.client, HOOK_POINTS[point], (ctx.clone(),), &doing)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(done.map(|_| ctx.lock().clone()))
    }

    fn batch_hook(&mut self, point: usize, ctx: &mut HookCtx) -> Result<()> {
        let (step, micro, loss, lr) = (ctx.step, ctx.micro_batch, ctx.loss, ctx.lr);
        let Some(done) = self.call(point, |d| {
            d.step = step;
            d.micro_batch = micro;
            d.loss = loss;
            d.lr = lr;
        })?
        else {
            return Ok(());
        };
        if let Some(term) = done.added {
            ctx.add_loss(term)?;
        }
        if let Some(lr) = done.set_lr {
            ctx.set_lr(lr);
        }
        if done.stop {
            ctx.stop();
        }
        Ok(())
    }
}

impl TrainHooks for BoundHooks<'_> {
    fn on_fit_start(&mut self, _adapter: &dyn Adapter) -> Result<()> {
        self.stop_at_start = self.call(0, |_| {})?.is_some_and(|done| done.stop);
        Ok(())
    }
    fn stop_requested(&self) -> bool {
        self.stop_at_start
    }
    fn on_batch_start(&mut self, ctx: &mut HookCtx) -> Result<()> {
        self.batch_hook(1, ctx)
    }
    fn on_batch_forward(&mut self, ctx: &mut HookCtx) -> Result<()> {
        self.batch_hook(2, ctx)
    }
    fn on_batch_backward(&mut self, ctx: &mut HookCtx) -> Result<()> {
        self.batch_hook(3, ctx)
    }
    fn on_batch_end(&mut self, ctx: &mut HookCtx) -> Result<()> {
        self.batch_hook(4, ctx)
    }
    fn on_fit_end(&mut self, _adapter: &dyn Adapter) -> Result<()> {
        let done = self.call(5, |_| {})?;
        self.send_extra = done.and_then(|d| d.send_extra);
        Ok(())
    }
}
