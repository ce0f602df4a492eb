//! The clients' side of a course: a [`RoundRobinTrainer`] over the clients'
//! data with the course's `[hooks]` and `[pfl]` scripts, for the in-process
//! course or for one client process; and FedOT's client, whose model comes
//! from the server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use fedtune_kernel::course::TrainerError;
use fedtune_kernel::{LocalTrainer, LocalUpdate, Meta, ParamSet, SplitEval, TrainContext};

use super::base::Base;
use super::config::CourseFile;
use super::data::client_process_data;
use super::offsite::BaseModelInfo;
use super::{scripts, Context, CourseError, Result};
use crate::adapter::AdapterSpec;
use crate::model::Llama;
use crate::round_robin::{ClientData, LocalTraining, RoundRobinTrainer};
use crate::tokenizer::TextTokenizer;

/// A kernel trainer error as a course error.
pub(crate) fn trainer_error(e: TrainerError) -> CourseError {
    CourseError::In {
        context: "setting up the trainer".into(),
        source: e,
    }
}

/// A trainer over `data` with `training`, and the course's `[hooks]` script.
pub fn plain_trainer(
    course: &CourseFile,
    (model, spec): (Arc<Llama>, &AdapterSpec),
    training: LocalTraining,
    data: BTreeMap<u32, ClientData>,
) -> Result<RoundRobinTrainer> {
    let trainer = RoundRobinTrainer::new(model, spec, training, data, course.cfg.course.seed)
        .map_err(trainer_error)?;
    Ok(match scripts::hooks(course)? {
        Some(h) => trainer.with_hooks(h),
        None => trainer,
    })
}

/// The federated trainer over the clients in `data`, with the course's
/// `[pfl]` and `[hooks]` scripts.
pub fn fed_trainer(
    course: &CourseFile,
    (model, spec): (Arc<Llama>, &AdapterSpec),
    data: BTreeMap<u32, ClientData>,
) -> Result<RoundRobinTrainer> {
    let training = course.llm()?.local_training();
    let trainer = plain_trainer(course, (model, spec), training, data)?;
    Ok(trainer.with_pfl_script(scripts::pfl(course)?))
}

/// One client's trainer for a client process: the course's data split as
/// `fedtune run` splits it, only client `id`'s part tokenized and batched.
pub fn client_process_trainer(
    course: &CourseFile,
    base: &Base,
    data_root: Option<&Path>,
    id: u32,
) -> Result<RoundRobinTrainer> {
    let data = client_process_data(course, &base.tok, data_root, id)?;
    let spec = course.llm()?.spec(&base.tok)?;
    fed_trainer(
        course,
        (base.model.clone(), &spec),
        BTreeMap::from([(id, data)]),
    )
}

/// A FedOT client process's trainer: its data is tokenized now, its model
/// (the emulator) comes from the server in a `base_model` message.
pub fn offsite_client_trainer(
    course: &CourseFile,
    tok: &TextTokenizer,
    data_root: Option<&Path>,
    id: u32,
) -> Result<OffsiteClient> {
    let device = course.llm()?.model.device;
    let opened = device.open()?;
    let data = client_process_data(course, tok, data_root, id)?;
    let course = course.clone();
    Ok(OffsiteClient {
        build: Box::new(move |model| {
            // The emulator arrives on the CPU; it trains on `[model] device`.
            let model = if model.device().same_device(&opened) {
                model
            } else {
                let moved = model
                    .to_device(&opened)
                    .with_context(|| format!("moving the emulator to {device}"))?;
                Arc::new(moved)
            };
            let layers = model.config().num_hidden_layers;
            let llm = course.llm()?;
            let spec = llm.offsite.emulator_spec(&llm.lora, layers);
            fed_trainer(
                &course,
                (model, &spec),
                BTreeMap::from([(id, data.clone())]),
            )
        }),
        inner: None,
        installed: None,
    })
}

/// FedOT's client: a [`RoundRobinTrainer`] built once the server's emulator arrives.
pub struct OffsiteClient {
    build: Box<dyn FnMut(Arc<Llama>) -> Result<RoundRobinTrainer> + Send>,
    inner: Option<RoundRobinTrainer>,
    /// A fingerprint of the installed base, so a repeated one changes nothing.
    installed: Option<u64>,
}

impl OffsiteClient {
    fn inner(&mut self) -> Result<&mut RoundRobinTrainer, TrainerError> {
        self.inner
            .as_mut()
            .ok_or_else(|| "no emulator from the server yet".into())
    }
}

/// A fingerprint of a model's weights: names, shapes and every value's bits.
fn fingerprint(base: &ParamSet) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, t) in base.iter() {
        name.hash(&mut h);
        t.shape().hash(&mut h);
        for x in t.data() {
            x.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

impl LocalTrainer for OffsiteClient {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        self.inner()?.train(client, global, ctx)
    }

    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        self.inner()?.evaluate(client, global, ctx)
    }

    fn install_base(
        &mut self,
        _client: u32,
        base: &ParamSet,
        meta: &Meta,
    ) -> Result<(), TrainerError> {
        let print = fingerprint(base);
        if self.installed == Some(print) {
            return Ok(());
        }
        let info = BaseModelInfo::from_meta(meta)?;
        let model = crate::offsite::model_from_params(
            info.llama_config,
            base,
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        self.inner = Some((self.build)(Arc::new(model))?);
        self.installed = Some(print);
        Ok(())
    }
}
