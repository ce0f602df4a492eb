//! The KV-cached forward pass matches the full forward pass position by position.

mod common;

use candle_core::{DType, Device, Tensor};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::model::{KvCache, Llama, LlamaConfig};
use fedtune_kernel::ParamSet;

/// A two-layer grouped-query model with room for `positions` tokens.
fn tiny(positions: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 30,
        hidden_size: 24,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: positions,
        tie_word_embeddings: true,
        ..Default::default()
    }
}

#[test]
fn cached_chunks_reproduce_the_full_forward() {
    cached_chunks_match(tiny(32));
}

/// In every family too: Qwen2's biases, Mistral's sliding window (shorter
/// than the sequence, so cached keys leave it) and wide heads, Llama 3's
/// scaled rotary frequencies.
#[test]
fn cached_chunks_reproduce_the_full_forward_in_every_family() {
    for (family, cfg) in common::family_configs() {
        println!("{family}");
        cached_chunks_match(cfg);
    }
}

fn cached_chunks_match(cfg: LlamaConfig) {
    let device = Device::Cpu;
    let model = Llama::random(cfg.clone(), 4, DType::F64, &device).unwrap();
    // A LoRA with non-zero B, so the adapter path is part of what is compared.
    let lora = Lora::new(&cfg, LoraConfig::default(), 2, DType::F64, &device).unwrap();
    let mut p = ParamSet::new();
    for (name, t) in lora.to_param_set().unwrap().iter() {
        p.insert(name, t.shape().to_vec(), vec![0.05; t.len()])
            .unwrap();
    }
    lora.load_param_set(&p).unwrap();

    let ids: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 3, 5, 8, 9];
    let full = model
        .forward(
            &Tensor::new(ids.as_slice(), &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            Some(&lora),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let mut start = 0;
    for chunk in [3usize, 1, 4, 2] {
        let part = Tensor::new(&ids[start..start + chunk], &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model
            .forward_cached(&part, &mut cache, Some(&lora))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = full.narrow(0, start, chunk).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff < 1e-10, "positions {start}..{}: {diff}", start + chunk);
        start += chunk;
        assert_eq!(cache.len(), start);
    }
}

#[test]
fn a_cache_grows_past_its_buffers_and_clones_do_not_share_them() {
    let cfg = tiny(700);
    let device = Device::Cpu;
    let model = Llama::random(cfg.clone(), 5, DType::F64, &device).unwrap();
    let ids: Vec<u32> = (0..600u32).map(|i| (i * 7 + i / 13) % 30).collect();
    let row = |x: &[u32]| Tensor::new(x, &device).unwrap().unsqueeze(0).unwrap();
    let full = model
        .forward(&row(&ids), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();

    // Chunks that cross the first buffer (asked size + 256 positions) and its doubling.
    let mut cache = KvCache::new(cfg.num_hidden_layers);
    let mut start = 0;
    for chunk in [3usize, 250, 1, 100, 1, 200] {
        let got = model
            .forward_cached(&row(&ids[start..start + chunk]), &mut cache, None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = common::max_abs_diff(&got, &full.narrow(0, start, chunk).unwrap());
        assert!(diff < 1e-10, "positions {start}..{}: {diff}", start + chunk);
        start += chunk;
    }

    // A clone continues the true sequence while the original writes other
    // tokens into the positions after it: the clone must not see them.
    let mut clone = cache.clone();
    model
        .forward_cached(&row(&ids[start..start + 2]), &mut clone, None)
        .unwrap();
    model
        .forward_cached(&row(&[1, 2, 3, 4]), &mut cache, None)
        .unwrap();
    let got = model
        .forward_cached_last(&row(&ids[start + 2..start + 4]), &mut clone, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = common::max_abs_diff(&got, &full.get(start + 3).unwrap());
    assert!(diff < 1e-10, "the clone's last logits: {diff}");
}
