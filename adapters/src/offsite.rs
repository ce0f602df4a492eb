//! Offsite-tuning (Xiao et al., 2023), federated as FS-LLM's FedOT.
//!
//! The model owner (the server) never sends the full model. It builds an
//! *emulator*: the first `emu_l` and last `emu_r` decoder layers are the
//! adapter that clients fine-tune, and the layers between them are
//! compressed by uniform layer dropping — of the `m` middle layers, `round(m
//! · (1 − drop_ratio))` evenly spaced ones are kept (FS-LLM used drop ratios
//! 0.2 and 0.5). Clients receive the emulator's frozen weights and train
//! LoRA inside its adapter layers with FedAvg; the trained adapter plugs
//! back into the full model, where its layers are the full model's first
//! `emu_l` and last `emu_r`.
//!
//! Building the emulator is the course's model pre-processing step: the
//! server runs it before the course and sends its result to every client
//! that joins, so any other compression of the middle (distillation,
//! quantization) fits the same place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use fedtune_kernel::{KeyError, ParamSet};
use serde::{Deserialize, Serialize};

use crate::adapter::AdapterSpec;
use crate::full::FullConfig;
use crate::lora::LoraConfig;
use crate::model::{Llama, LlamaConfig};

/// `[offsite]`: FedOT's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffsiteConfig {
    /// Train on an emulator instead of the full model.
    pub enabled: bool,
    /// Adapter layers at the bottom.
    pub emu_l: usize,
    /// Adapter layers at the top.
    pub emu_r: usize,
    /// Fraction of the middle layers dropped.
    pub drop_ratio: f64,
    /// Align the emulator to the full model before the course: optimizer
    /// steps of distillation on public data (0: no alignment).
    pub distill_steps: usize,
    /// The public data set distillation reads (a built-in name).
    pub distill_data: String,
    /// Examples of it used (a tenth held out to measure the alignment).
    pub distill_examples: usize,
    /// Distillation's learning rate (AdamW on LoRA in the kept middle layers).
    pub distill_lr: f64,
    /// A directory for the (aligned) emulator: a course reuses the one saved
    /// there when it was made from the same model and settings, and saves
    /// the one it builds there otherwise.
    pub emulator_path: Option<PathBuf>,
    /// What clients train in the adapter layers: `lora` (LoRA as `[lora]`
    /// says) or `full` (every projection, as offsite-tuning does).
    #[serde(skip_serializing_if = "Tune::is_lora")]
    pub tune: Tune,
}

/// See [`OffsiteConfig::tune`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tune {
    /// LoRA inside the adapter layers.
    #[default]
    Lora,
    /// The adapter layers' projections in full.
    Full,
}

impl Tune {
    fn is_lora(&self) -> bool {
        *self == Tune::Lora
    }
}

impl Default for OffsiteConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            emu_l: 2,
            emu_r: 2,
            drop_ratio: 0.5,
            distill_steps: 0,
            distill_data: "dolly".into(),
            distill_examples: 200,
            distill_lr: 1e-4,
            emulator_path: None,
            tune: Tune::Lora,
        }
    }
}

