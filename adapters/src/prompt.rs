//! Prompt-learning adapters: prompt tuning, P-tuning and prefix-tuning.
//!
//! All three leave the model's weights alone and add positions before the
//! input (see [`ProjectionAdapter::virtual_tokens`] and
//! [`ProjectionAdapter::kv_prefix`]):
//!
//! - **prompt tuning** (Lester et al., 2021): `num_virtual_tokens` trainable
//!   embeddings before the input; initialized at random (scaled like the
//!   model's token embeddings) or from the embeddings of a text, as FS-LLM
//!   does with "Think step by step." (`num_virtual_tokens` is then its length);
//! - **P-tuning** (Liu et al., 2021): the virtual tokens are the output of a
//!   reparameterization encoder, an MLP of three linear layers with ReLU
//!   between them (PEFT's `MLP` encoder), applied to trainable inputs;
//! - **prefix-tuning** (Li & Liang, 2021): trainable keys and values before
//!   every layer's own, either free (`prefix_projection = false`) — started
//!   from the keys and values the model makes of `init_text` (`init =
//!   "text"`) or of seeded random tokens, as Li & Liang advise, rather than
//!   PEFT's N(0, 1) noise — or the output of a two-layer tanh MLP over
//!   trainable embeddings.
//!
//! Variable names follow PEFT's modules (`prompt_embeddings`,
//! `prompt_encoder.embedding.weight`, `prompt_encoder.mlp_head.N.*`,
//! `prompt_encoder.transform.N.*`), and [`PromptAdapter::prompt_embeddings`]
//! is the tensor PEFT saves for each method.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{Llama, LlamaConfig, Projection, ProjectionAdapter};

/// Which prompt-learning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PromptMethod {
    /// Trainable virtual-token embeddings.
    #[default]
    Prompt,
    /// Virtual tokens from an MLP encoder over trainable inputs.
    PTuning,
    /// Trainable per-layer key/value prefixes.
    Prefix,
}

impl PromptMethod {
    /// PEFT's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            PromptMethod::Prompt => "PROMPT_TUNING",
            PromptMethod::PTuning => "P_TUNING",
            PromptMethod::Prefix => "PREFIX_TUNING",
        }
    }
}

/// How prompt tuning's embeddings (and free prefixes) start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PromptInit {
    /// Normal noise with the spread of the model's token embeddings
    /// (prefixes: the model's keys and values of seeded random tokens).
    #[default]
    Random,
    /// The token embeddings of `init_text` (prefixes: the model's keys and
    /// values of it); `num_virtual_tokens` becomes its length.
    Text,
}

/// `[prompt]`: the prompt-learning adapter's hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptConfig {
    /// Virtual tokens (prompt tuning, P-tuning) or prefix positions (prefix-tuning).
    pub num_virtual_tokens: usize,
    /// How prompt tuning and free prefixes start.
    pub init: PromptInit,
    /// The text that starts them with `init = "text"`.
    pub init_text: String,
    /// Width of the P-tuning encoder and of the prefix projection.
    pub encoder_hidden_size: usize,
    /// Prefix-tuning: reparameterize the prefixes with an MLP (PEFT's `prefix_projection`).
    pub prefix_projection: bool,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            init: PromptInit::Random,
            init_text: "Think step by step.".into(),
            encoder_hidden_size: 128,
            prefix_projection: false,
        }
    }
}

/// A prompt-learning adapter (see the module docs).
#[derive(Debug)]
pub struct PromptAdapter {
    method: PromptMethod,
    config: PromptConfig,
    vars: BTreeMap<String, Var>,
    layers: usize,
    kv_dim: usize,
    hidden: usize,
    grad_enabled: AtomicBool,
}

/// Normal noise `(rows, cols)` with standard deviation `std`.
fn normal(
    rows: usize,
    cols: usize,
    std: f32,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> Result<Tensor> {
    use rand::Rng;
    // Box–Muller: two uniforms give a standard normal.
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(data, (rows, cols), dev)
}

/// A linear layer `(out, in)` and bias `(out)`, initialized as PyTorch's
/// `nn.Linear`: uniform in ±1/√in.
fn linear(out: usize, inp: usize, rng: &mut ChaCha8Rng, dev: &Device) -> Result<(Tensor, Tensor)> {
    use rand::Rng;
    let bound = 1.0 / (inp as f32).sqrt();
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random_range(-bound..bound)).collect();
    Ok((
        Tensor::from_vec(w, (out, inp), dev)?,
        Tensor::from_vec(b, out, dev)?,
    ))
}

