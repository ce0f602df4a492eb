//! A federated LoRA course end to end: the kernel's server and clients, FedAvg,
//! and the round-robin LoRA trainer over one shared tiny Llama.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use fedtune_adapters::lora::LoraConfig;
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_adapters::round_robin::{ClientData, LocalTraining, RoundRobinTrainer};
use fedtune_adapters::train::{Batch, TrainConfig};
use fedtune_kernel::course::run_in_process;
use fedtune_kernel::{CourseConfig, Event, FedAvg, MetricsLog};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 48;

fn counting_batches(rng: &mut ChaCha8Rng, batches: usize, rows: usize, len: usize) -> Vec<Batch> {
    common::counting_batches(rng, (batches, rows, len), VOCAB as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_lora_course_lowers_every_clients_loss() {
    let cfg = LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        ..Default::default()
    };
    let model = Arc::new(Llama::random(cfg, 3, DType::F32, &Device::Cpu).unwrap());
    let lora = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: ["q_proj", "v_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        ..LoraConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let data: BTreeMap<u32, ClientData> = (1..=3)
        .map(|id| {
            let train = counting_batches(&mut rng, 4, 4, 16);
            let test = counting_batches(&mut rng, 2, 4, 16);
            (
                id,
                ClientData {
                    train,
                    eval: vec![("test".into(), test)],
                    n_samples: 16,
                },
            )
        })
        .collect();
    let training = LocalTraining {
        local_steps: 4,
        keep_optimizer_state: false,
        optim: TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        },
        ..LocalTraining::default()
    };
    let initial = RoundRobinTrainer::initial_adapter(&model, &lora, 99).unwrap();
    let trainer = RoundRobinTrainer::new(model.clone(), lora, training, data, 99).unwrap();
    let course = CourseConfig::from_toml(
        "[federate]\nname = \"lora\"\nrounds = 5\nclients = 3\n",
        "<test>",
    )
    .unwrap();
    let report = run_in_process(
        &course,
        initial.clone(),
        Arc::new(Mutex::new(trainer)),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();

    let curve = report.loss_curve("test");
    println!("test loss per round: {curve:?}");
    assert_eq!(curve.len(), 6);
    assert!(curve[5].1 < 0.7 * curve[0].1, "{curve:?}");
    for id in 1..=3 {
        let per_client: Vec<f64> = report
            .records
            .iter()
            .filter(|r| r.event == Event::Eval && r.client == Some(id))
            .filter_map(|r| r.loss)
            .collect();
        assert!(
            per_client.last().unwrap() < per_client.first().unwrap(),
            "client {id}: {per_client:?}"
        );
    }
    // The global adapter moved, kept its PEFT names and shapes, and updates crossed the wire.
    initial.check_compatible(&report.final_params).unwrap();
    assert!(report.final_params.sub(&initial).unwrap().l2_norm() > 0.0);
    assert!(report
        .records
        .iter()
        .filter(|r| r.event == Event::Train)
        .all(|r| r.bytes_up > 0));
}

/// A restarted client process (a fresh trainer) asked for round 3 trains on
/// the batches, and draws the dropout masks, of an uninterrupted one's round
/// 3: its data position comes from the round, its masks from the client's
/// and round's seed — not from what the process remembers.
#[test]
fn a_fresh_trainer_continues_where_the_round_says() {
    use fedtune_kernel::{LocalTrainer, TrainContext};
    let cfg = LlamaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        ..Default::default()
    };
    let model = Arc::new(Llama::random(cfg, 3, DType::F32, &Device::Cpu).unwrap());
    let lora = LoraConfig {
        lora_dropout: 0.1,
        ..LoraConfig::default()
    };
    // 5 batches and 3 steps a fit: the positions wrap unevenly (0, 3, 1, …).
    let data = || {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        BTreeMap::from([(
            1,
            ClientData {
                train: counting_batches(&mut rng, 5, 2, 12),
                eval: vec![],
                n_samples: 10,
            },
        )])
    };
    let training = LocalTraining {
        local_steps: 3,
        keep_optimizer_state: false,
        optim: TrainConfig {
            lr: 1e-2,
            ..TrainConfig::default()
        },
        ..LocalTraining::default()
    };
    let trainer = || {
        RoundRobinTrainer::new(model.clone(), lora.clone(), training.clone(), data(), 9).unwrap()
    };
    let global = RoundRobinTrainer::initial_adapter(&model, &lora, 9).unwrap();
    let ctx =
        |round: u64| TrainContext::new(round, 100 + round, Default::default(), Default::default());
    let mut uninterrupted = trainer();
    let mut third = None;
    for round in 1..=3 {
        let update = uninterrupted.train(1, &global, &ctx(round)).unwrap();
        third = Some(update.params);
    }
    let restarted = trainer().train(1, &global, &ctx(3)).unwrap().params;
    assert!(
        third.unwrap() == restarted,
        "the restarted client trained on other batches"
    );
}

/// `local_epochs`: each client passes over its own data that many times a
/// round — ⌈batches / grad_accum⌉ steps a pass, so clients with more data
/// take more steps — unless the strategy sets this fit's local_steps.
#[test]
fn local_epochs_take_each_clients_own_number_of_steps() {
    use fedtune_kernel::{LocalTrainer, TrainContext};

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
    let model = Arc::new(Llama::random(cfg, 5, DType::F32, &Device::Cpu).unwrap());
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        ..LoraConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // 4, 7 and 5 batches: 2 epochs at grad_accum 2 are 4, 8 and 6 steps.
    let data: BTreeMap<u32, ClientData> = [(1u32, 4usize), (2, 7), (3, 5)]
        .into_iter()
        .map(|(id, n)| {
            let d = ClientData {
                train: counting_batches(&mut rng, n, 2, 8),
                eval: Vec::new(),
                n_samples: 2 * n as u64,
            };
            (id, d)
        })
        .collect();
    let training = LocalTraining {
        local_steps: 1,
        local_epochs: 2,
        optim: TrainConfig {
            grad_accum: 2,
            ..TrainConfig::default()
        },
        ..LocalTraining::default()
    };
    let global = RoundRobinTrainer::initial_adapter(&model, &lora, 1).unwrap();
    let mut trainer = RoundRobinTrainer::new(model, lora, training, data, 1).unwrap();
    let ctx = || TrainContext::new(1, 7, Default::default(), Default::default());
    for (client, steps) in [(1, 4), (2, 8), (3, 6)] {
        let update = trainer.train(client, &global, &ctx()).unwrap();
        assert_eq!(update.local_steps, Some(steps), "client {client}");
    }
    // A strategy's own local_steps for a fit overrides the epochs.
    let mut config = fedtune_kernel::FitConfig::new();
    config.insert("local_steps".into(), serde_json::json!(3));
    let fit = ctx().with_fit(config, Default::default());
    assert_eq!(
        trainer.train(2, &global, &fit).unwrap().local_steps,
        Some(3)
    );
}
