//! Trainer hooks written as Rhai scripts, and the personalized-FL algorithms
//! (Ditto, pFedMe), on a tiny random Llama.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use fedtune_adapters::hooks::HookScript;
use fedtune_adapters::lora::LoraConfig;
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_adapters::round_robin::{ClientData, LocalTraining, PflConfig, RoundRobinTrainer};
use fedtune_adapters::train::{Batch, TrainConfig};
use fedtune_kernel::course::{LocalTrainer, TrainContext};
use fedtune_kernel::script::{ScriptSection, ScriptSource, ScriptingSection};
use fedtune_kernel::ParamSet;

fn model() -> Arc<Llama> {
    let cfg = LlamaConfig {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        ..Default::default()
    };
    Arc::new(Llama::random(cfg, 5, DType::F32, &Device::Cpu).unwrap())
}

fn batches() -> Vec<Batch> {
    (0..3u32)
        .map(|b| common::lm_batch((0..2 * 12).map(|i| (i * 7 + b * 3) % 32).collect(), 2, 12))
        .collect()
}

const LORA: fn() -> LoraConfig = || LoraConfig {
    r: 4,
    lora_alpha: 8.0,
    lora_dropout: 0.0,
    target_modules: vec!["q_proj".into(), "v_proj".into()],
    ..LoraConfig::default()
};

fn trainer(steps: usize) -> (RoundRobinTrainer, ParamSet) {
    let model = model();
    let data = BTreeMap::from([(
        1,
        ClientData {
            train: batches(),
            eval: vec![("test".into(), batches()[..1].to_vec())],
            n_samples: 6,
        },
    )]);
    let training = LocalTraining {
        local_steps: steps,
        keep_optimizer_state: false,
        optim: TrainConfig {
            lr: 5e-2,
            ..TrainConfig::default()
        },
        ..LocalTraining::default()
    };
    // A global adapter with non-zero B, so that the prox term has work to do.
    let mut global = RoundRobinTrainer::initial_adapter(&model, LORA(), 3).unwrap();
    for (_, t) in global.iter_mut() {
        for (i, x) in t.data_mut().iter_mut().enumerate() {
            if *x == 0.0 {
                *x = ((i % 7) as f32 - 3.0) * 0.01;
            }
        }
    }
    let t = RoundRobinTrainer::new(model, LORA(), training, data, 9).unwrap();
    (t, global)
}

fn hooks(text: &'static str, hp: &str) -> HookScript {
    let section = ScriptSection {
        script: None,
        params: hp.parse().unwrap(),
    };
    HookScript::new(
        &ScriptingSection::default(),
        &ScriptSource::BuiltIn { name: "test", text },
        section.hp(),
    )
    .unwrap()
}

fn ctx(round: u64) -> TrainContext {
    TrainContext::new(
        round,
        1,
        Default::default(),
        Arc::new(AtomicBool::new(false)),
    )
}

fn train(t: &mut RoundRobinTrainer, global: &ParamSet) -> ParamSet {
    t.train(1, global, &ctx(1)).unwrap().params
}

#[test]
fn the_fedprox_script_adds_exactly_the_proximal_term() {
    let fedprox = include_str!("../scripts/hooks/fedprox.rhai");
    let (t0, global) = trainer(4);
    let mut plain = t0;
    let free = train(&mut plain, &global);

    let (t1, _) = trainer(4);
    let mut prox = t1.with_hooks(hooks(fedprox, "mu = 0.5"));
    let near = train(&mut prox, &global);

    // The same term spelled out by hand (sum over tensors of ‖w − g‖², times mu/2)
    // through the generic hook API must give the very same update.
    let by_hand = "fn on_batch_forward(ctx) { ctx.add_loss(ctx.prox_sq_norm() * 0.25); }";
    let (t2, _) = trainer(4);
    let mut manual = t2.with_hooks(hooks(by_hand, ""));
    assert_eq!(train(&mut manual, &global), near);

    // A strong pull keeps the update much closer to the global adapter.
    let (t3, _) = trainer(4);
    let mut strong = t3.with_hooks(hooks(fedprox, "mu = 200.0"));
    let pulled = train(&mut strong, &global);
    let dist = |p: &ParamSet| p.sub(&global).unwrap().l2_norm();
    assert!(dist(&near) != dist(&free), "mu = 0.5 changes training");
    assert!(
        dist(&pulled) < 0.5 * dist(&free),
        "{} vs {}",
        dist(&pulled),
        dist(&free)
    );
}

