//! Loading from a Hugging Face directory: a random model written in HF layout reads back exactly.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fedtune_adapters::model::{load_hf_dir, Llama, LlamaConfig};

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 50,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-6,
        rope_theta: 50_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        ..Default::default()
    }
}

/// Writes `model` as HF would: config.json plus one file, or `shards` files and an index.
fn write_hf(dir: &Path, model: &Llama, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = serde_json::to_value(model.config()).unwrap();
    cfg["model_type"] = "llama".into();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    cfg["torch_dtype"] = "float32".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let weights = model.named_weights();
    if shards == 1 {
        let map: HashMap<String, Tensor> = weights.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let part: HashMap<String, Tensor> = weights
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, (n, t))| (n.clone(), t.clone()))
            .collect();
        for name in part.keys() {
            weight_map.insert(name.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn models_written_in_hf_layout_load_back_exactly() {
    let device = Device::Cpu;
    let tokens = Tensor::new(&[[4u32, 9, 33, 2, 17, 49, 0, 8]], &device).unwrap();
    for (tied, shards) in [(true, 1), (false, 1), (false, 2), (true, 3)] {
        let model = Llama::random(config(tied), 21, DType::F32, &device).unwrap();
        let dir =
            std::env::temp_dir().join(format!("fedtune-hf-{}-{tied}-{shards}", std::process::id()));
        write_hf(&dir, &model, shards);
        let loaded = load_hf_dir(&dir, DType::F32, &device).unwrap();
        assert_eq!(loaded.model.config(), model.config());
        assert!(loaded.tokenizer.is_none(), "no tokenizer.json was written");
        let a = model.forward(&tokens, None, None).unwrap();
        let b = loaded.model.forward(&tokens, None, None).unwrap();
        let diff = common::max_abs_diff(&a, &b);
        assert_eq!(diff, 0.0, "tied {tied}, {shards} shard(s)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn broken_directories_are_explained() {
    let device = Device::Cpu;
    let model = Llama::random(config(true), 1, DType::F32, &device).unwrap();
    let dir = std::env::temp_dir().join(format!("fedtune-hf-bad-{}", std::process::id()));
    write_hf(&dir, &model, 1);
    let err = |dir: &Path| {
        load_hf_dir(dir, DType::F32, &device)
            .err()
            .expect("loading fails")
            .to_string()
    };

    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &device).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    assert!(
        err(&dir).contains("weights lack `model.layers.1.mlp.up_proj.weight`"),
        "{}",
        err(&dir)
    );

    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    assert!(
        err(&dir).contains("model_type `gpt2` is not a Llama-family model"),
        "{}",
        err(&dir)
    );

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert!(
        err(&dir).contains("neither model.safetensors nor"),
        "{}",
        err(&dir)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_directorys_chat_template_is_read_from_its_tokenizer_config() {
    use fedtune_adapters::chat::ChatLayout;
    use fedtune_adapters::model::{load_hf_tokenizer, write_tiny_model, TinySpec};
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), TinySpec::default()).unwrap();
    let tok = load_hf_tokenizer(dir.path()).unwrap().unwrap();
    assert_eq!(
        ChatLayout::of(&tok),
        ChatLayout::Plain,
        "no tokenizer_config.json"
    );
    let qwen = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": qwen }).to_string(),
    )
    .unwrap();
    let tok = load_hf_tokenizer(dir.path()).unwrap().unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some(qwen));
    assert!(matches!(ChatLayout::of(&tok), ChatLayout::ChatMl { .. }));
    // Older files list named templates; the default one is used.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": "<start_of_turn>{{ m }}<end_of_turn>"}
        ]})
        .to_string(),
    )
    .unwrap();
    let tok = load_hf_tokenizer(dir.path()).unwrap().unwrap();
    assert_eq!(ChatLayout::of(&tok), ChatLayout::Gemma);
}
