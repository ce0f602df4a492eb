//! The training step on a tiny random model (f64): hooks, accumulation, clipping, PEFT files.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::loss::IGNORE_INDEX;
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_adapters::peft::{load_lora, save_lora};
use fedtune_adapters::train::{
    fit, Batch, HookCtx, NoHooks, OptimizerKind, Stepper, TrainConfig, TrainHooks,
};
use fedtune_kernel::ParamSet;

fn tiny() -> (Llama, LlamaConfig) {
    let cfg = common::tiny_config(false);
    (
        Llama::random(cfg.clone(), 5, DType::F64, &Device::Cpu).unwrap(),
        cfg,
    )
}

fn lora(cfg: &LlamaConfig) -> Lora {
    let lc = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..LoraConfig::default()
    };
    Lora::new(cfg, lc, 9, DType::F64, &Device::Cpu).unwrap()
}

fn batch() -> Batch {
    let d = &Device::Cpu;
    let i = IGNORE_INDEX;
    Batch {
        tokens: Tensor::new(&[[1u32, 4, 9, 16, 25, 36, 7], [2, 3, 5, 7, 11, 13, 0]], d).unwrap(),
        attention_mask: Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], d).unwrap(),
        labels: Tensor::new(&[[i, 4, 9, 16, 25, 36, 7], [i, i, 5, 7, 11, 13, i]], d).unwrap(),
    }
}

fn flat(p: &ParamSet) -> Vec<f32> {
    p.iter().flat_map(|(_, t)| t.data().to_vec()).collect()
}

#[test]
fn adamw_memorizes_a_fixed_batch() {
    let (model, cfg) = tiny();
    let lora = lora(&cfg);
    let tc = TrainConfig {
        lr: 1e-2,
        ..TrainConfig::default()
    };
    let mut stepper = Stepper::new(&lora, tc).unwrap();
    let reports = fit(&model, &lora, &mut stepper, &[batch()], 30, &mut NoHooks).unwrap();
    let (first, last) = (reports[0].loss, reports.last().unwrap().loss);
    assert_eq!(reports.len(), 30);
    assert!(last < 0.7 * first, "loss {first} → {last}");
}

#[derive(Default)]
struct Recorder(Vec<String>);

impl TrainHooks for Recorder {
    fn on_fit_start(&mut self, _: &dyn Adapter) -> Result<()> {
        self.0.push("fit_start".into());
        Ok(())
    }
    fn on_epoch_start(&mut self, e: usize) -> Result<()> {
        self.0.push(format!("epoch_start {e}"));
        Ok(())
    }
    fn on_batch_start(&mut self, c: &mut HookCtx) -> Result<()> {
        self.0
            .push(format!("batch_start {}.{}", c.step, c.micro_batch));
        Ok(())
    }
    fn on_batch_forward(&mut self, c: &mut HookCtx) -> Result<()> {
        assert!(c.loss.is_some_and(f64::is_finite));
        self.0.push("forward".into());
        Ok(())
    }
    fn on_batch_backward(&mut self, _: &mut HookCtx) -> Result<()> {
        self.0.push("backward".into());
        Ok(())
    }
    fn on_batch_end(&mut self, c: &mut HookCtx) -> Result<()> {
        self.0.push(format!("batch_end {}", c.step));
        if c.step == 2 {
            c.stop();
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, e: usize) -> Result<()> {
        self.0.push(format!("epoch_end {e}"));
        Ok(())
    }
    fn on_fit_end(&mut self, _: &dyn Adapter) -> Result<()> {
        self.0.push("fit_end".into());
        Ok(())
    }
}

#[test]
fn hooks_fire_in_order_and_can_stop_the_fit() {
    let (model, cfg) = tiny();
    let lora = lora(&cfg);
    let tc = TrainConfig {
        grad_accum: 2,
        ..TrainConfig::default()
    };
    let mut stepper = Stepper::new(&lora, tc).unwrap();
    let mut rec = Recorder::default();
    let batches = vec![batch(); 4]; // 2 steps per epoch
    let reports = fit(&model, &lora, &mut stepper, &batches, 5, &mut rec).unwrap();
    assert_eq!(reports.len(), 3, "stopped after step 2");
    let micro = |s: usize, m: usize| {
        vec![
            format!("batch_start {s}.{m}"),
            "forward".into(),
            "backward".into(),
        ]
    };
    let mut expected = vec!["fit_start".to_string(), "epoch_start 0".into()];
    expected.extend(micro(0, 0));
    expected.extend(micro(0, 1));
    expected.push("batch_end 0".into());
    expected.extend(micro(1, 0));
    expected.extend(micro(1, 1));
    expected.extend([
        "batch_end 1".into(),
        "epoch_end 0".into(),
        "epoch_start 1".into(),
    ]);
    expected.extend(micro(2, 0));
    expected.extend(micro(2, 1));
    expected.extend(["batch_end 2".into(), "epoch_end 1".into(), "fit_end".into()]);
    assert_eq!(rec.0, expected);
}

#[test]
fn accumulating_two_copies_of_a_batch_equals_one_step_on_it() {
    let (model, cfg) = tiny();
    let sgd = |accum| TrainConfig {
        optimizer: OptimizerKind::Sgd,
        lr: 0.1,
        max_grad_norm: None,
        grad_accum: accum,
        ..TrainConfig::default()
    };
    let a = lora(&cfg);
    let b = lora(&cfg);
    Stepper::new(&a, sgd(1))
        .unwrap()
        .step(&model, &a, &[batch()], (0, 1), &mut NoHooks)
        .unwrap();
    Stepper::new(&b, sgd(2))
        .unwrap()
        .step(&model, &b, &[batch(), batch()], (0, 1), &mut NoHooks)
        .unwrap();
    let (pa, pb) = (
        flat(&a.to_param_set().unwrap()),
        flat(&b.to_param_set().unwrap()),
    );
    let worst = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "max difference {worst}");
}

