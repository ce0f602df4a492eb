//! The course's scripts, found and compiled from its file: the server's
//! `[aggregator]`, the trainer's `[hooks]` and the `[pfl]` plan.
//!
//! A script is looked for relative to the config's folder, then its parent,
//! then as the path given (from the working directory), then among the
//! shipped ones by name. Any error —
//! no such script, a syntax error, a missing function — names the key that
//! chose the script, at its line in the file (or the `--set` that gave it).

use fedtune_kernel::script::{ScriptAggregator, ScriptHost};
use fedtune_kernel::{Aggregator, FedAvg};

use super::config::{CourseFile, Task};
use super::{CourseError, Result};
use crate::hooks::HookScript;
use crate::pfl::PflScript;

/// An error about the script `key` chose, located in the course file.
fn at_key(course: &CourseFile, key: &str, e: impl std::fmt::Display) -> CourseError {
    course.doc.key_error(key, e.to_string()).into()
}

/// The configured aggregator: native FedAvg, or the `[aggregator]` script.
pub fn aggregator(course: &CourseFile) -> Result<Box<dyn Aggregator>> {
    let cfg = &course.cfg;
    let key = "aggregator.script";
    let Some(source) = cfg
        .aggregator
        .resolve(course.dir())
        .map_err(|e| at_key(course, key, e))?
    else {
        return Ok(Box::new(FedAvg));
    };
    let host = ScriptHost::new(&cfg.scripting);
    let aggregator = ScriptAggregator::new(host, &source, &strategy_params(course))
        .map_err(|e| at_key(course, key, e))?;
    tracing::info!(script = aggregator.origin(), "aggregation by script");
    Ok(Box::new(aggregator))
}

/// `[aggregator.params]`, with what a strategy needs to know of the course
/// and was not set: `num_clients` (SCAFFOLD), and `lora_alpha` of a LoRA
/// course (FlexLoRA and HetLoRA rescale factors between ranks by it).
fn strategy_params(course: &CourseFile) -> toml::Table {
    let mut params = course.cfg.aggregator.params.clone();
    params
        .entry("num_clients")
        .or_insert_with(|| toml::Value::Integer(i64::from(course.cfg.course.clients)));
    if let Task::Llm(llm) = &course.task {
        params
            .entry("lora_alpha")
            .or_insert_with(|| toml::Value::Float(llm.lora.lora_alpha));
    }
    params
}

/// The `[hooks]` script, if one is configured.
pub fn hooks(course: &CourseFile) -> Result<Option<HookScript>> {
    let llm = course.llm()?;
    let hooks = HookScript::from_config(&llm.hooks, &course.cfg.scripting, course.dir())
        .map_err(|e| at_key(course, "hooks.script", e))?;
    if let Some(h) = &hooks {
        tracing::info!(script = h.origin(), "trainer hooks by script");
    }
    Ok(hooks)
}

/// The `[pfl]` script (none for `algorithm = "none"`); a knob's error names
/// the knob (`pfl.lambda`), a script's the algorithm.
pub fn pfl(course: &CourseFile) -> Result<Option<PflScript>> {
    let llm = course.llm()?;
    let script = PflScript::from_config(&llm.pfl, &course.cfg.scripting, course.dir())
        .map_err(|e| at_key(course, e.key(), &e))?;
    if let Some(s) = &script {
        tracing::info!(script = s.origin(), "personalized FL by script");
    }
    Ok(script)
}

/// Finds and compiles every script the course names, so that a broken one
/// fails before anything is loaded (and `--dry-run` checks them).
pub fn check(course: &CourseFile) -> Result<()> {
    aggregator(course)?;
    if let Task::Llm(_) = &course.task {
        hooks(course)?;
        pfl(course)?;
    }
    Ok(())
}
