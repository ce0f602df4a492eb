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
