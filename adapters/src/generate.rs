//! Text generation: greedy or temperature / top-p sampling with a KV cache and stop sequences.
//!
//! The prompt is encoded in one forward pass that fills the cache; each new
//! token then costs one single-position pass. Generation stops at the
//! end-of-sequence token, at `max_new_tokens`, or as soon as the decoded
//! continuation contains a stop sequence (which is cut from the returned
//! text). Sampling is seeded, so a run is reproducible.

use candle_core::{DType, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{KvCache, Llama, ProjectionAdapter};
use crate::tokenizer::TextTokenizer;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// 0 for greedy decoding; otherwise logits are divided by this before sampling.
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to this.
    pub top_p: f64,
    /// Seed of sampling.
    pub seed: u64,
    /// Strings that end the continuation (not included in the result).
    pub stop: Vec<String>,
    /// Never pick the end-of-sequence token, so every sequence runs
    /// `max_new_tokens` steps (Hugging Face's `min_new_tokens` equal to
    /// `max_new_tokens`; for timing).
    pub ignore_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop sequence appeared.
    Stop(String),
    /// `max_new_tokens` were produced.
    Length,
}

/// A continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The continuation's text, stop sequence removed.
    pub text: String,
    /// The continuation's token ids (up to and including the token that completed a stop sequence).
    pub ids: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Continues `prompt` (token ids) with `model` (and `adapter`, if any).
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
    adapter: Option<&dyn ProjectionAdapter>,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("cannot generate from an empty prompt")
    }
    let device = model.device();
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut ids = Vec::new();
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let finish = loop {
        if ids.len() >= cfg.max_new_tokens {
            break FinishReason::Length;
        }
        let last = model
            .forward_cached_last(&input, &mut cache, adapter)?
            .squeeze(0)?; // (vocab)
        let next = pick(&last, cfg, tokenizer.eos_id, &mut rng)?;
        if next == tokenizer.eos_id {
            break FinishReason::Eos;
        }
        ids.push(next);
        if !cfg.stop.is_empty() {
            let text = tokenizer.decode(&ids).map_err(candle_core::Error::msg)?;
            if let Some(stop) = cfg.stop.iter().find(|s| text.contains(s.as_str())) {
                break FinishReason::Stop(stop.clone());
            }
        }
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    };
    let mut text = tokenizer.decode(&ids).map_err(candle_core::Error::msg)?;
    if let FinishReason::Stop(stop) = &finish {
        if let Some(at) = text.find(stop.as_str()) {
            text.truncate(at);
        }
    }
    Ok(Generation { text, ids, finish })
}

/// Greedy when `temperature` is 0, otherwise temperature + nucleus sampling.
pub(crate) fn pick(
    logits: &Tensor,
    cfg: &GenerationConfig,
    eos: u32,
    rng: &mut ChaCha8Rng,
) -> Result<u32> {
    let masked;
    let logits = if cfg.ignore_eos {
        let mut v: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if let Some(x) = v.get_mut(eos as usize) {
            *x = f32::NEG_INFINITY;
        }
        masked = Tensor::from_vec(v, logits.dims1()?, logits.device())?;
        &masked
    } else {
        logits
    };
    if cfg.temperature <= 0.0 {
        return logits.argmax(D::Minus1)?.to_scalar::<u32>();
    }
    let scaled = (logits.to_dtype(DType::F64)? / cfg.temperature)?;
    let probs: Vec<f64> = candle_nn::ops::softmax(&scaled, D::Minus1)?.to_vec1()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for &i in &order {
        kept.push(i);
        mass += probs[i];
        if mass >= cfg.top_p {
            break;
        }
    }
    let mut r = rng.random_range(0.0..mass);
    for &i in &kept {
        r -= probs[i];
        if r <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(*kept.last().expect("at least one token kept") as u32)
}
