//! The course file: every section a course configuration may have, read,
//! overridden, checked and resolved in one place.
//!
//! | section | type | owner |
//! |---|---|---|
//! | `[federate]` | [`CourseSection`](fedtune_kernel::config::CourseSection) | kernel: clients, rounds, sampling, timeouts, scenario |
//! | `[wire]` | [`WireSection`](fedtune_kernel::config::WireSection) | kernel: quantization, compression, message size |
//! | `[aggregator]`, `[scripting]` | [`ScriptSection`](fedtune_kernel::script::ScriptSection), [`ScriptingSection`](fedtune_kernel::script::ScriptingSection) | kernel: the server's script and the sandbox |
//! | `[broker]` | [`BrokerSection`] | kernel: in-process bus or NATS |
//! | `[trainer]` | [`TrainerSection`] | here: the LLM or the numeric reference task |
//! | `[least_squares]` | [`LeastSquaresSection`] | kernel: the numeric reference task |
//! | `[model]`, `[adapter]`, `[train]`, `[eval]` | [`ModelSection`], [`AdapterSection`], [`TrainSection`], [`EvalSection`] | here |
//! | `[lora]`, `[prompt]`, `[offsite]` | [`LoraConfig`], [`PromptConfig`], [`OffsiteConfig`] | the PEFT methods and FedOT |
//! | `[optim]` | [`TrainConfig`] | the training core |
//! | `[data]` | [`DataSpec`] | the data pipeline |
//! | `[hooks]`, `[pfl]` | [`ScriptSection`](fedtune_kernel::script::ScriptSection), [`PflConfig`] | trainer hooks and personalized FL |
//!
//! Every section type denies unknown keys, and every error names the file
//! and key (or the `--set` that supplied it). The resolved configuration —
//! every section with its defaults filled in — is what a run writes to
//! `config.toml`, and `fedtune run` on that file reproduces the run.

use std::path::{Path, PathBuf};

use fedtune_kernel::config::{BrokerSection, ConfigDoc, CourseConfig, Mode};
use fedtune_kernel::course::LeastSquaresSection;
use fedtune_kernel::script::ScriptSection;
use serde::{Deserialize, Serialize};

use super::{ensure, CourseError, Result};
use crate::adapter::AdapterSpec;
use crate::data::DataSpec;
use crate::eval::suite::parse_tasks;
use crate::lora::LoraConfig;
use crate::model::HubId;
use crate::offsite::OffsiteConfig;
use crate::pfl::PflConfig;
use crate::prompt::{PromptConfig, PromptInit, PromptMethod};
use crate::round_robin::LocalTraining;
use crate::tokenizer::TextTokenizer;
use crate::train::TrainConfig;

/// Every top-level section a course file may have.
pub const SECTIONS: [&str; 19] = [
    "adapter",
    "offsite",
    "prompt",
    "broker",
    "eval",
    "federate",
    "wire",
    "aggregator",
    "scripting",
    "privacy",
    "hooks",
    "pfl",
    "trainer",
    "least_squares",
    "data",
    "model",
    "lora",
    "train",
    "optim",
];

/// `[trainer]`: what trains on the clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerSection {
    /// `lora` (the LLM) or `least-squares` (the numeric reference task).
    pub kind: TrainerKind,
}

impl Default for TrainerSection {
    fn default() -> Self {
        Self {
            kind: TrainerKind::Lora,
        }
    }
}

/// See [`TrainerSection::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainerKind {
    /// The LLM, with the PEFT method of `[adapter]`.
    Lora,
    /// Linear least squares on synthetic data.
    LeastSquares,
}

