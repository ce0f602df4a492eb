//! Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! A directory written here loads with `peft.PeftModel.from_pretrained` on the
//! Hugging Face model, and one written by PEFT (LoRA on Llama projections,
//! prompt tuning) loads here. Prompt-learning adapters ([`save_prompt`])
//! keep PEFT's `prompt_embeddings` (the virtual tokens, or the prefixes, as
//! the model sees them) and, beside them in `fedtune_trainable.safetensors`,
//! every trainable tensor (P-tuning's encoder, the prefix projection), so
//! that training can go on from them. A LoRA adapter with a residual
//! (FedEx-LoRA, FLoRA) keeps it in `fedtune_residual.safetensors`. Import rejects what this implementation would silently get
//! wrong: DoRA, rsLoRA, biases, per-layer rank or alpha patterns.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fedtune_kernel::ParamSet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lora::LoraConfig;

/// Why an adapter cannot be saved or loaded.
#[derive(Debug, Error)]
pub enum PeftError {
    /// Reading or writing failed.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// The adapter uses a PEFT feature this implementation does not support.
    #[error("{path}: {message}")]
    Unsupported { path: String, message: String },
}

/// The subset of PEFT's `LoraConfig` JSON that fedtune reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AdapterConfigJson {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Vec<String>,
    #[serde(default = "none_string")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    layers_to_transform: Option<Vec<usize>>,
    /// fedtune's own key: the adapter has a residual (see [`LoraConfig::residual`]),
    /// in [`RESIDUAL_FILE`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fedtune_residual: bool,
}

/// The file beside `adapter_model.safetensors` that holds a LoRA adapter's
/// residuals, so that the PEFT file holds only what PEFT knows (PEFT loads
/// the factors alone: without the residual, not the trained model).
pub const RESIDUAL_FILE: &str = "fedtune_residual.safetensors";

fn none_string() -> String {
    "none".into()
}

/// Writes `params` (LoRA factors with PEFT names) and `config` as a PEFT adapter directory.
pub fn save_lora(
    dir: &Path,
    config: &LoraConfig,
    params: &ParamSet,
    base_model: &str,
) -> Result<(), PeftError> {
    let json = AdapterConfigJson {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(base_model.into()),
        r: config.r,
        lora_alpha: config.lora_alpha,
        lora_dropout: config.lora_dropout,
        target_modules: config.target_modules.clone(),
        bias: "none".into(),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        rank_pattern: HashMap::new(),
        alpha_pattern: HashMap::new(),
        inference_mode: true,
        layers_to_transform: config.layers_to_transform.clone(),
        fedtune_residual: config.residual,
    };
    let residual = format!(".{}.weight", crate::lora::RESIDUAL);
    let (mut factors, mut residuals) = (ParamSet::new(), ParamSet::new());
    for (name, t) in params.iter() {
        let into = match name.ends_with(&residual) {
            true => &mut residuals,
            false => &mut factors,
        };
        into.insert_tensor(name, t.clone());
    }
    write_adapter_dir(dir, &json, &factors)?;
    if residuals.is_empty() {
        return Ok(());
    }
    let path = dir.join(RESIDUAL_FILE);
    let io = |e: candle_core::Error| PeftError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    candle_core::safetensors::save(&tensors_of(&residuals).map_err(io)?, &path).map_err(io)
}

/// `dir` with `config` as `adapter_config.json` and `params` as
/// `adapter_model.safetensors`.
fn write_adapter_dir(
    dir: &Path,
    config: &impl Serialize,
    params: &ParamSet,
) -> Result<(), PeftError> {
    let io = |message: String| PeftError::Io {
        path: dir.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| io(e.to_string()))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| io(e.to_string()))?;
    let tensors = tensors_of(params).map_err(|e| io(e.to_string()))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))
        .map_err(|e| io(e.to_string()))
}

