//! The shape of a Llama-family decoder, named as in Hugging Face's `config.json`.
//!
//! One decoder serves the families that share Llama's block (pre-norm
//! RMSNorm, rotary attention with grouped-query heads, a SwiGLU MLP): they
//! differ only in what [`LlamaConfig`]'s family fields say — biases on the
//! query, key and value projections (Qwen2), a head width other than
//! `hidden / heads`, Llama 3's rotary frequency scaling, Mistral's sliding
//! attention window, Gemma's scaled embeddings, `1 + w` norms and GELU MLP.

use serde::{Deserialize, Serialize};

/// The architecture a config describes, Hugging Face's `model_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 1–3, SmolLM, TinyLlama …: the plain block.
    #[default]
    Llama,
    /// Mistral: Llama's block with an optional sliding attention window.
    Mistral,
    /// Qwen2 and Qwen2.5: biases on the query, key and value projections.
    Qwen2,
    /// Gemma (the first): embeddings scaled by `√hidden`, RMSNorm weights
    /// stored as `w − 1` (the norm multiplies by `1 + w`), a GELU (tanh)
    /// gate in the MLP, a tied head.
    Gemma,
}

impl Family {
    /// Every family, as `model_type` spells it.
    pub const NAMES: [&'static str; 4] = ["llama", "mistral", "qwen2", "gemma"];

    /// Parses a `model_type`.
    pub fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "gemma" => Some(Family::Gemma),
            _ => None,
        }
    }

    /// Its class in Hugging Face's `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
        }
    }

    /// Its `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma => "gemma",
        }
    }
}

/// Llama 3's rotary frequency scaling (`rope_scaling` with `rope_type =
/// "llama3"`): wavelengths longer than `original_max_position_embeddings /
/// low_freq_factor` are stretched by `factor`, those shorter than `… /
/// high_freq_factor` kept, and the ones between interpolated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Always `"llama3"` (the only scaling supported).
    pub rope_type: String,
    /// How much long wavelengths are stretched.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are stretched fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was first trained for.
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// The scaled inverse frequency of one rotary pair.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let original = self.original_max_position_embeddings as f64;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < original / self.high_freq_factor {
            inv_freq
        } else if wavelen > original / self.low_freq_factor {
            inv_freq / self.factor
        } else {
            let smooth = (original / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// Hyperparameters of a Llama-family model. Field names follow Hugging Face's
/// `config.json`, so a directory's config deserializes into this directly.
///
/// `Default` is the default model's shape, SmolLM2-135M (a plain Llama).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// Longest sequence the rotary tables cover.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// The output head reuses the token embeddings.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The architecture (`model_type`).
    #[serde(rename = "model_type", default)]
    pub family: Family,
    /// Width of one attention head when it is not `hidden_size /
    /// num_attention_heads` (Hugging Face's `head_dim`).
    #[serde(rename = "head_dim", default, skip_serializing_if = "Option::is_none")]
    pub explicit_head_dim: Option<usize>,
    /// Llama 3's rotary frequency scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Mistral's attention window: a position sees itself and the
    /// `sliding_window - 1` before it (as Hugging Face's masks do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            family: Family::Llama,
            explicit_head_dim: None,
            rope_scaling: None,
            sliding_window: None,
        }
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

/// A model configuration whose numbers do not fit together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the attention's queries (and of the output projection's input).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of the attention's keys and values.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    /// Whether projection `p` (`q_proj` …) has a bias: Qwen2's query, key
    /// and value projections do.
    pub fn has_bias(&self, p: super::Projection) -> bool {
        use super::Projection::{K, Q, V};
        self.family == Family::Qwen2 && matches!(p, Q | K | V)
    }

    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let c = self;
        if c.num_attention_heads == 0 || c.num_key_value_heads == 0 {
            return Err(ShapeError("head counts must be positive".into()));
        }
        if c.explicit_head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ShapeError(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            return Err(ShapeError(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if !c.head_dim().is_multiple_of(2) {
            return Err(ShapeError(format!(
                "head_dim {} must be even for rotary embeddings",
                c.head_dim()
            )));
        }
        if c.head_dim() == 0 {
            return Err(ShapeError("head_dim must be positive".into()));
        }
        if c.sliding_window == Some(0) {
            return Err(ShapeError("sliding_window must be positive".into()));
        }
        if let Some(s) = &c.rope_scaling {
            if s.rope_type != "llama3" {
                return Err(ShapeError(format!(
                    "rope_scaling type `{}` is not supported (only `llama3`)",
                    s.rope_type
                )));
            }
            let finite = [s.factor, s.low_freq_factor, s.high_freq_factor]
                .iter()
                .all(|x| x.is_finite() && *x > 0.0);
            if !finite
                || s.high_freq_factor <= s.low_freq_factor
                || s.original_max_position_embeddings == 0
            {
                return Err(ShapeError(format!(
                    "rope_scaling needs positive factors with high_freq_factor > low_freq_factor \
                     and original_max_position_embeddings > 0, got {s:?}"
                )));
            }
        }
        if c.vocab_size == 0 || c.num_hidden_layers == 0 || c.intermediate_size == 0 {
            return Err(ShapeError(
                "vocab_size, num_hidden_layers and intermediate_size must be positive".into(),
            ));
        }
        Ok(())
    }
}
