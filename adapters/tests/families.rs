//! Each model family's forward pass against an independent implementation:
//! candle-transformers' Qwen2, Mistral, Gemma and Llama (with Llama 3's
//! rotary scaling), loaded from the same random weights in Hugging Face layout.
//! Logits of every position agree to 1e-4 in f32.
//!
//! candle's references return the last position's logits only (Mistral,
//! Gemma, Llama), so those are run once per prefix. candle's Mistral lets a
//! position see `sliding_window` positions before itself, Hugging Face's
//! (and fedtune's) `sliding_window - 1`: the reference is given a window one
//! shorter so that both mean the same masks.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{gemma, llama, mistral, qwen2};
use fedtune_adapters::model::{Family, Llama, LlamaConfig};

const SEQ: usize = 12;

fn tokens(vocab: usize) -> Vec<u32> {
    (0..SEQ as u32)
        .map(|i| (i * 7 + 3) % vocab as u32)
        .collect()
}

fn weights(model: &Llama) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = model.named_weights().into_iter().collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// Our logits `(seq, vocab)` for `ids`.
fn ours(model: &Llama, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// Logits `(seq, vocab)` from a reference that gives only the last
/// position's: one call per prefix.
fn per_prefix(ids: &[u32], mut last: impl FnMut(&Tensor) -> Tensor) -> Tensor {
    let rows: Vec<Tensor> = (1..=ids.len())
        .map(|n| {
            let input = Tensor::new(&ids[..n], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            last(&input).flatten_all().unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

fn assert_close(family: &str, a: &Tensor, b: &Tensor) {
    let diff = common::max_abs_diff(a, b);
    let scale = common::max_abs_diff(a, &a.zeros_like().unwrap());
    println!("{family}: max |logit diff| {diff:.2e} (logits up to {scale:.2})");
    assert!(diff < 1e-4, "{family}: logits differ by {diff}");
    assert!(scale > 0.1, "{family}: logits are not trivially small");
}

fn config(family: &str) -> LlamaConfig {
    common::family_configs()
        .into_iter()
        .find(|(f, _)| *f == family)
        .unwrap()
        .1
}

#[test]
fn qwen2_matches_candle_transformers_qwen2() {
    for tied in [false, true] {
        let cfg = LlamaConfig {
            tie_word_embeddings: tied,
            ..config("qwen2")
        };
        let model = Llama::random(cfg.clone(), 5, DType::F32, &Device::Cpu).unwrap();
        assert!(
            model
                .named_weights()
                .iter()
                .any(|(n, _)| n.ends_with("q_proj.bias")),
            "Qwen2 has query biases"
        );
        let reference = qwen2::Config {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            max_position_embeddings: cfg.max_position_embeddings,
            sliding_window: cfg.max_position_embeddings,
            max_window_layers: cfg.num_hidden_layers,
            tie_word_embeddings: tied,
            rope_theta: f64::from(cfg.rope_theta),
            rms_norm_eps: cfg.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: candle_nn::Activation::Silu,
        };
        let mut theirs = qwen2::Model::new(&reference, weights(&model)).unwrap();
        let ids = tokens(cfg.vocab_size);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = theirs.forward(&input, 0, None).unwrap().i(0).unwrap();
        let logits = hidden.matmul(&model.output_weight().t().unwrap()).unwrap();
        assert_close(&format!("qwen2, tied {tied}"), &ours(&model, &ids), &logits);
    }
}

#[test]
fn mistral_with_a_sliding_window_and_wide_heads_matches_candle_transformers_mistral() {
    let cfg = LlamaConfig {
        tie_word_embeddings: false,
        ..config("mistral")
    };
    let window = cfg.sliding_window.unwrap();
    assert!(window < SEQ, "the window is shorter than the sequence");
    assert_ne!(cfg.head_dim(), cfg.hidden_size / cfg.num_attention_heads);
    let model = Llama::random(cfg.clone(), 6, DType::F32, &Device::Cpu).unwrap();
    let reference = mistral::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        head_dim: cfg.explicit_head_dim,
        num_key_value_heads: cfg.num_key_value_heads,
        hidden_act: candle_nn::Activation::Silu,
        max_position_embeddings: cfg.max_position_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: f64::from(cfg.rope_theta),
        sliding_window: Some(window - 1),
        use_flash_attn: false,
    };
    let mut theirs = mistral::Model::new(&reference, weights(&model)).unwrap();
    let ids = tokens(cfg.vocab_size);
    let want = per_prefix(&ids, |input| {
        theirs.clear_kv_cache();
        theirs.forward(input, 0).unwrap()
    });
    let got = ours(&model, &ids);
    assert_close("mistral", &got, &want);

    // The window matters: without it the later positions' logits move.
    let unwindowed = Llama::random(
        LlamaConfig {
            sliding_window: None,
            ..cfg
        },
        6,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let moved = common::max_abs_diff(&got, &ours(&unwindowed, &ids));
    assert!(moved > 1e-3, "the sliding window changed nothing ({moved})");
    let early = common::max_abs_diff(
        &got.narrow(0, 0, window).unwrap(),
        &ours(&unwindowed, &ids).narrow(0, 0, window).unwrap(),
    );
    assert!(early < 1e-6, "positions inside the window moved by {early}");
}

#[test]
fn gemma_matches_candle_transformers_gemma() {
    let cfg = config("gemma");
    assert_ne!(cfg.head_dim(), cfg.hidden_size / cfg.num_attention_heads);
    let model = Llama::random(cfg.clone(), 8, DType::F32, &Device::Cpu).unwrap();
    // Hugging Face's files hold a norm weight less one.
    let stored = model.named_weights();
    let norm = &stored
        .iter()
        .find(|(n, _)| n == "model.norm.weight")
        .unwrap()
        .1;
    let mean = norm.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        mean.abs() < 0.1,
        "stored norm weights centre on 0, got {mean}"
    );
    let reference = gemma::Config {
        attention_bias: false,
        head_dim: cfg.head_dim(),
        hidden_act: Some(candle_nn::Activation::GeluPytorchTanh),
        hidden_activation: None,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_attention_heads: cfg.num_attention_heads,
        num_hidden_layers: cfg.num_hidden_layers,
        num_key_value_heads: cfg.num_key_value_heads,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: f64::from(cfg.rope_theta),
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
    };
    let mut theirs = gemma::Model::new(false, &reference, weights(&model)).unwrap();
    let ids = tokens(cfg.vocab_size);
    let want = per_prefix(&ids, |input| {
        theirs.clear_kv_cache();
        theirs.forward(input, 0).unwrap()
    });
    assert_close("gemma", &ours(&model, &ids), &want);
}

#[test]
fn llama3_rotary_scaling_matches_candle_transformers_llama() {
    let cfg = config("llama3");
    let scaling = cfg.rope_scaling.clone().unwrap();
    let model = Llama::random(cfg.clone(), 7, DType::F32, &Device::Cpu).unwrap();
    let reference = llama::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: Some(llama::Llama3RopeConfig {
            factor: scaling.factor as f32,
            low_freq_factor: scaling.low_freq_factor as f32,
            high_freq_factor: scaling.high_freq_factor as f32,
            original_max_position_embeddings: scaling.original_max_position_embeddings,
            rope_type: llama::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings,
    };
    let theirs = llama::Llama::load(weights(&model), &reference).unwrap();
    let ids = tokens(cfg.vocab_size);
    let want = per_prefix(&ids, |input| {
        let mut cache = llama::Cache::new(false, DType::F32, &reference, &Device::Cpu).unwrap();
        theirs.forward(input, 0, &mut cache).unwrap()
    });
    let got = ours(&model, &ids);
    assert_close("llama3", &got, &want);

    // The scaling matters.
    let unscaled = Llama::random(
        LlamaConfig {
            rope_scaling: None,
            ..cfg
        },
        7,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let moved = common::max_abs_diff(&got, &ours(&unscaled, &ids));
    assert!(moved > 1e-3, "rope scaling changed nothing ({moved})");
}

/// Every family reads back from a Hugging Face `config.json` as written
/// there (keys such as Qwen2's unused `sliding_window` and Llama 3's
/// older `type` spelling included), and options the decoder does not
/// implement are refused by name.
#[test]
fn hugging_face_configs_of_each_family_are_read_or_refused_by_name() {
    use fedtune_adapters::model::config_of;
    use serde_json::json;
    let base = json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32, "hidden_act": "silu",
    });
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        config_of(v)
    };
    let qwen = with(json!({"model_type": "qwen2", "sliding_window": 32,
                           "use_sliding_window": false, "tie_word_embeddings": true}))
    .unwrap();
    assert_eq!(qwen.family, Family::Qwen2);
    assert_eq!(qwen.sliding_window, None, "Qwen2's window is off");
    let mistral =
        with(json!({"model_type": "mistral", "sliding_window": 4096, "head_dim": 8})).unwrap();
    assert_eq!(
        (mistral.sliding_window, mistral.head_dim()),
        (Some(4096), 8)
    );
    let llama3 = with(json!({"rope_scaling": {"type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}))
    .unwrap();
    assert_eq!(llama3.rope_scaling, Some(common::llama3_scaling()));
    assert_eq!(
        with(json!({"rope_scaling": {"rope_type": "default"}}))
            .unwrap()
            .rope_scaling,
        None
    );
    let gemma = with(json!({"model_type": "gemma", "hidden_act": "gelu", "head_dim": 8})).unwrap();
    assert_eq!(gemma.family, Family::Gemma);
    assert!(gemma.tie_word_embeddings, "Gemma's head is its embeddings");

    for (extra, says) in [
        (json!({"model_type": "gemma2"}), "model_type `gemma2` is not a Llama-family model this decoder implements (supported: llama, mistral, qwen2, gemma)"),
        (json!({"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": "gelu"}), "hidden_activation `gelu` is not supported for gemma"),
        (json!({"model_type": "gemma", "hidden_act": "gelu", "tie_word_embeddings": false}), "tie_word_embeddings = false is not supported"),
        (json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling type `yarn` is not supported"),
        (json!({"model_type": "qwen2", "use_sliding_window": true}), "use_sliding_window = true is not supported"),
        (json!({"hidden_act": "gelu_pytorch_tanh"}), "hidden_act `gelu_pytorch_tanh` is not supported"),
        (json!({"attention_bias": true}), "attention_bias = true is not supported"),
        (json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 1.0, "original_max_position_embeddings": 64}}),
         "high_freq_factor > low_freq_factor"),
    ] {
        let e = with(extra.clone()).unwrap_err().to_string();
        assert!(e.contains(says), "{extra}: {e}");
    }
}
