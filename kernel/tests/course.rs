//! Whole courses in one process with the numeric least-squares trainer.

use std::sync::{Arc, Mutex};

use fedtune_kernel::course::{
    client_worker, run_in_process, server_worker, LeastSquaresTrainer, LocalTrainer, LocalUpdate,
    SplitEval, SyntheticSpec, TrainContext, TrainerError,
};
use fedtune_kernel::{
    encode, CourseConfig, EncodeOptions, Envelope, Event, FedAvg, InProcTransport, MetricsLog,
    MsgKind, ParamSet, Party, Shutdown, Transport,
};

fn config(text: &str) -> CourseConfig {
    CourseConfig::from_toml(text, "<test>").unwrap()
}

fn trainer(spec: SyntheticSpec, steps: usize) -> LeastSquaresTrainer {
    LeastSquaresTrainer::synthetic(spec, 0.1, steps)
}

mod common;

async fn run(cfg: &CourseConfig, t: LeastSquaresTrainer) -> fedtune_kernel::course::CourseReport {
    common::run_least_squares(cfg, t).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_course_over_three_clients_and_five_rounds_lowers_the_global_loss() {
    let cfg = config("[federate]\nrounds = 5\nclients = 3\n");
    let report = run(&cfg, trainer(SyntheticSpec::default(), 5)).await;
    let curve = report.loss_curve("test");
    let rounds: Vec<u64> = curve.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        rounds,
        vec![0, 1, 2, 3, 4, 5],
        "evaluated before training and after every round"
    );
    for pair in curve.windows(2) {
        assert!(
            pair[1].1 < pair[0].1,
            "loss must fall every round: {curve:?}"
        );
    }
    assert!(curve[5].1 < 0.2 * curve[0].1, "{curve:?}");

    // One train record per client per round, one round record per round.
    let train: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.event == Event::Train)
        .collect();
    assert_eq!(train.len(), 15);
    assert!(train
        .iter()
        .all(|r| r.bytes_up > 0 && r.bytes_down > 0 && r.samples == Some(200)));
    for round in 1..=5 {
        let up: u64 = train
            .iter()
            .filter(|r| r.round == round)
            .map(|r| r.bytes_up)
            .sum();
        let rec = report
            .records
            .iter()
            .find(|r| r.event == Event::Round && r.round == round)
            .unwrap();
        assert_eq!(
            rec.bytes_up, up,
            "round {round} totals its clients' uploads"
        );
        assert_eq!(rec.samples, Some(600));
    }
    assert_eq!(report.server_stats.rejected, 0);
    assert_eq!(report.client_stats.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_iid_clients_fedavg_approaches_the_centralized_solution() {
    let cfg = config("[federate]\nrounds = 40\nclients = 4\neval_every = 40\n");
    let t = trainer(
        SyntheticSpec {
            clients: 4,
            ..SyntheticSpec::default()
        },
        5,
    );
    let central = t.centralized_solution();
    let central_loss = t.global_train_loss(&central).unwrap();
    let judge = t.clone();
    let report = run(&cfg, t).await;
    let gap = report.final_params.sub(&central).unwrap().l2_norm() / central.l2_norm();
    let fed_loss = judge.global_train_loss(&report.final_params).unwrap();
    assert!(
        gap < 0.01,
        "relative distance to the centralized solution: {gap}"
    );
    assert!(
        fed_loss < central_loss * 1.01,
        "federated {fed_loss} vs centralized {central_loss}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_participation_samples_the_configured_number_reproducibly() {
    let cfg = config(
        "[federate]\nrounds = 12\nclients = 6\nsample_clients = 2\neval_every = 4\nseed = 5\n",
    );
    let spec = SyntheticSpec {
        clients: 6,
        ..SyntheticSpec::default()
    };
    let a = run(&cfg, trainer(spec, 3)).await;
    let b = run(&cfg, trainer(spec, 3)).await;
    assert_eq!(a.sampled.len(), 12);
    for (round, picked) in &a.sampled {
        assert_eq!(picked.len(), 2, "round {round}");
        let trained: Vec<u32> = a
            .records
            .iter()
            .filter(|r| r.event == Event::Train && r.round == *round)
            .map(|r| r.client.unwrap())
            .collect();
        let mut trained = trained;
        trained.sort();
        assert_eq!(
            &trained, picked,
            "exactly the sampled clients trained in round {round}"
        );
    }
    assert_eq!(a.sampled, b.sampled, "same seed, same schedule");
    assert_eq!(
        a.final_params, b.final_params,
        "same seed, bit-identical result"
    );
    let distinct: std::collections::BTreeSet<_> =
        a.sampled.iter().map(|(_, p)| p.clone()).collect();
    assert!(
        distinct.len() > 3,
        "rounds draw different subsets: {:?}",
        a.sampled
    );

    let other = config(
        "[federate]\nrounds = 12\nclients = 6\nsample_clients = 2\neval_every = 4\nseed = 6\n",
    );
    let c = run(&other, trainer(spec, 3)).await;
    assert_ne!(a.sampled, c.sampled, "another seed, another schedule");
    // Evaluation every 4 rounds (plus the initial one) involves all clients.
    let eval_rounds: Vec<u64> = a.loss_curve("test").iter().map(|(r, _)| *r).collect();
    assert_eq!(eval_rounds, vec![0, 4, 8, 12]);
    let evals_round_4 = a
        .records
        .iter()
        .filter(|r| {
            r.event == Event::Eval
                && r.round == 4
                && r.client.is_some()
                && r.split.as_deref() == Some("test")
        })
        .count();
    assert_eq!(evals_round_4, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_and_compressed_courses_still_learn_and_send_fewer_bytes() {
    let plain = config("[federate]\nrounds = 4\nclients = 3\n");
    let small = config("[federate]\nrounds = 4\nclients = 3\n[wire]\nquantization = \"int8\"\ncompression = \"deflate\"\n");
    let spec = SyntheticSpec {
        dim: 256,
        ..SyntheticSpec::default()
    };
    let a = run(&plain, trainer(spec, 5)).await;
    let b = run(&small, trainer(spec, 5)).await;
    let (a0, a_end) = (
        a.loss_curve("test")[0].1,
        a.loss_curve("test").last().unwrap().1,
    );
    let b_end = b.loss_curve("test").last().unwrap().1;
    assert!(b_end < 0.5 * a0, "int8 course learns: {a0} → {b_end}");
    assert!(
        (b_end - a_end).abs() < 0.05 * a0,
        "and lands near the f32 course: {a_end} vs {b_end}"
    );
    let bytes = |r: &fedtune_kernel::course::CourseReport| {
        r.server_stats.bytes_out + r.server_stats.bytes_in
    };
    assert!(
        bytes(&b) * 2 < bytes(&a),
        "int8+deflate {} vs f32 {}",
        bytes(&b),
        bytes(&a)
    );
}

/// A trainer that fails for one client: the course must end with that error, not hang.
struct Failing(LeastSquaresTrainer);

impl LocalTrainer for Failing {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        if client == 2 && ctx.round == 2 {
            return Err("disk full".into());
        }
        self.0.train(client, global, ctx)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        self.0.evaluate(client, global, ctx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_trainer_ends_the_course_with_its_error() {
    let cfg = config("[federate]\nrounds = 5\nclients = 3\n");
    let t = trainer(SyntheticSpec::default(), 2);
    let initial = t.initial_params();
    let err = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(Failing(t))),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("client 2: training in round 2 failed: disk full"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_course_ends_with_the_round_client_and_step_instead_of_hanging() {
    // lr = 10 on least squares diverges within a few local steps. Before, the
    // NaN update was dropped as undecodable and the server waited forever.
    let cfg = config("[federate]\nrounds = 3\nclients = 3\n");
    let t = LeastSquaresTrainer::synthetic(SyntheticSpec::default(), 10.0, 50);
    let initial = t.initial_params();
    let run = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(t)),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    );
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the course ends instead of waiting forever")
        .unwrap_err()
        .to_string();
    // Whichever client reports first ends the course: it names itself.
    assert!(err.starts_with("server: round 1: client "), "{err}");
    assert!(
        err.contains(": training in round 1 failed: diverged at local step"),
        "{err}"
    );
    assert!(err.contains("federate.on_divergence"), "{err}");
}

/// Runs the two-client course `toml` with the synthetic trainer wrapped by
/// `wrap`, and returns the error it must end with (within 20 s: a refused
/// answer never stalls a round).
async fn two_client_course_error<W: LocalTrainer + 'static>(
    toml: &str,
    wrap: impl FnOnce(LeastSquaresTrainer) -> W,
) -> String {
    let t = trainer(
        SyntheticSpec {
            clients: 2,
            ..SyntheticSpec::default()
        },
        2,
    );
    let initial = t.initial_params();
    let cfg = config(toml);
    let run = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(wrap(t))),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the course does not wait forever on an answer it refused")
        .unwrap_err()
        .to_string()
}

/// A trainer whose client 2 returns an update the server cannot use
/// (a tensor of another shape) and NaN in its metrics map.
struct Misshapen(LeastSquaresTrainer);

impl LocalTrainer for Misshapen {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        let mut update = self.0.train(client, global, ctx)?;
        update.metrics.insert("odd".into(), f64::NAN);
        if client == 2 {
            update.params.insert("w", vec![1], vec![0.0])?;
        }
        Ok(update)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        self.0.evaluate(client, global, ctx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_update_from_an_awaited_client_fails_the_round_instead_of_stalling_it() {
    let err = two_client_course_error("[federate]\nrounds = 2\nclients = 2\n", Misshapen).await;
    assert!(
        err.contains("client 2: its update for round 1 cannot be used: update does not match"),
        "{err}"
    );
}

/// A trainer whose client 2 reports what would bloat the records: a
/// thousand metrics with its update, or a split with a 1,000-byte name.
struct Boastful(LeastSquaresTrainer, bool);

impl LocalTrainer for Boastful {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        let mut update = self.0.train(client, global, ctx)?;
        if client == 2 && self.1 {
            update
                .metrics
                .extend((0..1000).map(|i| (format!("m{i}"), 1.0)));
        }
        Ok(update)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        let mut results = self.0.evaluate(client, global, ctx)?;
        if client == 2 && !self.1 {
            results[0].split = "x".repeat(1000);
        }
        Ok(results)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_reports_into_the_records_is_bounded() {
    let cfg = "[federate]\nrounds = 1\nclients = 2\n";
    for (in_update, expected) in [
        (
            true,
            "its update for round 1 cannot be used: 1000 metrics (at most 64)",
        ),
        (
            false,
            "its evaluation of round 0 cannot be used: split name \"xxx",
        ),
    ] {
        let err = two_client_course_error(cfg, |t| Boastful(t, in_update)).await;
        assert!(err.contains(expected), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_skip_client_a_failing_client_is_left_out_of_its_round() {
    let cfg = config("[federate]\nrounds = 3\nclients = 3\non_divergence = \"skip-client\"\n");
    let t = trainer(SyntheticSpec::default(), 2);
    let initial = t.initial_params();
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        run_in_process(
            &cfg,
            initial,
            Arc::new(Mutex::new(Failing(t))),
            Box::new(FedAvg),
            MetricsLog::in_memory(),
        ),
    )
    .await
    .expect("the course does not wait for the failed client")
    .unwrap();
    let failed: Vec<(u64, Option<u32>)> = report
        .records
        .iter()
        .filter(|r| r.extra.get("failed") == Some(&1.0))
        .map(|r| (r.round, r.client))
        .collect();
    assert_eq!(failed, vec![(2, Some(2))]);
    let round2 = report
        .records
        .iter()
        .find(|r| r.event == Event::Round && r.round == 2)
        .unwrap();
    assert_eq!(
        round2.extra.get("clients"),
        Some(&2.0),
        "aggregated without client 2"
    );
    assert_eq!(
        report.loss_curve("test").len(),
        4,
        "every evaluation still ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_messages_are_rejected_without_disturbing_the_course() {
    let cfg = config("[federate]\nname = \"guarded\"\nrounds = 2\nclients = 2\n");
    let t = trainer(
        SyntheticSpec {
            clients: 2,
            ..SyntheticSpec::default()
        },
        3,
    );
    let initial = t.initial_params();
    let shared: fedtune_kernel::course::SharedTrainer = Arc::new(Mutex::new(t));
    let bus = InProcTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(bus.clone());
    let server = server_worker(
        cfg.clone(),
        initial.clone(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
        transport.clone(),
    );
    let sub = transport.subscribe(Party::Server).await.unwrap();

    // Before anyone joins: garbage, an out-of-range id, an update nobody asked for,
    // and an update with the wrong shapes.
    let frame = |env: &Envelope| encode(env, EncodeOptions::default()).unwrap();
    bus.send(
        Party::Client(1),
        Party::Server,
        bytes::Bytes::from_static(b"\x00garbage"),
    )
    .await
    .unwrap();
    let stranger = Envelope::new(
        "guarded",
        0,
        Party::Client(7),
        vec![Party::Server],
        MsgKind::JoinIn,
    );
    bus.send(Party::Client(7), Party::Server, frame(&stranger))
        .await
        .unwrap();
    let early = Envelope::new(
        "guarded",
        1,
        Party::Client(1),
        vec![Party::Server],
        MsgKind::Update,
    )
    .with_meta("n_samples", 5u64)
    .with_payload(initial.clone());
    bus.send(Party::Client(1), Party::Server, frame(&early))
        .await
        .unwrap();

    let server_task = tokio::spawn(server.run_subscribed(sub, Shutdown::never()));
    let clients: Vec<_> = (1..=2)
        .map(|id| {
            tokio::spawn(
                client_worker(id, &cfg, shared.clone(), transport.clone()).run(Shutdown::never()),
            )
        })
        .collect();
    let out = server_task.await.unwrap().unwrap();
    for c in clients {
        let c = c.await.unwrap().unwrap();
        assert_eq!(
            c.state.latest_global(),
            Some(out.state.global()),
            "clients got the final model"
        );
    }
    assert!(out.state.is_finished());
    assert_eq!(
        out.stats.rejected, 3,
        "garbage, stranger, unrequested update"
    );
    assert_eq!(out.state.evals().last().unwrap().round, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_written_as_json_lines_while_the_course_runs() {
    let dir = tempdir();
    let path = dir.join("metrics.jsonl");
    let cfg = config("[federate]\nrounds = 2\nclients = 2\n");
    let t = trainer(
        SyntheticSpec {
            clients: 2,
            ..SyntheticSpec::default()
        },
        2,
    );
    let initial = t.initial_params();
    let report = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(t)),
        Box::new(FedAvg),
        MetricsLog::to_file(&path).unwrap(),
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), report.records.len());
    for key in [
        "event",
        "round",
        "client",
        "split",
        "loss",
        "samples",
        "bytes_up",
        "bytes_down",
        "compute_s",
        "wall_s",
    ] {
        assert!(
            lines.iter().all(|l| l.get(key).is_some()),
            "every line has `{key}`"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fedtune-course-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_course_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does() {
    let spec = || SyntheticSpec {
        clients: 4,
        ..SyntheticSpec::default()
    };
    let text =
        "[federate]\nrounds = 6\nclients = 4\nsample_clients = 2\neval_every = 3\nseed = 9\n";
    let full = run(&config(text), trainer(spec(), 3)).await;

    // Stop after round 4 (the "kill"), keep the parameters as a checkpoint would …
    let first = run(
        &config(&text.replace("rounds = 6", "rounds = 4")),
        trainer(spec(), 3),
    )
    .await;
    // … and resume a fresh server and fresh clients from there.
    let setup = fedtune_kernel::course::ServerSetup::new(
        config(text),
        first.final_params.clone(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .resumed(4, first.final_params.clone());
    let resumed = fedtune_kernel::course::run_in_process_from(
        setup,
        Arc::new(Mutex::new(trainer(spec(), 3))),
    )
    .await
    .unwrap();
    assert_eq!(resumed.final_params, full.final_params, "bit for bit");
    let rounds: Vec<u64> = resumed
        .records
        .iter()
        .filter(|r| r.event == Event::Round)
        .map(|r| r.round)
        .collect();
    assert_eq!(rounds, vec![5, 6], "only the rounds not yet done run again");
    assert_eq!(
        resumed.sampled,
        full.sampled[4..].to_vec(),
        "the same clients are sampled"
    );
}

/// Client 3's trainer in the tests below: in round `hang_in` it reports that
/// it started (the "kill" cue) and then waits until its worker is shut
/// down, as a process killed mid-round never answers.
struct Hangs {
    inner: LeastSquaresTrainer,
    hang_in: u64,
    /// Each training takes at least this long (a real client is not instant).
    delay: std::time::Duration,
    started: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl LocalTrainer for Hangs {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        if ctx.round == self.hang_in {
            let _ = self.started.send(ctx.round);
            while !ctx.is_cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            return Err("killed".into());
        }
        std::thread::sleep(self.delay);
        self.inner.train(client, global, ctx)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        self.inner.evaluate(client, global, ctx)
    }
}

/// A server and three clients on one bus, client 3 on its own trainer that
/// hangs in round 2 and is then "killed"; `restart` decides when client 3
/// comes back (with a fresh trainer). Returns the server's outcome.
async fn course_with_a_killed_client(
    cfg: &CourseConfig,
    restart_after_round: Option<u64>,
) -> fedtune_kernel::worker::WorkerOutcome<fedtune_kernel::course::ServerState> {
    course_with_a_killed_stateful_client(cfg, restart_after_round, false, None).await
}

/// As [`course_with_a_killed_client`]; with `counted`, every trainer is
/// wrapped in [`Counted`], and with `keep`, client 3 keeps its state there.
async fn course_with_a_killed_stateful_client(
    cfg: &CourseConfig,
    restart_after_round: Option<u64>,
    counted: bool,
    keep: Option<&std::path::Path>,
) -> fedtune_kernel::worker::WorkerOutcome<fedtune_kernel::course::ServerState> {
    use fedtune_kernel::ShutdownHandle;
    let t = trainer(SyntheticSpec::default(), 3);
    let initial = t.initial_params();
    let bus = InProcTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(bus.clone());
    let (rounds_tx, mut rounds_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let log = MetricsLog::in_memory().with_observer(Box::new(move |r: &fedtune_kernel::Record| {
        if r.event == Event::Round {
            let _ = rounds_tx.send(r.round);
        }
    }));
    let server = server_worker(
        cfg.clone(),
        initial,
        Box::new(FedAvg),
        log,
        transport.clone(),
    );
    let sub = transport.subscribe(Party::Server).await.unwrap();
    let server_task = tokio::spawn(server.run_subscribed(sub, Shutdown::never()));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let slow = |hang_in| Hangs {
        inner: t.clone(),
        hang_in,
        delay: std::time::Duration::from_millis(20),
        started: started_tx.clone(),
    };
    let wrap = |h: Hangs| -> fedtune_kernel::course::SharedTrainer {
        if counted {
            Arc::new(Mutex::new(Counted::new(h)))
        } else {
            Arc::new(Mutex::new(h))
        }
    };
    let shared = wrap(slow(0));
    let mut others = Vec::new();
    for id in 1..=2 {
        let w = client_worker(id, cfg, shared.clone(), transport.clone());
        others.push(tokio::spawn(w.run(Shutdown::never())));
    }
    let (kill, signal) = ShutdownHandle::new();
    let client3 = |h: Hangs| {
        let mut w = client_worker(3, cfg, wrap(h), transport.clone());
        if let Some(dir) = keep {
            w.state_mut().keep_state_in(dir).unwrap();
        }
        w
    };
    let doomed = tokio::spawn(client3(slow(2)).run(signal));
    assert_eq!(started_rx.recv().await, Some(2), "client 3 began round 2");
    kill.trigger();
    doomed.await.unwrap().unwrap();
    if let Some(after) = restart_after_round {
        while let Some(r) = rounds_rx.recv().await {
            if r >= after {
                break;
            }
        }
    }
    let back = tokio::spawn(client3(slow(0)).run(Shutdown::never()));
    let out = server_task.await.unwrap().unwrap();
    for c in others {
        c.await.unwrap().unwrap();
    }
    let back = back.await.unwrap().unwrap();
    assert_eq!(
        back.state.latest_global(),
        Some(out.state.global()),
        "the restarted client got the final model"
    );
    out
}

fn round_record(
    out: &fedtune_kernel::worker::WorkerOutcome<fedtune_kernel::course::ServerState>,
    round: u64,
) -> fedtune_kernel::Record {
    out.state
        .records()
        .iter()
        .find(|r| r.event == Event::Round && r.round == round)
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_round_is_dropped_after_the_timeout_and_rejoins_the_next_round() {
    let cfg = config(
        "[federate]\nrounds = 5\nclients = 3\nround_timeout_s = 0.3\nmin_clients = 2\njoin_retry_s = 0.05\n",
    );
    let out = course_with_a_killed_client(&cfg, Some(2)).await;
    assert!(out.state.is_finished());
    let r2 = round_record(&out, 2);
    assert_eq!(
        r2.extra["clients"], 2.0,
        "round 2 completed without client 3"
    );
    assert_eq!(r2.extra["dropped"], 1.0);
    assert_eq!(
        out.state.sampled()[1],
        (2, vec![1, 2, 3]),
        "client 3 was asked in round 2"
    );
    // It rejoins while round 3 or the evaluation before it runs, and takes
    // part from the next round on.
    let back = out
        .state
        .sampled()
        .iter()
        .find(|(r, ids)| *r > 2 && ids.contains(&3))
        .map(|(r, _)| *r);
    assert!(
        matches!(back, Some(3 | 4)),
        "client 3 back in round {back:?}"
    );
    assert_eq!(out.state.sampled()[4], (5, vec![1, 2, 3]));
    assert_eq!(round_record(&out, 5).extra["clients"], 3.0);
    assert!(!round_record(&out, 5).extra.contains_key("dropped"));
    // The evaluation after round 2 went on without client 3; later ones include it.
    let evaluated = |round: u64| {
        out.state
            .records()
            .iter()
            .filter(|r| {
                r.event == Event::Eval
                    && r.round == round
                    && r.split.as_deref() == Some("test")
                    && r.client.is_some()
            })
            .count()
    };
    assert_eq!(evaluated(1), 3);
    assert_eq!(evaluated(2), 2);
    assert_eq!(evaluated(5), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_restarted_before_the_timeout_gets_its_round_again_and_nothing_changes() {
    // No timeout at all: the restarted client's join_in makes the server
    // send round 2 again, and the course ends exactly as an uninterrupted one.
    let cfg = config("[federate]\nrounds = 3\nclients = 3\njoin_retry_s = 0.05\n");
    let out = course_with_a_killed_client(&cfg, None).await;
    assert_eq!(round_record(&out, 2).extra["clients"], 3.0);
    let t = trainer(SyntheticSpec::default(), 3);
    let reference = run(&cfg, t).await;
    assert_eq!(out.state.global(), &reference.final_params);
}

/// A trainer whose updates shrink with each fit of a client (a stand-in
/// for optimizer moments): a client that forgot its count trains differently.
struct Counted<T> {
    inner: T,
    fits: std::collections::BTreeMap<u32, u32>,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            fits: Default::default(),
        }
    }
}

impl<T: LocalTrainer> LocalTrainer for Counted<T> {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        let mut update = self.inner.train(client, global, ctx)?;
        let fits = self.fits.entry(client).or_insert(0);
        *fits += 1;
        let shrink = 1.0 / *fits as f32;
        for ((_, t), (_, g)) in update.params.iter_mut().zip(global.iter()) {
            for (x, &g) in t.data_mut().iter_mut().zip(g.data()) {
                *x = g + (*x - g) * shrink;
            }
        }
        Ok(update)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        self.inner.evaluate(client, global, ctx)
    }

    fn save_client(&self, client: u32) -> Result<Option<Vec<u8>>, TrainerError> {
        let fits = self.fits.get(&client).copied().unwrap_or(0);
        Ok(Some(fits.to_le_bytes().to_vec()))
    }

    fn load_client(&mut self, client: u32, bytes: &[u8]) -> Result<(), TrainerError> {
        let fits = u32::from_le_bytes(bytes.try_into().map_err(|_| "not a fit count")?);
        self.fits.insert(client, fits);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_process_takes_up_the_state_it_kept() {
    let cfg = config("[federate]\nrounds = 3\nclients = 3\njoin_retry_s = 0.05\n");
    let t = trainer(SyntheticSpec::default(), 3);
    let initial = t.initial_params();
    let reference = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(Counted::new(t))),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();
    // Client 3 is killed in round 2 and restarted with a fresh trainer:
    // with its state kept it trains round 2 as its second fit, as an
    // uninterrupted client does; without, as its first.
    let dir = std::env::temp_dir().join(format!("fedtune-kept-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let kept = course_with_a_killed_stateful_client(&cfg, None, true, Some(&dir)).await;
    assert_eq!(kept.state.global(), &reference.final_params);
    let saved: Vec<String> = std::fs::read_dir(dir.join("client-3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        saved.iter().any(|f| f == "after-round-000003.msgpack"),
        "{saved:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let forgot = course_with_a_killed_stateful_client(&cfg, None, true, None).await;
    assert_ne!(forgot.state.global(), &reference.final_params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_started_before_the_server_keep_asking_until_it_answers() {
    let cfg = config("[federate]\nrounds = 2\nclients = 2\njoin_retry_s = 0.05\n");
    let t = trainer(
        SyntheticSpec {
            clients: 2,
            ..SyntheticSpec::default()
        },
        3,
    );
    let initial = t.initial_params();
    let bus = InProcTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(bus.clone());
    let shared: fedtune_kernel::course::SharedTrainer = Arc::new(Mutex::new(t.clone()));
    let clients: Vec<_> = (1..=2)
        .map(|id| {
            tokio::spawn(
                client_worker(id, &cfg, shared.clone(), transport.clone()).run(Shutdown::never()),
            )
        })
        .collect();
    // Their first join_in found nobody (sends fail on the bus, as they vanish on NATS).
    tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    let server = server_worker(
        cfg.clone(),
        initial,
        Box::new(FedAvg),
        MetricsLog::in_memory(),
        transport.clone(),
    );
    let out = server.run(Shutdown::never()).await.unwrap();
    assert!(out.state.is_finished());
    for c in clients {
        assert!(c.await.unwrap().unwrap().stats.send_failures >= 1);
    }
    assert_eq!(out.state.global(), &run(&cfg, t).await.final_params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_model_goes_once_to_each_client_instance() {
    let cfg = config("[federate]\nname = \"b\"\nrounds = 1\nclients = 2\n");
    let t = trainer(SyntheticSpec::default(), 1);
    let bus = InProcTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(bus.clone());
    let mut server = server_worker(
        cfg.clone(),
        t.initial_params(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
        transport.clone(),
    );
    let mut base = ParamSet::new();
    base.insert("frozen", vec![2], vec![1.0, 2.0]).unwrap();
    server
        .state_mut()
        .set_base(base.clone(), fedtune_kernel::message::Meta::new());
    let sub = transport.subscribe(Party::Server).await.unwrap();
    let task = tokio::spawn(server.run_subscribed(sub, Shutdown::never()));
    let mut inbox = bus.subscribe(Party::Client(1)).await.unwrap();
    let join = |instance: u64| {
        let env = Envelope::new(
            "b",
            0,
            Party::Client(1),
            vec![Party::Server],
            MsgKind::JoinIn,
        )
        .with_meta("instance", instance);
        encode(&env, EncodeOptions::default()).unwrap()
    };
    // Instance 7 asks twice (a retry), then instance 8 (a restart).
    for instance in [7, 7, 8] {
        bus.send(Party::Client(1), Party::Server, join(instance))
            .await
            .unwrap();
    }
    let mut kinds = Vec::new();
    while kinds.iter().filter(|k| **k == MsgKind::AssignId).count() < 3 {
        let d = inbox.recv().await.unwrap();
        let env =
            fedtune_kernel::decode(&d.frame, &fedtune_kernel::DecodeLimits::default()).unwrap();
        if env.kind == MsgKind::BaseModel {
            assert_eq!(env.payload.as_ref(), Some(&base));
        }
        kinds.push(env.kind);
    }
    assert_eq!(
        kinds,
        [
            MsgKind::BaseModel,
            MsgKind::AssignId,
            MsgKind::AssignId,
            MsgKind::BaseModel,
            MsgKind::AssignId
        ]
    );
    task.abort();
}

/// The in-process bus, but the first `train` request to client 2 is lost on
/// the way, as a broker restart can lose a message in flight.
struct Lossy {
    bus: InProcTransport,
    lost: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Transport for Lossy {
    async fn send(
        &self,
        from: Party,
        to: Party,
        frame: bytes::Bytes,
    ) -> Result<(), fedtune_kernel::TransportError> {
        let train = fedtune_kernel::decode(&frame, &fedtune_kernel::DecodeLimits::default())
            .is_ok_and(|e| e.kind == MsgKind::Train);
        if to == Party::Client(2)
            && train
            && !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(()); // gone
        }
        self.bus.send(from, to, frame).await
    }

    async fn subscribe(
        &self,
        me: Party,
    ) -> Result<fedtune_kernel::Subscription, fedtune_kernel::TransportError> {
        self.bus.subscribe(me).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_in_flight_is_asked_again_when_the_step_times_out() {
    // Every client's answer is needed (min_clients = 3): before, the round
    // waited forever for client 2, which never heard of it.
    let cfg =
        config("[federate]\nrounds = 2\nclients = 3\nround_timeout_s = 0.5\nmin_clients = 3\n");
    let t = trainer(SyntheticSpec::default(), 2);
    let initial = t.initial_params();
    let bus = InProcTransport::new();
    let lossy: Arc<dyn Transport> = Arc::new(Lossy {
        bus: bus.clone(),
        lost: Default::default(),
    });
    let transports = fedtune_kernel::course::Transports {
        server: lossy,
        clients: (1..=3)
            .map(|id| (id, Arc::new(bus.clone()) as Arc<dyn Transport>))
            .collect(),
    };
    let setup = fedtune_kernel::course::ServerSetup::new(
        cfg,
        initial,
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    );
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        fedtune_kernel::course::run_on(setup, Arc::new(Mutex::new(t)), transports),
    )
    .await
    .expect("the round does not wait forever for a lost request")
    .unwrap();
    let round1 = report
        .records
        .iter()
        .find(|r| r.event == Event::Round && r.round == 1)
        .unwrap();
    assert_eq!(round1.extra.get("clients"), Some(&3.0));
}
