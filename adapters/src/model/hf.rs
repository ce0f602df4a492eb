//! Loading a Llama-family model from a Hugging Face directory.
//!
//! The directory holds `config.json`, the weights as `model.safetensors` or as
//! shards listed in `model.safetensors.index.json`, and usually
//! `tokenizer.json`. Tensors are converted to the requested dtype; names are
//! Hugging Face's own, which is also this crate's layout.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use super::config::LlamaConfig;
use super::llama::Llama;
use crate::tokenizer::TextTokenizer;

/// A model read from a Hugging Face directory.
pub struct HfModel {
    /// The decoder.
    pub model: Llama,
    /// The tokenizer, when the directory has `tokenizer.json`.
    pub tokenizer: Option<TextTokenizer>,
}

#[derive(Deserialize)]
struct ConfigHead {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn err(path: &Path, message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("{}: {message}", path.display()))
}

/// Loads `dir` (see the module docs), converting weights to `dtype` on `device`.
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<HfModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| err(&config_path, e))?;
    let head: ConfigHead = serde_json::from_str(&text).map_err(|e| err(&config_path, e))?;
    if let Some(kind) = head.model_type.as_deref() {
        if !matches!(kind, "llama" | "mistral") {
            return Err(err(
                &config_path,
                format!("model_type `{kind}` is not a Llama-family model"),
            ));
        }
    }
    if head.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(err(&config_path, "rope_scaling is not supported"));
    }
    let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| err(&config_path, e))?;
    cfg.validate().map_err(|e| err(&config_path, e))?;

    let mut tensors = HashMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        tensors
            .extend(candle_core::safetensors::load(&single, device).map_err(|e| err(&single, e))?);
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| err(&index, e))?;
        let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| err(&index, e))?;
        let shards: BTreeSet<&String> = idx.weight_map.values().collect();
        for shard in shards {
            let path = dir.join(shard);
            tensors
                .extend(candle_core::safetensors::load(&path, device).map_err(|e| err(&path, e))?);
        }
    } else {
        return Err(err(
            dir,
            "has neither model.safetensors nor model.safetensors.index.json",
        ));
    }
    let take = |name: &str| -> Result<Tensor> {
        tensors
            .remove(name)
            .ok_or_else(|| err(dir, format!("weights lack `{name}`")))?
            .to_dtype(dtype)
    };
    let model = Llama::from_named(cfg, take)?;

    let tokenizer = tokenizer_of(dir, &config_path, &head)?;
    Ok(HfModel { model, tokenizer })
}

/// Only the tokenizer of the Hugging Face directory `dir` (no weights
/// read), or `None` when it has no `tokenizer.json`.
pub fn load_hf_tokenizer(dir: &Path) -> Result<Option<TextTokenizer>> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| err(&config_path, e))?;
    let head: ConfigHead = serde_json::from_str(&text).map_err(|e| err(&config_path, e))?;
    tokenizer_of(dir, &config_path, &head)
}

/// `dir/tokenizer.json` with the end-of-sequence id from its config.
fn tokenizer_of(
    dir: &Path,
    config_path: &Path,
    head: &ConfigHead,
) -> Result<Option<TextTokenizer>> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Ok(None);
    }
    let eos = head
        .eos_token_id
        .as_ref()
        .and_then(|v| v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()))
        .ok_or_else(|| {
            err(
                config_path,
                "has no eos_token_id, which the tokenizer needs",
            )
        })?;
    Ok(Some(
        TextTokenizer::from_file(&tok_path, eos as u32).map_err(|e| err(&tok_path, e))?,
    ))
}
