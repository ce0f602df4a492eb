//! The base model a course trains around, and a model with an adapter for evaluation.
//!
//! A model is read once per process — a GGUF file (the default model's
//! format), a Hugging Face directory, or a Hugging Face id `hf:ORG/NAME`
//! (downloaded into the Hugging Face cache, [`crate::model::fetch_model`])
//! — and shared: the round-robin
//! trainer, FedOT's emulator and the evaluations at the end all use the
//! same [`Base`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::{CourseError, Result};
use crate::adapter::Adapter;
use crate::course::Context;
use crate::eval::EvalModel;
use crate::fetch::ensure_default_model;
use crate::model::{
    fetch_model, load_gguf, load_hf_dir, load_hf_tokenizer, HubId, Llama, Placement,
    ProjectionAdapter,
};
use crate::peft::load_adapter;
use crate::tokenizer::TextTokenizer;

/// A base model in memory, its tokenizer and where it came from.
#[derive(Clone)]
pub struct Base {
    /// The decoder.
    pub model: Arc<Llama>,
    /// Its tokenizer.
    pub tok: Arc<TextTokenizer>,
    /// The file or directory it was read from.
    pub path: PathBuf,
    /// Its name as adapters record their base model: the hub id, or the
    /// file's (directory's) name.
    pub name: String,
}

/// Where the model `path` names is on disk, and its name: a Hugging Face id
/// downloaded (or found in the cache), a local path as it is, or the default
/// model's (fetched on first use) when `None`.
fn model_path(path: Option<&Path>, say: &dyn Fn(&str)) -> Result<(PathBuf, String)> {
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let Some(p) = path else {
        let p = ensure_default_model(say).context("fetching the default model")?;
        return Ok((p.clone(), file_name(&p)));
    };
    match p.to_str().and_then(HubId::parse) {
        None => Ok((p.to_path_buf(), file_name(p))),
        Some(id) => {
            let id = id.map_err(|e| CourseError::invalid(e.to_string()))?;
            let dir = fetch_model(&id, say).map_err(|e| CourseError::invalid(e.to_string()))?;
            Ok((dir, id.to_string()))
        }
    }
}

impl Base {
    /// The model's name, as adapters record their base model
    /// (`base_model_name_or_path`): the hub id, or the file's name.
    pub fn file_name(&self) -> String {
        self.name.clone()
    }

    /// Only the tokenizer of the model at `path` (or the default model's):
    /// GGUF metadata or a directory's `tokenizer.json`, no weights read.
    pub fn load_tokenizer(path: Option<&Path>, say: &dyn Fn(&str)) -> Result<TextTokenizer> {
        let (path, _) = model_path(path, say)?;
        let context = || format!("reading the tokenizer of {}", path.display());
        if !path.is_dir() {
            return TextTokenizer::from_gguf_path(&path).with_context(context);
        }
        load_hf_tokenizer(&path)
            .with_context(context)?
            .ok_or_else(|| {
                CourseError::invalid(format!("{} has no tokenizer.json", path.display()))
            })
    }

    /// Loads the model at `path` — a GGUF file, or a Hugging Face directory
    /// with `config.json`, safetensors weights and `tokenizer.json` (as
    /// `fedtune model tiny` writes), a Hugging Face id `hf:ORG/NAME[@REV]`
    /// — or the default model when `None`.
    pub fn load(path: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let (path, name) = model_path(path, say)?;
        say(&format!("loading {}", path.display()));
        let context = || format!("loading the model {}", path.display());
        if path.is_dir() {
            let hf = load_hf_dir(&path, DType::F32, &Device::Cpu).with_context(context)?;
            let tok = hf.tokenizer.ok_or_else(|| {
                CourseError::invalid(format!("{} has no tokenizer.json", path.display()))
            })?;
            return Ok(Self {
                model: Arc::new(hf.model),
                tok: Arc::new(tok),
                path,
                name,
            });
        }
        let loaded = load_gguf(&path, DType::F32, &Device::Cpu).with_context(context)?;
        Ok(Self {
            tok: Arc::new(TextTokenizer::from_gguf(&loaded.content).with_context(context)?),
            model: Arc::new(loaded.model),
            path,
            name,
        })
    }

