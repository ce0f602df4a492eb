//! Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! A directory written here loads with `peft.PeftModel.from_pretrained` on the
//! Hugging Face model, and one written by PEFT (LoRA on Llama projections)
//! loads here. Import rejects what this implementation would silently get
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
}

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
    let io = |message: String| PeftError::Io {
        path: dir.display().to_string(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
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
    };
    let text = serde_json::to_string_pretty(&json).map_err(|e| io(e.to_string()))?;
    std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| io(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, t) in params.iter() {
        let tensor =
            Tensor::from_slice(t.data(), t.shape(), &Device::Cpu).map_err(|e| io(e.to_string()))?;
        tensors.insert(name.to_string(), tensor);
    }
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
    };
    config.projections().map_err(|m| unsupported(&m))?;
    let weights = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| io(&weights, e.to_string()))?;
    let mut params = ParamSet::new();
    for (name, t) in tensors {
        // PEFT writes adapter names into keys only for non-default adapters (`.lora_A.default.weight`).
        let name = name.replace(".default.weight", ".weight");
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| io(&weights, format!("tensor `{name}`: {e}")))?;
        params
            .insert(name, t.dims().to_vec(), data)
            .map_err(|e| io(&weights, e.to_string()))?;
    }
    Ok((config, params))
}
