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
    /// The caller stopped it (Ctrl-C in `fedtune chat`).
    Interrupted,
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
    decode_loop(model, tokenizer, prompt, cfg, adapter, None)
}

/// [`generate`], handing each piece of text to `on_text` as soon as it is
/// final: text that could still become a stop sequence, or an incomplete
/// UTF-8 character, is held back until the next token decides it. The
/// pieces joined are the returned text (unless the tokenizer's decoder
/// rewrites text it already produced, which byte-level tokenizers do not).
/// `on_text` returning `false` ends generation
/// ([`FinishReason::Interrupted`]).
pub fn generate_streaming(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
    adapter: Option<&dyn ProjectionAdapter>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    decode_loop(model, tokenizer, prompt, cfg, adapter, Some(on_text))
}

/// [`generate`] and [`generate_streaming`]: the text is decoded after each
/// token only when a stop sequence or a listener needs it.
fn decode_loop(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
    adapter: Option<&dyn ProjectionAdapter>,
    mut on_text: Option<&mut dyn FnMut(&str) -> bool>,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("cannot generate from an empty prompt")
    }
    let device = model.device();
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut ids = Vec::new();
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut sent = 0; // bytes of the text already handed to `on_text`
    let decode = |ids: &[u32]| tokenizer.decode(ids).map_err(candle_core::Error::msg);
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
        if !cfg.stop.is_empty() || on_text.is_some() {
            let text = decode(&ids)?;
            if let Some(stop) = cfg.stop.iter().find(|s| text.contains(s.as_str())) {
                break FinishReason::Stop(stop.clone());
            }
            let ready = settled(&text, &cfg.stop);
            if let Some(on_text) = on_text.as_mut() {
                if ready > sent && text.is_char_boundary(sent) {
                    if !on_text(&text[sent..ready]) {
                        break FinishReason::Interrupted;
                    }
                    sent = ready;
                }
            }
        }
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    };
    let mut text = decode(&ids)?;
    if let FinishReason::Stop(stop) = &finish {
        if let Some(at) = text.find(stop.as_str()) {
            text.truncate(at);
        }
    }
    if let Some(on_text) = on_text {
        if finish != FinishReason::Interrupted && text.len() > sent && text.is_char_boundary(sent) {
            on_text(&text[sent..]);
        }
    }
    Ok(Generation { text, ids, finish })
}

/// How many leading bytes of `text` no later token can change: all of it
/// but a trailing replacement character (the first bytes of a character
/// split over tokens) and the longest tail that begins a stop sequence.
fn settled(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    let hold = stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .rev()
                .filter(|&n| stop.is_char_boundary(n))
                .find(|&n| text[..end].ends_with(&stop[..n]))
        })
        .max()
        .unwrap_or(0);
    end -= hold;
    end
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::{load_hf_dir, write_tiny_model, TinySpec};

    #[test]
    fn settled_text_holds_back_stop_prefixes_and_split_characters() {
        let stops = ["Q:".to_string(), "\n\n".to_string()];
        assert_eq!(settled("so 4 Q", &stops), 5);
        assert_eq!(settled("so 4\n", &stops), 4);
        assert_eq!(settled("so 4.", &stops), 5);
        assert_eq!(settled("caf\u{FFFD}", &[]), 3);
        assert_eq!(settled("", &stops), 0);
    }

    /// A tiny random model and its byte-level tokenizer (its continuations
    /// hold split UTF-8 characters, which streaming must hold back).
    fn tiny() -> (Llama, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec {
            seed: 3,
            ..TinySpec::default()
        };
        write_tiny_model(dir.path(), spec).unwrap();
        let m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        (m.model, m.tokenizer.unwrap())
    }

    fn streamed(
        m: &Llama,
        tok: &TextTokenizer,
        cfg: &GenerationConfig,
        stop_after: usize,
    ) -> (Generation, Vec<String>) {
        let prompt = tok.encode("Natalia sold 48 clips").unwrap();
        let mut pieces = Vec::new();
        let g = generate_streaming(m, tok, &prompt, cfg, None, &mut |piece| {
            pieces.push(piece.to_string());
            pieces.len() < stop_after
        })
        .unwrap();
        (g, pieces)
    }

    #[test]
    fn streamed_pieces_join_to_the_generated_text() {
        let (m, tok) = tiny();
        let cfg = GenerationConfig {
            max_new_tokens: 48,
            ignore_eos: true,
            ..GenerationConfig::default()
        };
        let whole = generate(
            &m,
            &tok,
            &tok.encode("Natalia sold 48 clips").unwrap(),
            &cfg,
            None,
        )
        .unwrap();
        let (g, pieces) = streamed(&m, &tok, &cfg, usize::MAX);
        assert_eq!(g, whole);
        assert!(pieces.len() > 1, "{pieces:?}");
        assert_eq!(pieces.concat(), g.text);
        // A stop sequence from the middle of that text: nothing of it, nor
        // anything after it, is ever handed out.
        let chars: Vec<char> = whole.text.chars().collect();
        let at = (chars.len() / 3..chars.len() - 1)
            .find(|&i| chars[i..i + 2].iter().all(char::is_ascii_graphic))
            .expect("two printable characters in a row");
        let stop: String = chars[at..at + 2].iter().collect();
        let with_stop = GenerationConfig {
            stop: vec![stop.clone()],
            ..cfg.clone()
        };
        let (g, pieces) = streamed(&m, &tok, &with_stop, usize::MAX);
        assert_eq!(g.finish, FinishReason::Stop(stop.clone()));
        assert_eq!(pieces.concat(), g.text);
        assert!(whole.text.starts_with(&format!("{}{stop}", g.text)));
        // The caller can end it.
        let (g, pieces) = streamed(&m, &tok, &cfg, 2);
        assert_eq!(g.finish, FinishReason::Interrupted);
        assert_eq!(pieces.len(), 2);
        assert!(g.ids.len() < whole.ids.len());
    }
}