impl OffsiteConfig {
    /// Checks the settings against a model of `layers` layers.
    pub fn validate(&self, layers: usize) -> std::result::Result<(), KeyError> {
        if self.emu_l + self.emu_r == 0 {
            return Err(KeyError::new(
                "offsite.emu_l",
                "offsite.emu_l + offsite.emu_r must be at least 1",
            ));
        }
        if self.emu_l + self.emu_r > layers {
            return Err(KeyError::new(
                "offsite.emu_l",
                format!(
                    "offsite.emu_l + offsite.emu_r ({}) exceed the model's {layers} layers",
                    self.emu_l + self.emu_r
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.drop_ratio) {
            return Err(KeyError::new(
                "offsite.drop_ratio",
                format!(
                    "offsite.drop_ratio must be in [0, 1], got {}",
                    self.drop_ratio
                ),
            ));
        }
        Ok(())
    }

    /// The full model's layers the emulator keeps, in order.
    pub fn kept_layers(&self, layers: usize) -> Vec<usize> {
        let (l, r) = (self.emu_l, self.emu_r);
        let m = layers.saturating_sub(l + r);
        let k = ((m as f64) * (1.0 - self.drop_ratio)).round() as usize;
        let middle = (0..k).map(|j| l + j * m / k.max(1));
        (0..l).chain(middle).chain(layers - r..layers).collect()
    }

    /// The emulator's adapter layers, in its own numbering.
    pub fn adapter_layers(&self, emulator_layers: usize) -> Vec<usize> {
        (0..self.emu_l)
            .chain(emulator_layers - self.emu_r..emulator_layers)
            .collect()
    }

    /// `lora` restricted to the emulator's adapter layers.
    pub fn emulator_lora(&self, lora: &LoraConfig, emulator_layers: usize) -> LoraConfig {
        LoraConfig {
            layers_to_transform: Some(self.adapter_layers(emulator_layers)),
            ..lora.clone()
        }
    }

    /// What clients train on an emulator of `emulator_layers` layers: LoRA
    /// (`lora` in the adapter layers) or the adapter layers in full.
    pub fn emulator_spec(&self, lora: &LoraConfig, emulator_layers: usize) -> AdapterSpec {
        match self.tune {
            Tune::Lora => AdapterSpec::Lora(self.emulator_lora(lora, emulator_layers)),
            Tune::Full => AdapterSpec::Full(FullConfig::every_projection(
                self.adapter_layers(emulator_layers),
            )),
        }
    }
}

/// The emulator of a model and where its layers came from.
pub struct Emulator {
    /// The compressed model (sharing the full model's tensors).
    pub model: Llama,
    /// For each emulator layer, the full model's layer.
    pub kept: Vec<usize>,
}

/// Builds the emulator of `full` (see the module docs).
pub fn build_emulator(full: &Llama, cfg: &OffsiteConfig) -> Result<Emulator> {
    let layers = full.config().num_hidden_layers;
    cfg.validate(layers).map_err(candle_core::Error::msg)?;
    let kept = cfg.kept_layers(layers);
    Ok(Emulator {
        model: full.with_layers(&kept)?,
        kept,
    })
}

/// What aligning an emulator did: the mean per-token KL divergence of its
/// next-token distributions from the full model's, on held-out public text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distilled {
    /// Optimizer steps taken.
    pub steps: usize,
    /// KL(full ‖ emulator) before alignment.
    pub kl_before: f64,
    /// KL(full ‖ emulator) after.
    pub kl_after: f64,
}

/// Mean KL(full ‖ emulator) per counted token of `batch` (`emulator` with `adapter`).
fn kl(
    full: &Llama,
    emulator: &Llama,
    adapter: Option<&dyn crate::model::ProjectionAdapter>,
    batch: &crate::train::Batch,
) -> Result<Tensor> {
    use candle_nn::ops::log_softmax;
    let mask = Some(&batch.attention_mask);
    let p_logits = full.forward(&batch.tokens, mask, None)?.detach();
    let q_logits = emulator.forward(&batch.tokens, mask, adapter)?;
    let log_p = log_softmax(&p_logits, candle_core::D::Minus1)?;
    let p = log_p.exp()?;
    let log_q = log_softmax(&q_logits, candle_core::D::Minus1)?;
    let per_token = (p * (log_p - log_q)?)?.sum(candle_core::D::Minus1)?; // (b, t)
    let keep = batch.attention_mask.to_dtype(per_token.dtype())?;
    let n = keep.sum_all()?;
    (per_token * keep)?.sum_all()?.broadcast_div(&n)
}

/// Aligns `emu` to `full` by distillation, as offsite-tuning does before
/// handing the emulator out: LoRA (r 8, every projection) in the emulator's
/// kept middle layers is trained to bring its next-token distributions on
/// public text (`train`) close to the full model's (KL divergence), then
/// merged into those layers' weights. `held_out` measures the alignment.
pub fn distill(
    full: &Llama,
    emu: &mut Emulator,
    cfg: &OffsiteConfig,
    (train, held_out): (&[crate::train::Batch], &[crate::train::Batch]),
    progress: &dyn Fn(usize, f64),
) -> Result<Distilled> {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let n = emu.kept.len();
    let middle: Vec<usize> = (cfg.emu_l..n - cfg.emu_r).collect();
    let mean_kl = |model: &Llama| -> Result<f64> {
        let mut sum = 0.0;
        for b in held_out {
            sum += kl(full, model, None, b)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sum / held_out.len().max(1) as f64)
    };
    let kl_before = mean_kl(&emu.model)?;
    if middle.is_empty() || cfg.distill_steps == 0 || train.is_empty() {
        return Ok(Distilled {
            steps: 0,
            kl_before,
            kl_after: kl_before,
        });
    }
    let lora_cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: crate::model::Projection::ALL
            .iter()
            .map(|p| p.name().to_string())
            .collect(),
        layers_to_transform: Some(middle),
        residual: false,
    };
    let model = &emu.model;
    let lora = crate::lora::Lora::new(model.config(), lora_cfg, 7, model.dtype(), model.device())?;
    let mut opt = AdamW::new(
        crate::lora::Lora::named_vars(&lora)
            .into_iter()
            .map(|(_, v)| v)
            .collect(),
        ParamsAdamW {
            lr: cfg.distill_lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
    for step in 0..cfg.distill_steps {
        let b = &train[step % train.len()];
        let loss = kl(full, model, Some(&lora), b)?;
        progress(step + 1, loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        opt.backward_step(&loss)?;
    }
    let aligned = model.with_deltas(|layer, p| lora.merged_delta(layer, p))?;
    let kl_after = mean_kl(&aligned)?;
    emu.model = aligned;
    Ok(Distilled {
        steps: cfg.distill_steps,
        kl_before,
        kl_after,
    })
}

/// Every frozen weight of `model` as a `ParamSet` (f32, Hugging Face names):
/// what the server sends a client.
pub fn model_params(model: &Llama) -> Result<ParamSet> {
    let mut set = ParamSet::new();
    for (name, t) in model.named_weights() {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        set.insert(name, t.dims().to_vec(), data)
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(set)
}

/// The model of shape `cfg` whose weights `params` holds (see [`model_params`]).
pub fn model_from_params(
    cfg: LlamaConfig,
    params: &ParamSet,
    dtype: DType,
    device: &Device,
) -> Result<Llama> {
    Llama::from_named(cfg, |name| {
        let t = params
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("the model lacks `{name}`")))?;
        Tensor::from_slice(t.data(), t.shape(), device)?.to_dtype(dtype)
    })
}

/// `layers.{i}.` → `layers.{kept[i]}.` in every name: an adapter trained on
/// the emulator, renamed for the full model.
pub fn plug_into_full(params: &ParamSet, kept: &[usize]) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, t) in params.iter() {
        out.insert_tensor(rename_layer(name, kept)?, t.clone());
    }
    Ok(out)
}

/// The spec of an emulator adapter (LoRA or layers trained in full), for
/// the full model: its layers renumbered as the full model's.
pub fn spec_for_full(spec: &AdapterSpec, kept: &[usize]) -> Result<AdapterSpec> {
    let renumber = |layers: &[usize]| -> Result<Vec<usize>> {
        layers
            .iter()
            .map(|&i| {
                kept.get(i).copied().ok_or_else(|| {
                    candle_core::Error::msg(format!("the emulator has no layer {i}"))
                })
            })
            .collect()
    };
    Ok(match spec {
        AdapterSpec::Lora(cfg) => AdapterSpec::Lora(LoraConfig {
            layers_to_transform: cfg
                .layers_to_transform
                .as_deref()
                .map(renumber)
                .transpose()?,
            ..cfg.clone()
        }),
        AdapterSpec::Full(cfg) => AdapterSpec::Full(FullConfig {
            layers_to_transform: renumber(&cfg.layers_to_transform)?,
            ..cfg.clone()
        }),
        AdapterSpec::Prompt { .. } => {
            candle_core::bail!("offsite-tuning trains LoRA or full layers, not prompts")
        }
    })
}

fn rename_layer(name: &str, kept: &[usize]) -> Result<String> {
    const KEY: &str = ".layers.";
    let Some(at) = name.find(KEY) else {
        return Ok(name.to_string());
    };
    let rest = &name[at + KEY.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let i: usize = digits
        .parse()
        .map_err(|_| candle_core::Error::msg(format!("`{name}` has no layer number")))?;
    let full = kept.get(i).ok_or_else(|| {
        candle_core::Error::msg(format!("`{name}`: the emulator has no layer {i}"))
    })?;
    Ok(format!(
        "{}{KEY}{full}{}",
        &name[..at],
        &rest[digits.len()..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_dropping_keeps_the_ends_and_spaces_the_middle_evenly() {
        let c = |l, r, d| OffsiteConfig {
            enabled: true,
            emu_l: l,
            emu_r: r,
            drop_ratio: d,
            ..OffsiteConfig::default()
        };
        // SmolLM2-135M has 30 layers; FS-LLM's settings.
        let half = c(2, 2, 0.5).kept_layers(30);
        assert_eq!(half.len(), 2 + 13 + 2);
        assert_eq!(&half[..4], &[0, 1, 2, 4]);
        assert_eq!(&half[half.len() - 3..], &[26, 28, 29]);
        let fifth = c(2, 2, 0.2).kept_layers(30);
        assert_eq!(fifth.len(), 2 + 21 + 2);
        assert!(fifth.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(c(2, 2, 0.0).kept_layers(30), (0..30).collect::<Vec<_>>());
        assert_eq!(c(1, 1, 1.0).kept_layers(6), vec![0, 5]);
        assert_eq!(c(2, 2, 0.5).adapter_layers(17), vec![0, 1, 15, 16]);
        assert!(c(20, 20, 0.5).validate(30).is_err());
    }

    #[test]
    fn emulator_names_map_back_to_the_full_models_layers() {
        let kept = [0, 1, 3, 5, 6];
        assert_eq!(
            rename_layer(
                "base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight",
                &kept
            )
            .unwrap(),
            "base_model.model.model.layers.6.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            rename_layer("model.norm.weight", &kept).unwrap(),
            "model.norm.weight"
        );
        assert!(rename_layer("model.layers.9.x", &kept).is_err());
    }
}

/// The description saved beside an emulator's weights.
#[derive(Serialize, Deserialize)]
struct SavedEmulator {
    /// What it was made from (see [`save_emulator`]).
    origin: serde_json::Value,
    llama_config: LlamaConfig,
    kept_layers: Vec<usize>,
    distilled: Distilled,
}

/// The key of a saved emulator's `origin` that holds the full model's
/// content digest ([`crate::fetch::content_digest`]).
pub const ORIGIN_MODEL_DIGEST: &str = "model_sha256";

const EMULATOR_WEIGHTS: &str = "emulator.safetensors";
const EMULATOR_INFO: &str = "emulator.json";

/// Saves `emu` (and how it was aligned) in `dir`: its weights as
/// `emulator.safetensors`, its shape, kept layers, alignment and `origin` —
/// whatever must match for a later course to reuse it (the full model's
/// digest, the `[offsite]` settings) — as `emulator.json`.
pub fn save_emulator(
    dir: &Path,
    emu: &Emulator,
    distilled: &Distilled,
    origin: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| candle_core::Error::msg(format!("creating {}: {e}", dir.display())))?;
    let weights: HashMap<String, Tensor> = emu.model.named_weights().into_iter().collect();
    candle_core::safetensors::save(&weights, dir.join(EMULATOR_WEIGHTS))?;
    let info = SavedEmulator {
        origin: origin.clone(),
        llama_config: emu.model.config().clone(),
        kept_layers: emu.kept.clone(),
        distilled: distilled.clone(),
    };
    let text = serde_json::to_string_pretty(&info).map_err(candle_core::Error::wrap)?;
    let path = dir.join(EMULATOR_INFO);
    std::fs::write(&path, text)
        .map_err(|e| candle_core::Error::msg(format!("writing {}: {e}", path.display())))
}

/// The emulator [`save_emulator`] left in `dir`, with its alignment; `None`
/// when `dir` holds none. One made from another `origin` is an error naming
/// what differs, not silently replaced: the directory may be another
/// course's.
pub fn load_emulator(
    dir: &Path,
    origin: &serde_json::Value,
    dtype: DType,
    device: &Device,
) -> Result<Option<(Emulator, Distilled)>> {
    let Some(info) = read_info(dir)? else {
        return Ok(None);
    };
    if &info.origin != origin {
        return Err(info_error(
            dir,
            format!(
                "the emulator saved here was made from other settings ({}); \
                 point offsite.emulator_path elsewhere or delete the directory",
                differences(&info.origin, origin).join(", ")
            ),
        ));
    }
    load_weights(dir, info, dtype, device).map(Some)
}

/// The emulator saved in `dir` for evaluation (FS-LLM's `eval_type =
/// "emu"`), checking that it was made from the full model whose content
/// digest ([`crate::fetch::content_digest`]) is `model_sha256`: that model
/// supplies the tokenizer.
pub fn open_emulator(
    dir: &Path,
    model_sha256: &str,
    dtype: DType,
    device: &Device,
) -> Result<(Emulator, Distilled)> {
    let info = read_info(dir)?.ok_or_else(|| {
        candle_core::Error::msg(format!(
            "{} holds no emulator ({EMULATOR_INFO}): give the directory a FedOT \
             course saved with offsite.emulator_path",
            dir.display()
        ))
    })?;
    let made_from = info.origin[ORIGIN_MODEL_DIGEST].as_str();
    if made_from != Some(model_sha256) {
        return Err(info_error(
            dir,
            format!(
                "the emulator was made from another model (SHA-256 {}, this one's is \
                 {model_sha256}); give the model it was made from with --model",
                made_from.unwrap_or("unrecorded")
            ),
        ));
    }
    load_weights(dir, info, dtype, device)
}

/// `message` about the `emulator.json` in `dir`.
fn info_error(dir: &Path, message: String) -> candle_core::Error {
    candle_core::Error::msg(format!("{}: {message}", dir.join(EMULATOR_INFO).display()))
}

/// The description in `dir`, `None` when it has none.
fn read_info(dir: &Path) -> Result<Option<SavedEmulator>> {
    let path = dir.join(EMULATOR_INFO);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| info_error(dir, e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| info_error(dir, e.to_string()))
}

/// The weights `info` describes, from `dir`.
fn load_weights(
    dir: &Path,
    info: SavedEmulator,
    dtype: DType,
    device: &Device,
) -> Result<(Emulator, Distilled)> {
    let weights = candle_core::safetensors::load(dir.join(EMULATOR_WEIGHTS), device)?;
    let model = Llama::from_named(info.llama_config, |name| {
        weights
            .get(name)
            .ok_or_else(|| info_error(dir, format!("the saved weights lack `{name}`")))?
            .to_dtype(dtype)
    })?;
    let emu = Emulator {
        model,
        kept: info.kept_layers,
    };
    Ok((emu, info.distilled))
}

/// `key: saved → now` for each top-level key (one level into objects)
/// where two origins differ.
fn differences(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        saved.as_object().unwrap_or(&empty),
        now.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null));
        match (x, y) {
            (serde_json::Value::Object(_), serde_json::Value::Object(_)) if x != y => {
                out.extend(differences(x, y).into_iter().map(|d| format!("{k}.{d}")))
            }
            _ if x != y => out.push(format!("{k}: saved {x}, now {y}")),
            _ => {}
        }
    }
    out
}
