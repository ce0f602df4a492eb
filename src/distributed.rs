//! Distributed courses: `fedtune server` and `fedtune client` as separate
//! processes over a NATS broker, and `fedtune run` with
//! `[broker] transport = "nats"`, which starts them on one machine.
//!
//! The server process owns the course: it checkpoints the global parameters
//! after every round (`OUT/checkpoints/round-NNNN/`) and `--resume` continues
//! after the newest one, calling the roll so that running clients rejoin.
//! Each client process loads only its own part of the data. With
//! `federate.round_timeout_s` set, a client that stops answering is dropped
//! from the step and takes part again once it is back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use fedtune_broker::auth::Credentials;
use fedtune_broker::{LocalNats, NatsOptions, NatsTransport};
use fedtune_kernel::course::{client_worker, roll_call, server_worker_from, SharedTrainer};
use fedtune_kernel::worker::WorkerOutcome;
use fedtune_kernel::{MetricsLog, Party, Record, ShutdownHandle, Transport, Worker};
use serde::Serialize;

use crate::run::{self, Course, Task};
use crate::run_llm::{self, Checkpointing, Progress, Saved};

/// The environment variable naming a credentials file when `--creds` is not given.
pub const CREDS_ENV: &str = "FEDTUNE_NATS_CREDS";

/// Arguments of `fedtune server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The course configuration (TOML), the same file every client uses.
    config: PathBuf,
    /// The NATS server, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    nats: String,
    /// The server's credentials file (from `fedtune broker config`); default $FEDTUNE_NATS_CREDS.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Override a config value (repeatable); clients need the same overrides.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Output directory (default: runs/<course>-<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the course in --out DIR after its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Data root for public data (FedOT's emulator distillation); default
    /// $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Print only the final summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// Arguments of `fedtune client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The course configuration (TOML), the same file the server uses.
    config: PathBuf,
    /// The NATS server, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    nats: String,
    /// This client's id, 1..=federate.clients.
    #[arg(long)]
    id: u32,
    /// This client's credentials file; default $FEDTUNE_NATS_CREDS.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Override a config value (repeatable); the server needs the same overrides.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// Connects `party` of `course` to the broker at `url` with the credentials