#[test]
fn clipping_bounds_the_update_to_lr_times_max_norm() {
    let (model, cfg) = tiny();
    let l = lora(&cfg);
    let before = flat(&l.to_param_set().unwrap());
    let tc = TrainConfig {
        optimizer: OptimizerKind::Sgd,
        lr: 0.5,
        max_grad_norm: Some(1e-3),
        ..TrainConfig::default()
    };
    let report = Stepper::new(&l, tc)
        .unwrap()
        .step(&model, &l, &[batch()], (0, 1), &mut NoHooks)
        .unwrap();
    assert!(
        report.grad_norm > 1e-3,
        "the gradient is large enough to be clipped: {}",
        report.grad_norm
    );
    let after = flat(&l.to_param_set().unwrap());
    let moved: f64 = before
        .iter()
        .zip(&after)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (moved - 0.5e-3).abs() < 1e-6,
        "SGD moved {moved}, expected lr · max_norm = 5e-4"
    );
}

/// A FedProx-like hook: a huge L2 penalty on the adapter.
struct Penalty;
impl TrainHooks for Penalty {
    fn on_batch_forward(&mut self, c: &mut HookCtx) -> Result<()> {
        let mut sq: Option<Tensor> = None;
        for v in c.adapter.vars() {
            let s = v.as_tensor().sqr()?.sum_all()?;
            sq = Some(match sq {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        c.add_loss((sq.expect("vars") * 100.0)?)
    }
}

/// Adds a NaN term to the loss of the steps listed.
struct NanAt(Vec<usize>);
impl TrainHooks for NanAt {
    fn on_batch_forward(&mut self, c: &mut HookCtx) -> Result<()> {
        if self.0.contains(&c.step) {
            let v = c.adapter.vars()[0].as_tensor().sum_all()?;
            c.add_loss((v * f64::NAN)?)?;
        }
        Ok(())
    }
}

#[test]
fn a_step_with_a_non_finite_gradient_changes_nothing() {
    let (model, cfg) = tiny();
    let l = lora(&cfg);
    let tc = TrainConfig {
        lr: 1e-2,
        ..TrainConfig::default()
    };
    let mut stepper = Stepper::new(&l, tc).unwrap();
    let mut hooks = NanAt(vec![1]);
    let first = stepper
        .step(&model, &l, &[batch()], (0, 3), &mut hooks)
        .unwrap();
    assert!(!first.skipped);
    let (params, state) = (l.to_param_set().unwrap(), stepper.state().unwrap());
    let nan = stepper
        .step(&model, &l, &[batch()], (1, 3), &mut hooks)
        .unwrap();
    assert!(nan.skipped && nan.grad_norm.is_nan(), "{nan:?}");
    assert!(nan.loss.is_finite(), "the LM loss itself was finite");
    assert_eq!(l.to_param_set().unwrap(), params, "no parameter moved");
    assert_eq!(stepper.state().unwrap(), state, "no moment moved");
    // The next step goes on from where the first left off.
    let next = stepper
        .step(&model, &l, &[batch()], (2, 3), &mut hooks)
        .unwrap();
    assert!(!next.skipped && next.loss < first.loss);
}

#[test]
fn a_hook_can_add_a_term_to_the_loss() {
    let (model, cfg) = tiny();
    let tc = TrainConfig {
        optimizer: OptimizerKind::Sgd,
        lr: 1e-3,
        max_grad_norm: None,
        ..TrainConfig::default()
    };
    let plain = lora(&cfg);
    let penalized = lora(&cfg);
    let norm0 = plain.to_param_set().unwrap().l2_norm();
    Stepper::new(&plain, tc.clone())
        .unwrap()
        .step(&model, &plain, &[batch()], (0, 1), &mut NoHooks)
        .unwrap();
    let report = Stepper::new(&penalized, tc)
        .unwrap()
        .step(&model, &penalized, &[batch()], (0, 1), &mut Penalty)
        .unwrap();
    let (n_plain, n_pen) = (
        plain.to_param_set().unwrap().l2_norm(),
        penalized.to_param_set().unwrap().l2_norm(),
    );
    // d/dθ 100·|θ|² = 200θ: one SGD step of 1e-3 shrinks the adapter by 20%.
    assert!(
        n_pen < 0.85 * norm0 && n_plain > 0.95 * norm0,
        "{norm0} → plain {n_plain}, penalized {n_pen}"
    );
    assert!(
        report.loss.is_finite(),
        "the reported loss is the LM loss alone"
    );
}

#[test]
fn peft_directories_round_trip() {
    let (_, cfg) = tiny();
    let l = lora(&cfg);
    let params = l.to_param_set().unwrap();
    let dir = tempdir();
    save_lora(
        &dir,
        l.config(),
        &params,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let (config, back) = load_lora(&dir).unwrap();
    assert_eq!(&config, l.config());
    assert_eq!(back, params);

    std::fs::write(
        dir.join("adapter_config.json"),
        json.to_string()
            .replace("\"use_dora\":false", "\"use_dora\":true"),
    )
    .unwrap();
    let err = load_lora(&dir).unwrap_err().to_string();
    assert!(err.contains("DoRA"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fedtune-peft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn lora_dropout_is_seeded_and_only_on_while_training() {
    let (model, cfg) = tiny();
    let make = || {
        let lc = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.5,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..LoraConfig::default()
        };
        let l = Lora::new(&cfg, lc, 3, DType::F64, &Device::Cpu).unwrap();
        // Non-zero B so the branch (and its dropout) shows in the output.
        let mut p = ParamSet::new();
        for (name, t) in l.to_param_set().unwrap().iter() {
            p.insert(name, t.shape().to_vec(), vec![0.2; t.len()])
                .unwrap();
        }
        l.load_param_set(&p).unwrap();
        l
    };
    let b = batch();
    let run = |l: &Lora| {
        model
            .forward(&b.tokens, Some(&b.attention_mask), Some(l))
            .unwrap()
    };
    let max_diff = common::max_abs_diff;
    let (l1, l2) = (make(), make());
    let eval = run(&l1);
    assert_eq!(
        max_diff(&eval, &run(&l1)),
        0.0,
        "no dropout outside training"
    );
    l1.set_training(true);
    l2.set_training(true);
    let (t1, t2) = (run(&l1), run(&l2));
    assert_eq!(max_diff(&t1, &t2), 0.0, "same seed, same masks");
    assert!(
        max_diff(&t1, &eval) > 1e-6,
        "dropout changes the training forward"
    );
    assert!(max_diff(&t1, &run(&l1)) > 1e-6, "fresh masks on every pass");
    l1.set_training(false);
    assert_eq!(max_diff(&eval, &run(&l1)), 0.0);
}

#[test]
fn a_compute_dtype_converts_there_and_back() {
    // bf16 converts the projections, the embeddings and the head, tied or
    // not, and keeps no f32 copy of them (the memory is the point); the
    // activations stay f32. Back to f32 widens the rounded weights (asking
    // for f32 once left a converted model in bf16).
    for tied in [false, true] {
        let cfg = common::tiny_config(tied);
        let model = Llama::random(cfg, 5, DType::F32, &Device::Cpu).unwrap();
        let bf16 = model.with_compute(DType::BF16).unwrap();
        assert_eq!(bf16.compute_dtype(), DType::BF16);
        assert_eq!(bf16.dtype(), DType::F32);
        let weights = bf16.named_weights();
        for (name, t) in &weights {
            let want = if name.contains("norm") {
                DType::F32
            } else {
                DType::BF16
            };
            assert_eq!(t.dtype(), want, "{name}");
        }
        assert_eq!(weights.len(), model.named_weights().len());
        let tokens = Tensor::new(&[[3u32, 9, 1, 30, 7]], &Device::Cpu).unwrap();
        let logits = bf16.forward(&tokens, None, None).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let f32_logits = model.forward(&tokens, None, None).unwrap();
        let moved = common::max_abs_diff(&logits, &f32_logits);
        let scale = common::max_abs_diff(&f32_logits, &f32_logits.zeros_like().unwrap());
        assert!(
            moved > 0.0 && moved < 0.05 * scale,
            "bf16 logits moved by {moved} of {scale}"
        );
        let back = bf16.with_compute(DType::F32).unwrap();
        assert_eq!(back.compute_dtype(), DType::F32);
        for (name, t) in back.named_weights() {
            assert_eq!(t.dtype(), DType::F32, "{name}");
        }
        let widened = bf16.output_weight().to_dtype(DType::F32).unwrap();
        assert_eq!(common::max_abs_diff(back.output_weight(), &widened), 0.0);
    }
}

#[test]
fn an_int8_base_trains_as_the_values_it_holds() {
    // compute int8 (`U8`) stores every projection as int8 blocks and the
    // embeddings and head in bf16; a model of the dequantized values in
    // f32 gives the same logits and the same LoRA steps, within the bf16
    // rounding of the products where they run on the bf16 units. LoRA on
    // q and v leaves k, o and the MLP plain (the residual and gating paths);
    // on every projection each takes the LoRA path.
    use fedtune_adapters::model::{Frozen, Projection};
    let units = fedtune_adapters::kernels::bf16::bf16_units();
    let tol = if units { 2e-2 } else { 1e-4 };
    for (tied, targets) in [
        (false, vec!["q_proj", "v_proj"]),
        (true, Projection::ALL.iter().map(|p| p.name()).collect()),
    ] {
        // Rows of 48 and 80 values: whole blocks of 32 and short ones.
        let cfg = LlamaConfig {
            hidden_size: 48,
            intermediate_size: 80,
            ..common::tiny_config(tied)
        };
        let model = Llama::random(cfg, 5, DType::F32, &Device::Cpu).unwrap();
        let int8 = model.with_compute(DType::U8).unwrap();
        assert_eq!(int8.compute_dtype(), DType::U8);
        assert_eq!(int8.dtype(), DType::F32, "activations stay f32");
        assert_eq!(int8.output_weight().dtype(), DType::BF16);
        for l in int8.layers() {
            for p in Projection::ALL {
                assert!(matches!(l.weight(p), Frozen::Int8(_)), "{p:?}");
            }
        }
        let values = int8.with_compute(DType::F32).unwrap();
        let tokens = Tensor::new(&[[3u32, 9, 1, 30, 7]], &Device::Cpu).unwrap();
        let logits = |m: &Llama| m.forward(&tokens, None, None).unwrap();
        let (a, b, f) = (logits(&int8), logits(&values), logits(&model));
        let scale = common::max_abs_diff(&f, &f.zeros_like().unwrap());
        let (same, moved) = (common::max_abs_diff(&a, &b), common::max_abs_diff(&a, &f));
        assert!(same <= tol * scale, "int8 vs its values: {same} of {scale}");
        assert!(
            moved > 0.0 && moved < 0.05 * scale,
            "int8 vs f32: {moved} of {scale}"
        );

        let lc = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            ..LoraConfig::default()
        };
        let cfg = model.config();
        let trained = |m: &Llama| {
            let lora = Lora::new(cfg, lc.clone(), 9, DType::F32, &Device::Cpu).unwrap();
            let tc = TrainConfig {
                lr: 1e-2,
                ..TrainConfig::default()
            };
            let mut stepper = Stepper::new(&lora, tc).unwrap();
            let reports = fit(m, &lora, &mut stepper, &[batch()], 3, &mut NoHooks).unwrap();
            let losses: Vec<f64> = reports.iter().map(|r| r.loss).collect();
            (losses, flat(&lora.to_param_set().unwrap()))
        };
        let ((la, pa), (lb, pb)) = (trained(&int8), trained(&values));
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= tol * y.abs(), "losses {la:?} vs {lb:?}");
        }
        let norm = pb.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        assert!(
            f64::from(diff) <= tol * f64::from(norm),
            "parameters {diff} apart of {norm}"
        );
    }
}
