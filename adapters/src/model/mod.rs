//! The Llama-family decoder: configuration, weights, forward pass, loaders.
//!
//! The forward pass is written for training: it uses only candle operations
//! whose backward pass reaches their inputs (a composite RMSNorm, softmax and
//! half-rotation RoPE), because candle-nn 0.11's fused `rms_norm`,
//! `softmax_last_dim` and `rope` return no gradient to their input and would
//! silently train nothing. Base weights are plain tensors (never `Var`s), held
//! once behind an `Arc` and shared by every client; adapters add their terms
//! through [`ProjectionAdapter`].

mod config;
mod gguf;
mod hf;
mod llama;

pub use config::LlamaConfig;
pub use gguf::{load_gguf, GgufModel};
pub use hf::{load_hf_dir, HfModel};
pub use llama::{frozen_linear, KvCache, LayerWeights, Llama, Projection, ProjectionAdapter};
