//! Personalized FL as scripts (`scripts/pfl/*.rhai`).
//!
//! A pFL script defines `fit(ctx)`, called at the start of each client's local
//! fit. It returns the fit's *plan*: a list of native operations that the
//! trainer then runs in order. The script decides the algorithm's shape; the
//! operations do the tensor work:
//!
//! | operation | what it does |
//! |---|---|
//! | `train(steps)` | optimizer steps on the adapter the client sends back (the `[hooks]` script applies) |
//! | `train_personal(steps, lambda, anchor)` | steps on the client's personal adapter θ with the loss + λ/2‖θ − a‖², where `a` is `"global"` (the adapter received this round) or `"local"` (the sent adapter as it stands now); an optional fifth argument sets its learning rate |
//! | `pull_to_personal(rate)` | moves the sent adapter towards θ: w ← w − rate·(w − θ) |
//! | `keep_local(pattern)` | tensors whose PEFT names match the regular expression stay on the client; the server gets its own values back |
//! | `freeze(pattern)` | the sent adapter's tensors whose PEFT names match do not train in this fit (FFA-LoRA freezes `lora_A`) |
//! | `train_only(pattern)` | only the sent adapter's tensors whose PEFT names match train in this fit |
//!
//! `ctx` holds `round`, `client`, `local_steps`, `samples`, `lr` and
//! `has_personal`. A client with a personal adapter is evaluated with it. As
//! with hooks, `this` is a map kept per client, `this.hp` holds the `[pfl]`
//! knobs and `[pfl.params]`, the file reloads when it changes and errors name
//! file and line.
//!
//! ```
//! # use fedtune_adapters::pfl::{FitOp, Anchor, plan_of};
//! // Ditto in four lines: the usual update, then a personal adapter pulled towards the global one.
//! let plan = plan_of("fn fit(ctx) {
//!     [train(ctx.local_steps), train_personal(ctx.local_steps, this.hp.lambda, \"global\")]
//! }", "lambda = 0.5", 4).unwrap();
//! assert_eq!(plan[1], FitOp::TrainPersonal { steps: 4, lambda: 0.5, anchor: Anchor::Global, lr: None });
//! ```

use std::path::Path;

use fedtune_kernel::script::rhai::{Array, Dynamic, Engine, EvalAltResult, Map, Position};
use fedtune_kernel::script::{
    ScriptError, ScriptLoadError, ScriptSection, ScriptSource, ScriptingSection,
};
use fedtune_kernel::KeyError;
use serde::{Deserialize, Serialize};

use crate::hooks::PerClientScript;

/// The pFL scripts shipped in `scripts/pfl/`.
pub const BUILT_IN_PFL: [(&str, &str); 5] = [
    ("ditto", include_str!("../scripts/pfl/ditto.rhai")),
    ("pfedme", include_str!("../scripts/pfl/pfedme.rhai")),
    (
        "local_adapter",
        include_str!("../scripts/pfl/local_adapter.rhai"),
    ),
    ("ffa_lora", include_str!("../scripts/pfl/ffa_lora.rhai")),
    ("fedsa_lora", include_str!("../scripts/pfl/fedsa_lora.rhai")),
];

/// Why the `[pfl]` section cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PflError {
    /// A knob is out of range.
    #[error(transparent)]
    Knob(#[from] KeyError),
    /// The algorithm's script is not found or does not compile.
    #[error(transparent)]
    Load(#[from] ScriptLoadError),
}

impl PflError {
    /// The config key at fault: the knob's, or `pfl.algorithm` for the script.
    pub fn key(&self) -> &str {
        match self {
            PflError::Knob(k) => &k.key,
            PflError::Load(_) => "pfl.algorithm",
        }
    }
}

/// Personalized FL: the script and its knobs (the `[pfl]` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PflConfig {
    /// `none`, a shipped script (`ditto`, `pfedme`, `local_adapter`) or the
    /// path of a `.rhai` file defining `fit(ctx)`.
    pub algorithm: String,
    /// λ, the pull of the personal adapter towards its anchor: the personal
    /// objective is loss + λ/2 · ‖θ − w‖².
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
    /// More hyperparameters for a script of your own (`this.hp.NAME`).
    pub params: toml::Table,
}

