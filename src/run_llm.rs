//! `fedtune run` with `trainer.kind = "lora"`: federated LoRA fine-tuning of
//! the LLM, in one process.
//!
//! The model is loaded once and shared by every simulated client (the
//! round-robin trainer swaps adapters and optimizer state in). `mode` picks
//! the scenario of FS-LLM's Table 2: `fed` runs the course as configured;
//! `global` gives one client everyone's training data (the centralized
//! reference) and the same total number of optimizer steps per round as the
//! federated clients take together; `local` runs one single-client course
//! per client, with no aggregation. In every mode each client's test split is
//! evaluated before training and after the last round, so the three
//! scenarios compare directly.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use fedtune_adapters::adapter::AdapterSpec;
use fedtune_adapters::data::{self, collate, DataSpec, FederatedData, Template, Tokenized};
use fedtune_adapters::hooks::HookScript;
use fedtune_adapters::lora::LoraConfig;
use fedtune_adapters::model::LlamaConfig;
use fedtune_adapters::offsite::{
    build_emulator, distill, plug_into_full, Distilled, Emulator, OffsiteConfig,
};
use fedtune_adapters::peft::{load_adapter, save_adapter};
use fedtune_adapters::pfl::PflScript;
use fedtune_adapters::prompt::{PromptConfig, PromptInit, PromptMethod};
use fedtune_adapters::round_robin::{
    ClientData, LocalTraining, PflConfig, RoundRobinTrainer, StepProgress,
};
use fedtune_adapters::tokenizer::TextTokenizer;
use fedtune_adapters::train::{Batch, TrainConfig};
use fedtune_kernel::config::Mode;
use fedtune_kernel::course::{run_in_process_from, CourseReport, TrainerError};
use fedtune_kernel::script::ScriptSection;
use fedtune_kernel::{
    AggregateError, Aggregator, ClientUpdate, ConfigDoc, CourseConfig, Event, FedAvg, MetricsLog,
    ParamSet, Record,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `[model]`: which base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file; the default model (SmolLM2-135M-Instruct, fetched on first use) when unset.
    pub path: Option<PathBuf>,
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
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            tasks: Vec::new(),
            limit: None,
            batch: 8,
            timeout_s: 10,
        }
    }
}

/// `[train]`: local training on each client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps per client per round.
    pub local_steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// Keep AdamW's moments across rounds.
    pub keep_optimizer_state: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            local_steps: 10,
            batch_size: 4,
            eval_batch_size: 8,
            keep_optimizer_state: false,
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
    #[default]
    Lora,
    Prompt,
    PTuning,
    Prefix,
}

/// The LLM course's sections beyond the kernel's.
#[derive(Debug, Clone, Serialize)]
pub struct LlmSections {
    pub data: DataSpec,
    pub model: ModelSection,
    /// `[adapter]`: the PEFT method.
    pub adapter: AdapterSection,
    pub lora: LoraConfig,
    /// `[prompt]`: prompt tuning, P-tuning and prefix-tuning.
    pub prompt: PromptConfig,
    pub train: TrainSection,
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

impl LlmSections {
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
        if s.offsite.enabled {
            ensure!(
                s.adapter.kind == AdapterKind::Lora,
                "{}: [offsite] trains LoRA inside the emulator's adapter layers; adapter.kind must be \"lora\"",
                doc.origin()
            );
            if let Err(m) = s.offsite.validate(usize::MAX / 2) {
                return Err(doc.key_error("offsite", m).into());
            }
        }
        for name in &s.eval.tasks {
            if let Err(message) = crate::eval_cmd::parse_tasks(name) {
                return Err(doc.key_error("eval.tasks", message).into());
            }
        }
        ensure!(
            s.eval.batch > 0,
            "{}: [eval] batch must be at least 1",
            doc.origin()
        );
        if let Err(message) = s.pfl.validate() {
            let key = message.split(' ').next().unwrap_or("pfl").to_string();
            return Err(doc.key_error(&key, message).into());
        }
        let origin = doc.origin();
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
        Ok(s)
    }
}

