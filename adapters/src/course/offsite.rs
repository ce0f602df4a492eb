//! FedOT in a course: the emulator the clients train on (optionally aligned
//! to the full model by distillation first), the model the server sends
//! each joining client, and the trained adapter plugged back into the full
//! model at the end. The emulator itself is [`crate::offsite`]'s.

use std::collections::BTreeMap;
use std::path::Path;

use fedtune_kernel::{Meta, ParamSet};
use serde::{Deserialize, Serialize};

use super::config::LlmConfig;
use super::data::batches;
use super::store::AdapterStore;
use super::{Context, Result};
use crate::adapter::AdapterSpec;
use crate::data::{self, DataSpec, Template};
use crate::model::{Llama, LlamaConfig, ProjectionAdapter};
use crate::offsite::{
    build_emulator, distill, load_emulator, plug_into_full, save_emulator, spec_for_full,
    Distilled, Emulator,
};
use crate::tokenizer::TextTokenizer;
use crate::train::{summed_token_loss, Batch};

/// What a `base_model` message says about the weights it carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseModelInfo {
    /// The emulator's shape.
    pub llama_config: LlamaConfig,
    /// The full model's layers the emulator kept.
    pub kept_layers: Vec<usize>,
}

impl BaseModelInfo {
    /// The emulator's weights and description, as the server sends them to every joining client.
    pub fn message(emu: &Emulator) -> Result<(ParamSet, Meta)> {
        let weights = crate::offsite::model_params(&emu.model).context("the emulator's weights")?;
        let info = Self {
            llama_config: emu.model.config().clone(),
            kept_layers: emu.kept.clone(),
        };
        let meta = match serde_json::to_value(&info).context("describing the emulator")? {
            serde_json::Value::Object(fields) => fields.into_iter().collect(),
            _ => Meta::new(),
        };
        Ok((weights, meta))
    }

    /// Reads the description a `base_model` message carries.
    pub fn from_meta(meta: &Meta) -> Result<Self, serde_json::Error> {
        let fields: serde_json::Map<String, serde_json::Value> =
            meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        serde_json::from_value(serde_json::Value::Object(fields))
    }
}

/// FedOT's emulator of `model` and the adapter trained on it (LoRA in its
/// adapter layers); `None` without `[offsite]`.
///
/// With `offsite.distill_steps` the emulator is first aligned to the full
/// model on `offsite.distill_data` (read from `data_root`, tokenized with
/// `tok`). With `offsite.emulator_path` the emulator saved there is reused
/// when it was made from the same model file (`model_path`) and settings,
/// and the one built is saved there otherwise.
pub fn emulator(
    llm: &LlmConfig,
    (model, model_path): (&Llama, &Path),
    tok: &TextTokenizer,
    data_root: &Path,
    say: &dyn Fn(&str),
) -> Result<Option<(Emulator, AdapterSpec, Distilled)>> {
    if !llm.offsite.enabled {
        return Ok(None);
    }
    let o = &llm.offsite;
    o.validate(model.config().num_hidden_layers)
        .map_err(super::CourseError::invalid)?;
    let saved = match &o.emulator_path {
        Some(dir) => Some((dir, origin(llm, model_path)?)),
        None => None,
    };
    if let Some((dir, origin)) = &saved {
        let found = load_emulator(dir, origin, model.dtype(), model.device())
            .with_context(|| format!("offsite.emulator_path {}", dir.display()))?;
        if let Some((emu, distilled)) = found {
            say(&format!(
                "reusing the emulator saved in {} (layers {:?}; aligned in {} steps, KL {:.4} -> {:.4})",
                dir.display(),
                emu.kept,
                distilled.steps,
                distilled.kl_before,
                distilled.kl_after
            ));
            let spec = o.emulator_spec(&llm.lora, emu.kept.len());
            return Ok(Some((emu, spec, distilled)));
        }
    }
    let mut emu = build_emulator(model, o).context("building the emulator")?;
    let (train, held_out) = if o.distill_steps > 0 {
        distillation_data(llm, tok, data_root)?
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
    })
    .context("aligning the emulator")?;
    if o.distill_steps > 0 {
        say(&format!(
            "emulator aligned: KL(full || emulator) on held-out text {:.4} -> {:.4}",
            distilled.kl_before, distilled.kl_after
        ));
    }
    if let Some((dir, origin)) = &saved {
        save_emulator(dir, &emu, &distilled, origin)
            .with_context(|| format!("saving the emulator to {}", dir.display()))?;
        say(&format!(
            "emulator saved in {}: courses with offsite.emulator_path = {:?} reuse it",
            dir.display(),
            dir.display().to_string()
        ));
    }
    let spec = o.emulator_spec(&llm.lora, emu.kept.len());
    Ok(Some((emu, spec, distilled)))
}

/// What a saved emulator must have been made from to be reused: the full
/// model's bytes, the `[offsite]` settings and what shapes distillation's
/// batches.
fn origin(llm: &LlmConfig, model_path: &Path) -> Result<serde_json::Value> {
    let digest = crate::fetch::content_digest(model_path)
        .with_context(|| format!("reading {}", model_path.display()))?;
    // Where it is kept and what clients train on it do not make an emulator.
    let settings = crate::offsite::OffsiteConfig {
        emulator_path: None,
        tune: crate::offsite::Tune::Lora,
        ..llm.offsite.clone()
    };
    let mut origin = serde_json::json!({
        "offsite": settings,
        "distill_batch_size": llm.train.batch_size,
        "distill_max_tokens": llm.data.max_tokens,
    });
    origin[crate::offsite::ORIGIN_MODEL_DIGEST] = digest.into();
    Ok(origin)
}