/// `[model]`: which base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file, a Hugging Face directory, or a Hugging Face id
    /// `hf:ORG/NAME[@REVISION]` (downloaded into the Hugging Face cache);
    /// the default model (SmolLM2-135M-Instruct, fetched on first use) when
    /// unset.
    pub path: Option<PathBuf>,
    /// What the frozen base is stored and multiplied in: `f32` (the
    /// default), `bf16` (half the memory; AVX512-BF16 products where the CPU
    /// has them), `int8` (the projections as int8 blocks, the embeddings
    /// and head bf16) or `auto` (bf16 where it has them). Left out of the
    /// resolved config when f32, so earlier runs keep their fingerprint.
    #[serde(skip_serializing_if = "crate::model::Compute::is_f32")]
    pub compute: crate::model::Compute,
    /// Where the model lives and runs: `cpu` (the default, with the fused
    /// kernels), `cuda` or `cuda:N` (a build with `--features cuda`; the
    /// composite ops). Left out of the resolved config when cpu.
    #[serde(skip_serializing_if = "crate::model::DeviceSpec::is_cpu")]
    pub device: crate::model::DeviceSpec,
}

impl ModelSection {
    /// The device and the frozen base's dtype this section asks for.
    pub fn placement(&self) -> crate::model::Placement {
        crate::model::Placement {
            compute: self.compute,
            device: self.device,
        }
    }
}

/// `[eval]`: benchmarks run on the final adapter when the course ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Tasks as `fedtune eval` names them: gsm8k, humaneval, mmlu,
    /// openbookqa, nq-open, helm-mini, mc:FILE, loss (this course's test split).
    pub tasks: Vec<String>,
    /// Evaluate the first N items of each task only.
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Seconds a HumanEval program may run.
    pub timeout_s: u64,
    /// How HumanEval programs are isolated: "strict" (namespaces, a minimal
    /// root, Landlock, seccomp; refuses where the kernel lacks one) or
    /// "basic" (rlimits only; the code runs with your rights).
    pub sandbox: crate::eval::sandbox::Mode,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            tasks: Vec::new(),
            limit: None,
            batch: 8,
            timeout_s: 10,
            sandbox: crate::eval::sandbox::Mode::Strict,
        }
    }
}

/// `[train]`: local training on each client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps per client per round.
    pub local_steps: usize,
    /// When positive: passes over each client's training data per round
    /// instead of `local_steps` (FS-LLM's `batch_or_epoch = "epoch"`).
    pub local_epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// Keep AdamW's moments across rounds.
    pub keep_optimizer_state: bool,
    /// Steps with a non-finite loss or gradient a client's fit may skip
    /// (going on with the next batch; the update is never applied) before
    /// the client counts as diverged (`federate.on_divergence`).
    pub retry_on_nan_loss: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            local_steps: 10,
            local_epochs: 0,
            batch_size: 4,
            eval_batch_size: 8,
            keep_optimizer_state: false,
            retry_on_nan_loss: 0,
        }
    }
}

/// `[adapter]`: which PEFT method the course trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterSection {
    /// `lora` (`[lora]`), or `prompt`, `p-tuning`, `prefix` (`[prompt]`).
    pub kind: AdapterKind,
}

/// See [`AdapterSection::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// LoRA.
    #[default]
    Lora,
    /// Prompt tuning.
    Prompt,
    /// P-tuning.
    PTuning,
    /// Prefix-tuning.
    Prefix,
}

/// The LLM course's sections beyond the kernel's; serialized, each field is
/// a section of the resolved file.
#[derive(Debug, Clone, Serialize)]
pub struct LlmConfig {
    /// `[data]`: the data set and its split over the clients.
    pub data: DataSpec,
    /// `[model]`: the base model.
    pub model: ModelSection,
    /// `[adapter]`: the PEFT method.
    pub adapter: AdapterSection,
    /// `[lora]`: LoRA's rank, scale and target modules.
    pub lora: LoraConfig,
    /// `[prompt]`: prompt tuning, P-tuning and prefix-tuning.
    pub prompt: PromptConfig,
    /// `[train]`: local steps and batch sizes.
    pub train: TrainSection,
    /// `[optim]`: the optimizer.
    pub optim: TrainConfig,
    /// `[hooks]`: a trainer hook script and its hyperparameters.
    pub hooks: ScriptSection,
    /// `[pfl]`: personalized FL (Ditto, pFedMe).
    pub pfl: PflConfig,
    /// `[eval]`: benchmarks at the end of the course.
    pub eval: EvalSection,
    /// `[offsite]`: FedOT, training on an emulator of the model.
    pub offsite: OffsiteConfig,
}

