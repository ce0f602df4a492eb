//! `fedtune data`: inspect how a config splits its data set, show examples as
//! the model sees them, and download built-in sets.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fedtune_adapters::data::{self, DataSpec, FederatedData, Template};
use fedtune_adapters::fetch::ensure_default_model;
use fedtune_adapters::tokenizer::TextTokenizer;
use fedtune_kernel::config::CourseSection;
use fedtune_kernel::ConfigDoc;
use serde::Serialize;

/// `fedtune data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print, as JSON, how the config's `[data]` splits among clients: sizes,
    /// label histograms, token-length percentiles.
    Split(SplitArgs),
    /// Print examples of one client exactly as the model will see them.
    Show(ShowArgs),
    /// Download a built-in data set into the data root and verify its SHA-256.
    Fetch(FetchArgs),
}

/// Where the config and data are.
#[derive(Debug, Args)]
pub struct Source {
    /// A course config with a `[data]` section.
    config: PathBuf,
    /// Override a config value: `--set data.seed=3` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    data_root: Option<PathBuf>,
}

/// Arguments of `fedtune data split`.
#[derive(Debug, Args)]
pub struct SplitArgs {
    #[command(flatten)]
    source: Source,
    /// Skip tokenization (no token-length percentiles; no model needed).
    #[arg(long)]
    no_tokens: bool,
}

/// Arguments of `fedtune data show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    source: Source,
    /// Client id (1-based, as in the course).
    #[arg(long, default_value_t = 1)]
    client: usize,
    /// Number of examples.
    #[arg(long, default_value_t = 3)]
    n: usize,
    /// Which split: train, val or test.
    #[arg(long, default_value = "train")]
    split: String,
}

