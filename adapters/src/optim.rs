//! AdamW whose state can be saved and restored.
//!
//! The update is candle-nn's `AdamW` line for line (so results are the same
//! to the bit), but its step count and moments are reachable: a client that
//! keeps its optimizer across rounds (`train.keep_optimizer_state`) carries
//! them into a checkpoint, and a resumed course continues with them.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
pub use candle_nn::optim::ParamsAdamW;
use serde::{Deserialize, Serialize};

/// One variable with its first and second moments.
#[derive(Debug)]
struct Moments {
    var: Var,
    m: Var,
    v: Var,
}

/// AdamW (Loshchilov & Hutter) with decoupled weight decay.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Moments>,
    step_t: usize,
    params: ParamsAdamW,
}

/// AdamW's state: the step count and each variable's moments, in the order
/// of the variables it was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Steps taken.
    pub step_t: usize,
    /// `(shape, first moment, second moment)` per variable.
    pub moments: Vec<(Vec<usize>, Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    /// Zero moments for `vars` (the float ones).
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let (shape, dtype, device) = (var.shape(), var.dtype(), var.device());
                Ok(Moments {
                    m: Var::zeros(shape, dtype, device)?,
                    v: Var::zeros(shape, dtype, device)?,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            step_t: 0,
            params,
        })
    }

    /// Sets the learning rate of the next steps.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let lr = self.params.lr;
        let lr_lambda = lr * self.params.weight_decay;
        let (beta1, beta2) = (self.params.beta1, self.params.beta2);
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for Moments { var, m, v } in &self.vars {
            let theta = var.as_tensor();
            let Some(g) = grads.get(theta) else {
                continue;
            };
            let next_m = ((m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (theta * (1f64 - lr_lambda))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + self.params.eps)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
            var.set(&next_theta)?;
        }
        Ok(())
    }

    /// The step count and moments.
    pub fn state(&self) -> Result<AdamWState> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        Ok(AdamWState {
            step_t: self.step_t,
            moments: self
                .vars
                .iter()
                .map(|x| {
                    Ok((
                        x.var.dims().to_vec(),
                        flat(x.m.as_tensor())?,
                        flat(x.v.as_tensor())?,
                    ))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Takes up `state` (of an optimizer over variables of the same shapes).
    pub fn restore(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.vars.len() {
            candle_core::bail!(
                "optimizer state for {} variables, this optimizer has {}",
                state.moments.len(),
                self.vars.len()
            )
        }
        for (x, (shape, m, v)) in self.vars.iter().zip(&state.moments) {
            if x.var.dims() != shape.as_slice() {
                candle_core::bail!(
                    "optimizer state of shape {shape:?} for a variable of shape {:?}",
                    x.var.dims()
                )
            }
            let like = |data: &[f32]| -> Result<Tensor> {
                Tensor::from_slice(data, shape.as_slice(), x.var.device())?.to_dtype(x.var.dtype())
            };
            x.m.set(&like(m)?)?;
            x.v.set(&like(v)?)?;
        }
        self.step_t = state.step_t;
        Ok(())
    }
}
