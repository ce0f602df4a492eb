//! A tiny random model for tests and prototyping: a few small layers, a
//! byte-level tokenizer (256 byte tokens and `<|endoftext|>`), written as a
//! Hugging Face directory that [`super::load_hf_dir`] reads back. Courses
//! run on it in seconds; it learns (byte statistics) but knows nothing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::config::{Family, LlamaConfig};
use super::llama::Llama;

/// The end-of-sequence token of the tiny tokenizer.
pub const TINY_EOS: &str = "<|endoftext|>";

/// The shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    /// Decoder blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Attention heads (key/value heads: half of them, rounded up).
    pub heads: usize,
    /// Seed of the random weights.
    pub seed: u64,
    /// The architecture: Qwen2's has biases on the query, key and value
    /// projections; Mistral's a sliding attention window of
    /// [`TINY_SLIDING_WINDOW`] positions; Gemma's scales its embeddings and
    /// gates its MLP with GELU.
    pub family: Family,
}

/// The sliding window of a tiny Mistral: shorter than a course's sequences,
/// so that the window matters.
pub const TINY_SLIDING_WINDOW: usize = 48;

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            heads: 4,
            seed: 0,
            family: Family::Llama,
        }
    }
}

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

/// The character GPT-2's byte-level encoding writes for each byte, in byte
/// order: printable bytes stand for themselves, the others for 256, 257, …
/// in turn (`ByteLevel::alphabet()` is the same set, unordered).
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            }
        })
        .collect()
}

/// Writes a tiny random model to `dir` (`config.json`, `model.safetensors`,
/// `tokenizer.json`) and returns its configuration.
pub fn write_tiny_model(dir: &Path, spec: TinySpec) -> candle_core::Result<LlamaConfig> {
    if spec.heads == 0
        || !spec.hidden.is_multiple_of(spec.heads)
        || !(spec.hidden / spec.heads).is_multiple_of(2)
    {
        return Err(err(format!(
            "hidden ({}) must split into heads ({}) of an even width",
            spec.hidden, spec.heads
        )));
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    // The tokenizer: one token per byte, the byte's value, as GPT-2's
    // byte-level alphabet writes it.
    let bpe = BPE::builder()
        .vocab_and_merges(
            byte_level_chars()
                .into_iter()
                .zip(0..)
                .map(|(c, id)| (c.to_string(), id))
                .collect::<tokenizers::models::bpe::Vocab>(),
            Vec::new(),
        )
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(&[AddedToken::from(TINY_EOS, true)]);
    let eos = tok
        .token_to_id(TINY_EOS)
        .ok_or_else(|| err("no eos token"))?;
    tok.save(dir.join("tokenizer.json"), false).map_err(err)?;

    let heads = spec.heads;
    let cfg = LlamaConfig {
        vocab_size: eos as usize + 1,
        hidden_size: spec.hidden,
        intermediate_size: spec.hidden * 2,
        num_hidden_layers: spec.layers,
        num_attention_heads: heads,
        num_key_value_heads: heads.div_ceil(2).max(1),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        family: spec.family,
        sliding_window: (spec.family == Family::Mistral).then_some(TINY_SLIDING_WINDOW),
        ..Default::default()
    };
    if !heads.is_multiple_of(cfg.num_key_value_heads) {
        return Err(err(format!(
            "{heads} heads do not group into {} key/value heads",
            cfg.num_key_value_heads
        )));
    }
    let model = Llama::random(cfg.clone(), spec.seed, DType::F32, &Device::Cpu)?;
    let mut json = serde_json::to_value(&cfg).map_err(err)?;
    json["architectures"] = serde_json::json!([spec.family.architecture()]);
    json["torch_dtype"] = "float32".into();
    json["eos_token_id"] = eos.into();
    std::fs::write(dir.join("config.json"), json.to_string()).map_err(err)?;
    let weights: HashMap<String, Tensor> = model.named_weights().into_iter().collect();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_model_loads_back_and_round_trips_text() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_tiny_model(dir.path(), TinySpec::default()).unwrap();
        let loaded = super::super::load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.model.config(), &cfg);
        let tok = loaded.tokenizer.unwrap();
        let text = "Natalia sold 48/2 = 24 clips in May. ü\n#### 72";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.eos_id as usize, cfg.vocab_size - 1);
        let input = Tensor::new(&ids[..8], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = loaded.model.forward(&input, None, None).unwrap();
        assert_eq!(logits.dims(), &[1, 8, cfg.vocab_size]);
    }

    /// Each byte's token is the byte's value, in every process: the
    /// tokenizer (and so every test on a tiny model) is the same each time.
    #[test]
    fn tiny_models_of_each_family_load_back_as_written() {
        for family in [Family::Mistral, Family::Qwen2, Family::Gemma] {
            let dir = tempfile::tempdir().unwrap();
            let spec = TinySpec {
                family,
                ..TinySpec::default()
            };
            let cfg = write_tiny_model(dir.path(), spec).unwrap();
            let loaded = super::super::load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(loaded.model.config(), &cfg);
            assert_eq!(cfg.family, family);
            let biases = loaded
                .model
                .named_weights()
                .iter()
                .filter(|(n, _)| n.ends_with(".bias"))
                .count();
            assert_eq!(biases, if family == Family::Qwen2 { 2 * 3 } else { 0 });
        }
    }

    #[test]
    fn a_bytes_token_is_its_value() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), TinySpec::default()).unwrap();
        let tok = super::super::load_hf_dir(dir.path(), DType::F32, &Device::Cpu)
            .unwrap()
            .tokenizer
            .unwrap();
        let text = "Az09 !~\n\t\u{7f}é";
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(tok.encode(text).unwrap(), bytes);
        let all: Vec<u8> = (0..=255).collect();
        let text = String::from_utf8_lossy(&all).into_owned();
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        let mut ours = byte_level_chars();
        let mut theirs: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(ours, theirs);
    }
}