impl LlmSections {
    /// FedOT's emulator of `model` and the adapter trained on it (LoRA in
    /// its adapter layers); `None` without `[offsite]`.
    ///
    /// With `offsite.distill_steps` the emulator is first aligned to the
    /// full model on `offsite.distill_data` (read from `data_root`,
    /// tokenized with `tok`).
    pub fn emulator(
        &self,
        model: &fedtune_adapters::model::Llama,
        tok: &TextTokenizer,
        data_root: &Path,
        say: &dyn Fn(&str),
    ) -> Result<Option<(Emulator, AdapterSpec, Distilled)>> {
        if !self.offsite.enabled {
            return Ok(None);
        }
        let o = &self.offsite;
        o.validate(model.config().num_hidden_layers)
            .map_err(anyhow::Error::msg)?;
        let mut emu = build_emulator(model, o)?;
        let (train, held_out) = if o.distill_steps > 0 {
            let spec = DataSpec {
                name: Some(o.distill_data.clone()),
                limit_per_client: o.distill_examples,
                max_tokens: self.data.max_tokens,
                ..DataSpec::default()
            };
            let public = data::build(&spec, data_root, 1)
                .with_context(|| format!("offsite.distill_data `{}`", o.distill_data))?;
            let template = Template::resolve(&spec.template, Path::new("."))?;
            let c = &public.clients[0];
            let pad = tok.eos_id;
            let size = self.train.batch_size;
            let train = public.tokenize(&c.train, &template, tok, spec.max_tokens)?;
            let mut test = public.tokenize(&c.test, &template, tok, spec.max_tokens)?;
            // A tenth as many held out, enough to measure the alignment.
            test.truncate((o.distill_examples / 10).max(1));
            (
                batches(&train, size, Some(0), pad)?,
                batches(&test, size, None, pad)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        if o.distill_steps > 0 {
            say(&format!(
                "aligning the emulator: {} distillation steps on {} ({} batches, {} held out)",
                o.distill_steps,
                o.distill_data,
                train.len(),
                held_out.len()
            ));
        }
        let distilled = distill(model, &mut emu, o, (&train, &held_out), &|step, kl| {
            if step % 10 == 0 {
                tracing::info!(step, kl, "emulator distillation");
            }
        })?;
        if o.distill_steps > 0 {
            say(&format!(
                "emulator aligned: KL(full || emulator) on held-out text {:.4} -> {:.4}",
                distilled.kl_before, distilled.kl_after
            ));
        }
        let spec = AdapterSpec::Lora(o.emulator_lora(&self.lora, emu.kept.len()));
        Ok(Some((emu, spec, distilled)))
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
            let ids = tok.encode_continuation(&config.init_text)?;
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
}

/// What the caller decided about output.
pub struct Output {
    pub dir: PathBuf,
    /// Continue from the newest checkpoint in `dir`.
    pub resume: bool,
    pub data_root: Option<PathBuf>,
    pub quiet: bool,
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ClientSummary {
    id: u32,
    name: String,
    train_examples: usize,
    test_examples: usize,
    test_loss_before: Option<f64>,
    test_loss_after: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Summary {
    course: String,
    mode: Mode,
    rounds: u64,
    clients: u32,
    local_steps: usize,
    /// Sample-weighted mean of the clients' test losses.
    test_loss_before: Option<f64>,
    test_loss_after: Option<f64>,
    /// Unweighted mean over clients of their test loss after the last round
    /// (each with its personal adapter in personalized runs), as FS-LLM reports pFL.
    mean_client_test_loss_after: Option<f64>,
    per_client: Vec<ClientSummary>,
    bytes_up: u64,
    bytes_down: u64,
    wall_s: f64,
    peak_rss_mib: Option<f64>,
    adapter: String,
    /// The `[eval]` tasks' results on the final adapter (each client's, in local mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    eval: Vec<crate::eval_cmd::TaskReport>,
    /// FedOT: the emulator, and the adapter plugged back into the full model.
    #[serde(skip_serializing_if = "Option::is_none")]
    offsite: Option<OffsiteSummary>,
}

/// What FedOT's course ends with.
#[derive(Debug, Serialize)]
pub(crate) struct OffsiteSummary {
    /// The full model's layers the emulator kept.
    kept_layers: Vec<usize>,
    /// Layers of the full model.
    full_layers: usize,
    /// The adapter's trainable parameters.
    trainable_params: usize,
    /// Token-weighted test loss of the adapter plugged into the full model
    /// (the course's own `test_loss_after` is on the emulator).
    test_loss_full_model: Option<f64>,
    /// The full model without any adapter, on the same tokens.
    test_loss_full_model_base: Option<f64>,
    /// The emulator's alignment by distillation, when `offsite.distill_steps` asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    distilled: Option<Distilled>,
}

/// FedOT's end: renames the emulator adapter `params` (LoRA `lora`, in the
/// emulator's numbering) onto the full model's layers, saves it there (PEFT, for the full model) and measures the test
/// loss of the full model with it (and without) over `test` batches.
pub(crate) fn plug_in(
    full: &fedtune_adapters::model::Llama,
    emu: &Emulator,
    (lora, params): (&LoraConfig, &ParamSet),
    test: &[Vec<Batch>],
    (dir, base_name): (&Path, &str),
) -> Result<OffsiteSummary> {
    let plugged = plug_into_full(params, &emu.kept)?;
    let full_cfg = fedtune_adapters::offsite::lora_for_full(lora, &emu.kept);
    let spec = AdapterSpec::Lora(full_cfg);
    save_adapter(dir, &spec, &plugged, full.config(), base_name)?;
    let adapter = spec.build(full, 0)?;
    adapter.load_param_set(&plugged)?;
    adapter.set_grad_enabled(false);
    let loss_of =
        |with: Option<&dyn fedtune_adapters::model::ProjectionAdapter>| -> Result<Option<f64>> {
            let (mut sum, mut tokens) = (0.0, 0usize);
            for batches in test {
                let (s, t) = fedtune_adapters::train::summed_token_loss(full, with, batches)?;
                sum += s;
                tokens += t;
            }
            Ok((tokens > 0).then(|| sum / tokens as f64))
        };
    Ok(OffsiteSummary {
        kept_layers: emu.kept.clone(),
        full_layers: full.config().num_hidden_layers,
        trainable_params: plugged.num_elements(),
        test_loss_full_model: loss_of(Some(
            adapter.as_ref() as &dyn fedtune_adapters::model::ProjectionAdapter
        ))?,
        test_loss_full_model_base: loss_of(None)?,
        distilled: None,
    })
}

/// One client's tokenized data.
struct Prepared {
    name: String,
    train: Vec<Tokenized>,
    test: Vec<Tokenized>,
    val: Vec<Tokenized>,
}

pub fn run(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    log: MetricsLog,
    out: &Output,
) -> Result<()> {
    let started = Instant::now();
    // Build the aggregator first: a broken script fails before the model loads.
    let mut aggregator = match cfg.course.mode {
        Mode::Fed => Some(crate::run::build_aggregator(doc, cfg)?),
        _ => {
            if llm.pfl.enabled() {
                tracing::warn!(
                    "pfl.algorithm is ignored in {:?} mode: personalization needs a federation",
                    cfg.course.mode
                );
            }
            if cfg.aggregator.script.is_some() {
                tracing::warn!(
                    "aggregator.script is ignored in {:?} mode: one client, nothing to combine",
                    cfg.course.mode
                );
            }
            None
        }
    };
    let say = |line: &str| {
        if !out.quiet && !out.json {
            eprintln!("[{:6.1} s] {line}", started.elapsed().as_secs_f64());
        }
    };
    // The model and its tokenizer.
    let base = crate::eval_cmd::Base::load(llm.model.path.as_deref(), &say)?;
    let (model, tok) = (base.model.clone(), base.tok.clone());

    // The data, split and tokenized.
    let root = data::data_root(out.data_root.as_deref());
    let (fed, template) = course_data(doc, cfg, llm, &root)?;
    let prepared = prepare(&fed, &template, &tok, llm.data.max_tokens)?;
    for (c, p) in prepared.iter().enumerate() {
        ensure!(
            !p.train.is_empty(),
            "client {c} ({}) has no training examples",
            p.name
        );
    }
    say(&format!(
        "{}: {} examples over {} clients ({}), template `{}`",
        fed.path.display(),
        fed.examples.len(),
        prepared.len(),
        prepared
            .iter()
            .map(|p| format!("{} {}", p.name, p.train.len()))
            .collect::<Vec<_>>()
            .join(", "),
        template.name
    ));

    let total_rounds = match cfg.course.mode {
        Mode::Local => cfg.course.rounds * prepared.len() as u64,
        _ => cfg.course.rounds,
    };
    let display = Progress::new(out.quiet || out.json, total_rounds);
    let progress = display.steps();
    let pad = tok.eos_id;
    let seed = cfg.course.seed;
    let training = local_training(llm);
    // FedOT trains on the emulator; the full model stays for the final evaluation.
    let emulator = llm.emulator(
        &model,
        &tok,
        &data::data_root(out.data_root.as_deref()),
        &say,
    )?;
    let (model, spec) = match &emulator {
        Some((emu, spec, _)) => {
            say(&format!(
                "offsite-tuning: emulator of {} of {} layers ({:?}), LoRA in layers {:?}",
                emu.kept.len(),
                base.model.config().num_hidden_layers,
                emu.kept,
                llm.offsite.adapter_layers(emu.kept.len())
            ));
            (Arc::new(emu.model.clone()), spec.clone())
        }
        None => (model, llm.spec(&tok)?),
    };
    let initial = RoundRobinTrainer::initial_adapter(&model, &spec, seed).map_err(trainer_error)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let batch = |items: &[Tokenized], size: usize, shuffle: Option<u64>| -> Result<Vec<Batch>> {
        batches(items, size, shuffle, pad)
    };
    let client_data = |p: &Prepared, c: u64| client_data(p, c, llm, seed, pad);

    let log = Arc::new(Mutex::new(Some(log)));
    let mut per_client: Vec<ClientSummary> = prepared
        .iter()
        .enumerate()
        .map(|(c, p)| ClientSummary {
            id: c as u32 + 1,
            name: p.name.clone(),
            train_examples: p.train.len(),
            test_examples: p.test.len(),
            test_loss_before: None,
            test_loss_after: None,
        })
        .collect();
    let adapter_dir = out.dir.join("adapter");
    let base_name = base.file_name();
    let save = |dir: &Path, params: &ParamSet| -> Result<()> {
        Ok(save_adapter(
            dir,
            &spec,
            params,
            model.config(),
            &base_name,
        )?)
    };

    let checkpoints = |sub: &str, inner: Box<dyn Aggregator>| Checkpointing {
        inner,
        every: cfg.course.save_every,
        dir: out.dir.join("checkpoints").join(sub),
        format: Saved::Adapter {
            spec: spec.clone(),
            base: base_name.clone(),
            model: model.config().clone(),
        },
    };
    let start = if out.resume {
        ensure!(
            cfg.course.mode != Mode::Local,
            "--resume continues fed and global courses; a local run is one course per client"
        );
        latest_checkpoint(&out.dir.join("checkpoints"))?
    } else {
        None
    };
    // Where the newest checkpoint lies: an aggregator's saved state comes back from it.
    let resumed_from = start.as_ref().map(|(round, _)| {
        out.dir
            .join("checkpoints")
            .join(format!("round-{round:04}"))
    });
    if let Some((round, _)) = &start {
        display.line(format!(
            "resuming after round {round} from {}",
            out.dir.join("checkpoints").display()
        ));
    }
    let initial = match start {
        Some((round, params)) => Start::After(round, params),
        None => Start::Fresh(initial),
    };
    let mut offsite_summary = None;
    match cfg.course.mode {
        Mode::Fed => {
            let data: BTreeMap<u32, ClientData> = prepared
                .iter()
                .enumerate()
                .map(|(c, p)| Ok((c as u32 + 1, client_data(p, c as u64)?)))
                .collect::<Result<_>>()?;
            let trainer =
                fed_trainer(doc, cfg, llm, (model.clone(), &spec), data)?.with_progress(progress);
            let report = course(
                &runtime,
                cfg,
                initial,
                trainer,
                &log,
                None,
                &display,
                checkpoints("", aggregator.take().expect("built for fed mode"))
                    .restored(resumed_from.as_deref())?,
            )?;
            match &emulator {
                None => save(&adapter_dir, &report.final_params)?,
                Some((emu, emu_spec, distilled)) => {
                    let AdapterSpec::Lora(emu_lora) = emu_spec else {
                        unreachable!("offsite-tuning trains LoRA")
                    };
                    save(&out.dir.join("adapter-emulator"), &report.final_params)?;
                    let test: Vec<Vec<Batch>> = prepared
                        .iter()
                        .map(|p| batch(&p.test, llm.train.eval_batch_size, None))
                        .collect::<Result<_>>()?;
                    let mut summary = plug_in(
                        &base.model,
                        emu,
                        (emu_lora, &report.final_params),
                        &test,
                        (&adapter_dir, &base_name),
                    )?;
                    summary.distilled = (distilled.steps > 0).then(|| distilled.clone());
                    offsite_summary = Some(summary);
                }
            }
        }
        Mode::Global => {
            // One client with everyone's training data, evaluated on each client's test split.
            let all_train: Vec<Tokenized> = prepared.iter().flat_map(|p| p.train.clone()).collect();
            let mut eval = Vec::new();
            for (c, p) in prepared.iter().enumerate() {
                if !p.test.is_empty() {
                    eval.push((
                        format!("test:{}", c + 1),
                        batch(&p.test, llm.train.eval_batch_size, None)?,
                    ));
                }
            }
            let one = ClientData {
                train: batch(&all_train, llm.train.batch_size, Some(seed))?,
                eval,
                n_samples: all_train.len() as u64,
            };
            let mut g_cfg = cfg.clone();
            g_cfg.course.clients = 1;
            g_cfg.course.sample_clients = None;
            let steps = training.local_steps * cfg.clients_per_round() as usize;
            let g_training = LocalTraining {
                local_steps: steps,
                ..training
            };
            let trainer = RoundRobinTrainer::new(
                model.clone(),
                &spec,
                g_training,
                BTreeMap::from([(1, one)]),
                seed,
            )
            .map_err(trainer_error)?
            .with_progress(progress);
            let trainer = with_hooks(trainer, doc, cfg, llm)?;
            let report = course(
                &runtime,
                &g_cfg,
                initial,
                trainer,
                &log,
                None,
                &display,
                checkpoints("", Box::new(FedAvg)),
            )?;
            save(&adapter_dir, &report.final_params)?;
        }
        Mode::Local => {
            let mut l_cfg = cfg.clone();
            l_cfg.course.clients = 1;
            l_cfg.course.sample_clients = None;
            for (c, p) in prepared.iter().enumerate() {
                display.line(format!("local training of client {} ({})", c + 1, p.name));
                let trainer = RoundRobinTrainer::new(
                    model.clone(),
                    &spec,
                    training.clone(),
                    BTreeMap::from([(1, client_data(p, c as u64)?)]),
                    seed,
                )
                .map_err(trainer_error)?
                .with_progress(progress.clone());
                let trainer = with_hooks(trainer, doc, cfg, llm)?;
                let report = course(
                    &runtime,
                    &l_cfg,
                    Start::Fresh(initial.params().clone()),
                    trainer,
                    &log,
                    Some(c as u32 + 1),
                    &display,
                    checkpoints(&format!("client-{}", c + 1), Box::new(FedAvg)),
                )?;
                save(
                    &adapter_dir.join(format!("client-{}", c + 1)),
                    &report.final_params,
                )?;
            }
        }
    }

    // Losses and traffic from the whole metrics file: a resumed course's
    // "before" was logged by the run it continues.
    let records = read_records(&out.dir.join("metrics.jsonl"))?;
    for s in per_client.iter_mut() {
        (s.test_loss_before, s.test_loss_after) = match cfg.course.mode {
            Mode::Global => split_losses(&records, 1, &format!("test:{}", s.id)),
            _ => split_losses(&records, s.id, "test"),
        };
    }
    let (bytes_up, bytes_down) = traffic(&records);
    let mean = |f: fn(&ClientSummary) -> Option<f64>| -> Option<f64> {
        let (mut num, mut den) = (0.0, 0.0);
        for s in &per_client {
            if let Some(v) = f(s) {
                num += v * s.test_examples as f64;
                den += s.test_examples as f64;
            }
        }
        (den > 0.0).then(|| num / den)
    };
    // The full model (with FedOT, `model` is the emulator; the adapter in
    // `adapter/` is the full model's).
    let eval = evaluate_at_end(doc, cfg, llm, &base, &adapter_dir, out, &say)?;
    let summary = Summary {
        course: cfg.course.name.clone(),
        mode: cfg.course.mode,
        rounds: cfg.course.rounds,
        clients: cfg.course.clients,
        local_steps: llm.train.local_steps,
        test_loss_before: mean(|s| s.test_loss_before),
        test_loss_after: mean(|s| s.test_loss_after),
        mean_client_test_loss_after: {
            let after: Vec<f64> = per_client
                .iter()
                .filter_map(|c| c.test_loss_after)
                .collect();
            (!after.is_empty()).then(|| after.iter().sum::<f64>() / after.len() as f64)
        },
        per_client,
        bytes_up,
        bytes_down,
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: crate::bench_train::peak_rss_mib(),
        adapter: adapter_dir.display().to_string(),
        eval,
        offsite: offsite_summary,
    };
    display.finish();
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(out.dir.join("summary.json"), &text)?;
    if out.json {
        println!("{text}");
    } else {
        print_summary(&summary, &out.dir);
    }
    Ok(())
}

/// How each client trains locally.
fn local_training(llm: &LlmSections) -> LocalTraining {
    LocalTraining {
        local_steps: llm.train.local_steps,
        keep_optimizer_state: llm.train.keep_optimizer_state,
        optim: llm.optim.clone(),
    }
}

/// `items` in batches of `size` (shuffled first when `shuffle` gives a seed).
fn batches(items: &[Tokenized], size: usize, shuffle: Option<u64>, pad: u32) -> Result<Vec<Batch>> {
    let mut order: Vec<&Tokenized> = items.iter().collect();
    if let Some(s) = shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(s));
    }
    order
        .chunks(size)
        .map(|c| collate(c, pad, &Device::Cpu).map_err(Into::into))
        .collect()
}

/// Client `c`'s (0-based) batches: training (shuffled by the course seed), val and test.
fn client_data(p: &Prepared, c: u64, llm: &LlmSections, seed: u64, pad: u32) -> Result<ClientData> {
    let mut eval = Vec::new();
    if !p.val.is_empty() {
        eval.push((
            "val".to_string(),
            batches(&p.val, llm.train.eval_batch_size, None, pad)?,
        ));
    }
    if !p.test.is_empty() {
        eval.push((
            "test".to_string(),
            batches(&p.test, llm.train.eval_batch_size, None, pad)?,
        ));
    }
    Ok(ClientData {
        train: batches(&p.train, llm.train.batch_size, Some(seed ^ c), pad)?,
        eval,
        n_samples: p.train.len() as u64,
    })
}

/// The federated trainer over the clients in `data`, with the course's
/// `[pfl]` and `[hooks]` scripts.
fn fed_trainer(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    (model, spec): (Arc<fedtune_adapters::model::Llama>, &AdapterSpec),
    data: BTreeMap<u32, ClientData>,
) -> Result<RoundRobinTrainer> {
    let trainer = RoundRobinTrainer::new(model, spec, local_training(llm), data, cfg.course.seed)
        .map_err(trainer_error)?
        .with_pfl_script(pfl_script(doc, cfg, llm)?);
    with_hooks(trainer, doc, cfg, llm)
}

/// One client's trainer for a client process: the course's data split as
/// `fedtune run` splits it, only client `id`'s part tokenized and batched.
pub(crate) fn client_process_trainer(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    base: &crate::eval_cmd::Base,
    data_root: Option<&Path>,
    id: u32,
) -> Result<RoundRobinTrainer> {
    let data = client_process_data(doc, cfg, llm, &base.tok, data_root, id)?;
    let spec = llm.spec(&base.tok)?;
    fed_trainer(
        doc,
        cfg,
        llm,
        (base.model.clone(), &spec),
        BTreeMap::from([(id, data)]),
    )
}

/// A FedOT client process's trainer: its data is tokenized now, its model
/// (the emulator) comes from the server in a `base_model` message.
pub(crate) fn offsite_client_trainer(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    tok: &TextTokenizer,
    data_root: Option<&Path>,
    id: u32,
) -> Result<OffsiteClient> {
    let data = client_process_data(doc, cfg, llm, tok, data_root, id)?;
    let (doc, cfg, llm) = (doc.clone(), cfg.clone(), llm.clone());
    Ok(OffsiteClient {
        build: Box::new(move |model| {
            let layers = model.config().num_hidden_layers;
            let spec = AdapterSpec::Lora(llm.offsite.emulator_lora(&llm.lora, layers));
            fed_trainer(
                &doc,
                &cfg,
                &llm,
                (model, &spec),
                BTreeMap::from([(id, data.clone())]),
            )
        }),
        inner: None,
        installed: None,
    })
}

/// See [`offsite_client_trainer`].
pub(crate) struct OffsiteClient {
    build: Box<dyn FnMut(Arc<fedtune_adapters::model::Llama>) -> Result<RoundRobinTrainer> + Send>,
    inner: Option<RoundRobinTrainer>,
    /// A fingerprint of the installed base, so a repeated one changes nothing.
    installed: Option<u64>,
}

impl OffsiteClient {
    fn inner(&mut self) -> Result<&mut RoundRobinTrainer, TrainerError> {
        self.inner
            .as_mut()
            .ok_or_else(|| "no emulator from the server yet".into())
    }
}

impl fedtune_kernel::LocalTrainer for OffsiteClient {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &fedtune_kernel::TrainContext,
    ) -> Result<fedtune_kernel::LocalUpdate, TrainerError> {
        self.inner()?.train(client, global, ctx)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &fedtune_kernel::TrainContext,
    ) -> Result<Vec<fedtune_kernel::SplitEval>, TrainerError> {
        self.inner()?.evaluate(client, global, ctx)
    }

    fn install_base(
        &mut self,
        _client: u32,
        base: &ParamSet,
        meta: &fedtune_kernel::message::Meta,
    ) -> Result<(), TrainerError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, t) in base.iter() {
            name.hash(&mut h);
            t.shape().hash(&mut h);
            for x in t.data() {
                x.to_bits().hash(&mut h);
            }
        }
        let print = h.finish();
        if self.installed == Some(print) {
            return Ok(());
        }
        let cfg: LlamaConfig = meta
            .get("llama_config")
            .cloned()
            .ok_or("the base model came without its llama_config")
            .and_then(|v| serde_json::from_value(v).map_err(|_| "a malformed llama_config"))?;
        let model = fedtune_adapters::offsite::model_from_params(
            cfg,
            base,
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        self.inner = Some((self.build)(Arc::new(model)).map_err(|e| e.to_string())?);
        self.installed = Some(print);
        Ok(())
    }
}

/// Client `id`'s batches in a client process: the course's data split as
/// `fedtune run` splits it, only this client's part tokenized.
fn client_process_data(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    tok: &TextTokenizer,
    data_root: Option<&Path>,
    id: u32,
) -> Result<ClientData> {
    let root = data::data_root(data_root);
    let (fed, template) = course_data(doc, cfg, llm, &root)?;
    let c = fed
        .clients
        .get(id as usize - 1)
        .with_context(|| format!("the data has no client {id}"))?;
    let p = Prepared {
        name: c.name.clone(),
        train: fed.tokenize(&c.train, &template, tok, llm.data.max_tokens)?,
        val: fed.tokenize(&c.val, &template, tok, llm.data.max_tokens)?,
        test: fed.tokenize(&c.test, &template, tok, llm.data.max_tokens)?,
    };
    ensure!(
        !p.train.is_empty(),
        "client {id} ({}) has no training examples",
        p.name
    );
    tracing::info!(client = id, name = %p.name, train = p.train.len(), test = p.test.len(), "client data");
    client_data(&p, u64::from(id - 1), llm, cfg.course.seed, tok.eos_id)
}

/// Runs the `[eval]` tasks on the final adapter (on each client's, in local
/// mode), writing results under `OUT/eval/`.
fn evaluate_at_end(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    base: &crate::eval_cmd::Base,
    adapter_dir: &Path,
    out: &Output,
    say: &dyn Fn(&str),
) -> Result<Vec<crate::eval_cmd::TaskReport>> {
    if llm.eval.tasks.is_empty() {
        return Ok(Vec::new());
    }
    let adapters: Vec<(String, PathBuf)> = match cfg.course.mode {
        Mode::Local => (1..=cfg.course.clients)
            .map(|c| {
                (
                    format!("client-{c}/"),
                    adapter_dir.join(format!("client-{c}")),
                )
            })
            .collect(),
        _ => vec![(String::new(), adapter_dir.to_path_buf())],
    };
    let settings = crate::eval_cmd::Settings {
        limit: llm.eval.limit,
        batch: llm.eval.batch,
        samples: 1,
        temperature: 0.0,
        timeout: std::time::Duration::from_secs(llm.eval.timeout_s.max(1)),
        max_new_tokens: None,
        data_root: data::data_root(out.data_root.as_deref()),
        quiet: out.quiet || out.json,
        adapter: None,
    };
    let mut reports = Vec::new();
    for (who, dir) in adapters {
        // The course's own base model, with the adapter it trained.
        let loaded = crate::eval_cmd::Loaded::with_adapter(base.clone(), Some(&dir), say)?;
        let settings = crate::eval_cmd::Settings {
            adapter: Some(dir.clone()),
            ..settings.clone()
        };
        for name in &llm.eval.tasks {
            say(&format!("evaluating {who}{name}"));
            let eval_dir = out.dir.join("eval").join(who.trim_end_matches('/'));
            let mut found =
                crate::eval_cmd::run_named(&loaded, name, &settings, &eval_dir, Some(doc))?;
            for r in &mut found {
                r.task = format!("{who}{}", r.task);
            }
            reports.extend(found);
        }
    }
    Ok(reports)
}

/// The configured aggregator, also writing the global parameters to
/// `dir/round-NNNN/` (plus `state.json` with the round) every `every` rounds.
pub(crate) struct Checkpointing {
    pub inner: Box<dyn Aggregator>,
    pub every: u64,
    pub dir: PathBuf,
    pub format: Saved,
}

/// How a checkpoint holds the parameters.
#[derive(Clone)]
pub(crate) enum Saved {
    /// An adapter (LoRA or prompt learning) in PEFT layout
    /// (`adapter_model.safetensors`, `adapter_config.json`), for a base
    /// model of shape `model` named `base`.
    Adapter {
        spec: AdapterSpec,
        base: String,
        model: LlamaConfig,
    },
    /// Any [`ParamSet`] as MessagePack (`params.msgpack`).
    Params,
}

/// The file a [`Saved::Params`] checkpoint keeps its parameters in.
const PARAMS_FILE: &str = "params.msgpack";

impl Saved {
    /// Writes `params` into `dir`.
    pub(crate) fn save(&self, dir: &Path, params: &ParamSet) -> Result<(), String> {
        match self {
            Saved::Adapter { spec, base, model } => {
                save_adapter(dir, spec, params, model, base).map_err(|e| e.to_string())
            }
            Saved::Params => {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                let bytes = rmp_serde::to_vec_named(params).map_err(|e| e.to_string())?;
                std::fs::write(dir.join(PARAMS_FILE), bytes).map_err(|e| e.to_string())
            }
        }
    }
}

impl Aggregator for Checkpointing {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError> {
        let next = self.inner.aggregate(global, updates, round)?;
        if self.every > 0 && round % self.every == 0 {
            let dir = self.dir.join(format!("round-{round:04}"));
            let saved = self.format.save(&dir, &next).and_then(|()| {
                let state = serde_json::json!({ "round": round, "clients": updates.len() });
                std::fs::write(dir.join("state.json"), state.to_string()).map_err(|e| e.to_string())
            });
            // A checkpoint that cannot be written must not pass unnoticed.
            saved
                .map_err(|e| AggregateError::Other(format!("checkpoint {}: {e}", dir.display())))?;
            self.save_aggregator_state(&dir)?;
            tracing::info!(round, dir = %dir.display(), "checkpoint written");
        }
        Ok(next)
    }
}

/// Where a stateful aggregator (a script's `this`) is saved in a checkpoint.
const AGGREGATOR_STATE: &str = "aggregator_state.msgpack";

impl Checkpointing {
    /// Writes the aggregator's state next to the adapter (nothing for a stateless one).
    fn save_aggregator_state(&self, dir: &Path) -> Result<(), AggregateError> {
        let bytes = match self.inner.save_state() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(()),
            Err(e) => {
                // The adapter is saved; only the script's extra state is not.
                tracing::warn!(
                    "{e}; this checkpoint holds no aggregator state, so a course resumed from it starts the aggregator fresh"
                );
                return Ok(());
            }
        };
        let path = dir.join(AGGREGATOR_STATE);
        std::fs::write(&path, bytes)
            .map_err(|e| AggregateError::Other(format!("checkpoint {}: {e}", path.display())))
    }