impl Default for PflConfig {
    fn default() -> Self {
        Self {
            algorithm: "none".into(),
            lambda: 0.1,
            personal_steps: None,
            personal_lr: None,
            inner_steps: 2,
            eta: 1.0,
            local_params: String::new(),
            params: toml::Table::new(),
        }
    }
}

impl PflConfig {
    /// Whether an algorithm is chosen.
    pub fn enabled(&self) -> bool {
        !matches!(self.algorithm.as_str(), "" | "none")
    }

    /// Checks the knobs, naming the one at fault.
    pub fn validate(&self) -> Result<(), KeyError> {
        let bad = |key: &str, message: String| Err(KeyError::new(key, format!("{key} {message}")));
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad("pfl.lambda", format!("must be ≥ 0, got {}", self.lambda));
        }
        if self.inner_steps == 0 {
            return bad("pfl.inner_steps", "must be at least 1".into());
        }
        if self.personal_steps == Some(0) {
            return bad("pfl.personal_steps", "must be at least 1".into());
        }
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return bad("pfl.eta", format!("must be > 0, got {}", self.eta));
        }
        if self.algorithm == "local_adapter" && self.local_params.is_empty() {
            return bad("pfl.local_params", "must name the local parts (a regular expression over tensor names, e.g. \"lora_B\")".into());
        }
        if let Err(e) = regex::Regex::new(&self.local_params) {
            return bad(
                "pfl.local_params",
                format!("is not a valid regular expression: {e}"),
            );
        }
        if let Some(lr) = self.personal_lr {
            if !(lr.is_finite() && lr > 0.0) {
                return bad("pfl.personal_lr", format!("must be > 0, got {lr}"));
            }
        }
        Ok(())
    }

    /// What the script reads as `this.hp`: the knobs that are set, then `params`.
    fn hp(&self) -> Map {
        let mut hp = ScriptSection {
            script: None,
            params: self.params.clone(),
        }
        .hp();
        let mut set = |k: &str, v: Dynamic| {
            hp.entry(k.into()).or_insert(v);
        };
        set("lambda", Dynamic::from(self.lambda));
        set("inner_steps", Dynamic::from(self.inner_steps as i64));
        set("eta", Dynamic::from(self.eta));
        if let Some(n) = self.personal_steps {
            set("personal_steps", Dynamic::from(n as i64));
        }
        if let Some(lr) = self.personal_lr {
            set("personal_lr", Dynamic::from(lr));
        }
        if !self.local_params.is_empty() {
            set("local_params", Dynamic::from(self.local_params.clone()));
        }
        hp
    }
}

/// What a personal adapter is pulled towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The global adapter the client received this round (Ditto).
    Global,
    /// The adapter the client will send, as it stands (pFedMe).
    Local,
}

/// One operation of a client's local fit.
#[derive(Debug, Clone, PartialEq)]
pub enum FitOp {
    /// Optimizer steps on the adapter sent to the server.
    Train {
        /// Steps.
        steps: usize,
    },
    /// Optimizer steps on the personal adapter, with a proximal pull.
    TrainPersonal {
        /// Steps.
        steps: usize,
        /// λ of the pull λ/2‖θ − anchor‖².
        lambda: f64,
        /// What θ is pulled towards.
        anchor: Anchor,
        /// Learning rate (default: the optimizer's).
        lr: Option<f64>,
    },
    /// w ← w − rate·(w − θ).
    PullToPersonal {
        /// The rate.
        rate: f64,
    },
    /// Tensors matching the pattern stay on the client.
    KeepLocal {
        /// A regular expression over PEFT tensor names.
        pattern: String,
    },
    /// Which of the sent adapter's tensors train in this fit's `train` steps.
    Trainable {
        /// A regular expression over PEFT tensor names.
        pattern: String,
        /// True: only the matching tensors train; false: the matching ones are frozen.
        only: bool,
    },
}

impl FitOp {
    /// Optimizer steps the operation takes.
    pub fn steps(&self) -> usize {
        match self {
            FitOp::Train { steps } | FitOp::TrainPersonal { steps, .. } => *steps,
            _ => 0,
        }
    }
}

fn runtime_err(message: String) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message),
        Position::NONE,
    ))
}

fn positive_steps(what: &str, steps: i64) -> Result<usize, Box<EvalAltResult>> {
    if steps < 1 {
        return Err(runtime_err(format!(
            "{what}({steps}): steps must be at least 1"
        )));
    }
    Ok(steps as usize)
}