/// Reads a PEFT LoRA adapter directory: its config and its tensors (as f32).
pub fn load_lora(dir: &Path) -> Result<(LoraConfig, ParamSet), PeftError> {
    let path = dir.join("adapter_config.json");
    let io = |p: &Path, message: String| PeftError::Io {
        path: p.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e.to_string()))?;
    let json: AdapterConfigJson =
        serde_json::from_str(&text).map_err(|e| io(&path, e.to_string()))?;
    let unsupported = |message: &str| PeftError::Unsupported {
        path: path.display().to_string(),
        message: message.to_string(),
    };
    if json.peft_type != "LORA" {
        return Err(unsupported(&format!(
            "peft_type `{}` is not LORA",
            json.peft_type
        )));
    }
    if json.use_dora || json.use_rslora || json.bias != "none" || json.fan_in_fan_out {
        return Err(unsupported(
            "DoRA, rsLoRA, LoRA biases and fan_in_fan_out are not supported",
        ));
    }
    if !json.rank_pattern.is_empty() || !json.alpha_pattern.is_empty() {
        return Err(unsupported(
            "per-module rank_pattern / alpha_pattern are not supported",
        ));
    }
    let config = LoraConfig {
        r: json.r,
        lora_alpha: json.lora_alpha,
        lora_dropout: json.lora_dropout,
        target_modules: json.target_modules,
        layers_to_transform: json.layers_to_transform,
        residual: json.fedtune_residual,
    };
    config.projections().map_err(|e| unsupported(&e.message))?;
    let weights = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| io(&weights, e.to_string()))?;
    // PEFT writes adapter names into keys only for non-default adapters (`.lora_A.default.weight`).
    let mut tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name.replace(".default.weight", ".weight"), t))
        .collect();
    if config.residual {
        let path = dir.join(RESIDUAL_FILE);
        let residuals = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| io(&path, e.to_string()))?;
        tensors.extend(residuals);
    }
    let params = params_of(tensors, &weights)?;
    Ok((config, params))
}

/// The file beside `adapter_model.safetensors` that holds every trainable
/// tensor of a prompt-learning adapter.
pub const TRAINABLE_FILE: &str = "fedtune_trainable.safetensors";

fn tensors_of(params: &ParamSet) -> candle_core::Result<HashMap<String, Tensor>> {
    params
        .iter()
        .map(|(name, t)| {
            Ok((
                name.to_string(),
                Tensor::from_slice(t.data(), t.shape(), &Device::Cpu)?,
            ))
        })
        .collect()
}

/// The tensors of a safetensors file as a [`ParamSet`]; `path` names the file in errors.
fn params_of(tensors: HashMap<String, Tensor>, path: &Path) -> Result<ParamSet, PeftError> {
    let io = |message: String| PeftError::Io {
        path: path.display().to_string(),
        message,
    };
    let mut params = ParamSet::new();
    let mut names: Vec<_> = tensors.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in names {
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| io(format!("tensor `{name}`: {e}")))?;
        params
            .insert(name, t.dims().to_vec(), data)
            .map_err(|e| io(e.to_string()))?;
    }
    Ok(params)
}

/// Writes a prompt-learning adapter: PEFT's `adapter_config.json` and
/// `adapter_model.safetensors` (`prompt_embeddings`), plus every trainable
/// tensor in [`TRAINABLE_FILE`].
pub fn save_prompt(
    dir: &Path,
    (method, config): (crate::prompt::PromptMethod, &crate::prompt::PromptConfig),
    params: &ParamSet,
    model: &crate::model::LlamaConfig,
    base_model: &str,
) -> Result<(), PeftError> {
    use crate::prompt::{PromptInit, PromptMethod};
    let io = |message: String| PeftError::Io {
        path: dir.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
    let tensors = tensors_of(params).map_err(|e| io(e.to_string()))?;
    let embeddings = crate::prompt::prompt_embeddings(method, config, |name| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::msg(format!("the adapter lacks `{name}`")))
    })
    .map_err(|e| io(e.to_string()))?;
    let mut json = serde_json::json!({
        "peft_type": method.peft_type(),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": model.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.num_key_value_heads,
        "num_layers": model.num_hidden_layers,
        "inference_mode": true,
        "fedtune": { "method": method, "config": config },
    });
    match method {
        PromptMethod::Prompt => {
            let text = config.init == PromptInit::Text;
            json["prompt_tuning_init"] = (if text { "TEXT" } else { "RANDOM" }).into();
            if text {
                json["prompt_tuning_init_text"] = config.init_text.clone().into();
            }
        }
        PromptMethod::PTuning => {
            json["encoder_reparameterization_type"] = "MLP".into();
            json["encoder_hidden_size"] = config.encoder_hidden_size.into();
        }
        PromptMethod::Prefix => {
            json["prefix_projection"] = config.prefix_projection.into();
            json["encoder_hidden_size"] = config.encoder_hidden_size.into();
        }
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| io(e.to_string()))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| io(e.to_string()))?;
    let peft = HashMap::from([("prompt_embeddings".to_string(), embeddings)]);
    candle_core::safetensors::save(&peft, dir.join("adapter_model.safetensors"))
        .map_err(|e| io(e.to_string()))?;
    candle_core::safetensors::save(&tensors, dir.join(TRAINABLE_FILE))
        .map_err(|e| io(e.to_string()))
}

