//! `fedtune bench …`: the speed and sizes of fedtune's parts, each a file.
//!
//! | command | file | measures |
//! |---|---|---|
//! | `codec` | [`codec`] | encoded size and throughput of a ParamSet per quantization × compression |
//! | `matmul` | [`matmul`] | the frozen products (f32, bf16, int8 weights) and candle's CPU matmul by dtype at the default model's shapes |
//! | `peft` | [`peft`] | per PEFT method: trainable parameters, bytes per round, step time, memory |
//! | `wire` | [`wire`] | a broadcast-collect round, in-process vs NATS, per wire encoding |
//! | `generate` | [`generate`] | decoding throughput with GSM8K's 8-shot prefix, by batch size |
//! | `scripts` | [`scripts`] | what the Rhai script host costs against the native path |
//! | `train-step` | [`train`] | one LoRA training step on the default model |
//! | `sandbox` | [`sandbox`] | time per HumanEval sample, strict sandbox against basic |
//! | `secagg` | [`secagg`] | time and bytes secure aggregation adds to a round, by clients |

mod codec;
mod generate;
mod matmul;
mod peft;
mod sandbox;
mod scripts;
mod secagg;
mod train;
mod wire;

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use fedtune_adapters::model::{Compute, DeviceSpec, Placement};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Encoded size and encode/decode throughput of a ParamSet for every quantization × compression.
    Codec {
        /// Number of parameters in the benchmark ParamSet.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Repetitions per configuration (the fastest counts).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Print JSON instead of a Markdown table.
        #[arg(long)]
        json: bool,
        /// Write the result to this file as well.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The frozen products (f32, bf16 and int8 weights, forward and input
    /// gradient) and candle's CPU matmul in f32, bf16 and f16 at the
    /// default model's shapes.
    Matmul {
        /// Rows of the activation matrix (tokens in a batch).
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// Repetitions per shape and dtype (the fastest counts).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Per PEFT method on the default model: trainable parameters, bytes per
    /// client per round, seconds per training step, peak memory.
    Peft {
        /// Methods to measure, comma-separated (lora, prompt, p-tuning, prefix,
        /// fedot-RATIO: LoRA in a 2 + 2-layer emulator with that drop ratio,
        /// fedot-full-RATIO: those 2 + 2 layers trained in full).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "lora,prompt,p-tuning,prefix,fedot-0.2,fedot-0.5"
        )]
        methods: Vec<String>,
        /// Timed training steps per method (after one untimed).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Sequences per batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Measure this one method in this process and print its row as JSON.
        #[arg(long, hide = true)]
        one: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seconds and bytes of one broadcast-collect round, in-process vs NATS, per wire encoding.
    Wire {
        /// Clients in the round.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Rounds per configuration (the median counts).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// A NATS server to use (default: start a local nats-server).
        #[arg(long)]
        nats: Option<String>,
    },
    /// Generation throughput on the default model with GSM8K's 8-shot prefix, by batch size.
    Generate {
        /// Batch sizes to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
        batches: Vec<usize>,
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Where the data sets are (default: $FEDTUNE_DATA_ROOT, ./data or ../shared/data).
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Measure prefill plus decoding of random prompts of this many
        /// tokens, no shared prefix, every sequence running `--tokens`
        /// steps — what `torch_baseline.py generate --prompt-len N` times.
        #[arg(long, requires = "no_prefix")]
        prompt_len: Option<usize>,
        /// With --prompt-len: no GSM8K prefix (the like-for-like comparison).
        #[arg(long, requires = "prompt_len")]
        no_prefix: bool,
        /// With --prompt-len: the frozen base's dtype (auto, f32, bf16, int8).
        #[arg(long, default_value = "f32")]
        compute: Compute,
        /// With --prompt-len: where the model runs (cpu, cuda, cuda:N).
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Print JSON lines (with --prompt-len).
        #[arg(long)]
        json: bool,
    },
    /// What the Rhai script host costs per aggregation and per training step, against the native path.
    Scripts {
        /// Calls per measurement (the median counts).
        #[arg(long, default_value_t = 100)]
        calls: usize,
        /// Client updates per aggregation.
        #[arg(long, default_value_t = 3)]
        clients: usize,
        /// Real training steps timed (batch 4 x 128).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seconds and GFLOP/s of one LoRA training step (r 8, q/v, AdamW, f32) on the default model.
    TrainStep {
        /// Sequences per batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// The frozen base's dtype: auto, f32, bf16 or int8 (`[model] compute`).
        #[arg(long, default_value = "f32")]
        compute: Compute,
        /// Where the step runs: cpu, cuda or cuda:N (`[model] device`).
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time and bytes secure aggregation adds to a round, against plain FedAvg, by clients per round.
    Secagg {
        /// Clients per round to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3,8,32")]
        clients: Vec<u32>,
        /// Values per update (default: the quickstart's LoRA adapter, r 8 on q/v of SmolLM2-135M).
        #[arg(long, default_value_t = 460_800)]
        params: usize,
        /// Courses per configuration, alternating (the fastest counts).
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Over a local nats-server instead of the in-process bus.
        #[arg(long)]
        nats: bool,
    },
    /// Milliseconds per HumanEval sample in the strict sandbox against the basic one (canonical solutions).
    Sandbox {
        /// Problems to run (default: all 164).
        #[arg(long)]
        limit: Option<usize>,
        /// Alternating passes over the problems per mode (the median counts).
        #[arg(long, default_value_t = 3)]
        passes: usize,
        /// Where the data sets are (default: $FEDTUNE_DATA_ROOT, ./data or ../shared/data).
        #[arg(long)]
        data_root: Option<PathBuf>,
    },
}

/// Runs one benchmark.
pub fn bench(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Codec {
            params,
            reps,
            json,
            out,
        } => codec::codec(params, reps, json, out.as_deref()),
        BenchCommand::TrainStep {
            batch,
            seq_len,
            steps,
            compute,
            device,
            json,
        } => train::train_step((batch, seq_len, steps), Placement { compute, device }, json),
        BenchCommand::Scripts {
            calls,
            clients,
            steps,
            json,
        } => scripts::scripts(calls, clients, steps, json),
        BenchCommand::Matmul { tokens, reps } => matmul::matmul(tokens, reps),
        BenchCommand::Secagg {
            clients,
            params,
            reps,
            nats,
        } => secagg::secagg(&clients, params, reps, nats),
        BenchCommand::Sandbox {
            limit,
            passes,
            data_root,
        } => sandbox::sandbox(
            &fedtune_adapters::data::data_root(data_root.as_deref()),
            limit,
            passes,
        ),
        BenchCommand::Peft {
            methods,
            steps,
            batch,
            seq_len,
            one,
            json,
        } => peft::peft(&methods, (steps, batch, seq_len), one.as_deref(), json),
        BenchCommand::Wire {
            clients,
            reps,
            nats,
        } => wire::wire(clients, reps, nats),
        BenchCommand::Generate {
            batches,
            tokens,
            prompt_len: Some(prompt_len),
            compute,
            device,
            json,
            ..
        } => generate::random_prompts(
            &batches,
            (prompt_len, tokens),
            Placement { compute, device },
            json,
        ),
        BenchCommand::Generate {
            batches,
            tokens,
            data_root,
            ..
        } => generate::generate(
            &batches,
            tokens,
            &fedtune_adapters::data::data_root(data_root.as_deref()),
        ),
    }
}