fn personal_op(
    steps: i64,
    lambda: f64,
    anchor: &str,
    lr: Option<f64>,
) -> Result<FitOp, Box<EvalAltResult>> {
    let steps = positive_steps("train_personal", steps)?;
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(runtime_err(format!(
            "train_personal: lambda must be finite and ≥ 0, got {lambda}"
        )));
    }
    let anchor = match anchor {
        "global" => Anchor::Global,
        "local" => Anchor::Local,
        other => {
            return Err(runtime_err(format!(
                "train_personal: the anchor is \"global\" or \"local\", not {other:?}"
            )))
        }
    };
    if let Some(lr) = lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(runtime_err(format!(
                "train_personal: the learning rate must be > 0, got {lr}"
            )));
        }
    }
    Ok(FitOp::TrainPersonal {
        steps,
        lambda,
        anchor,
        lr,
    })
}

/// Registers the plan operations on a script engine.
pub fn register_pfl_api(engine: &mut Engine) {
    engine.register_type_with_name::<FitOp>("FitOp");
    engine.register_fn("to_string", |op: &mut FitOp| format!("{op:?}"));
    engine.register_fn("train", |steps: i64| {
        positive_steps("train", steps).map(|steps| FitOp::Train { steps })
    });
    engine.register_fn("train_personal", |steps: i64, lambda: f64, anchor: &str| {
        personal_op(steps, lambda, anchor, None)
    });
    engine.register_fn(
        "train_personal",
        |steps: i64, lambda: f64, anchor: &str, lr: f64| {
            personal_op(steps, lambda, anchor, Some(lr))
        },
    );
    engine.register_fn("pull_to_personal", |rate: f64| {
        if !rate.is_finite() {
            return Err(runtime_err(format!(
                "pull_to_personal: the rate must be finite, got {rate}"
            )));
        }
        Ok(FitOp::PullToPersonal { rate })
    });
    for (name, only) in [("train_only", true), ("freeze", false)] {
        engine.register_fn(name, move |pattern: &str| {
            regex::Regex::new(pattern).map_err(|e| {
                runtime_err(format!(
                    "{name}: {pattern:?} is not a regular expression: {e}"
                ))
            })?;
            Ok::<_, Box<EvalAltResult>>(FitOp::Trainable {
                pattern: pattern.to_string(),
                only,
            })
        });
    }
    engine.register_fn("keep_local", |pattern: &str| {
        if pattern.is_empty() {
            return Err(runtime_err(
                "keep_local: the pattern is empty (set pfl.local_params, e.g. \"lora_B\")".into(),
            ));
        }
        regex::Regex::new(pattern).map_err(|e| {
            runtime_err(format!(
                "keep_local: {pattern:?} is not a regular expression: {e}"
            ))
        })?;
        Ok(FitOp::KeepLocal {
            pattern: pattern.to_string(),
        })
    });
}

/// Where a client's fit stands when the script plans it.
#[derive(Debug, Clone, Copy)]
pub struct FitAt {
    /// The round.
    pub round: u64,
    /// The client.
    pub client: u32,
    /// `train.local_steps`.
    pub local_steps: usize,
    /// The client's training examples.
    pub samples: u64,
    /// The optimizer's learning rate.
    pub lr: f64,
    /// Whether the client already has a personal adapter.
    pub has_personal: bool,
}

/// A loaded pFL script with per-client state.
pub struct PflScript {
    inner: PerClientScript,
}

impl PflScript {
    /// Loads the script `pfl` selects (`Ok(None)` for `none`), after checking its knobs.
    pub fn from_config(
        pfl: &PflConfig,
        scripting: &ScriptingSection,
        config_dir: Option<&Path>,
    ) -> Result<Option<Self>, PflError> {
        pfl.validate()?;
        if !pfl.enabled() {
            return Ok(None);
        }
        let section = ScriptSection {
            script: Some(pfl.algorithm.clone()),
            params: toml::Table::new(),
        };
        let Some(source) = section
            .resolve_in(config_dir, &BUILT_IN_PFL)
            .map_err(ScriptLoadError::from)?
        else {
            return Ok(None);
        };
        Ok(Some(
            Self::new(scripting, &source, pfl.hp()).map_err(ScriptLoadError::from)?,
        ))
    }