/// Every layer's keys and values of `model` reading `ids`, as prefix-tuning's
/// `(n, layers · 2 · kv_dim)` (layer by layer, keys before values).
fn read_kv(model: &Llama, ids: &[u32]) -> Result<Tensor> {
    let mut cache = crate::model::KvCache::new(model.config().num_hidden_layers);
    let tokens = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    model.forward_cached(&tokens, &mut cache, None)?;
    let n = ids.len();
    let mut parts = Vec::new();
    for layer in 0..model.config().num_hidden_layers {
        let (k, v) = cache
            .layer(layer)?
            .ok_or_else(|| candle_core::Error::msg("the cache lacks a layer"))?;
        for t in [k, v] {
            // (1, kv_heads, n, head_dim) → (n, kv_heads · head_dim)
            let (_, h, _, d) = t.dims4()?;
            parts.push(t.squeeze(0)?.transpose(0, 1)?.reshape((n, h * d))?);
        }
    }
    Tensor::cat(&parts, 1)
}

/// The standard deviation of the model's token embeddings.
fn embedding_std(model: &Llama) -> Result<f32> {
    let table = model.token_embeddings().to_dtype(DType::F32)?;
    let mean = table.mean_all()?.to_scalar::<f32>()?;
    let var = table
        .affine(1.0, -(mean as f64))?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(var.sqrt())
}

impl PromptAdapter {
    /// A fresh adapter of `method` for `model`, seeded; `init_ids` are the
    /// token ids of `config.init_text`, which prompt tuning with `init =
    /// "text"` starts from (without them it starts at random: only right
    /// when trained values are loaded next).
    pub fn new(
        model: &Llama,
        method: PromptMethod,
        config: PromptConfig,
        init_ids: Option<&[u32]>,
        seed: u64,
    ) -> Result<Self> {
        let cfg: &LlamaConfig = model.config();
        let dev = model.device().clone();
        let hidden = cfg.hidden_size;
        let kv_dim = Projection::K.dims(cfg).1;
        let layers = cfg.num_hidden_layers;
        let enc = config.encoder_hidden_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut config = config;
        let mut vars = BTreeMap::new();
        let mut put = |name: &str, t: Tensor| -> Result<()> {
            vars.insert(
                name.to_string(),
                Var::from_tensor(&t.to_dtype(model.dtype())?)?,
            );
            Ok(())
        };
        match method {
            PromptMethod::Prompt => {
                let table = match (config.init, init_ids) {
                    (PromptInit::Text, Some(ids)) if !ids.is_empty() => {
                        config.num_virtual_tokens = ids.len();
                        let ids = Tensor::new(ids, &dev)?;
                        model
                            .token_embeddings()
                            .index_select(&ids, 0)?
                            .to_dtype(DType::F32)?
                    }
                    (PromptInit::Text, Some(_)) => {
                        candle_core::bail!("prompt init = \"text\" needs a non-empty init_text")
                    }
                    // Without the text's ids (an adapter about to be loaded
                    // from a checkpoint) the start does not matter.
                    (PromptInit::Random, _) | (PromptInit::Text, None) => normal(
                        config.num_virtual_tokens,
                        hidden,
                        embedding_std(model)?,
                        &mut rng,
                        &dev,
                    )?,
                };
                put("prompt_embeddings", table)?;
            }
            PromptMethod::PTuning => {
                let n = config.num_virtual_tokens;
                put(
                    "prompt_encoder.embedding.weight",
                    normal(n, hidden, embedding_std(model)?, &mut rng, &dev)?,
                )?;
                for (i, (out, inp)) in [(enc, hidden), (enc, enc), (hidden, enc)]
                    .into_iter()
                    .enumerate()
                {
                    let (w, b) = linear(out, inp, &mut rng, &dev)?;
                    put(&format!("prompt_encoder.mlp_head.{}.weight", 2 * i), w)?;
                    put(&format!("prompt_encoder.mlp_head.{}.bias", 2 * i), b)?;
                }
            }
            PromptMethod::Prefix => {
                let n = config.num_virtual_tokens;
                let width = layers * 2 * kv_dim;
                if config.prefix_projection {
                    put(
                        "prompt_encoder.embedding.weight",
                        normal(n, hidden, embedding_std(model)?, &mut rng, &dev)?,
                    )?;
                    for (i, (out, inp)) in [(enc, hidden), (width, enc)].into_iter().enumerate() {
                        let (w, b) = linear(out, inp, &mut rng, &dev)?;
                        put(&format!("prompt_encoder.transform.{}.weight", 2 * i), w)?;
                        put(&format!("prompt_encoder.transform.{}.bias", 2 * i), b)?;
                    }
                } else {
                    // The keys and values the model itself makes of a text
                    // (`init = "text"`) or of seeded random tokens: the
                    // prefix starts as if the model had read them, not as
                    // noise that swamps attention.
                    let ids: Vec<u32> = match (config.init, init_ids) {
                        (PromptInit::Text, Some(ids)) if !ids.is_empty() => ids.to_vec(),
                        _ => {
                            use rand::Rng;
                            (0..n)
                                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                                .collect()
                        }
                    };
                    config.num_virtual_tokens = ids.len();
                    put("prompt_encoder.embedding.weight", read_kv(model, &ids)?)?;
                }
            }
        }
        if config.num_virtual_tokens == 0 {
            candle_core::bail!("num_virtual_tokens must be at least 1");
        }
        Ok(Self {
            method,
            config,
            vars,
            layers,
            kv_dim,
            hidden,
            grad_enabled: AtomicBool::new(true),
        })
    }

