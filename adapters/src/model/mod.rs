//! The Llama-family decoder (Llama, Llama 3, Qwen2, Mistral, Gemma: see [`LlamaConfig`] and [`Family`]): configuration, weights, forward pass, loaders (GGUF, Hugging Face directories, Hugging Face ids).
//!
//! The forward pass is written for training: its RMSNorm, softmax, RoPE,
//! SwiGLU and frozen projections are the fused ops of [`crate::kernels`],
//! each with a backward pass to its input (candle-nn 0.11's fused forms have
//! none and would silently train nothing). Base weights are plain tensors (never `Var`s), held
//! once behind an `Arc` and shared by every client; adapters add their terms
//! through [`ProjectionAdapter`].

mod compute;
mod config;
mod device;
mod gguf;
mod hf;
mod hub;
mod llama;
mod tiny;

pub use crate::kernels::{frozen_linear, Frozen, LowRank};
pub use compute::{Compute, UnknownCompute};
pub use config::{Family, LlamaConfig, RopeScaling};
pub use device::{DeviceError, DeviceSpec, Placement, UnknownDevice};
pub use gguf::{load_gguf, GgufModel};
pub use hf::{config_of, load_hf_dir, load_hf_tokenizer, HfModel};
pub use hub::{fetch_model, HubError, HubId, HUB_PREFIX};
pub use llama::{KvCache, LayerWeights, Llama, Norm, Projection, ProjectionAdapter};
pub use tiny::{write_tiny_model, TinySpec, TINY_EOS, TINY_SLIDING_WINDOW};
