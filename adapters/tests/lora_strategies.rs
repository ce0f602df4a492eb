//! Federated LoRA strategies end to end on a tiny Llama: FlexLoRA's
//! clients train at their own ranks, FFA-LoRA never moves A, FedSA-LoRA
//! never shows the server B, per-client steps reach the trainer, and
//! FedEx-LoRA's and FLoRA's residuals make the global model exactly the
//! clients' average.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use fedtune_adapters::lora::LoraConfig;
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_adapters::pfl::{PflConfig, PflScript};
use fedtune_adapters::round_robin::{ClientData, LocalTraining, RoundRobinTrainer};
use fedtune_adapters::train::{Batch, TrainConfig};
use fedtune_kernel::course::{run_in_process, CourseReport};
use fedtune_kernel::script::{AggregatorSection, ScriptAggregator, ScriptHost};
use fedtune_kernel::{Aggregator, CourseConfig, Event, FedAvg, MetricsLog, ParamSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 32;

fn batches(rng: &mut ChaCha8Rng, n: usize) -> Vec<Batch> {
    common::counting_batches(rng, (n, 2, 12), VOCAB as u32)
}

struct Setup {
    model: Arc<Llama>,
    lora: LoraConfig,
}

fn setup() -> Setup {
    let cfg = LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        ..Default::default()
    };
    Setup {
        model: Arc::new(Llama::random(cfg, 3, DType::F32, &Device::Cpu).unwrap()),
        lora: LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: ["q_proj", "v_proj"].map(String::from).to_vec(),
            ..LoraConfig::default()
        },
    }
}

/// Three clients with three training batches and one test batch each, and
/// `samples(id)` training samples.
fn clients(samples: impl Fn(u32) -> u64) -> BTreeMap<u32, ClientData> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    (1..=3)
        .map(|id| {
            let data = ClientData {
                train: batches(&mut rng, 3),
                eval: vec![("test".into(), batches(&mut rng, 1))],
                n_samples: samples(id),
            };
            (id, data)
        })
        .collect()
}

async fn course(
    s: &Setup,
    strategy: Box<dyn Aggregator>,
    optim: TrainConfig,
    extend: impl FnOnce(RoundRobinTrainer) -> RoundRobinTrainer,
) -> (ParamSet, CourseReport) {
    let data = clients(|_| 6);
    let training = LocalTraining {
        local_steps: 2,
        optim,
        ..LocalTraining::default()
    };
    let initial = RoundRobinTrainer::initial_adapter(&s.model, &s.lora, 5).unwrap();
    let trainer =
        extend(RoundRobinTrainer::new(s.model.clone(), s.lora.clone(), training, data, 5).unwrap());
    let cfg = CourseConfig::from_toml("[federate]\nrounds = 3\nclients = 3\n", "<test>").unwrap();
    let report = run_in_process(
        &cfg,
        initial.clone(),
        Arc::new(Mutex::new(trainer)),
        strategy,
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();
    (initial, report)
}

fn adam() -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        ..TrainConfig::default()
    }
}

/// A course of plain local training planned by the shipped pFL script `algorithm`.
async fn pfl_course(s: &Setup, algorithm: &str) -> (ParamSet, CourseReport) {
    let cfg = PflConfig {
        algorithm: algorithm.into(),
        ..PflConfig::default()
    };
    let script = PflScript::from_config(&cfg, &Default::default(), None).unwrap();
    course(s, Box::new(FedAvg), adam(), |t| t.with_pfl_script(script)).await
}

fn strategy(name: &str, hp: &str) -> Box<dyn Aggregator> {
    let section = AggregatorSection {
        script: Some(name.into()),
        params: hp.parse().unwrap(),
    };
    let source = section.resolve(None).unwrap().unwrap();
    Box::new(
        ScriptAggregator::new(
            ScriptHost::new(&Default::default()),
            &source,
            &section.params,
        )
        .unwrap(),
    )
}

