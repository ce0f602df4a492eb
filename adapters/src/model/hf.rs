//! Loading a Llama-family model from a Hugging Face directory.
//!
//! The directory holds `config.json`, the weights as `model.safetensors` or as
//! shards listed in `model.safetensors.index.json`, and usually
//! `tokenizer.json`. Tensors are converted to the requested dtype; names are
//! Hugging Face's own, which is also this crate's layout.
//!
//! The families read are those of [`Family`] (`model_type` `llama`,
//! `mistral`, `qwen2`, `gemma`); any other (Gemma 2 and 3 among them), and
//! any option of theirs that the decoder
//! does not implement (a rotary scaling other than Llama 3's, Qwen2's
//! per-layer sliding windows, Llama's optional biases, an activation other
//! than SiLU (Gemma: GELU's tanh form)),
//! is refused by name rather than run wrongly.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use super::config::{Family, LlamaConfig};
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
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(&config_path, e))?;
    let cfg = config_of(json).map_err(|e| err(&config_path, e))?;

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

/// A `config.json` this decoder cannot run, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

impl From<&str> for Unsupported {
    fn from(why: &str) -> Self {
        Self(why.to_string())
    }
}

/// The decoder's configuration from a `config.json`'s contents: the
/// family's conventions made explicit, unsupported options refused.
pub fn config_of(mut json: serde_json::Value) -> std::result::Result<LlamaConfig, Unsupported> {
    let Some(obj) = json.as_object_mut() else {
        return Err("is not a JSON object".into());
    };
    let kind = obj
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("llama")
        .to_string();
    let Some(family) = Family::from_model_type(&kind) else {
        return Err(Unsupported(format!(
            "model_type `{kind}` is not a Llama-family model this decoder implements (supported: {})",
            Family::NAMES.join(", ")
        )));
    };
    obj.insert("model_type".into(), family.name().into());
    // The MLP's activation: SiLU, or Gemma's GELU with the tanh
    // approximation (what transformers runs for Gemma's `hidden_act =
    // "gelu"` unless `hidden_activation` says otherwise).
    let allowed: &[&str] = match family {
        Family::Gemma => &["gelu", "gelu_pytorch_tanh"],
        _ => &["silu"],
    };
    for key in ["hidden_act", "hidden_activation"] {
        if let Some(act) = obj.get(key).and_then(|v| v.as_str()) {
            let exact_gelu = family == Family::Gemma && key == "hidden_activation" && act == "gelu";
            if !allowed.contains(&act) || exact_gelu {
                return Err(Unsupported(format!(
                    "{key} `{act}` is not supported for {} (only `{}`)",
                    family.name(),
                    if family == Family::Gemma {
                        "gelu_pytorch_tanh"
                    } else {
                        "silu"
                    }
                )));
            }
        }
    }
    if family == Family::Gemma {
        // Gemma's head is the embeddings.
        match obj.get("tie_word_embeddings").and_then(|v| v.as_bool()) {
            Some(false) => {
                return Err("gemma with tie_word_embeddings = false is not supported".into())
            }
            _ => {
                obj.insert("tie_word_embeddings".into(), true.into());
            }
        }
    }
    for key in ["mlp_bias", "attention_bias"] {
        if obj.get(key).and_then(|v| v.as_bool()) == Some(true) {
            return Err(Unsupported(format!("{key} = true is not supported")));
        }
    }
    // Rotary scaling: Llama 3's (spelled `rope_type` or, in older files,
    // `type`); "default" means none.
    match obj.get("rope_scaling").cloned() {
        None | Some(serde_json::Value::Null) => {
            obj.remove("rope_scaling");
        }
        Some(serde_json::Value::Object(mut scaling)) => {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            match kind.as_str() {
                "default" => {
                    obj.remove("rope_scaling");
                }
                "llama3" => {
                    scaling.insert("rope_type".into(), kind.into());
                    obj.insert("rope_scaling".into(), scaling.into());
                }
                other => {
                    return Err(Unsupported(format!(
                        "rope_scaling type `{other}` is not supported (only `llama3`)"
                    )))
                }
            }
        }
        Some(other) => {
            return Err(Unsupported(format!(
                "rope_scaling {other} is not an object"
            )))
        }
    }
    // Sliding windows: Mistral's applies to every layer; Qwen2 lists one it
    // does not use unless `use_sliding_window` (and then only from
    // `max_window_layers` on, which this decoder does not implement).
    if family == Family::Qwen2 {
        if obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err("use_sliding_window = true is not supported for qwen2".into());
        }
        obj.remove("sliding_window");
    }
    if matches!(family, Family::Llama | Family::Gemma) {
        obj.remove("sliding_window");
    }
    let cfg: LlamaConfig = serde_json::from_value(json).map_err(|e| Unsupported(e.to_string()))?;
    cfg.validate().map_err(|e| Unsupported(e.to_string()))?;
    Ok(cfg)
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
    let mut tok = TextTokenizer::from_file(&tok_path, eos as u32).map_err(|e| err(&tok_path, e))?;
    tok.chat_template = chat_template(dir)?;
    Ok(Some(tok))
}

/// The chat template of `dir/tokenizer_config.json`, if it has one: a
/// string, or a list of named templates of which the `default` one.
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(&path, e))?;
    Ok(match &json["chat_template"] {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}
