//! Training FLOPs counted from the model's shapes, the cost FS-LLM reports
//! beside bytes, time and memory.
//!
//! One training step of an adapter on a frozen model, over a batch of `B`
//! sequences of `T` tokens (`N = B·T`, padding included: it is computed):
//!
//! - **the frozen matmuls**: `2·P·N` forward, where `P` counts every weight a
//!   token's activations are multiplied by — each layer's seven projections
//!   and the output head (tied to the embeddings or not; the embedding
//!   itself is a lookup) — and `2·P·N` backward, for the gradient with
//!   respect to each projection's input (the frozen weights get none):
//!   `4·P·N`, where full fine-tuning would take `6·P·N`;
//! - **attention's two `T × T` products** (scores and their weighted sum),
//!   `4·B·T²·d` forward per layer with `d` the query width, twice that
//!   backward: `12·L·B·T²·d` (the full square: the causal mask is applied
//!   to computed scores);
//! - **the adapter**: `6·A·N` for its `A` trainable parameters (forward,
//!   input and weight gradients) — exact for LoRA's two factors and for
//!   weights trained in full ([`crate::full`]), an estimate of the same
//!   form for prompt and prefix tuning.
//!
//! Norms, rotary embeddings, activations, the softmax and the optimizer are
//! left out: each is O(N·h), under a percent of the matmuls here.

use crate::model::LlamaConfig;
use crate::model::Projection;

/// Parameters a token's activations are multiplied by: the projections of
/// every layer and the output head.
pub fn matmul_params(cfg: &LlamaConfig) -> u64 {
    let per_layer: usize = Projection::ALL
        .iter()
        .map(|p| {
            let (i, o) = p.dims(cfg);
            i * o
        })
        .sum();
    (cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size) as u64
}

/// The FLOPs of one training step, by term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFlops {
    /// `4·P·N`: the frozen model's matmuls, forward and backward.
    pub matmul: f64,
    /// `12·L·B·T²·d`: attention's score and value products.
    pub attention: f64,
    /// `6·A·N`: the adapter's own.
    pub adapter: f64,
}

impl StepFlops {
    /// All terms.
    pub fn total(&self) -> f64 {
        self.matmul + self.attention + self.adapter
    }
}

/// One training step over `batch` sequences of `seq` tokens with an
/// adapter of `adapter_params` trainable parameters.
pub fn training_step(
    cfg: &LlamaConfig,
    adapter_params: usize,
    batch: usize,
    seq: usize,
) -> StepFlops {
    let n = (batch * seq) as f64;
    let (b, t) = (batch as f64, seq as f64);
    let d = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    StepFlops {
        matmul: 4.0 * matmul_params(cfg) as f64 * n,
        attention: 12.0 * cfg.num_hidden_layers as f64 * b * t * t * d,
        adapter: 6.0 * adapter_params as f64 * n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;

    /// SmolLM2-135M-Instruct's shapes (the default model's header gives
    /// them: `adapters/tests/default_model.rs` checks).
    fn smollm2() -> LlamaConfig {
        LlamaConfig::default()
    }

    #[test]
    fn the_default_models_matmul_parameters_by_hand() {
        // Per layer: q, o 576² each; k, v 576·192 each; gate, up, down 576·1536 each.
        let layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536;
        assert_eq!(layer, 3_538_944);
        assert_eq!(matmul_params(&smollm2()), 30 * 3_538_944 + 49_152 * 576);
        assert_eq!(matmul_params(&smollm2()), 134_479_872);
        // One step of the quickstart's shape: batch 4 × 128 tokens, LoRA r 8
        // on q/v (460,800 parameters): 4·P·T plus the stated terms.
        let f = training_step(&smollm2(), 460_800, 4, 128);
        assert_eq!(f.matmul, 4.0 * 134_479_872.0 * 512.0);
        assert_eq!(f.attention, 12.0 * 30.0 * 4.0 * 128.0 * 128.0 * 576.0);
        assert_eq!(f.adapter, 6.0 * 460_800.0 * 512.0);
        // 290 GFLOP a step, attention under 5% of it.
        assert!(
            (f.total() / 1e9 - 290.42).abs() < 0.01,
            "{}",
            f.total() / 1e9
        );
        assert!(f.attention / f.total() < 0.05);
    }

    #[test]
    fn matmul_parameters_are_the_models_projection_and_head_weights() {
        // An untied model with grouped-query attention, counted from its tensors.
        let cfg = LlamaConfig {
            vocab_size: 300,
            hidden_size: 48,
            intermediate_size: 80,
            num_hidden_layers: 3,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            ..Default::default()
        };
        let model = Llama::random(
            cfg.clone(),
            1,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let counted: usize = model
            .named_weights()
            .iter()
            .filter(|(name, _)| name.ends_with("_proj.weight") || name == "lm_head.weight")
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(matmul_params(&cfg), counted as u64);
        let tied = LlamaConfig {
            tie_word_embeddings: true,
            ..cfg.clone()
        };
        // Tied, the head is the embeddings: the same multiplications.
        assert_eq!(matmul_params(&tied), matmul_params(&cfg));
    }
}
