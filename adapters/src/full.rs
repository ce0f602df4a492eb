//! Full fine-tuning of chosen layers' projections (and norms): what
//! offsite-tuning trains in its adapter layers (FS-LLM's FedOT trains them
//! whole, not LoRA inside them).
//!
//! Each chosen weight `W` becomes `W + Δ`, with `Δ` trainable and starting
//! at zero. The forward pass adds `x·Δᵀ` to the frozen projection, so the
//! gradient of `Δ` is the gradient of `W` and training `Δ` is training `W`
//! itself, while the frozen base stays shared by every simulated client.
//! What crosses the wire is `Δ`, as large as the weights; averaging the
//! clients' `Δ` is averaging their `W`. With `norms`, the layers' two
//! RMSNorm weights get a `Δ` the same way (2·hidden values a layer), so the
//! whole layer trains, as in offsite-tuning.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use fedtune_kernel::KeyError;
use serde::{Deserialize, Serialize};

use crate::model::{LlamaConfig, Norm, Projection, ProjectionAdapter};

/// Which weights are trained in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullConfig {
    /// Projections, by short name (`q_proj`, …, `down_proj`).
    pub target_modules: Vec<String>,
    /// The layers whose projections are trained.
    pub layers_to_transform: Vec<usize>,
    /// Whether those layers' two RMSNorm weights are trained too.
    #[serde(default)]
    pub norms: bool,
}

impl FullConfig {
    /// The whole of `layers`: every projection and both norms.
    pub fn every_projection(layers: Vec<usize>) -> Self {
        Self {
            target_modules: Projection::ALL
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
            layers_to_transform: layers,
            norms: true,
        }
    }

    /// The targeted projections, or an error naming an unknown module.
    pub fn projections(&self) -> std::result::Result<Vec<Projection>, KeyError> {
        Projection::parse_all(
            &self.target_modules,
            "target_modules",
            "projection to train in full",
        )
    }
}

/// The name of one trained weight's `Δ`.
pub fn delta_name(layer: usize, p: Projection) -> String {
    format!("base_model.model.model.layers.{layer}.{}.delta", p.path())
}

/// The name of one trained norm weight's `Δ`.
pub fn norm_delta_name(layer: usize, n: Norm) -> String {
    format!("base_model.model.model.layers.{layer}.{}.delta", n.path())
}

/// The trainable `Δ` of every chosen weight.
#[derive(Debug)]
pub struct FullDelta {
    config: FullConfig,
    deltas: BTreeMap<(usize, Projection), Var>,
    norms: BTreeMap<(usize, Norm), Var>,
    grad_enabled: AtomicBool,
}

impl FullDelta {
    /// Zero `Δ`s for a model of shape `model`.
    pub fn new(
        model: &LlamaConfig,
        config: FullConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let projections = config.projections().map_err(candle_core::Error::msg)?;
        let (mut deltas, mut norms) = (BTreeMap::new(), BTreeMap::new());
        for &layer in &config.layers_to_transform {
            if layer >= model.num_hidden_layers {
                candle_core::bail!(
                    "layers_to_transform names layer {layer} of a {}-layer model",
                    model.num_hidden_layers
                )
            }
            for &p in &projections {
                let (din, dout) = p.dims(model);
                let zero = Tensor::zeros((dout, din), dtype, device)?;
                deltas.insert((layer, p), Var::from_tensor(&zero)?);
            }
            if config.norms {
                for n in Norm::ALL {
                    let zero = Tensor::zeros(model.hidden_size, dtype, device)?;
                    norms.insert((layer, n), Var::from_tensor(&zero)?);
                }
            }
        }
        Ok(Self {
            config,
            deltas,
            norms,
            grad_enabled: AtomicBool::new(true),
        })
    }

    /// What it trains.
    pub fn config(&self) -> &FullConfig {
        &self.config
    }

