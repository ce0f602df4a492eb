//! Offsite-tuning's emulator on a tiny random model.

mod common;

use candle_core::{DType, Device, Tensor};
use fedtune_adapters::model::{Llama, LlamaConfig};
use fedtune_adapters::offsite::{build_emulator, model_from_params, model_params, OffsiteConfig};

fn six_layers() -> Llama {
    let cfg = LlamaConfig {
        num_hidden_layers: 6,
        ..common::tiny_config(true)
    };
    Llama::random(cfg, 8, DType::F64, &Device::Cpu).unwrap()
}

#[test]
fn an_emulator_that_drops_nothing_is_the_full_model() {
    let full = six_layers();
    let cfg = OffsiteConfig {
        enabled: true,
        emu_l: 1,
        emu_r: 1,
        drop_ratio: 0.0,
        ..OffsiteConfig::default()
    };
    let emu = build_emulator(&full, &cfg).unwrap();
    assert_eq!(emu.kept, (0..6).collect::<Vec<_>>());
    let tokens = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let a = full.forward(&tokens, None, None).unwrap();
    let b = emu.model.forward(&tokens, None, None).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn a_dropped_emulator_differs_and_its_weights_rebuild_it_exactly() {
    let full = six_layers();
    let cfg = OffsiteConfig {
        enabled: true,
        emu_l: 1,
        emu_r: 1,
        drop_ratio: 0.5,
        ..OffsiteConfig::default()
    };
    let emu = build_emulator(&full, &cfg).unwrap();
    assert_eq!(emu.kept, vec![0, 1, 3, 5]);
    let tokens = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let a = full.forward(&tokens, None, None).unwrap();
    let b = emu.model.forward(&tokens, None, None).unwrap();
    assert!(
        common::max_abs_diff(&a, &b) > 1e-3,
        "dropping layers changes the model"
    );
    // What the server sends: the emulator's 4 layers, nothing of layers 2 and 4.
    let params = model_params(&emu.model).unwrap();
    let layers: std::collections::BTreeSet<&str> = params
        .names()
        .filter_map(|n| n.strip_prefix("model.layers."))
        .filter_map(|n| n.split('.').next())
        .collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), ["0", "1", "2", "3"]);
    let rebuilt = model_from_params(
        emu.model.config().clone(),
        &params,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let c = rebuilt.forward(&tokens, None, None).unwrap();
    // f32 on the wire: equal to f32 rounding.
    assert!(common::max_abs_diff(&b, &c) < 1e-4);
}

#[test]
fn distillation_brings_the_emulator_closer_to_the_full_model() {
    use fedtune_adapters::offsite::distill;
    use fedtune_adapters::train::Batch;
    let full = six_layers();
    let cfg = OffsiteConfig {
        enabled: true,
        emu_l: 1,
        emu_r: 1,
        drop_ratio: 0.5,
        distill_steps: 40,
        distill_lr: 1e-2,
        ..OffsiteConfig::default()
    };
    let mut emu = build_emulator(&full, &cfg).unwrap();
    let batch = |seed: u32| {
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 + seed * 13) % 40).collect();
        Batch {
            tokens: Tensor::from_vec(ids.clone(), (2, 12), &Device::Cpu).unwrap(),
            attention_mask: Tensor::ones((2, 12), DType::U32, &Device::Cpu).unwrap(),
            labels: Tensor::from_vec(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                (2, 12),
                &Device::Cpu,
            )
            .unwrap(),
        }
    };
    let train = [batch(1), batch(2), batch(3)];
    let held_out = [batch(4)];
    let before = emu.model.named_weights();
    let report = distill(&full, &mut emu, &cfg, (&train, &held_out), &|_, _| {}).unwrap();
    saved_and_reused(&emu, &report, &batch(5));
    assert_eq!(report.steps, 40);
    assert!(
        report.kl_after < 0.7 * report.kl_before,
        "KL {} → {}",
        report.kl_before,
        report.kl_after
    );
    // Only the kept middle layers (emulator layers 1 and 2) changed.
    let after = emu.model.named_weights();
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let changed = common::max_abs_diff(a, b) > 0.0;
        let middle = name.starts_with("model.layers.1.") || name.starts_with("model.layers.2.");
        let projection = name.contains("_proj");
        assert_eq!(changed, middle && projection, "{name}");
    }
}

/// The aligned emulator saved and loaded back gives bit-identical logits and
/// the same alignment report; one saved from other settings is refused by
/// name, and an empty directory holds none.
fn saved_and_reused(
    emu: &fedtune_adapters::offsite::Emulator,
    report: &fedtune_adapters::offsite::Distilled,
    batch: &fedtune_adapters::train::Batch,
) {
    use fedtune_adapters::offsite::{load_emulator, save_emulator};
    let dir = tempfile::tempdir().unwrap();
    let origin = serde_json::json!({"model_sha256": "ab12", "offsite": {"drop_ratio": 0.5}});
    let load =
        |origin: &serde_json::Value| load_emulator(dir.path(), origin, DType::F64, &Device::Cpu);
    assert!(load(&origin).unwrap().is_none());
    save_emulator(dir.path(), emu, report, &origin).unwrap();
    let (again, distilled) = load(&origin).unwrap().expect("saved");
    assert_eq!(again.kept, emu.kept);
    assert_eq!(&distilled, report);
    let logits = |m: &Llama| {
        m.forward(&batch.tokens, Some(&batch.attention_mask), None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (logits(&emu.model), logits(&again.model));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let other = serde_json::json!({"model_sha256": "ab12", "offsite": {"drop_ratio": 0.2}});
    let e = load(&other).err().expect("refused").to_string();
    assert!(e.contains("offsite.drop_ratio: saved 0.5, now 0.2"), "{e}");
}
