//! Federated LoRA strategies end to end on a tiny Llama: FlexLoRA's
//! clients train at their own ranks, FFA-LoRA never moves A, FedSA-LoRA
//! never shows the server B, and per-client steps reach the trainer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
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
    let d = &Device::Cpu;
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..2)
                .flat_map(|_| {
                    let start = rng.random_range(0..VOCAB as u32);
                    (0..12u32).map(move |i| (start + i) % VOCAB as u32)
                })
                .collect();
            let labels: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            Batch {
                tokens: Tensor::from_vec(ids, (2, 12), d).unwrap(),
                attention_mask: Tensor::ones((2, 12), DType::U32, d).unwrap(),
                labels: Tensor::from_vec(labels, (2, 12), d).unwrap(),
            }
        })
        .collect()
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
    };
    Setup {
        model: Arc::new(Llama::random(cfg, 3, DType::F32, &Device::Cpu).unwrap()),
        lora: LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: ["q_proj", "v_proj"].map(String::from).to_vec(),
            layers_to_transform: None,
        },
    }
}

async fn course(
    s: &Setup,
    strategy: Box<dyn Aggregator>,
    pfl: Option<&str>,
) -> (ParamSet, CourseReport) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let data: BTreeMap<u32, ClientData> = (1..=3)
        .map(|id| {
            let data = ClientData {
                train: batches(&mut rng, 3),
                eval: vec![("test".into(), batches(&mut rng, 1))],
                n_samples: 6,
            };
            (id, data)
        })
        .collect();
    let training = LocalTraining {
        local_steps: 2,
        optim: TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        },
        ..LocalTraining::default()
    };
    let initial = RoundRobinTrainer::initial_adapter(&s.model, &s.lora, 5).unwrap();
    let mut trainer =
        RoundRobinTrainer::new(s.model.clone(), s.lora.clone(), training, data, 5).unwrap();
    if let Some(algorithm) = pfl {
        let cfg = PflConfig {
            algorithm: algorithm.into(),
            ..PflConfig::default()
        };
        let script = PflScript::from_config(&cfg, &Default::default(), None).unwrap();
        trainer = trainer.with_pfl_script(script);
    }
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

fn test_curve(report: &CourseReport) -> Vec<f64> {
    report
        .loss_curve("test")
        .into_iter()
        .map(|(_, l)| l)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flexlora_clients_train_at_their_own_ranks_and_the_course_learns() {
    let s = setup();
    let (initial, report) = course(
        &s,
        strategy("flexlora", "ranks = [2, 4, 8]\nlora_alpha = 16.0"),
        None,
    )
    .await;
    initial.check_compatible(&report.final_params).unwrap();
    let curve = test_curve(&report);
    assert!(curve.last().unwrap() < &curve[0], "{curve:?}");
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
    let (initial, ffa) = course(&s, Box::new(FedAvg), Some("ffa_lora")).await;
    assert_eq!(
        factors(&ffa.final_params, "lora_A"),
        factors(&initial, "lora_A")
    );
    assert_ne!(
        factors(&ffa.final_params, "lora_B"),
        factors(&initial, "lora_B")
    );
    let curve = test_curve(&ffa);
    assert!(
        curve.last().unwrap() < &curve[0],
        "FFA-LoRA learns: {curve:?}"
    );

    let (initial, sa) = course(&s, Box::new(FedAvg), Some("fedsa_lora")).await;
    // The server only ever got its own B back; A was averaged.
    assert_eq!(
        factors(&sa.final_params, "lora_B"),
        factors(&initial, "lora_B")
    );
    assert_ne!(
        factors(&sa.final_params, "lora_A"),
        factors(&initial, "lora_A")
    );
    let curve = test_curve(&sa);
    assert!(
        curve.last().unwrap() < &curve[0],
        "FedSA-LoRA learns: {curve:?}"
    );
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
    let (_, report) = course(&s, Box::new(agg), None).await;
    assert_eq!(report.sampled.len(), 3);
}