    /// The method.
    pub fn method(&self) -> PromptMethod {
        self.method
    }

    /// The hyperparameters (`num_virtual_tokens` as used: a text init sets it).
    pub fn config(&self) -> &PromptConfig {
        &self.config
    }

    /// `(name, variable)` pairs in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// Turns gradient tracking on or off (off: no graph is recorded).
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_enabled.store(on, Ordering::Relaxed);
    }

    fn t(&self, name: &str) -> Result<Tensor> {
        let v = self
            .vars
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("no variable `{name}`")))?;
        Ok(if self.grad_enabled.load(Ordering::Relaxed) {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        })
    }

    /// What PEFT saves as `prompt_embeddings`: the virtual tokens `(n,
    /// hidden)`, or for prefix-tuning every layer's keys and values `(n,
    /// layers · 2 · kv_dim)` (layer by layer, keys before values).
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        prompt_embeddings(self.method, &self.config, |name| self.t(name))
    }

    /// Width of one layer's keys (and of its values).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// The model's layers and hidden size this adapter was made for.
    pub fn model_dims(&self) -> (usize, usize) {
        (self.layers, self.hidden)
    }
}

/// [`PromptAdapter::prompt_embeddings`] from the trainable tensors `var`
/// gives by name (the adapter's variables, or a saved `ParamSet`'s).
pub fn prompt_embeddings(
    method: PromptMethod,
    config: &PromptConfig,
    var: impl Fn(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    let dense = |x: &Tensor, prefix: &str, i: usize| -> Result<Tensor> {
        let w = var(&format!("{prefix}.{i}.weight"))?;
        let b = var(&format!("{prefix}.{i}.bias"))?;
        x.matmul(&w.t()?)?.broadcast_add(&b)
    };
    match method {
        PromptMethod::Prompt => var("prompt_embeddings"),
        PromptMethod::PTuning => {
            let x = var("prompt_encoder.embedding.weight")?;
            let h = dense(&x, "prompt_encoder.mlp_head", 0)?.relu()?;
            let h = dense(&h, "prompt_encoder.mlp_head", 2)?.relu()?;
            dense(&h, "prompt_encoder.mlp_head", 4)
        }
        PromptMethod::Prefix => {
            let x = var("prompt_encoder.embedding.weight")?;
            if !config.prefix_projection {
                return Ok(x);
            }
            let h = dense(&x, "prompt_encoder.transform", 0)?.tanh()?;
            dense(&h, "prompt_encoder.transform", 2)
        }
    }
}

impl ProjectionAdapter for PromptAdapter {
    fn delta(&self, _layer: usize, _proj: Projection, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn adapts(&self, _layer: usize, _proj: Projection) -> bool {
        false
    }

    fn virtual_tokens(&self) -> Result<Option<Tensor>> {
        match self.method {
            PromptMethod::Prefix => Ok(None),
            _ => Ok(Some(self.prompt_embeddings()?)),
        }
    }

    fn prefix_len(&self) -> usize {
        match self.method {
            PromptMethod::Prefix => self.config.num_virtual_tokens,
            _ => 0,
        }
    }

    fn kv_prefix(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        if self.method != PromptMethod::Prefix || layer >= self.layers {
            return Ok(None);
        }
        let all = self.prompt_embeddings()?;
        let at = layer * 2 * self.kv_dim;
        Ok(Some((
            all.narrow(1, at, self.kv_dim)?,
            all.narrow(1, at + self.kv_dim, self.kv_dim)?,
        )))
    }
}