    /// Compiles `source`; it must define `fit(ctx)`.
    pub fn new(
        scripting: &ScriptingSection,
        source: &ScriptSource,
        hp: Map,
    ) -> Result<Self, ScriptError> {
        let inner = PerClientScript::new(scripting, source, hp, register_pfl_api)?;
        inner.file().require_fn("fit", 1)?;
        Ok(Self { inner })
    }

    /// The script, as errors name it.
    pub fn origin(&self) -> &str {
        self.inner.file().origin()
    }

    /// Client `client`'s script state, as bytes.
    pub fn save_client(
        &self,
        client: u32,
    ) -> Result<Option<Vec<u8>>, fedtune_kernel::script::state::StateError> {
        self.inner.save_client(client)
    }

    /// Gives client `client` back its saved script state.
    pub fn load_client(
        &mut self,
        client: u32,
        bytes: &[u8],
    ) -> Result<(), fedtune_kernel::script::state::StateError> {
        self.inner.load_client(client, bytes)
    }

    /// The plan of one client's fit; `Ok(None)` when the script failed and the
    /// policy is `skip` (the caller trains as plain FedAvg).
    pub fn plan(&mut self, at: FitAt) -> Result<Option<Vec<FitOp>>, ScriptError> {
        if self.inner.refresh() {
            match self.inner.file().require_fn("fit", 1) {
                Ok(()) => tracing::info!(
                    script = self.origin(),
                    "pfl script changed on disk: the new version runs from now on"
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let mut ctx = Map::new();
        ctx.insert("round".into(), Dynamic::from(at.round as i64));
        ctx.insert("client".into(), Dynamic::from(i64::from(at.client)));
        ctx.insert("local_steps".into(), Dynamic::from(at.local_steps as i64));
        ctx.insert("samples".into(), Dynamic::from(at.samples as i64));
        ctx.insert("lr".into(), Dynamic::from(at.lr));
        ctx.insert("has_personal".into(), Dynamic::from(at.has_personal));
        let doing = format!("fit, round {}, client {}", at.round, at.client);
        let Some(out) = self
            .inner
            .call(at.client, "fit", (Dynamic::from_map(ctx),), &doing)?
        else {
            return Ok(None);
        };
        let located = |message: String| ScriptError::unplaced(self.origin(), message, &doing);
        let type_name = out.type_name().to_string();
        let Some(items) = out.try_cast::<Array>() else {
            return Err(located(format!(
                "`fit` must return an array of operations (train, train_personal, pull_to_personal, keep_local), it returned {type_name}"
            )));
        };
        let mut plan = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let type_name = item.type_name().to_string();
            plan.push(item.try_cast::<FitOp>().ok_or_else(|| {
                located(format!(
                    "`fit` returned {type_name} at index {i}, not an operation"
                ))
            })?);
        }
        let trains = plan.iter().any(|op| op.steps() > 0);
        if !trains {
            return Err(located(
                "the plan trains nothing: add train(…) or train_personal(…)".into(),
            ));
        }
        let mut personal = at.has_personal;
        for (i, op) in plan.iter().enumerate() {
            match op {
                FitOp::TrainPersonal { .. } => personal = true,
                FitOp::PullToPersonal { .. } if !personal => {
                    return Err(located(format!(
                        "pull_to_personal at index {i} comes before any train_personal: there is no personal adapter yet"
                    )))
                }
                _ => {}
            }
        }
        Ok(Some(plan))
    }
}

/// The plan `script` makes for client 1 in round 1 with `local_steps`, its
/// `this.hp` from the TOML text `hp` (for docs and tests).
pub fn plan_of(script: &str, hp: &str, local_steps: usize) -> Result<Vec<FitOp>, ScriptError> {
    let error = |message: String, doing: &str| ScriptError::unplaced("<plan>", message, doing);
    let params: toml::Table = hp
        .parse()
        .map_err(|e: toml::de::Error| error(e.to_string(), "reading the hyperparameters"))?;
    let hp = ScriptSection {
        script: None,
        params,
    }
    .hp();
    let text: &'static str = Box::leak(script.to_string().into_boxed_str());
    let source = ScriptSource::BuiltIn { name: "plan", text };
    let mut s = PflScript::new(&ScriptingSection::default(), &source, hp)?;
    let at = FitAt {
        round: 1,
        client: 1,
        local_steps,
        samples: 1,
        lr: 1e-3,
        has_personal: false,
    };
    s.plan(at)?
        .ok_or_else(|| error("the script failed and was skipped".into(), "planning"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_in(name: &str, cfg: PflConfig, steps: usize) -> Vec<FitOp> {
        let mut s = PflScript::from_config(
            &PflConfig {
                algorithm: name.into(),
                ..cfg
            },
            &ScriptingSection::default(),
            None,
        )
        .unwrap()
        .unwrap();
        s.plan(FitAt {
            round: 1,
            client: 1,
            local_steps: steps,
            samples: 10,
            lr: 1e-3,
            has_personal: false,
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn shipped_scripts_plan_what_their_papers_do() {
        let ditto = built_in(
            "ditto",
            PflConfig {
                lambda: 0.3,
                personal_steps: Some(5),
                ..PflConfig::default()
            },
            4,
        );
        assert_eq!(
            ditto,
            [
                FitOp::Train { steps: 4 },
                FitOp::TrainPersonal {
                    steps: 5,
                    lambda: 0.3,
                    anchor: Anchor::Global,
                    lr: None
                }
            ]
        );
        // pFedMe: 6 steps in outer steps of K = 2, each followed by w ← w − ηλ(w − θ).
        let me = built_in(
            "pfedme",
            PflConfig {
                lambda: 0.5,
                eta: 2.0,
                personal_lr: Some(0.01),
                ..PflConfig::default()
            },
            6,
        );
        let outer = [
            FitOp::TrainPersonal {
                steps: 2,
                lambda: 0.5,
                anchor: Anchor::Local,
                lr: Some(0.01),
            },
            FitOp::PullToPersonal { rate: 1.0 },
        ];
        assert_eq!(
            me,
            outer.iter().cycle().take(6).cloned().collect::<Vec<_>>()
        );
        let local = built_in(
            "local_adapter",
            PflConfig {
                local_params: "lora_B".into(),
                ..PflConfig::default()
            },
            3,
        );
        assert_eq!(
            local,
            [
                FitOp::KeepLocal {
                    pattern: "lora_B".into()
                },
                FitOp::Train { steps: 3 }
            ]
        );
    }

    #[test]
    fn bad_plans_are_script_errors_with_file_and_line() {
        let cases = [
            (
                "fn fit(ctx) { [train(0)] }",
                "train(0): steps must be at least 1",
            ),
            ("fn fit(ctx) { 3 }", "must return an array"),
            (
                "fn fit(ctx) { [train(1), 2] }",
                "at index 1, not an operation",
            ),
            ("fn fit(ctx) { [keep_local(\"lora_B\")] }", "trains nothing"),
            (
                "fn fit(ctx) { [train(1), train_personal(1, 0.1, \"mine\")] }",
                "not \"mine\"",
            ),
            (
                "fn fit(ctx) { [pull_to_personal(0.5), train_personal(1, 0.1, \"local\")] }",
                "before any train_personal",
            ),
            (
                "fn fit(ctx) { [keep_local(\"(\")] }",
                "not a regular expression",
            ),
        ];
        for (script, want) in cases {
            let e = plan_of(script, "", 2).unwrap_err().to_string();
            assert!(e.contains(want), "{script}: {e}");
            assert!(e.starts_with("<built-in plan>:"), "{e}");
        }
        let e = plan_of("fn fit(ctx) {\n  [train(ctx.nope + 1)]\n}", "", 2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("<built-in plan>:2:"), "{e}");
        let e = plan_of("fn plan(ctx) { [] }", "", 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fit"), "{e}");
    }

    #[test]
    fn knobs_are_checked_and_reach_the_script() {
        let bad = PflConfig {
            algorithm: "local_adapter".into(),
            ..PflConfig::default()
        };
        let e = PflScript::from_config(&bad, &ScriptingSection::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pfl.local_params"), "{e}");
        let e = PflScript::from_config(
            &PflConfig {
                algorithm: "nope".into(),
                ..PflConfig::default()
            },
            &ScriptingSection::default(),
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("shipped: ditto, pfedme, local_adapter"), "{e}");
        assert!(
            PflScript::from_config(&PflConfig::default(), &ScriptingSection::default(), None)
                .unwrap()
                .is_none()
        );
        // [pfl.params] reach this.hp next to the knobs.
        let plan = plan_of("fn fit(ctx) { [train(this.hp.warm)] }", "warm = 7", 2).unwrap();
        assert_eq!(plan, [FitOp::Train { steps: 7 }]);
    }
}
