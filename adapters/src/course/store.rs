//! Adapters on disk in PEFT's layout (`adapter_config.json`,
//! `adapter_model.safetensors`): how an LLM course's checkpoints and final
//! adapters are kept, so each is also an adapter PEFT and `fedtune eval` load.

use std::path::Path;

use fedtune_kernel::{CheckpointError, ParamSet, ParamStore};

use super::{Context, Result};
use crate::adapter::AdapterSpec;
use crate::model::LlamaConfig;
use crate::peft::{load_adapter, save_adapter};

/// The file whose presence marks a folder as holding an adapter.
const WEIGHTS: &str = "adapter_model.safetensors";

/// Writes and reads an adapter of one method, for one base model.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    spec: AdapterSpec,
    model: LlamaConfig,
    base: String,
}

impl AdapterStore {
    /// Adapters of `spec` for a base model of shape `model` named `base`
    /// (recorded as PEFT's `base_model_name_or_path`).
    pub fn new(spec: AdapterSpec, model: LlamaConfig, base: &str) -> Self {
        Self {
            spec,
            model,
            base: base.to_string(),
        }
    }

    /// Writes `params` into `dir`, creating it.
    pub fn write(&self, dir: &Path, params: &ParamSet) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.save(dir, params)
            .with_context(|| format!("saving the adapter in {}", dir.display()))
    }
}

impl ParamStore for AdapterStore {
    fn save(&self, dir: &Path, params: &ParamSet) -> Result<(), CheckpointError> {
        save_adapter(dir, &self.spec, params, &self.model, &self.base)
            .map_err(|e| CheckpointError::format(dir, e))
    }

    fn load(&self, dir: &Path) -> Result<ParamSet, CheckpointError> {
        let (_, params) = load_adapter(dir)
            .map_err(|e| CheckpointError::format(dir, format!("loading the checkpoint: {e}")))?;
        Ok(params)
    }

    fn holds(&self, dir: &Path) -> bool {
        dir.join(WEIGHTS).is_file()
    }
}
