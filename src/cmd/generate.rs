//! `fedtune generate` and `fedtune chat`: text from the base model, or the
//! model with an adapter a course wrote, streamed as it is produced.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use fedtune_adapters::chat::{ChatLayout, Role, Turn};
use fedtune_adapters::course::Loaded;
use fedtune_adapters::data::{Example, Template};
use fedtune_adapters::generate::{generate_streaming, FinishReason, GenerationConfig};
use fedtune_adapters::progress::Observer;

use crate::display::Display;

/// The model, the adapter and how tokens are picked: shared by both commands.
#[derive(Debug, Args)]
pub struct Sampling {
    /// A GGUF model file, a Hugging Face directory or id (`hf:ORG/NAME[@REV]`)
    /// (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter directory (as `fedtune run` writes under `adapter/`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 picks the likeliest token (greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: sample among the likeliest tokens whose
    /// probabilities sum to this.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of sampling: the same seed, prompt and model give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A system prompt (chat layouts; default: the model template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Print no loading messages.
    #[arg(long)]
    pub quiet: bool,
    /// The frozen weights' dtype: f32, bf16 (half the memory, bf16 products
    /// where the CPU has them), int8 (int8 projection blocks) or auto.
    #[arg(long, default_value = "f32")]
    pub compute: fedtune_adapters::model::Compute,
    /// Where the model runs: cpu, cuda or cuda:N (a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: fedtune_adapters::model::DeviceSpec,
}

impl Sampling {
    /// The generation settings, with `defaults` (temperature, top-p) for
    /// what the command line leaves out.
    fn config(&self, defaults: (f64, f64), stop: Vec<String>) -> Result<GenerationConfig> {
        let temperature = self.temperature.unwrap_or(defaults.0);
        let top_p = self.top_p.unwrap_or(defaults.1);
        ensure!(
            temperature.is_finite() && temperature >= 0.0,
            "--temperature must be 0 (greedy) or positive, not {temperature}"
        );
        ensure!(
            top_p > 0.0 && top_p <= 1.0,
            "--top-p must be in (0, 1], not {top_p}"
        );
        ensure!(
            self.max_new_tokens >= 1,
            "--max-new-tokens must be at least 1"
        );
        Ok(GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature,
            top_p,
            seed: self.seed,
            stop,
            ignore_eos: false,
        })
    }

    fn load(&self) -> Result<Loaded> {
        let display = Display::new(self.quiet);
        Ok(Loaded::load(
            self.model.as_deref(),
            self.adapter.as_deref(),
            fedtune_adapters::model::Placement {
                compute: self.compute,
                device: self.device,
            },
            &|l| display.say(l),
        )?)
    }

    fn system_turn(&self) -> Vec<Turn> {
        self.system
            .iter()
            .map(|s| Turn::new(Role::System, s.clone()))
            .collect()
    }
}

/// `fedtune generate` decodes greedily unless told otherwise.
const GREEDY: (f64, f64) = (0.0, 1.0);

/// `fedtune chat` samples a little (SmolLM2's model card: temperature 0.2,
/// top-p 0.9), still reproducibly through `--seed`.
const CHAT_SAMPLING: (f64, f64) = (0.2, 0.9);

/// `fedtune generate` arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt; `-` reads it from standard input.
    #[arg(long)]
    pub prompt: String,
    /// How the prompt is laid out: `chat` (one user turn in the model's chat
    /// layout), `raw` (the text as given, to be continued), or a course's
    /// prompt template (`alpaca`, `chatml`, a .toml file) — use the one the
    /// adapter was trained with.
    #[arg(long, default_value = "chat")]
    pub template: String,
    /// Also stop where this text appears (repeatable; it is not printed).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object (text, why it ended, tokens, seconds) instead
    /// of streaming the text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: Sampling,
}

/// `fedtune generate`.
pub fn generate(args: GenerateArgs) -> Result<()> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .read_to_string(&mut text)
            .context("reading the prompt from standard input")?;
        text
    } else {
        args.prompt.clone()
    };
    ensure!(!prompt.is_empty(), "the prompt is empty");
    // A bad template or sampling setting fails before the model loads.
    let layout = Layout::parse(&args.template)?;
    let mut cfg = args.sampling.config(GREEDY, Vec::new())?;
    let loaded = args.sampling.load()?;
    let (text, stop) = layout.render(&loaded, &args.sampling, &prompt);
    cfg.stop = stop.into_iter().chain(args.stop.iter().cloned()).collect();
    let view = loaded.view();
    let ids = view.tok.encode(&text)?;
    check_fits(&loaded, ids.len(), cfg.max_new_tokens)?;
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let streaming = !args.json;
    let g = generate_streaming(
        view.model,
        view.tok,
        &ids,
        &cfg,
        view.adapter,
        &mut |piece| {
            if streaming {
                // A closed pipe (`| head`) ends generation quietly.
                out.write_all(piece.as_bytes())
                    .and_then(|()| out.flush())
                    .is_ok()
            } else {
                true
            }
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let finish = match &g.finish {
            FinishReason::Eos => "eos".to_string(),
            FinishReason::Stop(s) => format!("stop: {s}"),
            FinishReason::Length => "length".to_string(),
            FinishReason::Interrupted => "interrupted".to_string(),
        };
        let report = serde_json::json!({
            "text": g.text,
            "finish": finish,
            "prompt_tokens": ids.len(),
            "new_tokens": g.ids.len(),
            "seconds": seconds,
            "tokens_per_s": g.ids.len() as f64 / seconds.max(1e-9),
        });
        writeln!(out, "{report:#}")?;
    } else {
        writeln!(out).ok();
    }
    Ok(())
}