    /// Restores the aggregator's state from the checkpoint in `dir`, if it saved one.
    pub(crate) fn restored(mut self, dir: Option<&Path>) -> Result<Self> {
        let Some(path) = dir.map(|d| d.join(AGGREGATOR_STATE)) else {
            return Ok(self);
        };
        if !path.is_file() {
            return Ok(self);
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        self.inner.load_state(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (delete the file to resume with a fresh aggregator state)",
                path.display()
            )
        })?;
        tracing::info!(path = %path.display(), "aggregator state restored");
        Ok(self)
    }
}

/// Finds and compiles the `[hooks]` and `[pfl]` scripts, so that `--dry-run` checks them.
pub fn check_hooks(doc: &ConfigDoc, cfg: &CourseConfig, llm: &LlmSections) -> Result<()> {
    let config_dir = std::path::Path::new(doc.origin()).parent();
    HookScript::from_config(&llm.hooks, &cfg.scripting, config_dir)
        .map_err(|message| doc.key_error("hooks.script", message))?;
    pfl_script(doc, cfg, llm)?;
    Ok(())
}

/// The `[pfl]` script, loaded and checked (none for `algorithm = "none"`).
fn pfl_script(doc: &ConfigDoc, cfg: &CourseConfig, llm: &LlmSections) -> Result<Option<PflScript>> {
    let config_dir = std::path::Path::new(doc.origin()).parent();
    let script =
        PflScript::from_config(&llm.pfl, &cfg.scripting, config_dir).map_err(|message| {
            // A knob's error names the knob (`pfl.lambda must be ≥ 0`); a script's, the algorithm.
            let key = message
                .split_whitespace()
                .next()
                .filter(|k| k.starts_with("pfl."))
                .unwrap_or("pfl.algorithm")
                .to_string();
            doc.key_error(&key, message)
        })?;
    if let Some(s) = &script {
        tracing::info!(script = s.origin(), "personalized FL by script");
    }
    Ok(script)
}