/// in `creds` (or `$FEDTUNE_NATS_CREDS`; none: an open broker).
async fn connect(
    url: &str,
    course: &str,
    party: Party,
    creds: Option<&Path>,
) -> Result<(Arc<dyn Transport>, Refusals)> {
    let creds = creds
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CREDS_ENV).map(PathBuf::from));
    let credentials = match &creds {
        Some(path) => Some(Credentials::load(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let options = NatsOptions {
        name: format!("fedtune-{course}-{party}").replace(' ', "-"),
        credentials,
        ..NatsOptions::default()
    };
    let transport = NatsTransport::connect(url, course, options)
        .await
        .with_context(|| match &creds {
            Some(p) => format!("{party} with the credentials in {}", p.display()),
            None => format!("{party} without credentials (--creds or ${CREDS_ENV})"),
        })?;
    let refusals = transport.refusals();
    Ok((Arc::new(transport), refusals))
}

/// What the broker refused a party, once it refuses something.
type Refusals = tokio::sync::watch::Receiver<Option<String>>;

/// Runs `worker` until it ends, or stops it as soon as the broker refuses
/// it a subject (wrong credentials for this party): then fails saying so.
async fn run_guarded<S: Send + 'static>(
    worker: Worker<S>,
    refusals: Refusals,
) -> Result<WorkerOutcome<S>> {
    let party = worker.party();
    let (handle, signal) = ShutdownHandle::new();
    let mut watch = refusals.clone();
    let watcher = tokio::spawn(async move {
        if watch.wait_for(|r| r.is_some()).await.is_ok() {
            handle.trigger();
        }
    });
    let out = worker.run(signal).await;
    watcher.abort();
    if let Some(m) = refusals.borrow().clone() {
        bail!("the NATS server refused {party}: {m} (are these {party}'s credentials?)");
    }
    Ok(out?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// What `fedtune server` writes to `summary.json`.
#[derive(Debug, Serialize)]
struct ServerSummary {
    course: String,
    rounds: u64,
    clients: u32,
    /// The round this run started after (0: a fresh course).
    resumed_after: u64,
    /// Sample-weighted loss per split before training (or at the resumed
    /// round) and after the last round.
    loss_first: std::collections::BTreeMap<String, f64>,
    loss_last: std::collections::BTreeMap<String, f64>,
    evals: Vec<EvalRow>,
    /// Clients that took part in each round.
    sampled: Vec<(u64, Vec<u32>)>,
    bytes_up: u64,
    bytes_down: u64,
    rejected_messages: u64,
    wall_s: f64,
    /// Where the final parameters are.
    params: String,
}

#[derive(Debug, Serialize)]
struct EvalRow {
    round: u64,
    split: String,
    loss: f64,
    samples: u64,
}

/// `fedtune server`: the course's server, alone in this process.
pub fn server(args: ServerArgs) -> Result<()> {
    let started = Instant::now();
    let course = run::load_course(&args.config, &args.set)?;
    let Course {
        doc,
        cfg,
        task,
        resolved,
        ..
    } = &course;
    if args.resume {
        let Some(dir) = &args.out else {
            bail!("--resume needs --out DIR, the server's run directory");
        };
        run::same_config_but_rounds(&dir.join("config.toml"), resolved)?;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| run::default_run_dir(&cfg.course.name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), resolved)?;
    crate::runlog::log_to_file(&out.join("server.log"))
        .with_context(|| format!("cannot write {}", out.join("server.log").display()))?;
    let quiet = args.quiet || args.json;
    let say = |line: &str| {
        if !quiet {
            eprintln!("[{:6.1} s] {line}", started.elapsed().as_secs_f64());
        }
    };

    // The initial global parameters and how checkpoints hold them; with
    // [offsite], the emulator every client gets when it joins (and the full
    // model, to plug the trained adapter into at the end).
    let mut offsite = None;
    let (initial, format) = match task {
        Task::LeastSquares(ls) => (
            run::least_squares_trainer(cfg, ls).initial_params(),
            Saved::Params,
        ),
        Task::Lora(llm) => {
            let base = crate::eval_cmd::Base::load(llm.model.path.as_deref(), &say)?;
            let root = fedtune_adapters::data::data_root(args.data_root.as_deref());
            let (model, spec) = match llm.emulator(&base.model, &base.tok, &root, &say)? {
                Some((emu, spec, _)) => {
                    say(&format!(
                        "offsite-tuning: clients get an emulator of layers {:?}",
                        emu.kept
                    ));
                    let model = emu.model.clone();
                    offsite = Some((emu, spec.clone(), base.clone()));
                    (model, spec)
                }
                None => ((*base.model).clone(), llm.spec(&base.tok)?),
            };
            let initial = fedtune_adapters::round_robin::RoundRobinTrainer::initial_adapter(
                &model,
                &spec,
                cfg.course.seed,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let name = base.file_name();
            (
                initial,
                Saved::Adapter {
                    spec,
                    base: name,
                    model: model.config().clone(),
                },
            )
        }
    };
    let final_format = format.clone();
    let checkpoints = out.join("checkpoints");
    let start = if args.resume {
        run_llm::latest_checkpoint(&checkpoints)?
    } else {
        None
    };
    let (completed, global) = match start {
        Some((round, params)) => {
            say(&format!("resuming after round {round}"));
            (round, params)
        }
        None => (0, initial),
    };
    let resumed_from = (completed > 0).then(|| checkpoints.join(format!("round-{completed:04}")));
    let aggregator = Checkpointing {
        inner: run::build_aggregator(doc, cfg)?,
        // A server process checkpoints every round: a crash loses at most the round in flight.
        every: 1,
        dir: checkpoints,
        format,
    }
    .restored(resumed_from.as_deref())?;

    let display = Progress::new(quiet, cfg.course.rounds.saturating_sub(completed));
    let shown = display.clone();
    let rounds = cfg.course.rounds;
    let log = MetricsLog::to_file(&out.join("metrics.jsonl"))
        .with_context(|| format!("cannot write metrics to {}", out.display()))?
        .with_observer(Box::new(move |r: &Record| shown.record(r, rounds)));
    say(&format!(
        "course `{}`: waiting for {} clients at {}",
        cfg.course.name, cfg.course.clients, args.nats
    ));
    let outcome = runtime()?.block_on(async {
        let (transport, refusals) = connect(
            &args.nats,
            &cfg.course.name,
            Party::Server,
            args.creds.as_deref(),
        )
        .await?;
        let mut worker = server_worker_from(
            cfg.clone(),
            completed,
            global,
            Box::new(aggregator),
            log,
            transport,
        )
        .on_start(roll_call);
        if let Some((emu, _, _)) = &offsite {
            let weights = fedtune_adapters::offsite::model_params(&emu.model)?;
            let mut meta = fedtune_kernel::message::Meta::new();
            meta.insert(
                "llama_config".into(),
                serde_json::to_value(emu.model.config())?,
            );
            meta.insert("kept_layers".into(), serde_json::to_value(&emu.kept)?);
            worker.state_mut().set_base(weights, meta);
        }
        run_guarded(worker, refusals).await
    })?;
    display.finish();
    let state = outcome.state;
    ensure!(
        state.is_finished(),
        "the server stopped before the course finished ({:?})",
        outcome.reason
    );
    let results = state.into_results();
    let params_path = out.join(match (&final_format, &offsite) {
        (Saved::Adapter { .. }, None) => "adapter",
        (Saved::Adapter { .. }, Some(_)) => "adapter-emulator",
        (Saved::Params, _) => "final",
    });
    final_format
        .save(&params_path, &results.global)
        .map_err(|e| anyhow::anyhow!("cannot save {}: {e}", params_path.display()))?;
    if let Some((emu, fedtune_adapters::adapter::AdapterSpec::Lora(lora), full)) = &offsite {
        // The adapter plugged into the full model (no test data here: the clients evaluate).
        let name = full.file_name();
        run_llm::plug_in(
            &full.model,
            emu,
            (lora, &results.global),
            &[],
            (&out.join("adapter"), &name),
        )?;
    }
    let (bytes_up, bytes_down) = run_llm::traffic(&results.records);
    let summary = ServerSummary {
        course: cfg.course.name.clone(),
        rounds: cfg.course.rounds,
        clients: cfg.course.clients,
        resumed_after: completed,
        loss_first: run::losses_at(&results.evals, results.evals.first().map(|e| e.round)),
        loss_last: run::losses_at(&results.evals, results.evals.last().map(|e| e.round)),
        evals: results
            .evals
            .iter()
            .map(|e| EvalRow {
                round: e.round,
                split: e.split.clone(),
                loss: e.loss,
                samples: e.samples,
            })
            .collect(),
        sampled: results.sampled.clone(),
        bytes_up,
        bytes_down,
        rejected_messages: outcome.stats.rejected,
        wall_s: started.elapsed().as_secs_f64(),
        params: params_path.display().to_string(),
    };
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(out.join("summary.json"), &text)?;
    if args.json {
        println!("{text}");
    } else {
        println!(
            "course `{}` finished: {} rounds, {:.1} KB up, {:.1} KB down, {:.1} s; final {}\nresults in {}",
            summary.course,
            summary.rounds,
            summary.bytes_up as f64 / 1e3,
            summary.bytes_down as f64 / 1e3,
            summary.wall_s,
            summary
                .loss_last
                .iter()
                .map(|(s, l)| format!("{s} loss {l:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            out.display()
        );
    }
    Ok(())
}

/// `fedtune client`: one client of a course, alone in this process.
pub fn client(args: ClientArgs) -> Result<()> {
    let started = Instant::now();
    let course = run::load_course(&args.config, &args.set)?;
    let Course { doc, cfg, task, .. } = &course;
    let id = args.id;
    ensure!(
        (1..=cfg.course.clients).contains(&id),
        "--id {id} is outside 1..={} (federate.clients in {})",
        cfg.course.clients,
        doc.origin()
    );
    let say = |line: &str| {
        if !args.quiet {
            eprintln!(
                "[{:6.1} s] client {id}: {line}",
                started.elapsed().as_secs_f64()
            );
        }
    };
    let trainer: SharedTrainer = match task {
        Task::LeastSquares(ls) => Arc::new(Mutex::new(run::least_squares_trainer(cfg, ls))),
        // FedOT: the tokenizer only; the weights come from the server.
        Task::Lora(llm) if llm.offsite.enabled => {
            let tok = crate::eval_cmd::Base::load_tokenizer(llm.model.path.as_deref(), &say)?;
            Arc::new(Mutex::new(run_llm::offsite_client_trainer(
                doc,
                cfg,
                llm,
                &tok,
                args.data_root.as_deref(),
                id,
            )?))
        }
        Task::Lora(llm) => {
            let base = crate::eval_cmd::Base::load(llm.model.path.as_deref(), &say)?;
            let trainer = run_llm::client_process_trainer(
                doc,
                cfg,
                llm,
                &base,
                args.data_root.as_deref(),
                id,
            )?;
            Arc::new(Mutex::new(trainer))
        }
    };
    say(&format!(
        "joining course `{}` at {}",
        cfg.course.name, args.nats
    ));
    let outcome = runtime()?.block_on(async {
        let (transport, refusals) = connect(
            &args.nats,
            &cfg.course.name,
            Party::Client(id),
            args.creds.as_deref(),
        )
        .await?;
        run_guarded(client_worker(id, cfg, trainer, transport), refusals).await
    })?;
    ensure!(
        outcome.reason == fedtune_kernel::worker::StopReason::Finished,
        "client {id} stopped before the course finished ({:?})",
        outcome.reason
    );
    say(&format!(
        "course finished; trained in rounds {:?}, {:.1} KB sent, {:.1} KB received",
        outcome.state.rounds_trained(),
        outcome.stats.bytes_out as f64 / 1e3,
        outcome.stats.bytes_in as f64 / 1e3
    ));
    Ok(())
}

/// A child process that is killed if still running when dropped.
struct Spawned {
    name: String,
    child: Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `fedtune run` with `[broker] transport = "nats"`: the server and every
/// client as separate processes of this binary, against `[broker] url` or a
/// nats-server started for the run with a user per party.
pub fn run_processes(course: &Course, args: &run::RunArgs) -> Result<()> {
    let cfg = &course.cfg;
    let broker = course.broker()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| run::default_run_dir(&cfg.course.name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    // A broker of our own, with per-party users, unless one is given.
    let mut _local = None;
    let (url, creds_dir) = match &broker.url {
        Some(url) => (url.clone(), broker.credentials.clone()),
        None => {
            let dir = out.join("broker");
            let files = fedtune_broker::auth::write_config(
                &cfg.course.name,
                cfg.course.clients,
                ("127.0.0.1", 4222),
                &dir,
            )
            .map_err(anyhow::Error::msg)?;
            let nats = LocalNats::start(Some(&files.config))
                .context("starting a local nats-server for the run ([broker] url is unset)")?;
            let url = nats.url();
            _local = Some(nats);
            (url, Some(dir))
        }
    };
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let common = |cmd: &mut Command| {
        cmd.arg(&args.config);
        for s in &args.set {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("--nats").arg(&url);
    };
    let log_file = |name: &str| -> Result<std::fs::File> {
        let path = out.join(format!("{name}.out"));
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))
    };
    let mut server = Command::new(&exe);
    server.arg("server");
    common(&mut server);
    server.arg("--out").arg(&out);
    if args.resume {
        server.arg("--resume");
    }
    if let Some(root) = &args.data_root {
        server.arg("--data-root").arg(root);
    }
    if args.json {
        server.arg("--json");
    }
    if args.quiet {
        server.arg("--quiet");
    }
    if let Some(dir) = &creds_dir {
        server.arg("--creds").arg(dir.join("server.json"));
    }
    let mut server = Spawned {
        name: "server".into(),
        child: server
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the server process")?,
    };
    let mut clients = Vec::new();
    for id in 1..=cfg.course.clients {
        let mut c = Command::new(&exe);
        c.arg("client");
        common(&mut c);
        c.arg("--id").arg(id.to_string());
        if let Some(root) = &args.data_root {
            c.arg("--data-root").arg(root);
        }
        if let Some(dir) = &creds_dir {
            c.arg("--creds").arg(dir.join(format!("client-{id}.json")));
        }
        let log = log_file(&format!("client-{id}"))?;
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        clients.push(Spawned {
            name: format!("client {id}"),
            child: c
                .spawn()
                .with_context(|| format!("cannot start client {id}"))?,
        });
    }
    // The server's exit decides; a client that fails early is reported while we wait.
    let mut reported = std::collections::BTreeSet::new();
    let status = loop {
        if let Some(status) = server.child.try_wait()? {
            break status;
        }
        for c in clients.iter_mut() {
            if let Some(st) = c.child.try_wait()? {
                if !st.success() && reported.insert(c.name.clone()) {
                    eprintln!(
                        "warning: {} exited with {st}; see {}",
                        c.name,
                        out.join(format!("{}.out", c.name.replace(' ', "-")))
                            .display()
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!(
            "the server process failed ({status}); see {}",
            out.join("server.log").display()
        );
    }
    // Clients end when the server's `finish` reaches them.
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in clients.iter_mut() {
        while c.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
