//! The `fedtune` command line: run courses, evaluate, benchmark.
//!
//! Each command is a file under `cmd/` (benchmarks under `bench/`) that
//! parses its arguments, calls the library and prints; courses are
//! assembled in `fedtune_adapters::course`.

mod alloc;
mod bench;
mod chart;
mod cmd;
mod display;
mod live;
mod runlog;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    Run(cmd::course_args::RunArgs),
    /// Run a course's server alone, over NATS (clients: `fedtune client`).
    Server(cmd::server::ServerArgs),
    /// Run one client of a course alone, over NATS.
    Client(cmd::client::ClientArgs),
    /// Measure the speed and sizes of fedtune's parts.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Evaluate the base model or an adapter on a benchmark (GSM8K, HumanEval, MMLU, …).
    Eval(cmd::eval::EvalArgs),
    /// Continue one prompt with the base model or an adapter, streaming the text.
    Generate(cmd::generate::GenerateArgs),
    /// Talk with the base model or an adapter in its chat layout.
    Chat(cmd::generate::ChatArgs),
    /// Manage models.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Inspect and download data sets.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// NATS broker set-up for distributed courses.
    #[command(subcommand)]
    Broker(cmd::broker::BrokerCommand),
    /// Search a course's hyperparameters (random, grid, sha, hyperband, bo, fts, flora or a script).
    Hpo(cmd::hpo::HpoArgs),
    /// Run one course over several seeds (and scenarios); mean ± std per metric.
    Sweep(cmd::sweep::SweepArgs),
    /// Start a course of your own: a config and editable copies of the scripts it runs.
    Init(cmd::init::InitArgs),
    /// The shipped Rhai scripts: list them, or copy one to edit.
    #[command(subcommand)]
    Scripts(cmd::init::ScriptsCommand),
    /// Write SVG charts (loss per round per client, bytes per round) and a Markdown report for a run directory.
    Report {
        /// A directory written by `fedtune run`.
        dir: PathBuf,
    },
    /// Follow runs in a browser: a live page of their loss, bytes and clients' status.
    Serve {
        /// Run directories (written, or being written, by `fedtune run`).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to listen (default: a free loopback port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: String,
    },
    /// Print a shell completion script (e.g. `fedtune completions bash > ~/.local/share/bash-completion/completions/fedtune`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[global_allocator]
pub(crate) static GLOBAL: alloc::CachingAlloc = alloc::CachingAlloc::new();

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
        Command::Run(args) => cmd::run::run(args),
        Command::Server(args) => cmd::server::server(args),
        Command::Client(args) => cmd::client::client(args),
        Command::Eval(args) => cmd::eval::eval(args),
        Command::Generate(args) => cmd::generate::generate(args),
        Command::Chat(args) => cmd::generate::chat(args),
        Command::Bench(command) => bench::bench(command),
        Command::Model(command) => cmd::model::model(command),
        Command::Data(command) => cmd::data::run(command),
        Command::Broker(command) => cmd::broker::broker(command),
        Command::Report { dir } => cmd::report::report(&dir),
        Command::Serve { dirs, addr } => live::serve(dirs, &addr),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "fedtune",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Hpo(args) => cmd::hpo::hpo(args),
        Command::Init(args) => cmd::init::init(args),
        Command::Scripts(cmd) => cmd::init::scripts(cmd),
        Command::Sweep(args) => cmd::sweep::sweep(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