fn factors(p: &ParamSet, which: &str) -> ParamSet {
    let mut out = ParamSet::new();
    for (name, t) in p.iter().filter(|(n, _)| n.contains(which)) {
        out.insert_tensor(name, t.clone());
    }
    out
}

/// The course's test loss ended below where it started.
fn assert_learns(report: &CourseReport, what: &str) {
    let curve: Vec<f64> = report
        .loss_curve("test")
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert!(
        curve.last().unwrap() < &curve[0],
        "{what} learns: {curve:?}"
    );
}

/// The factor named `kept` ended as it started, the one named `moved` did not.
fn assert_kept_and_moved(initial: &ParamSet, last: &ParamSet, kept: &str, moved: &str) {
    assert_eq!(factors(last, kept), factors(initial, kept), "{kept} moved");
    assert_ne!(
        factors(last, moved),
        factors(initial, moved),
        "{moved} stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flexlora_clients_train_at_their_own_ranks_and_the_course_learns() {
    let s = setup();
    let flex = strategy("flexlora", "ranks = [2, 4, 8]\nlora_alpha = 16.0");
    let (initial, report) = course(&s, flex, adam(), |t| t).await;
    initial.check_compatible(&report.final_params).unwrap();
    assert_learns(&report, "FlexLoRA");
    // Smaller ranks cost fewer bytes up: client 1 (rank 2) < 2 (rank 4) < 3 (rank 8).
    let up = |c: u32| {
        report
            .records
            .iter()
            .filter(|r| r.event == Event::Train && r.client == Some(c))
            .map(|r| r.bytes_up)
            .sum::<u64>()
    };
    assert!(
        up(1) < up(2) && up(2) < up(3),
        "{} {} {}",
        up(1),
        up(2),
        up(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffa_lora_never_moves_a_and_fedsa_lora_never_shows_the_server_b() {
    let s = setup();
    let (initial, ffa) = pfl_course(&s, "ffa_lora").await;
    assert_kept_and_moved(&initial, &ffa.final_params, "lora_A", "lora_B");
    assert_learns(&ffa, "FFA-LoRA");

    // A frozen A never travels back: fewer bytes up than plain FedAvg.
    let (_, plain) = course(&s, Box::new(FedAvg), adam(), |t| t).await;
    let up = |r: &CourseReport| r.server_stats.bytes_in;
    assert!(up(&ffa) < up(&plain), "{} vs {}", up(&ffa), up(&plain));

    let (initial, sa) = pfl_course(&s, "fedsa_lora").await;
    // Nor does the local B.
    assert!(up(&sa) < up(&plain), "{} vs {}", up(&sa), up(&plain));
    // The server only ever got its own B back; A was averaged.
    assert_kept_and_moved(&initial, &sa.final_params, "lora_B", "lora_A");
    assert_learns(&sa, "FedSA-LoRA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_steps_from_configure_fit_reach_the_llm_trainer() {
    let s = setup();
    let text = "fn configure_fit(g, clients, round) { clients.map(|c| fit_ins(c, #{ local_steps: c, lr: 0.001 })) }\nfn aggregate_fit(g, results, round) {\n    for r in results { if r.local_steps != r.client { throw `client ${r.client}: ${r.local_steps} steps`; } }\n    weighted_mean(results)\n}";
    let source = fedtune_kernel::script::ScriptSource::BuiltIn {
        name: "steps",
        text: Box::leak(text.to_string().into_boxed_str()),
    };
    let agg = ScriptAggregator::new(
        ScriptHost::new(&Default::default()),
        &source,
        &toml::Table::new(),
    )
    .unwrap();
    let (_, report) = course(&s, Box::new(agg), adam(), |t| t).await;
    assert_eq!(report.sampled.len(), 3);
}

/// SCAFFOLD's client half, by hand on one SGD step: the correction c − cᵢ
/// moves the trained adapter by exactly −η·(c − cᵢ) from where plain
/// training takes it, and the control-variate update sent back is
/// Δcᵢ = −c + (x − y)/(K·η) with cᵢ = 0.
#[test]
fn scaffold_clients_correct_their_gradient_and_send_the_option_ii_update() {
    use fedtune_adapters::hooks::HookScript;
    use fedtune_kernel::script::ScriptSection;
    use fedtune_kernel::{LocalTrainer, TrainContext};
    let s = setup();
    let lr = 0.05;
    let trainer = |hooks: bool| {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let data = BTreeMap::from([(
            1,
            ClientData {
                train: batches(&mut rng, 2),
                eval: vec![],
                n_samples: 4,
            },
        )]);
        let training = LocalTraining {
            local_steps: 1,
            optim: TrainConfig {
                lr,
                optimizer: fedtune_adapters::train::OptimizerKind::Sgd,
                // Clipping would scale the corrected gradient as a whole.
                max_grad_norm: None,
                ..TrainConfig::default()
            },
            ..LocalTraining::default()
        };
        let t = RoundRobinTrainer::new(s.model.clone(), s.lora.clone(), training, data, 5).unwrap();
        if !hooks {
            return t;
        }
        let section = ScriptSection {
            script: Some("scaffold".into()),
            params: toml::Table::new(),
        };
        let h = HookScript::from_config(&section, &Default::default(), None)
            .unwrap()
            .unwrap();
        t.with_hooks(h)
    };
    let mut x = RoundRobinTrainer::initial_adapter(&s.model, &s.lora, 5).unwrap();
    // B = 0 would make A's gradient 0; give both factors values.
    x = x.map_values(|v| if v == 0.0 { 0.1 } else { v });
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut c = x.clone();
    for (_, t) in c.iter_mut() {
        t.data_mut()
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-0.5..0.5));
    }
    let mut extra = ParamSet::new();
    for (name, t) in c.iter() {
        extra.insert_tensor(format!("c/{name}"), t.clone());
    }
    let ctx = TrainContext::new(1, 7, Default::default(), Default::default())
        .with_fit(Default::default(), extra.clone());
    let plain = trainer(false).train(1, &x, &ctx).unwrap();
    let mut with = trainer(true);
    let corrected = with.train(1, &x, &ctx).unwrap();
    let want = plain.params.sub(&c.scale(lr as f32)).unwrap();
    let off = corrected.params.sub(&want).unwrap().l2_norm();
    assert!(off < 1e-5 * want.l2_norm(), "{off}");
    let dc = &corrected.extra;
    let expected = x
        .sub(&corrected.params)
        .unwrap()
        .scale(1.0 / lr as f32)
        .sub(&c)
        .unwrap();
    for (name, t) in expected.iter() {
        let got = dc.get(&format!("dc/{name}")).unwrap();
        let diff: f32 = got
            .data()
            .iter()
            .zip(t.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-3, "{name}: {diff}");
    }
    // Without the server's c the hook says what is missing.
    let bare = TrainContext::new(2, 7, Default::default(), Default::default());
    let err = with.train(1, &x, &bare).unwrap_err().to_string();
    assert!(
        err.contains("set [aggregator] script = \"scaffold\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaffold_course_runs_end_to_end() {
    let s = setup();
    let section = fedtune_kernel::script::ScriptSection {
        script: Some("scaffold".into()),
        params: toml::Table::new(),
    };
    let hooks =
        fedtune_adapters::hooks::HookScript::from_config(&section, &Default::default(), None)
            .unwrap()
            .unwrap();
    let sgd = TrainConfig {
        lr: 0.05,
        optimizer: fedtune_adapters::train::OptimizerKind::Sgd,
        ..TrainConfig::default()
    };
    let scaffold = strategy("scaffold", "num_clients = 3");
    let (_, report) = course(&s, scaffold, sgd, |t| t.with_hooks(hooks)).await;
    assert_learns(&report, "SCAFFOLD");
    // The control variates travel both ways: more bytes than the adapter alone.
    let round = report
        .records
        .iter()
        .find(|r| r.event == Event::Round)
        .unwrap();
    assert!(round.bytes_down > 0 && round.bytes_up > 0);
}

/// A server that sends a lora_A of no rows, of no dimensions, or claiming
/// a huge rank over no inputs gets an error back, not a panic or an
/// allocation of that rank.
#[test]
fn malformed_ranks_from_the_server_are_refused() {
    use fedtune_kernel::{LocalTrainer, TrainContext};
    let s = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data = BTreeMap::from([(
        1,
        ClientData {
            train: batches(&mut rng, 1),
            eval: vec![],
            n_samples: 2,
        },
    )]);
    let mut t = RoundRobinTrainer::new(
        s.model.clone(),
        s.lora.clone(),
        LocalTraining::default(),
        data,
        5,
    )
    .unwrap();
    let good = RoundRobinTrainer::initial_adapter(&s.model, &s.lora, 5).unwrap();
    let a = good
        .names()
        .find(|n| n.contains("lora_A"))
        .unwrap()
        .to_string();
    for shape in [vec![], vec![1 << 40, 0], vec![0, 16]] {
        let mut bad = good.clone();
        let n: usize = shape.iter().product();
        bad.insert(&a, shape.clone(), vec![0.0; n]).unwrap();
        let ctx = TrainContext::new(1, 1, Default::default(), Default::default());
        assert!(t.train(1, &bad, &ctx).is_err(), "{shape:?}");
    }
    // The trainer is still usable.
    let ctx = TrainContext::new(1, 1, Default::default(), Default::default());
    assert!(t.train(1, &good, &ctx).is_ok());
}

/// One fit as the client saw it.
#[derive(Clone)]
struct Fit {
    round: u64,
    client: u32,
    /// What the server sent.
    sent: ParamSet,
    /// What the client ended with: its update, the sent tensors it did not
    /// send back filled in.
    ended: ParamSet,
    samples: u64,
    /// Whether the update carried a residual back.
    sent_back_residual: bool,
}

/// A trainer that records every fit of the one it wraps.
struct Recording {
    inner: RoundRobinTrainer,
    fits: Arc<Mutex<Vec<Fit>>>,
}

impl fedtune_kernel::LocalTrainer for Recording {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &fedtune_kernel::TrainContext,
    ) -> Result<fedtune_kernel::LocalUpdate, fedtune_kernel::course::TrainerError> {
        let update = self.inner.train(client, global, ctx)?;
        let mut ended = global.clone();
        for (name, t) in update.params.iter() {
            ended.insert_tensor(name, t.clone());
        }
        self.fits.lock().unwrap().push(Fit {
            round: ctx.round,
            client,
            sent: global.clone(),
            ended,
            samples: update.n_samples,
            sent_back_residual: update.params.names().any(|n| n.contains("lora_residual")),
        });
        Ok(update)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &fedtune_kernel::TrainContext,
    ) -> Result<Vec<fedtune_kernel::SplitEval>, fedtune_kernel::course::TrainerError> {
        self.inner.evaluate(client, global, ctx)
    }
}

/// `params` as a LoRA adapter of `base`'s settings at its own rank.
fn adapter_of(s: &Setup, params: &ParamSet) -> fedtune_adapters::lora::Lora {
    use fedtune_adapters::adapter::Adapter;
    let a = params.names().find(|n| n.contains("lora_A")).unwrap();
    let cfg = LoraConfig {
        r: params.get(a).unwrap().shape()[0],
        ..s.lora.clone()
    };
    let lora =
        fedtune_adapters::lora::Lora::new(s.model.config(), cfg, 0, DType::F32, &Device::Cpu)
            .unwrap();
    lora.load_param_set(params).unwrap();
    lora
}

/// The largest difference between the weight change `R + s·B·A` of
/// `global` and the clients' sample-weighted average of theirs, over every
/// adapted projection.
fn gap_to_average(s: &Setup, global: &ParamSet, fits: &[&Fit]) -> f64 {
    use fedtune_adapters::model::Projection;
    let total: u64 = fits.iter().map(|f| f.samples).sum();
    let g = adapter_of(s, global);
    let mut worst = 0.0f64;
    for p in [Projection::Q, Projection::V] {
        let want = fits
            .iter()
            .map(|f| {
                let delta = adapter_of(s, &f.ended).merged_delta(0, p).unwrap().unwrap();
                (delta * (f.samples as f64 / total as f64)).unwrap()
            })
            .reduce(|x, y| (x + y).unwrap())
            .unwrap();
        let got = g.merged_delta(0, p).unwrap().unwrap();
        let gap = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        worst = worst.max(f64::from(gap.to_scalar::<f32>().unwrap()));
    }
    worst
}

/// A 2-round course of `strategy` with clients of 3, 5 and 7 samples,
/// every fit recorded.
async fn recorded_course(s: &Setup, strategy: Box<dyn Aggregator>) -> (CourseReport, Vec<Fit>) {
    let data = clients(|id| 2 * u64::from(id) + 1);
    let training = LocalTraining {
        local_steps: 3,
        optim: adam(),
        ..LocalTraining::default()
    };
    let inner = RoundRobinTrainer::new(s.model.clone(), s.lora.clone(), training, data, 5).unwrap();
    let initial = RoundRobinTrainer::initial_adapter(&s.model, &s.lora, 5).unwrap();
    let fits = Arc::new(Mutex::new(Vec::new()));
    let recording = Recording {
        inner,
        fits: fits.clone(),
    };
    let cfg = CourseConfig::from_toml("[federate]\nrounds = 2\nclients = 3\n", "<test>").unwrap();
    let report = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(recording)),
        strategy,
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();
    let fits = fits.lock().unwrap().clone();
    (report, fits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedex_lora_and_flora_make_the_global_model_exactly_the_clients_average() {
    let mut s = setup();
    s.lora.residual = true;
    for (name, hp) in [
        ("fedex_lora", "lora_alpha = 16.0"),
        ("flora", "ranks = [2, 4, 8]\nlora_alpha = 16.0"),
    ] {
        let (report, fits) = recorded_course(&s, strategy(name, hp)).await;
        assert_learns(&report, name);
        let round = |r: u64| fits.iter().filter(|f| f.round == r).collect::<Vec<_>>();
        assert_eq!((round(1).len(), round(2).len()), (3, 3));
        // After round 1 the global model is what round 2 was sent (FLoRA's
        // fresh factors have B = 0, so only the residual carries it);
        // after round 2 it is the final adapter.
        let after_1 = &round(2)[0].sent;
        let gaps = [
            gap_to_average(&s, after_1, &round(1)),
            gap_to_average(&s, &report.final_params, &round(2)),
        ];
        assert!(gaps.iter().all(|&g| g < 1e-6), "{name}: {gaps:?}");
        // The residual moved, and no client sent one back.
        let largest = after_1
            .iter()
            .filter(|(n, _)| n.contains("lora_residual"))
            .flat_map(|(_, t)| t.data().to_vec())
            .fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(largest > 1e-4, "{name}: the residual stayed zero");
        assert!(fits.iter().all(|f| !f.sent_back_residual), "{name}");
        if name == "flora" {
            // Client c trained at rank 2, 4, 8 from the initial A and a zero B.
            for f in round(2) {
                let a = f.sent.names().find(|n| n.contains("lora_A")).unwrap();
                assert_eq!(
                    f.sent.get(a).unwrap().shape()[0],
                    [2, 4, 8][f.client as usize - 1]
                );
            }
        } else {
            // Plain FedAvg of the same fits misses the average: the check can fail.
            let updates: Vec<_> = round(2)
                .iter()
                .map(|f| fedtune_kernel::ClientUpdate::new(f.client, f.samples, f.ended.clone()))
                .collect();
            let avg = FedAvg.aggregate(after_1, &updates, 2).unwrap();
            let gap = gap_to_average(&s, &avg, &round(2));
            assert!(gap > 1e-5, "FedAvg's gap {gap}");
        }
    }
}