/// How `fedtune generate` lays a prompt out.
enum Layout {
    Chat,
    Raw,
    Template(Template),
}

impl Layout {
    fn parse(spec: &str) -> Result<Self> {
        Ok(match spec {
            "chat" => Layout::Chat,
            "raw" => Layout::Raw,
            other => {
                Layout::Template(Template::resolve(other, Path::new(".")).with_context(|| {
                    format!("--template {other}: use chat, raw, alpaca, chatml or a .toml file")
                })?)
            }
        })
    }

    /// The prompt's text and where the answer ends.
    fn render(&self, loaded: &Loaded, sampling: &Sampling, prompt: &str) -> (String, Vec<String>) {
        match self {
            Layout::Chat => {
                let chat = ChatLayout::of(loaded.tok());
                let mut turns = sampling.system_turn();
                turns.push(Turn::new(Role::User, prompt));
                (chat.render(&turns), chat.stops())
            }
            Layout::Raw => (prompt.to_string(), Vec::new()),
            Layout::Template(t) => {
                let ex = Example {
                    instruction: prompt.to_string(),
                    input: String::new(),
                    output: String::new(),
                    meta: Default::default(),
                };
                (t.render(&ex), Vec::new())
            }
        }
    }
}

/// Refuses a prompt that leaves no room in the model's context.
fn check_fits(loaded: &Loaded, prompt_tokens: usize, max_new: usize) -> Result<()> {
    let context = loaded.view().model.config().max_position_embeddings;
    if prompt_tokens + max_new > context {
        bail!(
            "the prompt is {prompt_tokens} tokens and --max-new-tokens {max_new}: more than the model's context of {context}"
        );
    }
    Ok(())
}

/// `fedtune chat` arguments.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub sampling: Sampling,
}

/// `fedtune chat`: read a line, answer it in the model's chat layout with
/// the conversation so far, repeat. Ctrl-C while it answers stops the
/// answer; Ctrl-C or Ctrl-D (end of input) at the prompt leaves.
pub fn chat(args: ChatArgs) -> Result<()> {
    let s = &args.sampling;
    let loaded = s.load()?;
    let layout = ChatLayout::of(loaded.tok());
    let cfg = s.config(CHAT_SAMPLING, layout.stops())?;
    let view = loaded.view();
    eprintln!(
        "chatting with {}{} ({} layout). /reset forgets the conversation; Ctrl-C stops an answer; Ctrl-D or Ctrl-C at the prompt leaves.",
        loaded.model_path().display(),
        s.adapter
            .as_ref()
            .map(|a| format!(" + {}", a.display()))
            .unwrap_or_default(),
        layout.name()
    );
    interrupt::install();
    let mut turns = s.system_turn();
    let first = turns.len();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(()); // end of input
        }
        let said = line.trim();
        match said {
            "" => continue,
            "/reset" => {
                turns.truncate(first);
                eprintln!("(conversation forgotten)");
                continue;
            }
            "/exit" | "/quit" => return Ok(()),
            _ => {}
        }
        turns.push(Turn::new(Role::User, said));
        // The oldest exchanges leave once the conversation outgrows the context.
        let ids = loop {
            let ids = view.tok.encode(&layout.render(&turns))?;
            let context = view.model.config().max_position_embeddings;
            if ids.len() + cfg.max_new_tokens <= context || turns.len() <= first + 1 {
                break ids;
            }
            turns.drain(first..(first + 2).min(turns.len() - 1));
        };
        if let Err(e) = check_fits(&loaded, ids.len(), cfg.max_new_tokens) {
            eprintln!("{e}");
            turns.pop();
            continue;
        }
        let mut out = std::io::stdout().lock();
        let g = interrupt::while_answering(|| {
            generate_streaming(
                view.model,
                view.tok,
                &ids,
                &cfg,
                view.adapter,
                &mut |piece| {
                    let written = out.write_all(piece.as_bytes()).and_then(|()| out.flush());
                    written.is_ok() && !interrupt::requested()
                },
            )
        })?;
        writeln!(out)?;
        out.flush()?;
        if g.finish == FinishReason::Interrupted {
            eprintln!("(stopped)");
        }
        turns.push(Turn::new(Role::Assistant, g.text.trim()));
    }
}

/// Ctrl-C in `fedtune chat`: during an answer it asks generation to stop;
/// at the prompt it leaves, exit status 0.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static ANSWERING: AtomicBool = AtomicBool::new(false);
    static REQUESTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(_: libc::c_int) {
        if ANSWERING.load(Ordering::SeqCst) {
            REQUESTED.store(true, Ordering::SeqCst);
        } else {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; nothing
            // is pending at the prompt (answers are flushed as they print).
            unsafe {
                libc::write(2, b"\n".as_ptr().cast(), 1);
                libc::_exit(0);
            }
        }
    }

    pub fn install() {
        // SAFETY: the handler only touches atomics and async-signal-safe calls.
        unsafe {
            libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        }
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    /// Runs `answer` with Ctrl-C meaning "stop this answer".
    pub fn while_answering<T>(answer: impl FnOnce() -> T) -> T {
        REQUESTED.store(false, Ordering::SeqCst);
        ANSWERING.store(true, Ordering::SeqCst);
        let out = answer();
        ANSWERING.store(false, Ordering::SeqCst);
        out
    }
}

/// Elsewhere Ctrl-C keeps its default: it ends the process.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod interrupt {
    pub fn install() {}
    pub fn requested() -> bool {
        false
    }
    pub fn while_answering<T>(answer: impl FnOnce() -> T) -> T {
        answer()
    }
}
