//! Fixtures shared by the adapters' integration tests (each test binary uses a part).
#![allow(dead_code)]

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use fedtune_adapters::fetch::ensure_default_model;
use fedtune_adapters::model::{Family, LlamaConfig, RopeScaling};
use fedtune_adapters::train::Batch;
use rand::Rng;

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("tensors of one shape")
}

/// A two-layer model small enough for finite differences: 4 query heads over 2 kv heads.
pub fn tiny_config(tie_word_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        tie_word_embeddings,
        ..Default::default()
    }
}

/// Llama 3's rotary scaling, at a scale where a tiny model's frequencies
/// fall in each of its three bands (kept, interpolated, stretched).
pub fn llama3_scaling() -> RopeScaling {
    RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    }
}

/// [`tiny_config`] as each supported family other than plain Llama:
/// Qwen2 (query/key/value biases, untied head), Mistral with a 4-position
/// sliding window and heads wider than `hidden / heads`, Llama 3's rotary
/// scaling, Gemma (scaled embeddings, `1 + w` norms, GELU, wide heads).
pub fn family_configs() -> Vec<(&'static str, LlamaConfig)> {
    let base = tiny_config(true);
    vec![
        (
            "qwen2",
            LlamaConfig {
                family: Family::Qwen2,
                tie_word_embeddings: false,
                ..base.clone()
            },
        ),
        (
            "mistral",
            LlamaConfig {
                family: Family::Mistral,
                sliding_window: Some(4),
                explicit_head_dim: Some(6),
                ..base.clone()
            },
        ),
        (
            "llama3",
            LlamaConfig {
                rope_scaling: Some(llama3_scaling()),
                ..base.clone()
            },
        ),
        (
            "gemma",
            LlamaConfig {
                family: Family::Gemma,
                explicit_head_dim: Some(8),
                ..base
            },
        ),
    ]
}

/// About 150 tokens of GSM8K-style English with numbers.
pub const TEXT: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. \
Natalia sold 48+24 = 72 clips altogether in April and May. The answer is 72. \
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn? \
Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. The answer is 10. \
Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.";

/// The default model, fetched into the cache on first use.
pub fn model_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        ensure_default_model(|line| eprintln!("{line}")).expect("the default model can be fetched")
    })
}

/// A batch of `rows × len` token ids (row-major) whose labels are the ids.
pub fn lm_batch(ids: Vec<u32>, rows: usize, len: usize) -> Batch {
    let d = &Device::Cpu;
    let labels: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    Batch {
        tokens: Tensor::from_vec(ids, (rows, len), d).unwrap(),
        attention_mask: Tensor::ones((rows, len), DType::U32, d).unwrap(),
        labels: Tensor::from_vec(labels, (rows, len), d).unwrap(),
    }
}

/// Sequences that count upwards mod `vocab` from a random start: next = current + 1.
pub fn counting_batches(
    rng: &mut impl Rng,
    (batches, rows, len): (usize, usize, usize),
    vocab: u32,
) -> Vec<Batch> {
    (0..batches)
        .map(|_| {
            let ids: Vec<u32> = (0..rows)
                .flat_map(|_| {
                    let start = rng.random_range(0..vocab);
                    (0..len as u32).map(move |i| (start + i) % vocab)
                })
                .collect();
            lm_batch(ids, rows, len)
        })
        .collect()
}