    /// This base with its frozen weights in the placement's dtype
    /// ([`Llama::with_compute`]), on its device ([`Llama::to_device`]);
    /// says so when that is not f32 on the CPU. The dtype changes first, so
    /// a bf16 base crosses to a GPU at half the size.
    pub fn place(self, placement: Placement, say: &dyn Fn(&str)) -> Result<Self> {
        let device = placement.device.open()?;
        let dtype = placement.dtype();
        let (convert, moves) = (
            dtype != self.model.compute_dtype(),
            !self.model.device().same_device(&device),
        );
        if !convert && !moves {
            return Ok(self);
        }
        let stored = match dtype {
            DType::U8 => "int8 blocks".to_string(),
            d => format!("{d:?}"),
        };
        say(&format!(
            "frozen base in {stored} on {} (model.compute = \"{}\": {})",
            placement.device,
            placement.compute.name(),
            placement.path()
        ));
        // Converted in place when no one else holds the f32 model.
        let mut model = Arc::try_unwrap(self.model).unwrap_or_else(|shared| (*shared).clone());
        if convert {
            model = model
                .into_compute(dtype)
                .context("converting the base model")?;
        }
        if moves {
            model = model
                .to_device(&device)
                .with_context(|| format!("moving the base model to {}", placement.device))?;
        }
        Ok(Self {
            model: Arc::new(model),
            ..self
        })
    }

    /// The emulator a FedOT course saved in `dir` (`offsite.emulator_path`),
    /// with the tokenizer of the full model at `path` (the default model
    /// when `None`), which it must have been made from: what FS-LLM's
    /// `eval_type = "emu"` scores, with the course's `adapter-emulator/`.
    pub fn emulator(dir: &Path, path: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let (path, _) = model_path(path, say)?;
        let digest = crate::fetch::content_digest(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let (emu, distilled) =
            crate::offsite::open_emulator(dir, &digest, DType::F32, &Device::Cpu)
                .with_context(|| format!("loading the emulator {}", dir.display()))?;
        say(&format!(
            "emulator {}: the full model's layers {:?} ({} steps of alignment, KL {:.4} -> {:.4})",
            dir.display(),
            emu.kept,
            distilled.steps,
            distilled.kl_before,
            distilled.kl_after
        ));
        Ok(Self {
            tok: Arc::new(Self::load_tokenizer(Some(&path), say)?),
            model: Arc::new(emu.model),
            path: dir.to_path_buf(),
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }
}

/// A loaded model, its tokenizer and (optionally) an adapter: what an evaluation runs.
pub struct Loaded {
    model: Arc<Llama>,
    tok: Arc<TextTokenizer>,
    adapter: Option<Box<dyn Adapter>>,
    model_path: PathBuf,
}

impl Loaded {
    /// Loads the model (the default one if `path` is `None`), its frozen
    /// weights in the placement's dtype and on its device, and the adapter
    /// in `adapter`. The device is opened first, so one that cannot be used
    /// fails before anything is read.
    pub fn load(
        path: Option<&Path>,
        adapter: Option<&Path>,
        placement: Placement,
        say: &dyn Fn(&str),
    ) -> Result<Self> {
        placement.device.open()?;
        Self::with_adapter(Base::load(path, say)?.place(placement, say)?, adapter, say)
    }

    /// `base` with the adapter in `adapter` (none: the base model alone).
    pub fn with_adapter(base: Base, adapter: Option<&Path>, say: &dyn Fn(&str)) -> Result<Self> {
        let Base {
            model,
            tok,
            path: model_path,
            ..
        } = base;
        let adapter = match adapter {
            None => None,
            Some(dir) => {
                let (spec, params) = load_adapter(dir)
                    .with_context(|| format!("loading the adapter {}", dir.display()))?;
                let built = spec
                    .build(&model, 0)
                    .with_context(|| format!("building the adapter {}", dir.display()))?;
                built.load_param_set(&params).with_context(|| {
                    format!("the adapter {} does not fit the model", dir.display())
                })?;
                built.set_grad_enabled(false);
                say(&format!(
                    "adapter {} ({} parameters)",
                    dir.display(),
                    built.num_parameters()
                ));
                say(&format!("adapter method {}", built.peft_type()));
                Some(built)
            }
        };
        Ok(Self {
            model,
            tok,
            adapter,
            model_path,
        })
    }

    /// The model as evaluations see it.
    pub fn view(&self) -> EvalModel<'_> {
        EvalModel {
            model: &self.model,
            tok: &self.tok,
            adapter: self.adapter.as_deref().map(|l| l as &dyn ProjectionAdapter),
        }
    }

    /// The tokenizer.
    pub fn tok(&self) -> &TextTokenizer {
        &self.tok
    }

    /// Where the model was read from.
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }
}