/// Arguments of `fedtune data fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The data set (gsm8k, gsm8k-test, humaneval).
    name: String,
    /// Data root to download into (default as for the other commands).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Download from this base URL instead of the canonical one (a mirror).
    #[arg(long)]
    mirror: Option<String>,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Split(a) => split(a),
        DataCommand::Show(a) => show(a),
        DataCommand::Fetch(a) => {
            let root = data::data_root(a.data_root.as_deref());
            let path =
                data::fetch_builtin(&a.name, &root, a.mirror.as_deref(), |l| eprintln!("{l}"))?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

/// The config's data spec and course, loaded and split.
struct Loaded {
    spec: DataSpec,
    data: FederatedData,
    template: Template,
}

fn load(src: &Source) -> Result<Loaded> {
    let mut doc = ConfigDoc::load(&src.config)?;
    for s in &src.set {
        doc.apply_override(s)?;
    }
    let course: CourseSection = doc.section("federate")?;
    let spec: DataSpec = doc.section("data")?;
    if spec == DataSpec::default() {
        bail!("{}: no [data] section", src.config.display());
    }
    let root = data::data_root(src.data_root.as_deref());
    let data = data::build(&spec, &root, course.clients as usize)
        .with_context(|| format!("{}: [data]", src.config.display()))?;
    let dir = src.config.parent().unwrap_or(Path::new("."));
    let template = Template::resolve(&spec.template, dir)?;
    Ok(Loaded {
        spec,
        data,
        template,
    })
}

fn tokenizer() -> Result<TextTokenizer> {
    let path = ensure_default_model(|l| eprintln!("{l}"))?;
    Ok(TextTokenizer::from_gguf_path(&path)?)
}

#[derive(Serialize)]
struct SplitReport {
    data: String,
    examples: usize,
    skipped_records: Vec<SkippedRecord>,
    unlabelled: usize,
    label: Option<String>,
    clients: Vec<ClientReport>,
}

#[derive(Serialize)]
struct SkippedRecord {
    line: usize,
    reason: String,
}

#[derive(Serialize)]
struct ClientReport {
    id: usize,
    name: String,
    samples: usize,
    train: usize,
    val: usize,
    test: usize,
    labels: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<Percentiles>,
}

#[derive(Serialize)]
struct Percentiles {
    p50: usize,
    p90: usize,
    p99: usize,
    max: usize,
    truncated: usize,
}

fn split(a: SplitArgs) -> Result<()> {
    let Loaded {
        spec,
        data,
        template,
    } = load(&a.source)?;
    let tok = if a.no_tokens {
        None
    } else {
        Some(tokenizer()?)
    };
    let label = spec
        .label
        .clone()
        .or(spec.labeler.as_ref().map(|l| l.field.clone()));
    let mut clients = Vec::new();
    for (id, c) in data.clients.iter().enumerate() {
        let all: Vec<usize> = c.all().collect();
        let mut labels = BTreeMap::new();
        if let Some(f) = &label {
            for &i in &all {
                if let Some(v) = data.examples[i].meta.get(f) {
                    *labels.entry(v.clone()).or_insert(0) += 1;
                }
            }
        }
        let tokens = match &tok {
            Some(t) => {
                let items = data.tokenize(&all, &template, t, spec.max_tokens)?;
                let mut lens: Vec<usize> = items.iter().map(|x| x.tokens.len()).collect();
                lens.sort_unstable();
                let pct = |p: usize| lens[(lens.len() - 1) * p / 100];
                Some(Percentiles {
                    p50: pct(50),
                    p90: pct(90),
                    p99: pct(99),
                    max: *lens.last().unwrap_or(&0),
                    truncated: items
                        .iter()
                        .filter(|x| x.prompt_cut + x.response_cut > 0)
                        .count(),
                })
            }
            None => None,
        };
        clients.push(ClientReport {
            id: id + 1,
            name: c.name.clone(),
            samples: all.len(),
            train: c.train.len(),
            val: c.val.len(),
            test: c.test.len(),
            labels,
            tokens,
        });
    }
    let report = SplitReport {
        data: data.path.display().to_string(),
        examples: data.examples.len(),
        skipped_records: data
            .skipped
            .iter()
            .map(|(line, reason)| SkippedRecord {
                line: *line,
                reason: reason.clone(),
            })
            .collect(),
        unlabelled: data.unlabelled,
        label,
        clients,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let Loaded {
        spec,
        data,
        template,
    } = load(&a.source)?;
    let Some(c) = a.client.checked_sub(1).and_then(|i| data.clients.get(i)) else {
        bail!(
            "--client {}: the split has clients 1 to {}",
            a.client,
            data.clients.len()
        );
    };
    let idx = match a.split.as_str() {
        "train" => &c.train,
        "val" => &c.val,
        "test" => &c.test,
        other => bail!("--split {other}: use train, val or test"),
    };
    let tok = tokenizer()?;
    let picked: Vec<usize> = idx.iter().take(a.n).copied().collect();
    let items = data.tokenize(&picked, &template, &tok, spec.max_tokens)?;
    println!(
        "client {} ({}), {} split: {} of {} examples, template `{}`, max_tokens {}",
        a.client,
        c.name,
        a.split,
        picked.len(),
        idx.len(),
        template.name,
        spec.max_tokens
    );
    for (n, (i, x)) in picked.iter().zip(&items).enumerate() {
        let prompt_len = x.labels.iter().take_while(|&&l| l < 0).count();
        let prompt = tok.decode(&x.tokens[..prompt_len])?;
        let response = tok.decode(&x.tokens[prompt_len..])?;
        println!(
            "\n── example {} (record {i}; {} tokens: {prompt_len} prompt, masked from the loss; {} response{}) ──",
            n + 1,
            x.tokens.len(),
            x.tokens.len() - prompt_len,
            if x.prompt_cut + x.response_cut > 0 {
                format!(
                    "; truncated {} prompt and {} response tokens",
                    x.prompt_cut, x.response_cut
                )
            } else {
                String::new()
            }
        );
        if std::io::stdout().is_terminal() {
            println!("{prompt}\x1b[1m{response}\x1b[0m");
        } else {
            println!("{prompt}{response}");
        }
    }
    Ok(())
}
