//! The shape of a Llama-family decoder, named as in Hugging Face's `config.json`.

use serde::{Deserialize, Serialize};

/// Hyperparameters of a Llama-family model. Field names follow Hugging Face's
/// `config.json`, so a directory's config deserializes into this directly.
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
        self.hidden_size / self.num_attention_heads
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
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(ShapeError(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(ShapeError(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                c.num_attention_heads, c.num_key_value_heads
            )));
        }
        if c.head_dim() % 2 != 0 {
            return Err(ShapeError(format!(
                "head_dim {} must be even for rotary embeddings",
                c.head_dim()
            )));
        }
        if c.vocab_size == 0 || c.num_hidden_layers == 0 || c.intermediate_size == 0 {
            return Err(ShapeError(
                "vocab_size, num_hidden_layers and intermediate_size must be positive".into(),
            ));
        }
        Ok(())
    }
}