impl LlmConfig {
    /// Reads and checks the LLM sections of `doc`.
    pub fn from_doc(doc: &ConfigDoc) -> Result<Self> {
        let s = Self {
            data: doc.section("data")?,
            model: doc.section("model")?,
            adapter: doc.section("adapter")?,
            lora: doc.section("lora")?,
            prompt: doc.section("prompt")?,
            train: doc.section("train")?,
            optim: doc.section("optim")?,
            hooks: doc.section("hooks")?,
            pfl: doc.section("pfl")?,
            eval: doc.section("eval")?,
            offsite: doc.section("offsite")?,
        };
        let origin = doc.origin();
        if s.offsite.enabled {
            ensure!(
                s.adapter.kind == AdapterKind::Lora,
                "{origin}: [offsite] trains LoRA inside the emulator's adapter layers; adapter.kind must be \"lora\""
            );
            if let Err(e) = s.offsite.validate(usize::MAX / 2) {
                return Err(doc.locate(e).into());
            }
            if s.lora.residual {
                let why = "FedOT renumbers the emulator's LoRA onto the full model; a residual (FedEx-LoRA, FLoRA) is not carried over, so it cannot be used with [offsite]";
                return Err(doc.key_error("lora.residual", why.into()).into());
            }
            if s.model.compute != crate::model::Compute::F32 {
                let why = "FedOT builds, aligns and trains layers of the emulator in full, which needs the f32 base; remove model.compute (or set it to \"f32\") with [offsite]";
                return Err(doc.key_error("model.compute", why.into()).into());
            }
        }
        for name in &s.eval.tasks {
            if let Err(e) = parse_tasks(name) {
                return Err(doc.key_error("eval.tasks", e.to_string()).into());
            }
        }
        ensure!(
            s.eval.batch > 0,
            "{origin}: [eval] batch must be at least 1"
        );
        if let Err(e) = s.pfl.validate() {
            return Err(doc.locate(e).into());
        }
        ensure!(
            s.train.local_steps > 0 && s.train.batch_size > 0 && s.train.eval_batch_size > 0,
            "{origin}: [train] local_steps, batch_size and eval_batch_size must be at least 1"
        );
        ensure!(
            s.lora.r > 0 && !s.lora.target_modules.is_empty(),
            "{origin}: [lora] needs r >= 1 and at least one target module"
        );
        ensure!(
            s.prompt.num_virtual_tokens > 0 && s.prompt.encoder_hidden_size > 0,
            "{origin}: [prompt] num_virtual_tokens and encoder_hidden_size must be at least 1"
        );
        ensure!(
            s.optim.lr > 0.0 && s.optim.grad_accum > 0,
            "{origin}: [optim] lr must be positive and grad_accum at least 1"
        );
        ensure!(
            s.data.name.is_some() || s.data.path.is_some(),
            "{origin}: a LoRA course needs a [data] section with `name` or `path`"
        );
        let hub_id = s
            .model
            .path
            .as_ref()
            .and_then(|p| p.to_str())
            .and_then(HubId::parse);
        if let Some(Err(e)) = hub_id {
            return Err(doc.key_error("model.path", e.to_string()).into());
        }
        Ok(s)
    }

    /// Fails early, naming the section, when the course's scenario and its
    /// LLM sections do not go together.
    fn check_scenario(&self, cfg: &CourseConfig) -> Result<()> {
        // Sampling only means something for the federated scenario; say so rather than ignore it.
        let samples = cfg
            .course
            .sample_clients
            .is_some_and(|k| k < cfg.course.clients);
        ensure!(
            cfg.course.mode == Mode::Fed || !samples,
            "federate.sample_clients applies to mode = \"fed\" only"
        );
        Ok(())
    }