#[test]
fn hooks_can_set_the_rate_and_stop_early() {
    let (t, global) = trainer(4);
    let frozen = "fn on_batch_start(ctx) { ctx.set_lr(0.0); }";
    let mut zero = t.with_hooks(hooks(frozen, ""));
    assert_eq!(
        train(&mut zero, &global),
        global,
        "lr 0 leaves the adapter as it was"
    );

    let steps = Arc::new(AtomicUsize::new(0));
    let seen = steps.clone();
    let (t, global) = trainer(4);
    let mut early = t
        .with_hooks(hooks(
            include_str!("../scripts/hooks/early_stop.rhai"),
            "target_loss = 100.0",
        ))
        .with_progress(Arc::new(move |_, _, _, _| {
            seen.fetch_add(1, Ordering::Relaxed);
        }));
    train(&mut early, &global);
    assert_eq!(
        steps.load(Ordering::Relaxed),
        1,
        "stopped after the first step"
    );
}

#[test]
fn a_failing_hook_fails_training_with_file_and_line() {
    let (t, global) = trainer(2);
    let bad =
        "fn on_batch_end(ctx) {\n    if ctx.step == 1 {\n        throw \"too far\";\n    }\n}\n";
    let mut failing = t.with_hooks(hooks(bad, ""));
    let err = failing.train(1, &global, &ctx(3)).unwrap_err().to_string();
    assert!(err.contains("<built-in test>:3:"), "{err}");
    assert!(err.contains("too far") && err.contains("round 3"), "{err}");
    let misplaced = "fn on_batch_end(ctx) { ctx.add_loss(ctx.sq_norm()); }";
    let (t, global) = trainer(1);
    let err = t
        .with_hooks(hooks(misplaced, ""))
        .train(1, &global, &ctx(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("on_batch_forward"), "{err}");
}

fn dist(a: &ParamSet, b: &ParamSet) -> f64 {
    a.sub(b).unwrap().l2_norm()
}

fn personalized(steps: usize, pfl: PflConfig) -> (RoundRobinTrainer, ParamSet) {
    let (t, global) = trainer(steps);
    (t.with_personalization(pfl).unwrap(), global)
}

#[test]
fn ditto_without_a_pull_trains_the_personal_adapter_like_the_global_copy() {
    let ditto = |lambda: f64| PflConfig {
        algorithm: "ditto".into(),
        lambda,
        ..PflConfig::default()
    };
    let (mut free, global) = personalized(4, ditto(0.0));
    let update = train(&mut free, &global);
    let personal = free.personal_adapter(1).unwrap().unwrap();
    // Same start, same batches, fresh optimizers, no pull: the very same result.
    assert_eq!(personal, update);
    // Personalized evaluation uses the personal adapter, whatever global it is handed.
    let (mut plain, _) = trainer(1);
    let eval_update = plain.evaluate(1, &update, &ctx(1)).unwrap();
    assert_eq!(free.evaluate(1, &global, &ctx(1)).unwrap(), eval_update);

    // A strong pull keeps the personal adapter near the global one; the shared
    // update is untouched by it.
    let (mut pulled, _) = personalized(4, ditto(200.0));
    assert_eq!(train(&mut pulled, &global), update);
    let near = pulled.personal_adapter(1).unwrap().unwrap();
    assert!(
        dist(&near, &global) < 0.5 * dist(&update, &global),
        "{} vs {}",
        dist(&near, &global),
        dist(&update, &global)
    );
}

#[test]
fn pfedme_moves_the_local_adapter_towards_the_personal_one() {
    // One outer step of one inner step: θ₁ is a plain step from the global
    // adapter (the pull is zero where θ = w), then w = g + ηλ·(θ₁ − g).
    let (mut plain, global) = trainer(1);
    let theta1 = train(&mut plain, &global);
    let pfl = PflConfig {
        algorithm: "pfedme".into(),
        lambda: 0.5,
        eta: 1.0,
        inner_steps: 1,
        ..PflConfig::default()
    };
    let (mut me, _) = personalized(1, pfl.clone());
    let w = train(&mut me, &global);
    assert_eq!(me.personal_adapter(1).unwrap().unwrap(), theta1);
    let want = global
        .add(&theta1.sub(&global).unwrap().scale(0.5))
        .unwrap();
    assert!(
        dist(&w, &want) < 1e-6 * dist(&theta1, &global),
        "{}",
        dist(&w, &want)
    );

    // Over more steps the local adapter trails the personal one: between it and the global.
    let (mut longer, _) = personalized(
        6,
        PflConfig {
            inner_steps: 2,
            ..pfl
        },
    );
    let w = train(&mut longer, &global);
    let theta = longer.personal_adapter(1).unwrap().unwrap();
    assert!(dist(&w, &global) > 0.0 && dist(&w, &global) < dist(&theta, &global));
}

#[test]
fn bad_personalization_knobs_are_refused() {
    for bad in [
        PflConfig {
            lambda: -1.0,
            ..PflConfig::default()
        },
        PflConfig {
            inner_steps: 0,
            ..PflConfig::default()
        },
        PflConfig {
            eta: 0.0,
            ..PflConfig::default()
        },
    ] {
        let (t, _) = trainer(1);
        let err = t
            .with_personalization(bad)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.starts_with("pfl."), "{err}");
    }
}

