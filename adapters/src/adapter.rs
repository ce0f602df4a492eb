//! The adapter interface: what the trainer optimizes, the federation
//! exchanges and a checkpoint saves, whatever the PEFT method.
//!
//! LoRA ([`crate::lora::Lora`]) and the prompt-learning methods
//! ([`crate::prompt::PromptAdapter`]: prompt tuning, P-tuning,
//! prefix-tuning) implement it; the model sees an adapter through
//! [`ProjectionAdapter`], the part that changes the forward pass.

use candle_core::{DType, Result, Tensor, Var};
use fedtune_kernel::ParamSet;

use crate::model::ProjectionAdapter;

/// A trainable adapter around a frozen model.
pub trait Adapter: ProjectionAdapter + Send + Sync {
    /// PEFT's name of the method (`LORA`, `PROMPT_TUNING`, `P_TUNING`, `PREFIX_TUNING`).
    fn peft_type(&self) -> &'static str;

    /// Every trainable variable with its name, in name order.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// State that is exchanged and saved with the adapter but never trained
    /// (a LoRA residual), with its name, in name order.
    fn frozen_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// The trainable and the frozen variables, in name order.
    fn all_vars(&self) -> Vec<(String, Var)> {
        let mut all = self.named_vars();
        all.extend(self.frozen_vars());
        all.sort_by(|x, y| x.0.cmp(&y.0));
        all
    }

    /// Turns training-only behaviour (dropout) on or off.
    fn set_training(&self, _on: bool) {}

    /// Restarts the random draws of training-only behaviour (dropout masks)
    /// from `seed`: a fit seeded by its client and round draws the same
    /// masks whatever the process did before (a resumed course, a restarted client).
    fn reseed(&self, _seed: u64) {}

    /// Turns gradient tracking on (the default) or off: off, forward passes
    /// record no graph, which saves memory in evaluation and generation.
    fn set_grad_enabled(&self, on: bool);

    /// The trainable variables, in name order.
    fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Number of trainable scalars.
    fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The variables, frozen ones included, as a kernel `ParamSet` (f32):
    /// what crosses the wire.
    fn to_param_set(&self) -> Result<ParamSet> {
        let mut set = ParamSet::new();
        for (name, var) in self.all_vars() {
            let t = var.as_tensor();
            let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            set.insert(name, t.dims().to_vec(), data)
                .map_err(candle_core::Error::wrap)?;
        }
        Ok(set)
    }

    /// Overwrites the variables from `params`, which must hold exactly this
    /// adapter's names and shapes; nothing changes if it does not.
    fn load_param_set(&self, params: &ParamSet) -> Result<()> {
        let mine = self.to_param_set()?;
        mine.check_compatible(params)
            .map_err(candle_core::Error::wrap)?;
        for (name, var) in self.all_vars() {
            let t = params.get(&name).expect("names checked above");
            let value =
                Tensor::from_slice(t.data(), t.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&value)?;
        }
        Ok(())
    }
}

impl Adapter for crate::lora::Lora {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        crate::lora::Lora::named_vars(self)
    }

    fn frozen_vars(&self) -> Vec<(String, Var)> {
        self.residual_vars()
    }

    fn set_training(&self, on: bool) {
        crate::lora::Lora::set_training(self, on)
    }

    fn reseed(&self, seed: u64) {
        crate::lora::Lora::reseed(self, seed)
    }

    fn set_grad_enabled(&self, on: bool) {
        crate::lora::Lora::set_grad_enabled(self, on)
    }
}

impl Adapter for crate::full::FullDelta {
    fn peft_type(&self) -> &'static str {
        FULL_PEFT_TYPE
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        crate::full::FullDelta::named_vars(self)
    }

    fn set_grad_enabled(&self, on: bool) {
        crate::full::FullDelta::set_grad_enabled(self, on)
    }
}

/// The `peft_type` fedtune writes for [`crate::full::FullDelta`] (not a PEFT method).
pub const FULL_PEFT_TYPE: &str = "FEDTUNE_FULL";

impl Adapter for crate::prompt::PromptAdapter {
    fn peft_type(&self) -> &'static str {
        self.method().peft_type()
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        crate::prompt::PromptAdapter::named_vars(self)
    }

    fn set_grad_enabled(&self, on: bool) {
        crate::prompt::PromptAdapter::set_grad_enabled(self, on)
    }
}

/// Which adapter a course trains, with its hyperparameters: enough to make
/// a fresh one for any client (or the server's initial one).
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterSpec {
    /// LoRA.
    Lora(crate::lora::LoraConfig),
    /// Chosen layers' projections trained in full (offsite-tuning's adapter layers).
    Full(crate::full::FullConfig),
    /// Prompt tuning, P-tuning or prefix-tuning; `init_ids` are the token
    /// ids of `config.init_text` when prompt tuning starts from a text.
    Prompt {
        method: crate::prompt::PromptMethod,
        config: crate::prompt::PromptConfig,
        init_ids: Option<Vec<u32>>,
    },
}

impl AdapterSpec {
    /// A fresh adapter for `model`, seeded.
    pub fn build(&self, model: &crate::model::Llama, seed: u64) -> Result<Box<dyn Adapter>> {
        Ok(match self {
            AdapterSpec::Lora(cfg) => Box::new(crate::lora::Lora::new(
                model.config(),
                cfg.clone(),
                seed,
                model.dtype(),
                model.device(),
            )?),
            AdapterSpec::Full(cfg) => Box::new(crate::full::FullDelta::new(
                model.config(),
                cfg.clone(),
                model.dtype(),
                model.device(),
            )?),
            AdapterSpec::Prompt {
                method,
                config,
                init_ids,
            } => Box::new(crate::prompt::PromptAdapter::new(
                model,
                *method,
                config.clone(),
                init_ids.as_deref(),
                seed,
            )?),
        })
    }

    /// PEFT's name of the method.
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterSpec::Lora(_) => "LORA",
            AdapterSpec::Full(_) => FULL_PEFT_TYPE,
            AdapterSpec::Prompt { method, .. } => method.peft_type(),
        }
    }
}

impl From<crate::lora::LoraConfig> for AdapterSpec {
    fn from(cfg: crate::lora::LoraConfig) -> Self {
        AdapterSpec::Lora(cfg)
    }
}

impl From<&crate::lora::LoraConfig> for AdapterSpec {
    fn from(cfg: &crate::lora::LoraConfig) -> Self {
        AdapterSpec::Lora(cfg.clone())
    }
}

impl From<&AdapterSpec> for AdapterSpec {
    fn from(spec: &AdapterSpec) -> Self {
        spec.clone()
    }
}
