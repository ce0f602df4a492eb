//! Fused CPU kernels for the training step, each with its backward pass.
//!
//! candle builds RMSNorm, softmax, rotary embeddings and SwiGLU out of many
//! elementwise ops (a dozen passes and buffers per call once backward is
//! counted), gives none of its fused forms a backward pass, and computes a
//! weight gradient for every matmul. On 2 cores that overhead was about as
//! large as the matrix products themselves. Here each of those is one op
//! with an analytic backward, working row by row on candle's CPU worker pool
//! (the same threads its elementwise ops use, so the two never compete for
//! cores).
//!
//! Every function takes the fused path for contiguous f32/f64 CPU tensors and
//! falls back to the composite candle ops otherwise (other devices, f16/bf16),
//! which are also the references the tests compare against, value and
//! gradient. `FEDTUNE_KERNELS=composite` (or [`composite_only`] on one
//! thread) turns the fused path off on the CPU: the math a GPU runs, which
//! the tests compare with the fused kernels through a whole training step.
//!
//! | file | op |
//! |---|---|
//! | [`linear`] | `x · Wᵀ` for a frozen `W` (backward: `g · W` only), also added into a residual; `W` may be bf16 with `x` in f32 |
//! | [`bf16`] | those two products with a bf16 `W`: `vdpbf16ps` on AVX512-BF16, else widened to f32 |
//! | [`int8`] | a frozen `W` as int8 blocks with f32 scales, dequantized into those products' panels |
//! | [`head_loss`] | the output head and the cross-entropy in one op, by blocks of rows (the logits of every position never held at once) |
//! | [`lora`] | `x · Wᵀ + scale · (x ⊙ mask) Aᵀ Bᵀ`, gradients for `x`, `A`, `B` |
//! | [`rms_norm`] | RMSNorm with a frozen weight |
//! | [`softmax`] | softmax over the last dimension |
//! | [`swiglu`] | `silu(gate) ⊙ up`, and with a frozen projection and a residual after it as one op |
//! | [`rope`] | rotary embeddings (Hugging Face's half layout) |
//! | [`attention`] | causal grouped-query attention with RoPE, probabilities kept for backward |
//! | `rows` | the CPU plumbing they share: storage access, the worker pool, the row-wise op skeleton |
//! | `gemm` | the one checked wrapper around the `gemm` crate (f32/f64 on the SIMD path [`crate::simd::simd_path`] picks at run time), and the only `unsafe` for it |

pub mod attention;
pub mod bf16;
mod frozen;
mod gemm;
pub mod head_loss;
pub mod int8;
pub mod linear;
pub mod lora;
pub mod rms_norm;
pub mod rope;
mod rows;
pub mod softmax;
pub mod swiglu;

#[cfg(test)]
mod tests;

pub use attention::{attention, attention_fuses, AttentionDims};
pub use frozen::Frozen;
pub use int8::Int8Weight;
pub use linear::{frozen_linear, frozen_linear_add};
pub use lora::{lora_linear, LowRank};
pub use rms_norm::{rms_norm, rms_norm_composite};
pub use rope::rope;
pub(crate) use rows::par_blocks;
pub use rows::{composite_forced, composite_only, Real};
pub use softmax::softmax_last_dim;
pub use swiglu::{swiglu, swiglu_linear_add};
