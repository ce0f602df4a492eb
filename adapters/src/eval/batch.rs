//! Batched generation and scoring over a shared prompt prefix.
//!
//! Few-shot evaluation repeats one long prefix (GSM8K's eight exemplars, about
//! 900 tokens) in front of every item. [`SharedPrefix`] encodes it once; each
//! batch starts from a copy of its KV cache, so an item costs only its own
//! tokens. Items are batched by the length of their own part, so that the
//! sequences of a batch stay aligned (same positions, no padding) and every
//! result equals generating the item alone.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::generate::{pick, FinishReason, Generation, GenerationConfig};
use crate::model::{KvCache, Llama, ProjectionAdapter};
use crate::tokenizer::TextTokenizer;

/// A prompt prefix encoded once (its token ids and KV cache).
pub struct SharedPrefix {
    text: String,
    ids: Vec<u32>,
    cache: KvCache,
}

impl SharedPrefix {
    /// Encodes `text` (with the model's bos token, if it uses one). An empty
    /// text gives an empty prefix: items then carry their whole prompt.
    pub fn new(
        model: &Llama,
        tok: &TextTokenizer,
        text: &str,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Self> {
        let mut cache = KvCache::new(model.config().num_hidden_layers);
        let ids = if text.is_empty() {
            Vec::new()
        } else {
            tok.encode(text).map_err(candle_core::Error::msg)?
        };
        if !ids.is_empty() {
            let x = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
            model.forward_cached_last(&x, &mut cache, adapter)?;
        }
        Ok(Self {
            text: text.to_string(),
            ids,
            cache,
        })
    }

    /// Tokens of the prefix.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The tokens of `rest` after this prefix: those of `prefix + rest`
    /// tokenized together, past the prefix's own tokens. `None` when the joint
    /// tokenization does not begin with them (a token spans the boundary); the
    /// item must then be run from the whole text.
    pub fn continuation(&self, tok: &TextTokenizer, rest: &str) -> Result<Option<Vec<u32>>> {
        let full = tok
            .encode(&format!("{}{rest}", self.text))
            .map_err(candle_core::Error::msg)?;
        if full.len() > self.ids.len() && full[..self.ids.len()] == self.ids[..] {
            Ok(Some(full[self.ids.len()..].to_vec()))
        } else {
            Ok(None)
        }
    }

    pub(crate) fn cache_for(&self, batch: usize) -> Result<KvCache> {
        if self.cache.is_empty() {
            Ok(self.cache.clone())
        } else {
            self.cache.expand(batch)
        }
    }
}

/// Groups item indices by the length of their token ids (aligned batches of at most `batch`).
pub fn aligned_batches(lengths: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &n) in lengths.iter().enumerate() {
        by_len.entry(n).or_default().push(i);
    }
    by_len
        .into_values()
        .flat_map(|items| {
            items
                .chunks(batch.max(1))
                .map(<[usize]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Generates continuations of `prefix + items[i]` for a batch of items whose
/// token ids have one length. Greedy decoding, or seeded sampling with seed
/// `cfg.seed + seeds[i]`; finished sequences leave the batch.
pub fn generate_aligned(
    model: &Llama,
    tok: &TextTokenizer,
    prefix: &SharedPrefix,
    items: &[&[u32]],
    seeds: &[u64],
    cfg: &GenerationConfig,
    adapter: Option<&dyn ProjectionAdapter>,
) -> Result<Vec<Generation>> {
    let b = items.len();
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let s = first.len();
    if s == 0 || items.iter().any(|x| x.len() != s) {
        candle_core::bail!("an aligned batch needs non-empty items of one length")
    }
    let device = model.device();
    let mut cache = prefix.cache_for(b)?;
    let flat: Vec<u32> = items.iter().flat_map(|x| x.iter().copied()).collect();
    let input = Tensor::from_vec(flat, (b, s), device)?;
    let mut last = model.forward_cached_last(&input, &mut cache, adapter)?; // (rows, vocab)
    let mut rngs: Vec<ChaCha8Rng> = seeds
        .iter()
        .map(|&k| ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(k)))
        .collect();
    let mut active: Vec<usize> = (0..b).collect();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    loop {
        if cfg.max_new_tokens == 0 {
            finish.fill(Some(FinishReason::Length));
            break;
        }
        let mut keep = Vec::new();
        let mut next = Vec::new();
        for (row, &i) in active.iter().enumerate() {
            let id = pick(&last.get(row)?, cfg, tok.eos_id, &mut rngs[i])?;
            if id == tok.eos_id {
                finish[i] = Some(FinishReason::Eos);
                continue;
            }
            ids[i].push(id);
            if !cfg.stop.is_empty() {
                let text = tok.decode(&ids[i]).map_err(candle_core::Error::msg)?;
                if let Some(stop) = cfg.stop.iter().find(|s| text.contains(s.as_str())) {
                    finish[i] = Some(FinishReason::Stop(stop.clone()));
                    continue;
                }
            }
            if ids[i].len() >= cfg.max_new_tokens {
                finish[i] = Some(FinishReason::Length);
                continue;
            }
            keep.push(row as u32);
            next.push(id);
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache = cache.select(&keep)?;
            active = keep.iter().map(|&r| active[r as usize]).collect();
        }
        let input = Tensor::from_vec(next, (active.len(), 1), device)?;
        last = model.forward_cached_last(&input, &mut cache, adapter)?;
    }
    ids.into_iter()
        .zip(finish)
        .map(|(ids, finish)| {
            let finish = finish.expect("every sequence ends");
            let mut text = tok.decode(&ids).map_err(candle_core::Error::msg)?;
            if let FinishReason::Stop(stop) = &finish {
                if let Some(at) = text.find(stop.as_str()) {
                    text.truncate(at);
                }
            }
            Ok(Generation { text, ids, finish })
        })
        .collect()
}

/// Log-likelihoods of continuations: for each `(context, continuation)`
/// pair, Σ log p(continuation tokens | prefix + context). The pairs of one
/// call share their context length; continuations may differ in length
/// (right padding, which causal attention never lets earlier positions see).
pub fn loglikelihoods(
    model: &Llama,
    prefix: &SharedPrefix,
    pairs: &[(&[u32], &[u32])],
    adapter: Option<&dyn ProjectionAdapter>,
) -> Result<Vec<f64>> {
    let b = pairs.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let ctx_len = pairs[0].0.len();
    if pairs
        .iter()
        .any(|(c, k)| c.len() != ctx_len || k.is_empty())
    {
        candle_core::bail!("scored pairs need one context length and non-empty continuations")
    }
    if ctx_len == 0 {
        candle_core::bail!("a continuation needs some context of its own to be scored against")
    }
    let width = ctx_len + pairs.iter().map(|(_, k)| k.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(b * width);
    for (c, k) in pairs {
        flat.extend_from_slice(c);
        flat.extend_from_slice(k);
        flat.resize(flat.len() + width - c.len() - k.len(), tok_pad(k));
    }
    let mut cache = prefix.cache_for(b)?;
    let input = Tensor::from_vec(flat, (b, width), model.device())?;
    let logits = model.forward_cached(&input, &mut cache, adapter)?; // (b, width, vocab)
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    // The token at position p is predicted by position p − 1.
    let mut out = Vec::with_capacity(b);
    for (row, (_, k)) in pairs.iter().enumerate() {
        let rows = logp.get(row)?;
        let mut total = 0.0f64;
        for (j, &id) in k.iter().enumerate() {
            let lp = rows.get(ctx_len + j - 1)?.get(id as usize)?;
            total += f64::from(lp.to_scalar::<f32>()?);
        }
        out.push(total);
    }
    Ok(out)
}

/// Padding after a continuation: any id will do (nothing reads past the end).
fn tok_pad(k: &[u32]) -> u32 {
    *k.last().expect("continuations are non-empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_group_equal_lengths_in_order() {
        let lengths = [3, 5, 3, 3, 5, 4];
        assert_eq!(
            aligned_batches(&lengths, 2),
            vec![vec![0, 2], vec![3], vec![5], vec![1, 4]]
        );
    }
}
