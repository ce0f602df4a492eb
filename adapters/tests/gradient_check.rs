//! LoRA gradients against central finite differences on a tiny random model.
//!
//! The model runs in f64 so that finite differences are accurate to ~1e-8 and
//! any real error in the backward pass (such as a fused op that drops its
//! input's gradient) stands out.

mod common;

use candle_core::{DType, Device, Tensor};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::loss::{causal_lm_loss, IGNORE_INDEX};
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_kernel::ParamSet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn all_modules() -> LoraConfig {
    LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        lora_dropout: 0.0,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        ..LoraConfig::default()
    }
}

/// A batch of two sequences; the second is right-padded, prompts are masked.
fn batch(device: &Device) -> (Tensor, Tensor, Tensor) {
    let tokens = Tensor::new(
        &[[3u32, 17, 5, 9, 22, 1, 30], [8, 8, 14, 2, 39, 0, 0]],
        device,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], device).unwrap();
    let i = IGNORE_INDEX;
    let labels = Tensor::new(&[[i, i, 5, 9, 22, 1, 30], [i, 8, 14, 2, 39, i, i]], device).unwrap();
    (tokens, mask, labels)
}

#[test]
fn lora_gradients_match_finite_differences() {
    check_lora_gradients(common::tiny_config(true), false);
}

/// With a frozen residual beside every projection (FedEx-LoRA, FLoRA),
/// randomized like the factors: the factors' gradients stay exact and none
/// reaches the residual.
#[test]
fn lora_gradients_match_finite_differences_with_a_residual() {
    check_lora_gradients(common::tiny_config(true), true);
}

/// The same check on every other family the decoder implements (biases,
/// a sliding window, wide heads, scaled rotary frequencies).
#[test]
fn lora_gradients_match_finite_differences_in_every_family() {
    for (family, cfg) in common::family_configs() {
        println!("{family}:");
        check_lora_gradients(cfg, false);
    }
}

fn check_lora_gradients(cfg: LlamaConfig, residual: bool) {
    let device = Device::Cpu;
    let model = Llama::random(cfg.clone(), 7, DType::F64, &device).unwrap();
    let lora_cfg = LoraConfig {
        residual,
        ..all_modules()
    };
    let lora = Lora::new(&cfg, lora_cfg, 11, DType::F64, &device).unwrap();
    assert_eq!(lora.residual_vars().len(), if residual { 2 * 7 } else { 0 });
    // B starts at zero, which would make every A-gradient zero: randomize it
    // (and the residual, which starts at zero too).
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut start = ParamSet::new();
    for (name, t) in lora.to_param_set().unwrap().iter() {
        let data = t
            .data()
            .iter()
            .map(|_| rng.random_range(-0.3f32..0.3))
            .collect();
        start.insert(name, t.shape().to_vec(), data).unwrap();
    }
    lora.load_param_set(&start).unwrap();

    let (tokens, mask, labels) = batch(&device);
    // The training path: only counted positions reach the head; fused cross-entropy.
    let loss_of = |lora: &Lora| -> f64 {
        model
            .causal_lm_loss(&tokens, Some(&mask), &labels, Some(lora))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = model
        .causal_lm_loss(&tokens, Some(&mask), &labels, Some(&lora))
        .unwrap();
    let grads = loss.backward().unwrap();

    // It equals the composite reference on full logits, in value and in gradients.
    let logits = model.forward(&tokens, Some(&mask), Some(&lora)).unwrap();
    let reference = causal_lm_loss(&logits, &labels).unwrap();
    let (fused, composite) = (
        loss.to_scalar::<f64>().unwrap(),
        reference.to_scalar::<f64>().unwrap(),
    );
    assert!(
        (fused - composite).abs() < 1e-12,
        "fused {fused} vs composite {composite}"
    );
    let reference_grads = reference.backward().unwrap();
    for (name, var) in lora.named_vars() {
        let diff = common::max_abs_diff(
            grads.get(var.as_tensor()).unwrap(),
            reference_grads.get(var.as_tensor()).unwrap(),
        );
        assert!(
            diff < 1e-12,
            "{name}: fused and composite gradients differ by {diff}"
        );
    }

    let eps = 1e-5;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (name, var) in lora.named_vars() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            grad.iter().any(|g| g.abs() > 1e-10),
            "{name}: gradient is all zero"
        );
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..3 {
            let k = rng.random_range(0..base.len());
            let probe = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &device).unwrap())
                    .unwrap();
                let l = loss_of(&lora);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &device).unwrap())
                    .unwrap();
                l
            };
            let fd = (probe(eps) - probe(-eps)) / (2.0 * eps);
            let rel = (grad[k] - fd).abs() / grad[k].abs().max(fd.abs()).max(1e-6);
            worst = worst.max(rel);
            assert!(
                rel < 1e-2,
                "{name}[{k}]: backprop {} vs finite difference {fd} (relative error {rel:.2e})",
                grad[k]
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        2 * 7 * 2 * 3,
        "every A and B of every module in both layers"
    );
    for (name, var) in lora.residual_vars() {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
    println!("checked {checked} elements; worst relative error {worst:.2e}");
}

#[test]
fn fresh_lora_leaves_the_model_unchanged_and_padding_does_not_leak() {
    let device = Device::Cpu;
    let cfg = common::tiny_config(true);
    let model = Llama::random(cfg.clone(), 7, DType::F64, &device).unwrap();
    let lora = Lora::new(&cfg, LoraConfig::default(), 1, DType::F64, &device).unwrap();
    let (tokens, mask, _) = batch(&device);
    let base = model.forward(&tokens, Some(&mask), None).unwrap();
    let adapted = model.forward(&tokens, Some(&mask), Some(&lora)).unwrap();
    let diff = common::max_abs_diff(&base, &adapted);
    assert_eq!(diff, 0.0, "B = 0 at initialization");

    // The real tokens of the padded row see exactly what they would see unpadded.
    let short = Tensor::new(&[[8u32, 8, 14, 2, 39]], &device).unwrap();
    let alone = model.forward(&short, None, None).unwrap();
    let padded_row = base.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap();
    let diff = common::max_abs_diff(&alone, &padded_row);
    assert!(diff < 1e-12, "padding changed real positions by {diff}");
}

#[test]
fn lora_round_trips_through_the_kernel_param_set() {
    let device = Device::Cpu;
    let cfg = common::tiny_config(true);
    let a = Lora::new(&cfg, LoraConfig::default(), 1, DType::F32, &device).unwrap();
    let b = Lora::new(&cfg, LoraConfig::default(), 2, DType::F32, &device).unwrap();
    let pa = a.to_param_set().unwrap();
    assert_ne!(
        pa,
        b.to_param_set().unwrap(),
        "different seeds, different A"
    );
    assert_eq!(
        pa.len(),
        2 * 2 * 2,
        "A and B for q_proj and v_proj in 2 layers"
    );
    assert!(pa
        .get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        .is_some_and(|t| t.shape() == [8, 8] && t.data().iter().all(|&x| x == 0.0)));
    b.load_param_set(&pa).unwrap();
    assert_eq!(b.to_param_set().unwrap(), pa);
    let mut wrong = pa.clone();
    wrong.remove("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    assert!(b.load_param_set(&wrong).is_err());
    assert_eq!(
        b.to_param_set().unwrap(),
        pa,
        "a failed load changes nothing"
    );
    assert!(LoraConfig {
        target_modules: vec!["qkv".into()],
        ..LoraConfig::default()
    }
    .projections()
    .unwrap_err()
    .to_string()
    .contains("unknown LoRA target module `qkv`"));
}
