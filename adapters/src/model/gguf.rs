//! Loading a Llama-family model from a GGUF file (llama.cpp's format).
//!
//! Tensors are dequantized to the training dtype and renamed to Hugging Face's
//! layout. llama.cpp's converter permutes the rows of `q_proj` and `k_proj`
//! so that its interleaved rotary embedding matches Hugging Face's
//! half-rotation; the loader undoes that permutation, so the model here — and
//! every adapter trained on it — is laid out exactly as the Hugging Face
//! original. Quantization blocks run along the input dimension, so permuting
//! output rows is exact.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};

use super::config::LlamaConfig;
use super::llama::{LayerWeights, Llama, Projection};

/// A model read from GGUF, with the metadata other parts (the tokenizer) need.
pub struct GgufModel {
    /// The decoder.
    pub model: Llama,
    /// The file's metadata, tokenizer included.
    pub content: gguf_file::Content,
}

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata has no `{key}`")))
}

/// Reads the model shape from GGUF metadata (`llama.*` keys).
pub fn config_from_gguf(content: &gguf_file::Content) -> Result<LlamaConfig> {
    let arch = md(content, "general.architecture")?.to_string()?.clone();
    if arch != "llama" {
        candle_core::bail!("GGUF architecture `{arch}` is not supported (only `llama`)")
    }
    let u = |key: &str| -> Result<usize> { Ok(md(content, key)?.to_u32()? as usize) };
    let hidden = u("llama.embedding_length")?;
    let heads = u("llama.attention.head_count")?;
    let vocab = match content.metadata.get("llama.vocab_size") {
        Some(v) => v.to_u32()? as usize,
        None => md(content, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("llama.feed_forward_length")?,
        num_hidden_layers: u("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: u("llama.attention.head_count_kv").unwrap_or(heads),
        rms_norm_eps: f64::from(md(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?),
        rope_theta: content
            .metadata
            .get("llama.rope.freq_base")
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(10_000.0),
        max_position_embeddings: u("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        ..Default::default()
    };
    if let Ok(rope_dim) = u("llama.rope.dimension_count") {
        if rope_dim != cfg.head_dim() {
            candle_core::bail!(
                "partial rotary embeddings (rope dim {rope_dim} < head dim {}) are not supported",
                cfg.head_dim()
            )
        }
    }
    cfg.validate().map_err(candle_core::Error::msg)?;
    Ok(cfg)
}

/// Loads a GGUF Llama, dequantizing every tensor to `dtype` on `device`.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let file = File::open(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot open {}: {e}", path.display())))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| {
        candle_core::Error::msg(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    let cfg = config_from_gguf(&content)?;
    let mut get = |name: &str| -> Result<Tensor> {
        content
            .tensor(&mut reader, name, device)
            .map_err(|e| candle_core::Error::msg(format!("tensor `{name}`: {e}")))?
            .dequantize(device)?
            .to_dtype(dtype)
    };
    let embed = get("token_embd.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let name = |s: &str| format!("blk.{i}.{s}.weight");
        let input_norm = get(&name("attn_norm"))?;
        let post_norm = get(&name("ffn_norm"))?;
        layers.push(LayerWeights::from_parts(
            input_norm,
            post_norm,
            |p| match p {
                Projection::Q => {
                    unpermute_rope_rows(&get(&name("attn_q"))?, cfg.num_attention_heads)
                }
                Projection::K => {
                    unpermute_rope_rows(&get(&name("attn_k"))?, cfg.num_key_value_heads)
                }
                Projection::V => get(&name("attn_v")),
                Projection::O => get(&name("attn_output")),
                Projection::Gate => get(&name("ffn_gate")),
                Projection::Up => get(&name("ffn_up")),
                Projection::Down => get(&name("ffn_down")),
            },
        )?);
    }
    let norm = get("output_norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(get("output.weight")?)
    };
    let model = Llama::new(cfg, embed, layers, norm, lm_head)?;
    Ok(GgufModel { model, content })
}

/// Inverts llama.cpp's `permute(w, n_head)`: GGUF rows of each head come as
/// `(head_dim/2, 2)` interleaved pairs; Hugging Face keeps `(2, head_dim/2)` halves.
fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / n_head / 2;
    w.reshape((n_head, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, half, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, head_dim, inp) = (3, 4, 2);
        let out = n_head * head_dim;
        let hf = Tensor::arange(0f32, (out * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let gguf = hf
            .reshape((n_head, 2, head_dim / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute_rope_rows(&gguf, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }
}
