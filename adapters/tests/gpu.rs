//! CUDA against the CPU: logits and LoRA gradients, on tiny models of every
//! family and on the default model, in f32 and with a bf16 base.
//!
//! Compiled only with `--features cuda` (CI type-checks them there) and
//! ignored unless asked for: they need a GPU. `tests/gpu.sh` runs them on a
//! machine that has one, with the other GPU checks.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{max_abs_diff, model_path, tiny_config, TEXT};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::model::{load_gguf, Compute, DeviceSpec, Llama, Placement, Projection};
use fedtune_adapters::tokenizer::TextTokenizer;
use fedtune_adapters::train::Batch;

fn gpu() -> Device {
    DeviceSpec::Cuda(0)
        .open()
        .expect("these tests need a CUDA GPU (run them through tests/gpu.sh)")
}

/// LoRA on every projection with seeded, non-zero `B` (so every gradient
/// is non-zero), and the same adapter on `device`.
fn lora_pair(model: &Llama, device: &Device) -> (Lora, Lora) {
    let cfg = LoraConfig {
        r: 4,
        lora_dropout: 0.0,
        target_modules: Projection::ALL.map(|p| p.name().to_string()).to_vec(),
        ..Default::default()
    };
    let cpu = Lora::new(model.config(), cfg.clone(), 3, DType::F32, &Device::Cpu).unwrap();
    for (i, (_, v)) in cpu.named_vars().into_iter().enumerate() {
        let t = Tensor::randn(0f32, 0.05f32, v.dims(), &Device::Cpu).unwrap();
        v.set(&(t * (1.0 + i as f64 / 20.0)).unwrap()).unwrap();
    }
    let there = Lora::new(model.config(), cfg, 3, DType::F32, device).unwrap();
    there.load_param_set(&cpu.to_param_set().unwrap()).unwrap();
    (cpu, there)
}

/// The loss of `batch` and the gradient of every LoRA tensor, on the host.
fn loss_and_grads(model: &Llama, lora: &Lora, batch: &Batch) -> (f64, Vec<(String, Tensor)>) {
    let loss = model
        .causal_lm_loss(
            &batch.tokens,
            Some(&batch.attention_mask),
            &batch.labels,
            Some(lora),
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    let named = lora
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .expect("every LoRA tensor has a gradient");
            (
                n,
                g.to_device(&Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    (
        loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
        named,
    )
}

/// Every gradient agrees to `tol` relative to its largest entry.
fn assert_grads_agree(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f64) {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let scale = max_abs_diff(x, &x.zeros_like().unwrap());
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        let rel = max_abs_diff(x, y) / scale;
        assert!(rel < tol, "{what}: {name} differs by {rel:.2e} relative");
    }
}

/// Next-token argmax agreement between two logit tensors, of `n` positions.
fn argmax_agreement(a: &Tensor, b: &Tensor) -> (usize, usize) {
    let top = |l: &Tensor| -> Vec<u32> {
        l.to_device(&Device::Cpu)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (x, y) = (top(a), top(b));
    (x.iter().zip(&y).filter(|(p, q)| p == q).count(), x.len())
}

/// Two right-padded sequences with ignored labels.
fn tiny_batch() -> Batch {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 7 + 3) % 40).collect();
    // The second sequence's last 4 positions are padding.
    let mask: Vec<u32> = (0..24).map(|i| u32::from(i < 20)).collect();
    let labels: Vec<i64> = ids
        .iter()
        .zip(&mask)
        .map(|(&t, &m)| if m == 0 { -100 } else { t as i64 })
        .collect();
    Batch {
        tokens: Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap(),
        attention_mask: Tensor::from_vec(mask, (2, 12), &Device::Cpu).unwrap(),
        labels: Tensor::from_vec(labels, (2, 12), &Device::Cpu).unwrap(),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: tests/gpu.sh"]
fn tiny_models_of_every_family_match_the_cpu() {
    let gpu = gpu();
    let mut configs = common::family_configs();
    configs.push(("llama", tiny_config(true)));
    for (family, cfg) in configs {
        let cpu_model = Llama::random(cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let gpu_model = cpu_model.to_device(&gpu).unwrap();
        assert!(gpu_model.device().same_device(&gpu));
        let (cpu_lora, gpu_lora) = lora_pair(&cpu_model, &gpu);
        let batch = tiny_batch();
        let logits = |m: &Llama, l: &Lora| {
            m.forward(&batch.tokens, Some(&batch.attention_mask), Some(l))
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let diff = max_abs_diff(
            &logits(&cpu_model, &cpu_lora),
            &logits(&gpu_model, &gpu_lora),
        );
        assert!(diff < 1e-4, "{family}: logits differ by {diff}");
        let (la, ga) = loss_and_grads(&cpu_model, &cpu_lora, &batch);
        let (lb, gb) = loss_and_grads(&gpu_model, &gpu_lora, &batch);
        assert!((la - lb).abs() < 1e-5 * la, "{family}: loss {la} vs {lb}");
        assert_grads_agree(family, &ga, &gb, 1e-3);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: tests/gpu.sh"]
fn the_default_model_predicts_and_differentiates_as_on_the_cpu() {
    let gpu = gpu();
    let m = load_gguf(model_path(), DType::F32, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_gguf(&m.content).unwrap();
    let ids = tok.encode(TEXT).unwrap();
    let tokens = Tensor::from_vec(ids[..128].to_vec(), (1, 128), &Device::Cpu).unwrap();
    let cpu_model = &m.model;
    let gpu_model = cpu_model.to_device(&gpu).unwrap();
    let reference = cpu_model.forward(&tokens, None, None).unwrap();
    for (name, model) in [
        ("f32", gpu_model.clone()),
        (
            "bf16 base",
            cpu_model
                .with_compute(DType::BF16)
                .unwrap()
                .to_device(&gpu)
                .unwrap(),
        ),
        (
            // int8 blocks dequantized to bf16 on the GPU for each product.
            "int8 base",
            cpu_model
                .with_compute(DType::U8)
                .unwrap()
                .to_device(&gpu)
                .unwrap(),
        ),
    ] {
        let logits = model.forward(&tokens, None, None).unwrap();
        let (agree, n) = argmax_agreement(&reference, &logits);
        println!("cuda {name} vs cpu f32: next-token argmax agrees at {agree} of {n}");
        assert!(agree * 100 >= 98 * n, "{name}: {agree} of {n}");
    }
    let batch = common::lm_batch(ids[..128].to_vec(), 2, 64);
    let (cpu_lora, gpu_lora) = lora_pair(cpu_model, &gpu);
    let (la, ga) = loss_and_grads(cpu_model, &cpu_lora, &batch);
    let (lb, gb) = loss_and_grads(&gpu_model, &gpu_lora, &batch);
    println!("LoRA loss: cpu {la:.6}, cuda {lb:.6}");
    assert!((la - lb).abs() < 1e-4 * la, "loss {la} vs {lb}");
    assert_grads_agree("default model", &ga, &gb, 1e-3);
}

#[test]
#[ignore = "needs a CUDA GPU: tests/gpu.sh"]
fn auto_is_bf16_on_an_ampere_or_newer_gpu() {
    // tests/gpu.sh runs on such a GPU (an H100 or H200).
    let _ = gpu();
    let auto = Placement {
        compute: Compute::Auto,
        device: DeviceSpec::Cuda(0),
    };
    assert_eq!(auto.dtype(), DType::BF16);
}