    /// The adapter the course trains; a text-initialized prompt is
    /// tokenized with `tok` (and has as many virtual tokens as the text has tokens).
    pub fn spec(&self, tok: &TextTokenizer) -> Result<AdapterSpec> {
        let method = match self.adapter.kind {
            AdapterKind::Lora => return Ok(AdapterSpec::Lora(self.lora.clone())),
            AdapterKind::Prompt => PromptMethod::Prompt,
            AdapterKind::PTuning => PromptMethod::PTuning,
            AdapterKind::Prefix => PromptMethod::Prefix,
        };
        let mut config = self.prompt.clone();
        let from_text = match method {
            PromptMethod::Prompt => true,
            PromptMethod::Prefix => !config.prefix_projection,
            PromptMethod::PTuning => false,
        };
        let init_ids = if from_text && config.init == PromptInit::Text {
            let ids = tok
                .encode_continuation(&config.init_text)
                .map_err(|e| CourseError::invalid(format!("[prompt] init_text: {e}")))?;
            ensure!(!ids.is_empty(), "[prompt] init_text is empty");
            config.num_virtual_tokens = ids.len();
            Some(ids)
        } else {
            None
        };
        Ok(AdapterSpec::Prompt {
            method,
            config,
            init_ids,
        })
    }

    /// How each client trains locally.
    pub fn local_training(&self) -> LocalTraining {
        LocalTraining {
            local_steps: self.train.local_steps,
            local_epochs: self.train.local_epochs,
            keep_optimizer_state: self.train.keep_optimizer_state,
            retry_on_nan_loss: self.train.retry_on_nan_loss,
            optim: self.optim.clone(),
        }
    }
}

/// What trains on the clients, with its sections.
#[derive(Debug, Clone)]
pub enum Task {
    /// The LLM course.
    Llm(Box<LlmConfig>),
    /// The numeric reference task.
    LeastSquares(LeastSquaresSection),
}

/// A course file, read, overridden, checked and resolved.
#[derive(Debug, Clone)]
pub struct CourseFile {
    /// The document as read, with the overrides applied (errors are located in it).
    pub doc: ConfigDoc,
    /// The kernel's sections.
    pub cfg: CourseConfig,
    /// `[broker]`.
    pub broker: BrokerSection,
    /// `[trainer]`.
    pub trainer: TrainerSection,
    /// What trains on the clients.
    pub task: Task,
}

impl CourseFile {
    /// Reads `path`, applies the `--set` overrides and checks everything a
    /// course needs before it starts, scripts included.
    pub fn load(path: &Path, set: &[String]) -> Result<Self> {
        let mut doc = ConfigDoc::load(path)?;
        for arg in set {
            doc.apply_override(arg)?;
        }
        Self::from_doc(doc)
    }

    /// Checks a document already read (see [`Self::load`]).
    pub fn from_doc(doc: ConfigDoc) -> Result<Self> {
        doc.check_sections(&SECTIONS)?;
        let cfg = CourseConfig::from_doc(&doc)?;
        let trainer: TrainerSection = doc.section("trainer")?;
        let broker: BrokerSection = doc.section("broker")?;
        let task = match trainer.kind {
            TrainerKind::Lora => {
                let llm = LlmConfig::from_doc(&doc)?;
                llm.check_scenario(&cfg)?;
                Task::Llm(Box::new(llm))
            }
            TrainerKind::LeastSquares => {
                Task::LeastSquares(LeastSquaresSection::from_doc(&doc, cfg.course.clients)?)
            }
        };
        let course = Self {
            doc,
            cfg,
            broker,
            trainer,
            task,
        };
        // Find and compile the scripts now, so that --dry-run checks them too.
        super::scripts::check(&course)?;
        Ok(course)
    }

    /// The folder of the config file: scripts and templates are also looked for there.
    pub fn dir(&self) -> Option<&Path> {
        Path::new(self.doc.origin()).parent()
    }