/// Writes weights trained in full ([`crate::full`]): the deltas in
/// `adapter_model.safetensors`, and an `adapter_config.json` in PEFT's
/// shape whose `peft_type` is fedtune's own (no PEFT method loads it).
fn save_full(
    dir: &Path,
    config: &crate::full::FullConfig,
    params: &ParamSet,
    base_model: &str,
) -> Result<(), PeftError> {
    let json = serde_json::json!({
        "peft_type": crate::adapter::FULL_PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": config.target_modules,
        "layers_to_transform": config.layers_to_transform,
        "norms": config.norms,
        "fedtune": "each tensor is the change to the base model's weight of the same path (`delta` for `weight`)",
    });
    write_adapter_dir(dir, &json, params)
}

/// Writes any adapter of `spec` (LoRA or prompt learning) in PEFT's layout.
pub fn save_adapter(
    dir: &Path,
    spec: &crate::adapter::AdapterSpec,
    params: &ParamSet,
    model: &crate::model::LlamaConfig,
    base_model: &str,
) -> Result<(), PeftError> {
    match spec {
        crate::adapter::AdapterSpec::Lora(cfg) => save_lora(dir, cfg, params, base_model),
        crate::adapter::AdapterSpec::Full(cfg) => save_full(dir, cfg, params, base_model),
        crate::adapter::AdapterSpec::Prompt { method, config, .. } => {
            save_prompt(dir, (*method, config), params, model, base_model)
        }
    }
}

/// Reads an adapter directory of any supported method: the spec to rebuild
/// it with and its trainable tensors. A prompt-tuning adapter written by
/// PEFT loads from its `prompt_embeddings`; other prompt-learning methods
/// need the trainable tensors fedtune writes beside them.
pub fn load_adapter(dir: &Path) -> Result<(crate::adapter::AdapterSpec, ParamSet), PeftError> {
    use crate::prompt::{PromptConfig, PromptMethod};
    let path = dir.join("adapter_config.json");
    let io = |p: &Path, message: String| PeftError::Io {
        path: p.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io(&path, e.to_string()))?;
    let peft_type = json["peft_type"].as_str().unwrap_or_default();
    if peft_type == "LORA" {
        let (cfg, params) = load_lora(dir)?;
        return Ok((crate::adapter::AdapterSpec::Lora(cfg), params));
    }
    if peft_type == crate::adapter::FULL_PEFT_TYPE {
        let config: crate::full::FullConfig = serde_json::from_value(serde_json::json!({
            "target_modules": json["target_modules"],
            "layers_to_transform": json["layers_to_transform"],
            "norms": json["norms"].as_bool().unwrap_or(false),
        }))
        .map_err(|e| io(&path, e.to_string()))?;
        let file = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| io(&file, e.to_string()))?;
        return Ok((
            crate::adapter::AdapterSpec::Full(config),
            params_of(tensors, &file)?,
        ));
    }
    let method = match peft_type {
        "PROMPT_TUNING" => PromptMethod::Prompt,
        "P_TUNING" => PromptMethod::PTuning,
        "PREFIX_TUNING" => PromptMethod::Prefix,
        other => {
            return Err(PeftError::Unsupported {
                path: path.display().to_string(),
                message: format!("peft_type `{other}` is not supported"),
            })
        }
    };
    let trainable = dir.join(TRAINABLE_FILE);
    let (method, config, file) = if trainable.is_file() {
        let fed = &json["fedtune"];
        let method: PromptMethod = serde_json::from_value(fed["method"].clone()).unwrap_or(method);
        let config: PromptConfig = serde_json::from_value(fed["config"].clone())
            .map_err(|e| io(&path, format!("`fedtune.config`: {e}")))?;
        (method, config, trainable)
    } else if method == PromptMethod::Prompt {
        let n = json["num_virtual_tokens"].as_u64().unwrap_or(0) as usize;
        let config = PromptConfig {
            num_virtual_tokens: n,
            ..PromptConfig::default()
        };
        (method, config, dir.join("adapter_model.safetensors"))
    } else {
        return Err(PeftError::Unsupported {
            path: dir.display().to_string(),
            message: format!("a {peft_type} adapter needs {TRAINABLE_FILE} (its encoder), which PEFT does not write"),
        });
    };
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .map_err(|e| io(&file, e.to_string()))?;
    let params = params_of(tensors, &file)?;
    Ok((
        crate::adapter::AdapterSpec::Prompt {
            method,
            config,
            init_ids: None,
        },
        params,
    ))
}
