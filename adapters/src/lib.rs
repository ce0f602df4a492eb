//! fedtune's adapters: real ML plugged into the kernel's ports.
//!
//! The kernel (`fedtune-kernel`) drives federated courses through the
//! [`LocalTrainer`](fedtune_kernel::LocalTrainer) port and knows nothing of
//! models. This crate will implement that port with candle: the Llama-family
//! LLM loaded from GGUF or safetensors, PEFT adapters (LoRA first), the
//! hook-based training core, tokenization, data sets, splitters and
//! evaluators. Each arrives with its own issue; until then the crate is empty
//! on purpose, so that the workspace's shape is fixed from the start.