/// Adds the `[hooks]` script, if one is configured, to a trainer.
fn with_hooks(
    trainer: RoundRobinTrainer,
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
) -> Result<RoundRobinTrainer> {
    let config_dir = std::path::Path::new(doc.origin()).parent();
    let hooks = HookScript::from_config(&llm.hooks, &cfg.scripting, config_dir)
        .map_err(|message| doc.key_error("hooks.script", message))?;
    Ok(match hooks {
        Some(h) => {
            tracing::info!(script = h.origin(), "trainer hooks by script");
            trainer.with_hooks(h)
        }
        None => trainer,
    })
}

fn trainer_error(e: fedtune_kernel::course::TrainerError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

/// The course's data, split over its clients, and its prompt template.
pub(crate) fn course_data(
    doc: &ConfigDoc,
    cfg: &CourseConfig,
    llm: &LlmSections,
    root: &Path,
) -> Result<(FederatedData, Template)> {
    let fed = data::build(&llm.data, root, cfg.course.clients as usize)
        .with_context(|| format!("{}: [data]", doc.origin()))?;
    let dir = Path::new(doc.origin()).parent().unwrap_or(Path::new("."));
    let template = Template::resolve(&llm.data.template, dir)?;
    Ok((fed, template))
}

/// Tokenizes every client's splits.
fn prepare(
    fed: &FederatedData,
    template: &Template,
    tok: &TextTokenizer,
    max_tokens: usize,
) -> Result<Vec<Prepared>> {
    fed.clients
        .iter()
        .map(|c| {
            Ok(Prepared {
                name: c.name.clone(),
                train: fed.tokenize(&c.train, template, tok, max_tokens)?,
                val: fed.tokenize(&c.val, template, tok, max_tokens)?,
                test: fed.tokenize(&c.test, template, tok, max_tokens)?,
            })
        })
        .collect()
}

/// Runs one course on the in-process bus, logging to the shared log; records
/// of a single-client course run for client `as_client` are logged under that id.
#[allow(clippy::too_many_arguments)]
fn course(
    runtime: &tokio::runtime::Runtime,
    cfg: &CourseConfig,
    start: Start,
    trainer: RoundRobinTrainer,
    log: &Arc<Mutex<Option<MetricsLog>>>,
    as_client: Option<u32>,
    display: &Arc<Progress>,
    checkpoints: Checkpointing,
) -> Result<CourseReport> {
    let shared = log.clone();
    let display = display.clone();
    let rounds = cfg.course.rounds;
    let relay = MetricsLog::in_memory().with_observer(Box::new(move |r: &Record| {
        let mut r = r.clone();
        if let (Some(id), Some(_)) = (as_client, r.client) {
            r.client = Some(id);
        }
        display.record(&r, rounds);
        if let Ok(mut guard) = shared.lock() {
            if let Some(log) = guard.as_mut() {
                if let Err(e) = log.push(r) {
                    display.line(format!("warning: cannot write metrics: {e}"));
                }
            }
        }
    }));
    let trainer: fedtune_kernel::course::SharedTrainer = Arc::new(Mutex::new(trainer));
    let (completed, params) = match start {
        Start::Fresh(p) => (0, p),
        Start::After(round, p) => (round, p),
    };
    let report = runtime.block_on(run_in_process_from(
        cfg,
        completed,
        params,
        trainer,
        Box::new(checkpoints),
        relay,
    ))?;
    Ok(report)
}

/// Where a course starts: from the initial adapter, or after a completed round.
enum Start {
    Fresh(ParamSet),
    After(u64, ParamSet),
}

impl Start {
    fn params(&self) -> &ParamSet {
        match self {
            Start::Fresh(p) | Start::After(_, p) => p,
        }
    }
}

/// The newest `round-NNNN` checkpoint under `dir`, if any (LoRA or plain parameters).
pub(crate) fn latest_checkpoint(dir: &Path) -> Result<Option<(u64, ParamSet)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let newest = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let round = name.strip_prefix("round-")?.parse::<u64>().ok()?;
            let p = e.path();
            (p.join("adapter_model.safetensors").is_file() || p.join(PARAMS_FILE).is_file())
                .then_some((round, p))
        })
        .max_by_key(|(round, _)| *round);
    match newest {
        None => Ok(None),
        Some((round, path)) if path.join(PARAMS_FILE).is_file() => {
            let file = path.join(PARAMS_FILE);
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let params = rmp_serde::from_slice(&bytes)
                .with_context(|| format!("{} is not a parameter checkpoint", file.display()))?;
            Ok(Some((round, params)))
        }
        Some((round, path)) => {
            let (_, params) = load_adapter(&path)
                .with_context(|| format!("loading the checkpoint {}", path.display()))?;
            Ok(Some((round, params)))
        }
    }
}