    /// Turns gradient tracking on or off (see [`crate::adapter::Adapter::set_grad_enabled`]).
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad_enabled.store(on, Ordering::Relaxed);
    }

    /// `Δ` of projection `proj` of block `layer`, `(out, in)`, if trained.
    pub fn merged_delta(&self, layer: usize, proj: Projection) -> Option<Tensor> {
        self.deltas
            .get(&(layer, proj))
            .map(|v| v.as_tensor().detach())
    }

    /// `Δ` of norm `norm` of block `layer`, `(hidden)`, if trained.
    pub fn merged_norm_delta(&self, layer: usize, norm: Norm) -> Option<Tensor> {
        self.norms
            .get(&(layer, norm))
            .map(|v| v.as_tensor().detach())
    }

    /// `(name, variable)` pairs in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .deltas
            .iter()
            .map(|(&(layer, p), v)| (delta_name(layer, p), v.clone()))
            .chain(
                self.norms
                    .iter()
                    .map(|(&(layer, n), v)| (norm_delta_name(layer, n), v.clone())),
            )
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// The variable itself, or a detached view when gradients are off.
    fn tracked(&self, v: &Var) -> Tensor {
        if self.grad_enabled.load(Ordering::Relaxed) {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }
}

impl ProjectionAdapter for FullDelta {
    fn adapts(&self, layer: usize, proj: Projection) -> bool {
        self.deltas.contains_key(&(layer, proj))
    }

    fn delta(&self, layer: usize, proj: Projection, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(d) = self.deltas.get(&(layer, proj)) else {
            return Ok(None);
        };
        // (n, in) · Δᵀ → (n, out)
        Ok(Some(x.matmul(&self.tracked(d).t()?)?))
    }

    fn norm_delta(&self, layer: usize, norm: Norm) -> Result<Option<Tensor>> {
        Ok(self.norms.get(&(layer, norm)).map(|v| self.tracked(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;

    fn tiny() -> Llama {
        let cfg = LlamaConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            ..Default::default()
        };
        Llama::random(cfg, 3, DType::F64, &Device::Cpu).unwrap()
    }

    /// With `Δ` set, the adapted model is the model whose weights are `W + Δ`.
    #[test]
    fn a_delta_is_the_same_as_changed_weights() {
        let model = tiny();
        let full = FullDelta::new(
            model.config(),
            FullConfig::every_projection(vec![1]),
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(full.named_vars().len(), 7 + 2, "projections and norms");
        for (i, (name, v)) in full.named_vars().into_iter().enumerate() {
            assert!(name.contains(".layers.1."), "{name}");
            let t = Tensor::randn(0.0, 0.1, v.dims(), &Device::Cpu).unwrap();
            v.set(&(t * (i + 1) as f64).unwrap()).unwrap();
        }
        let changed = model
            .with_deltas(|layer, p| Ok(full.merged_delta(layer, p)))
            .unwrap()
            .with_norm_deltas(|layer, n| Ok(full.merged_norm_delta(layer, n)))
            .unwrap();
        let tokens = Tensor::new(&[[3u32, 9, 1, 30, 7, 7]], &Device::Cpu).unwrap();
        let a = model.forward(&tokens, None, Some(&full)).unwrap();
        let b = changed.forward(&tokens, None, None).unwrap();
        let plain = model.forward(&tokens, None, None).unwrap();
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(diff(&a, &b) < 1e-10, "{}", diff(&a, &b));
        assert!(diff(&a, &plain) > 1e-3);
    }

    /// The gradient of `Δ` is the loss's derivative by the weight: checked
    /// against central finite differences on a few entries.
    #[test]
    fn the_gradient_of_a_delta_matches_finite_differences() {
        let model = tiny();
        let full = FullDelta::new(
            model.config(),
            FullConfig::every_projection(vec![0, 2]),
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let tokens = Tensor::new(&[[3u32, 9, 1, 30, 7, 2]], &Device::Cpu).unwrap();
        let loss = |adapter: &FullDelta| {
            let logits = model.forward(&tokens, None, Some(adapter)).unwrap();
            candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(&full).backward().unwrap();
        for (name, v) in full.named_vars() {
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let at = v.elem_count() / 3;
            let analytic = g.get(at).unwrap().to_scalar::<f64>().unwrap();
            let h = 1e-5;
            let nudge = |by: f64| {
                let mut data = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                data[at] += by;
                v.set(&Tensor::from_vec(data, v.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            let probe = |by: f64| {
                nudge(by);
                let l = loss(&full).to_scalar::<f64>().unwrap();
                nudge(-by);
                l
            };
            let numeric = (probe(h) - probe(-h)) / (2.0 * h);
            assert!(
                (analytic - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{name}: {analytic} vs {numeric}"
            );
        }
    }
}
