//! LoRA (Hu et al.): low-rank trainable updates beside frozen projections.
//!
//! For each targeted projection `W` (`out × in`) of each block, LoRA trains `A`
//! (`r × in`) and `B` (`out × r`) and adds `(alpha / r) · x Aᵀ Bᵀ` to `x Wᵀ`.
//! Initialization follows PEFT: `A` Kaiming-uniform (bound `1/√in`), `B` zero,
//! so training starts from the base model exactly. Tensors carry PEFT's names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), which
//! is also how they cross the wire as a kernel [`ParamSet`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};
use fedtune_kernel::KeyError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::{LlamaConfig, LowRank, Projection, ProjectionAdapter};

/// LoRA hyperparameters, as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scaling numerator: updates are multiplied by `alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input during training.
    pub lora_dropout: f64,
    /// Projections to adapt, by short name (`q_proj`, `v_proj`, …).
    pub target_modules: Vec<String>,
    /// Adapt only these layers (PEFT's `layers_to_transform`); all when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// A frozen dense term `R` (`out × in`, starting at zero) beside each
    /// adapted projection, so the weight is `W + R + (alpha / r)·B·A`. The
    /// strategy sets it (FedEx-LoRA's residual, FLoRA's merged stack); the
    /// client never trains it. Not a PEFT option: an adapter with it is
    /// saved with its `R` in a file of its own.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub residual: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            layers_to_transform: None,
            residual: false,
        }
    }
}

impl LoraConfig {
    /// The targeted projections, or an error naming an unknown module.
    pub fn projections(&self) -> std::result::Result<Vec<Projection>, KeyError> {
        let out = Projection::parse_all(
            &self.target_modules,
            "lora.target_modules",
            "LoRA target module",
        )?;
        if out.is_empty() {
            return Err(KeyError::new(
                "lora.target_modules",
                "LoRA needs at least one target module",
            ));
        }
        if self.r == 0 {
            return Err(KeyError::new("lora.r", "LoRA rank r must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(KeyError::new(
                "lora.lora_dropout",
                format!("lora_dropout must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        Ok(out)
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }
}

/// The part name of a residual (`….q_proj.lora_residual.weight`).
pub const RESIDUAL: &str = "lora_residual";

/// The PEFT name of one LoRA matrix.
pub fn peft_name(layer: usize, p: Projection, part: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{part}.weight",
        p.path()
    )
}

/// One projection's pair of trainable factors, and its frozen residual.
#[derive(Debug, Clone)]
struct Factors {
    a: Var,
    b: Var,
    residual: Option<Var>,
}

/// The trainable LoRA state of one model.
///
/// Dropout on the LoRA branch's input (PEFT's `lora_dropout`) applies only
/// while [`Lora::set_training`] is on — the training step turns it on for its
/// forward passes — and draws its masks from a generator seeded with the
/// adapter, so training is reproducible.
#[derive(Debug)]
pub struct Lora {
    config: LoraConfig,
    scaling: f64,
    factors: BTreeMap<(usize, Projection), Factors>,
    training: AtomicBool,
    grad_enabled: AtomicBool,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl Lora {
    /// Fresh factors for a model of shape `model`: `A` seeded Kaiming-uniform, `B` zero.
    pub fn new(
        model: &LlamaConfig,
        config: LoraConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let projections = config.projections().map_err(candle_core::Error::msg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut factors = BTreeMap::new();
        let layers: Vec<usize> = match &config.layers_to_transform {
            Some(l) => {
                if let Some(bad) = l.iter().find(|&&i| i >= model.num_hidden_layers) {
                    candle_core::bail!(
                        "layers_to_transform names layer {bad} of a {}-layer model",
                        model.num_hidden_layers
                    )
                }
                l.clone()
            }
            None => (0..model.num_hidden_layers).collect(),
        };
        for layer in layers {
            for &p in &projections {
                let (din, dout) = p.dims(model);
                let bound = 1.0 / (din as f32).sqrt();
                let a: Vec<f32> = (0..config.r * din)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (config.r, din), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((dout, config.r), dtype, device)?;
                let residual = match config.residual {
                    true => Some(Var::zeros((dout, din), dtype, device)?),
                    false => None,
                };
                factors.insert(
                    (layer, p),
                    Factors {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                        residual,
                    },
                );
            }
        }
        Ok(Self {
            scaling: config.scaling(),
            config,
            factors,
            training: AtomicBool::new(false),
            grad_enabled: AtomicBool::new(true),
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xD50D_0D0F)),
        })
    }

    /// Draws dropout masks from `seed` on (see [`crate::adapter::Adapter::reseed`]).
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut rng) = self.dropout_rng.lock() {
            *rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD50D_0D0F);
        }
    }

