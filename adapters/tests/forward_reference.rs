//! Our f32 forward pass against candle's `quantized_llama` on the default model.
//!
//! Two references, one implementation: `quantized_llama` as it normally runs
//! (ggml's Q4_1 kernels, which also quantize activations to 8 bits), and the
//! same code with every weight dequantized to f32 (`CANDLE_DEQUANTIZE_ALL`),
//! which is the like-for-like reference for an f32 forward. This binary holds
//! one test so that setting the environment variable races with nothing.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::{model_path, TEXT};
use fedtune_adapters::model::load_gguf;
use fedtune_adapters::tokenizer::TextTokenizer;

/// Next-token logits `(positions, vocab)` from `quantized_llama`, one token at
/// a time through its KV cache, computed on a fresh thread (candle reads
/// `CANDLE_DEQUANTIZE_ALL` once per thread).
fn reference_logits(ids: Vec<u32>) -> Tensor {
    std::thread::spawn(move || {
        let device = Device::Cpu;
        let mut reader = BufReader::new(File::open(model_path()).unwrap());
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let mut model = ModelWeights::from_gguf(content, &mut reader, &device).unwrap();
        let rows: Vec<Tensor> = ids
            .iter()
            .enumerate()
            .map(|(pos, &id)| {
                let x = Tensor::new(&[id], &device).unwrap().unsqueeze(0).unwrap();
                model.forward(&x, pos).unwrap().squeeze(0).unwrap()
            })
            .collect();
        Tensor::stack(&rows, 0).unwrap()
    })
    .join()
    .unwrap()
}

/// (argmax agreement rate, max |logit difference|).
fn compare(ours: &Tensor, theirs: &Tensor) -> (f64, f64) {
    let a = ours.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let b = theirs.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    let diff = common::max_abs_diff(ours, theirs);
    (agree as f64 / a.len() as f64, diff)
}

#[test]
fn f32_forward_agrees_with_candles_quantized_llama() {
    let loaded = load_gguf(model_path(), DType::F32, &Device::Cpu).unwrap();
    let cfg = loaded.model.config();
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
        (30, 576, 49_152)
    );
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (9, 3));
    assert!(cfg.tie_word_embeddings);
    let tok = TextTokenizer::from_gguf(&loaded.content).unwrap();
    let ids = tok.encode(TEXT).unwrap();
    assert!(ids.len() >= 128, "the text has {} tokens", ids.len());
    let ids = ids[..128].to_vec();
    let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = loaded
        .model
        .forward(&tokens, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap();

    let (q_rate, q_diff) = compare(&ours, &reference_logits(ids.clone()));
    // Safe: this binary's only test, and no other thread reads the environment now.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (f_rate, f_diff) = compare(&ours, &reference_logits(ids));
    println!("vs quantized_llama, f32-dequantized weights: argmax agreement {f_rate:.3}, max |logit diff| {f_diff:.2e}");
    println!("vs quantized_llama, Q4_1/Q8 kernels:          argmax agreement {q_rate:.3}, max |logit diff| {q_diff:.2e}");
    assert!(
        f_rate >= 0.98,
        "f32 reference: agreement {f_rate:.3}, max logit difference {f_diff}"
    );
    assert!(
        f_diff < 1e-2,
        "f32 reference: max logit difference {f_diff}"
    );
    // The quantized kernels round activations to 8 bits in every matmul; near-ties flip.
    assert!(
        q_rate >= 0.95,
        "quantized reference: agreement {q_rate:.3}, max logit difference {q_diff}"
    );
}