    /// Every section with its defaults filled in, as TOML (what `config.toml` holds).
    pub fn resolved(&self) -> Result<String> {
        let mut table = toml::Table::new();
        let mut add = |name: &str, value: std::result::Result<toml::Value, toml::ser::Error>| {
            value
                .map(|v| {
                    table.insert(name.to_string(), v);
                })
                .map_err(|e| CourseError::invalid(format!("cannot write [{name}]: {e}")))
        };
        let cfg = &self.cfg;
        add("federate", toml::Value::try_from(&cfg.course))?;
        add("wire", toml::Value::try_from(&cfg.wire))?;
        add("aggregator", toml::Value::try_from(&cfg.aggregator))?;
        add("scripting", toml::Value::try_from(&cfg.scripting))?;
        add("trainer", toml::Value::try_from(&self.trainer))?;
        add("broker", toml::Value::try_from(&self.broker))?;
        match &self.task {
            Task::LeastSquares(ls) => add("least_squares", toml::Value::try_from(ls))?,
            Task::Llm(llm) => {
                let toml::Value::Table(sections) =
                    toml::Value::try_from(llm.as_ref()).map_err(|e| {
                        CourseError::invalid(format!("cannot write the LLM sections: {e}"))
                    })?
                else {
                    return Err(CourseError::invalid("the LLM sections are not a table"));
                };
                for (name, value) in sections {
                    add(&name, Ok(value))?;
                }
            }
        }
        toml::to_string(&table)
            .map_err(|e| CourseError::invalid(format!("cannot write the configuration: {e}")))
    }

    /// A fingerprint of the resolved configuration but `federate.rounds`
    /// (more rounds is how a finished course is extended): checkpoints carry
    /// it, and a course resumes only from checkpoints with its own.
    pub fn fingerprint(&self) -> Result<String> {
        let mut table: toml::Table = self
            .resolved()?
            .parse()
            .map_err(|e| CourseError::invalid(format!("the resolved configuration: {e}")))?;
        if let Some(toml::Value::Table(f)) = table.get_mut("federate") {
            f.remove("rounds");
        }
        let text = toml::to_string(&table)
            .map_err(|e| CourseError::invalid(format!("the resolved configuration: {e}")))?;
        // FNV-1a, 64 bits: stable across builds and platforms.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Ok(format!("{hash:016x}"))
    }

    /// `[model] path`, a relative one found as scripts and `extends` are:
    /// relative to the working directory, else to the config file's folder.
    /// `None` for the default model (or a numeric course).
    pub fn model_path(&self) -> Option<PathBuf> {
        let path = self.llm().ok()?.model.path.as_ref()?;
        if path.is_absolute() || path.exists() {
            return Some(path.clone());
        }
        let beside = self.dir().map(|d| d.join(path));
        Some(
            beside
                .filter(|p| p.exists())
                .unwrap_or_else(|| path.clone()),
        )
    }

    /// The LLM sections, or an error for a numeric course.
    pub fn llm(&self) -> Result<&LlmConfig> {
        match &self.task {
            Task::Llm(llm) => Ok(llm),
            Task::LeastSquares(_) => Err(CourseError::invalid(format!(
                "{}: this needs an LLM course (trainer.kind = \"lora\")",
                self.doc.origin()
            ))),
        }
    }
}

/// Refuses to resume a run whose configuration changed in anything but
/// `federate.rounds` (more rounds is how a finished course is extended).
pub fn same_config_but_rounds(previous: &Path, resolved: &str) -> Result<()> {
    let old = std::fs::read_to_string(previous).map_err(|e| {
        CourseError::invalid(format!("--resume: cannot read {}: {e}", previous.display()))
    })?;
    let strip = |text: &str| -> Result<toml::Table> {
        let mut t: toml::Table = text.parse().map_err(|e| {
            CourseError::invalid(format!("--resume: {} is not TOML: {e}", previous.display()))
        })?;
        if let Some(toml::Value::Table(f)) = t.get_mut("federate") {
            f.remove("rounds");
        }
        Ok(t)
    };
    ensure!(
        strip(&old)? == strip(resolved)?,
        "--resume: the configuration differs from {} (only federate.rounds may change)",
        previous.display()
    );
    Ok(())
}