    /// Turns dropout on (training) or off (evaluation, generation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Turns gradient tracking of the factors on (the default) or off: off,
    /// forward passes through this adapter record no graph, which saves the
    /// memory of every activation during evaluation and generation.
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_enabled.store(on, Ordering::Relaxed);
    }

    /// Whether dropout is on.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// A dropout mask shaped like `x` (each element 0 with probability `p`,
    /// else `1 / (1 − p)`), or `None` when dropout is off.
    fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let p = self.config.lora_dropout;
        if p <= 0.0 || !self.is_training() {
            return Ok(None);
        }
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = {
            let mut rng = self
                .dropout_rng
                .lock()
                .map_err(|_| candle_core::Error::msg("LoRA dropout generator poisoned"))?;
            (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < p {
                        0.0
                    } else {
                        keep as f32
                    }
                })
                .collect()
        };
        Ok(Some(
            Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    /// The hyperparameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The weight change `scale · B·A` (plus the residual `R`, if any)
    /// `(out, in)` this adapter makes to projection `proj` of block `layer`
    /// (what merging adds to the weight).
    pub fn merged_delta(&self, layer: usize, proj: Projection) -> Result<Option<Tensor>> {
        let Some(f) = self.factors.get(&(layer, proj)) else {
            return Ok(None);
        };
        let delta = (f.b.as_tensor().matmul(f.a.as_tensor())? * self.scaling)?;
        Ok(Some(match &f.residual {
            Some(r) => (delta + r.as_tensor())?,
            None => delta,
        }))
    }

    /// `(name, variable)` of every frozen residual, in name order (empty
    /// without [`LoraConfig::residual`]).
    pub fn residual_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .factors
            .iter()
            .filter_map(|(&(layer, p), f)| {
                let r = f.residual.clone()?;
                Some((peft_name(layer, p, RESIDUAL), r))
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// `(PEFT name, variable)` pairs in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .factors
            .iter()
            .flat_map(|(&(layer, p), f)| {
                [
                    (peft_name(layer, p, "lora_A"), f.a.clone()),
                    (peft_name(layer, p, "lora_B"), f.b.clone()),
                ]
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }
}

impl ProjectionAdapter for Lora {
    fn adapts(&self, layer: usize, proj: Projection) -> bool {
        self.factors.contains_key(&(layer, proj))
    }

    fn weight_delta(&self, layer: usize, proj: Projection) -> Result<Option<Tensor>> {
        Ok(self
            .factors
            .get(&(layer, proj))
            .and_then(|f| f.residual.as_ref())
            .map(|r| r.as_tensor().detach()))
    }

    fn delta(&self, layer: usize, proj: Projection, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(term) = self.low_rank(layer, proj, x)? else {
            return Ok(None);
        };
        let xd = match &term.mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // (n, in) · Aᵀ → (n, r) · Bᵀ → (n, out)
        let low = xd.matmul(&term.a.t()?)?.matmul(&term.b.t()?)?;
        Ok(Some((low * term.scale)?))
    }

    fn low_rank(&self, layer: usize, proj: Projection, x: &Tensor) -> Result<Option<LowRank>> {
        let Some(f) = self.factors.get(&(layer, proj)) else {
            return Ok(None);
        };
        // With gradients off, detached factors keep the forward pass from
        // recording a graph (and holding every activation until it drops).
        let (a, b) = if self.grad_enabled.load(Ordering::Relaxed) {
            (f.a.as_tensor().clone(), f.b.as_tensor().clone())
        } else {
            (f.a.as_tensor().detach(), f.b.as_tensor().detach())
        };
        Ok(Some(LowRank {
            a,
            b,
            scale: self.scaling,
            mask: self.dropout_mask(x)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Adapter;
    use crate::model::Llama;

    fn tiny() -> Llama {
        let cfg = LlamaConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            ..Default::default()
        };
        Llama::random(cfg, 3, DType::F64, &Device::Cpu).unwrap()
    }

    /// LoRA on q and v with a residual, every tensor random (B too).
    fn with_residual(model: &Llama) -> Lora {
        let config = LoraConfig {
            r: 2,
            residual: true,
            ..Default::default()
        };
        let lora = Lora::new(model.config(), config, 1, DType::F64, &Device::Cpu).unwrap();
        for (i, (_, v)) in lora.all_vars().into_iter().enumerate() {
            let t = Tensor::randn(0.0, 0.2, v.dims(), &Device::Cpu).unwrap();
            v.set(&(t * (1.0 + i as f64 / 10.0)).unwrap()).unwrap();
        }
        lora
    }

    fn max_diff(x: &Tensor, y: &Tensor) -> f64 {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A residual is frozen state: exchanged and saved, never trained.
    #[test]
    fn a_residual_crosses_the_wire_but_is_not_trained() {
        let model = tiny();
        let lora = with_residual(&model);
        let trainable: Vec<String> = lora.named_vars().into_iter().map(|(n, _)| n).collect();
        let residuals: Vec<String> = lora.residual_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!((trainable.len(), residuals.len()), (8, 4));
        assert!(residuals
            .iter()
            .all(|n| n.ends_with(".lora_residual.weight")));
        assert!(trainable.iter().all(|n| !residuals.contains(n)));
        let set = lora.to_param_set().unwrap();
        assert_eq!(set.len(), 12);
        // q_proj's residual is (out, in) = (16, 16); v_proj's (8, 16).
        let v = peft_name(0, Projection::V, RESIDUAL);
        assert_eq!(set.get(&v).unwrap().shape(), [8, 16]);
        // A fresh adapter takes all of it back.
        let fresh = Lora::new(
            model.config(),
            lora.config().clone(),
            9,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let start = fresh.residual_vars()[0].1.as_tensor().clone();
        let zero = start.zeros_like().unwrap();
        assert_eq!(max_diff(&start, &zero), 0.0, "a residual starts at zero");
        fresh.load_param_set(&set).unwrap();
        assert_eq!(fresh.to_param_set().unwrap(), set);
    }

    /// With a residual `R`, the adapted model is the model whose weights are
    /// `W + R + s·B·A` (what `merged_delta` gives).
    #[test]
    fn a_residual_is_the_same_as_changed_weights() {
        let model = tiny();
        let lora = with_residual(&model);
        let changed = model
            .with_deltas(|layer, p| lora.merged_delta(layer, p))
            .unwrap();
        let tokens = Tensor::new(&[[3u32, 9, 1, 30, 7, 7]], &Device::Cpu).unwrap();
        let a = model.forward(&tokens, None, Some(&lora)).unwrap();
        let b = changed.forward(&tokens, None, None).unwrap();
        assert!(max_diff(&a, &b) < 1e-10, "{}", max_diff(&a, &b));
        // The residual matters: without it the logits differ.
        let factors_only = model
            .with_deltas(|layer, p| {
                let Some(f) = lora.factors.get(&(layer, p)) else {
                    return Ok(None);
                };
                Ok(Some(
                    (f.b.as_tensor().matmul(f.a.as_tensor())? * lora.scaling)?,
                ))
            })
            .unwrap();
        let c = factors_only.forward(&tokens, None, None).unwrap();
        assert!(max_diff(&a, &c) > 1e-3);
    }
}