#[test]
fn local_adapter_parts_never_leave_the_client() {
    let pfl = PflConfig {
        algorithm: "local_adapter".into(),
        local_params: "lora_B".into(),
        ..PflConfig::default()
    };
    let (mut t, global) = personalized(3, pfl);
    let (mut plain, _) = trainer(3);
    let full = train(&mut plain, &global);
    let sent = train(&mut t, &global);
    for (name, tensor) in sent.iter() {
        if name.contains("lora_B") {
            // What goes to the server is the server's own value, not the client's.
            assert_eq!(tensor, global.get(name).unwrap(), "{name}");
        } else {
            assert_eq!(tensor, full.get(name).unwrap(), "{name} trains as usual");
        }
    }
    // The client evaluates with its own B factors laid over whatever global it gets.
    let mine = full.clone();
    let (mut check, _) = trainer(1);
    assert_eq!(
        t.evaluate(1, &global, &ctx(1)).unwrap(),
        check
            .evaluate(
                1,
                &{
                    let mut g = global.clone();
                    for (name, x) in mine.iter().filter(|(n, _)| n.contains("lora_B")) {
                        g.insert_tensor(name, x.clone());
                    }
                    g
                },
                &ctx(1)
            )
            .unwrap()
    );
    let (t, _) = trainer(1);
    let err = t
        .with_personalization(PflConfig {
            algorithm: "local_adapter".into(),
            ..PflConfig::default()
        })
        .err()
        .expect("local_params is required")
        .to_string();
    assert!(err.contains("pfl.local_params"), "{err}");
}

#[test]
fn a_pfl_script_of_ones_own_runs_from_its_file() {
    // Ditto with a warm-up: personal adapters only from round `start` on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late_ditto.rhai");
    std::fs::write(
        &path,
        "fn fit(ctx) {\n\
         \x20   if ctx.round < this.hp.start { return [train(ctx.local_steps)]; }\n\
         \x20   [train(ctx.local_steps), train_personal(ctx.local_steps, this.hp.lambda, \"global\")]\n\
         }\n",
    )
    .unwrap();
    let pfl = PflConfig {
        algorithm: path.to_str().unwrap().into(),
        lambda: 0.0,
        params: "start = 2".parse().unwrap(),
        ..PflConfig::default()
    };
    let (mut t, global) = personalized(2, pfl);
    let (mut plain, _) = trainer(2);
    let first = t.train(1, &global, &ctx(1)).unwrap();
    assert_eq!(first.params, train(&mut plain, &global));
    assert!(!first.metrics.contains_key("personal_loss"));
    assert!(
        t.personal_adapter(1).unwrap().is_none(),
        "round 1 is warm-up"
    );
    // Round 2: the personal adapter appears; the sent update is untouched by it.
    let second = t.train(1, &first.params, &ctx(2)).unwrap();
    assert!(second.metrics.contains_key("personal_loss"));
    let plain_second = plain.train(1, &first.params, &ctx(2)).unwrap().params;
    assert!(second.params == plain_second);
    let personal = t.personal_adapter(1).unwrap().unwrap();
    assert!(dist(&personal, &first.params) > 0.0);
    // A broken file is refused when the trainer is built, naming file and line.
    std::fs::write(&path, "fn fit(ctx) {\n    [train(\n}\n").unwrap();
    let (t2, _) = trainer(1);
    let err = t2
        .with_personalization(PflConfig {
            algorithm: path.to_str().unwrap().into(),
            ..PflConfig::default()
        })
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("late_ditto.rhai:3:"), "{err}");
}