/// Every record of a metrics file.
fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))
        })
        .collect()
}

/// The first and last evaluated loss of `split` for `client`.
fn split_losses(records: &[Record], client: u32, split: &str) -> (Option<f64>, Option<f64>) {
    let evals: Vec<&Record> = records
        .iter()
        .filter(|r| {
            r.event == Event::Eval && r.client == Some(client) && r.split.as_deref() == Some(split)
        })
        .collect();
    (
        evals.first().and_then(|r| r.loss),
        evals.last().and_then(|r| r.loss),
    )
}

/// Bytes up and down over every round's record.
pub(crate) fn traffic(records: &[Record]) -> (u64, u64) {
    records
        .iter()
        .filter(|r| r.event == Event::Round)
        .fold((0, 0), |(u, d), r| (u + r.bytes_up, d + r.bytes_down))
}

/// The terminal display: a bar over the course's rounds and one over the
/// current client's local steps, with log lines printed above them. Without
/// a terminal (or with `--quiet`/`--json`) there are no bars, and the lines
/// go to stderr as they are (or nowhere when quiet).
pub(crate) struct Progress {
    multi: MultiProgress,
    rounds: ProgressBar,
    steps: ProgressBar,
    quiet: bool,
    live: bool,
}

impl Progress {
    pub(crate) fn new(quiet: bool, total_rounds: u64) -> Arc<Self> {
        let live = !quiet && std::io::stderr().is_terminal();
        let target = if live {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let style = |t: &str| {
            ProgressStyle::with_template(t)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        };
        let rounds = multi.add(
            ProgressBar::new(total_rounds)
                .with_style(style(
                    "{prefix:>7} [{bar:30}] {pos}/{len} rounds  {elapsed_precise} (eta {eta})",
                ))
                .with_prefix("course"),
        );
        let steps = multi.add(
            ProgressBar::new(1)
                .with_style(style("{prefix:>7} [{bar:30}] {pos}/{len} steps  {msg}"))
                .with_prefix("local"),
        );
        Arc::new(Self {
            multi,
            rounds,
            steps,
            quiet,
            live,
        })
    }

    pub(crate) fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        if self.live {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }

    /// A local-step callback for the trainer.
    fn steps(self: &Arc<Self>) -> StepProgress {
        let me = self.clone();
        Arc::new(move |client, step, steps, loss| {
            me.steps.set_length(steps as u64);
            me.steps.set_position(step as u64);
            me.steps
                .set_message(format!("client {client}, loss {loss:.4}"));
        })
    }

    pub(crate) fn finish(&self) {
        self.steps.finish_and_clear();
        self.rounds.finish_and_clear();
    }

    /// One line per round and per evaluation; the round bar advances.
    pub(crate) fn record(&self, r: &Record, rounds: u64) {
        match (r.event, r.client) {
            (Event::Round, None) => {
                self.rounds.inc(1);
                self.line(format!(
                    "round {}/{rounds}: {} clients trained, {:.1} KB up, {:.1} KB down, {:.1} s",
                    r.round,
                    r.extra.get("clients").copied().unwrap_or(0.0),
                    r.bytes_up as f64 / 1e3,
                    r.bytes_down as f64 / 1e3,
                    r.wall_s
                ));
            }
            (Event::Train, Some(c)) => self.line(format!(
                "  client {c}: mean train loss {:.4} over this round's steps",
                r.loss.unwrap_or(f64::NAN),
            )),
            (Event::Eval, None) => self.line(format!(
                "  evaluation after round {}: {} loss {:.4} ({} examples)",
                r.round,
                r.split.as_deref().unwrap_or("?"),
                r.loss.unwrap_or(f64::NAN),
                r.samples.unwrap_or(0)
            )),
            _ => {}
        }
    }
}

fn print_summary(s: &Summary, dir: &Path) {
    println!(
        "\n{:>4}  {:<24} {:>8} {:>8}  {:>12} {:>12}",
        "id", "client", "train", "test", "loss before", "loss after"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for c in &s.per_client {
        println!(
            "{:>4}  {:<24} {:>8} {:>8}  {:>12} {:>12}",
            c.id,
            c.name,
            c.train_examples,
            c.test_examples,
            fmt(c.test_loss_before),
            fmt(c.test_loss_after)
        );
    }
    println!(
        "{:>4}  {:<24} {:>8} {:>8}  {:>12} {:>12}",
        "",
        "all (weighted)",
        s.per_client.iter().map(|c| c.train_examples).sum::<usize>(),
        s.per_client.iter().map(|c| c.test_examples).sum::<usize>(),
        fmt(s.test_loss_before),
        fmt(s.test_loss_after)
    );
    println!(
        "{:>4}  {:<24} {:>8} {:>8}  {:>12} {:>12}",
        "",
        "mean over clients",
        "",
        "",
        "",
        fmt(s.mean_client_test_loss_after)
    );
    println!(
        "\nmode {:?}, {} rounds × {} local steps: {:.1} KB up, {:.1} KB down, {:.0} s wall, peak RSS {}",
        s.mode,
        s.rounds,
        s.local_steps,
        s.bytes_up as f64 / 1e3,
        s.bytes_down as f64 / 1e3,
        s.wall_s,
        s.peak_rss_mib.map_or("unknown".into(), |m| format!("{m:.0} MiB"))
    );
    println!(
        "adapter (PEFT format) in {}\nresults in {}",
        s.adapter,
        dir.display()
    );
}

/// Fails early, naming the section, when a LoRA course is configured oddly.
pub fn check(cfg: &CourseConfig, llm: &LlmSections) -> Result<()> {
    if llm.offsite.enabled && cfg.course.mode != Mode::Fed {
        bail!("[offsite] (FedOT) applies to mode = \"fed\" only");
    }
    if cfg.course.mode != Mode::Fed
        && cfg
            .course
            .sample_clients
            .is_some_and(|k| k < cfg.course.clients)
    {
        // Sampling only means something for the federated scenario; say so rather than ignore it.
        bail!("federate.sample_clients applies to mode = \"fed\" only");
    }
    Ok(())
}