/// Public text for the emulator's alignment: training batches and a tenth
/// as many held out, enough to measure it.
fn distillation_data(
    llm: &LlmConfig,
    tok: &TextTokenizer,
    data_root: &Path,
) -> Result<(Vec<Batch>, Vec<Batch>)> {
    let o = &llm.offsite;
    let spec = DataSpec {
        name: Some(o.distill_data.clone()),
        limit_per_client: o.distill_examples,
        max_tokens: llm.data.max_tokens,
        ..DataSpec::default()
    };
    let public = data::build(&spec, data_root, 1)
        .with_context(|| format!("offsite.distill_data `{}`", o.distill_data))?;
    let template = Template::resolve(&spec.template, Path::new("."))
        .context("the distillation data's template")?;
    let c = &public.clients[0];
    let pad = tok.eos_id;
    let size = llm.train.batch_size;
    let train = public
        .tokenize(&c.train, &template, tok, spec.max_tokens)
        .context("tokenizing the distillation data")?;
    let mut test = public
        .tokenize(&c.test, &template, tok, spec.max_tokens)
        .context("tokenizing the distillation data")?;
    test.truncate((o.distill_examples / 10).max(1));
    Ok((
        batches(&train, size, Some(0), pad)?,
        batches(&test, size, None, pad)?,
    ))
}

/// What FedOT's (or LocalOT's) course ends with.
#[derive(Debug, Serialize)]
pub struct OffsiteSummary {
    /// The full model's layers the emulator kept.
    pub kept_layers: Vec<usize>,
    /// Layers of the full model.
    pub full_layers: usize,
    /// The adapter's trainable parameters.
    pub trainable_params: usize,
    /// Token-weighted test loss of the adapter plugged into the full model
    /// (in a local course each client's own, on its own test split; the
    /// course's own `test_loss_after` is on the emulator).
    pub test_loss_full_model: Option<f64>,
    /// The full model without any adapter, on the same tokens.
    pub test_loss_full_model_base: Option<f64>,
    /// LocalOT: each client's own adapter in the full model, on its own
    /// test split (`test_loss_full_model` is their token-weighted mean).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub clients_test_loss_full_model: BTreeMap<u32, f64>,
    /// The emulator's alignment by distillation, when `offsite.distill_steps` asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distilled: Option<Distilled>,
}

/// One adapter trained on the emulator, for [`plug_in`]: its parameters,
/// where the full model's version goes, and the test batches it answers for.
pub struct Trained<'a> {
    /// The adapter, in the emulator's numbering.
    pub params: &'a ParamSet,
    /// The directory for the full model's adapter.
    pub dir: &'a Path,
    /// The test batches (per client) it is scored on.
    pub test: &'a [Vec<Batch>],
    /// The client whose own adapter it is (LocalOT); `None` for the course's.
    pub client: Option<u32>,
}

/// FedOT's end (and LocalOT's, one adapter per client): renames each
/// emulator adapter (of `spec`, in the emulator's numbering) onto the full
/// model's layers, saves it (for the full model named `base_name`) and
/// measures the token-weighted test loss of the full model with each
/// adapter on its own test batches, and without any on all of them.
pub fn plug_in(
    full: &Llama,
    emu: &Emulator,
    spec: &AdapterSpec,
    trained: &[Trained<'_>],
    base_name: &str,
) -> Result<OffsiteSummary> {
    let spec = spec_for_full(spec, &emu.kept).context("the adapter for the full model")?;
    let store = AdapterStore::new(spec.clone(), full.config().clone(), base_name);
    let loss_of =
        |with: Option<&dyn ProjectionAdapter>, test: &[Vec<Batch>]| -> Result<(f64, usize)> {
            let (mut sum, mut tokens) = (0.0, 0usize);
            for batches in test {
                let (s, t) =
                    summed_token_loss(full, with, batches).context("scoring the full model")?;
                sum += s;
                tokens += t;
            }
            Ok((sum, tokens))
        };
    let mean = |(sum, tokens): (f64, usize)| (tokens > 0).then(|| sum / tokens as f64);
    let (mut with, mut without) = ((0.0, 0), (0.0, 0));
    let mut trainable_params = 0;
    let mut per_client = BTreeMap::new();
    for t in trained {
        let plugged =
            plug_into_full(t.params, &emu.kept).context("renaming the emulator adapter")?;
        store.write(t.dir, &plugged)?;
        let adapter = spec
            .build(full, 0)
            .context("building the plugged adapter")?;
        adapter
            .load_param_set(&plugged)
            .context("loading the plugged adapter")?;
        adapter.set_grad_enabled(false);
        let (s, n) = loss_of(Some(adapter.as_ref() as &dyn ProjectionAdapter), t.test)?;
        with = (with.0 + s, with.1 + n);
        if let (Some(id), Some(loss)) = (t.client, mean((s, n))) {
            per_client.insert(id, loss);
        }
        let (s, n) = loss_of(None, t.test)?;
        without = (without.0 + s, without.1 + n);
        trainable_params = plugged.num_elements();
    }
    Ok(OffsiteSummary {
        kept_layers: emu.kept.clone(),
        full_layers: full.config().num_hidden_layers,
        trainable_params,
        test_loss_full_model: mean(with),
        test_loss_full_model_base: mean(without),
        clients_test_loss_full_model: per_client,
        distilled: None,
    })
}
