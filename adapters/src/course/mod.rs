//! From a course configuration to a running course.
//!
//! Everything that turns a TOML file into federated fine-tuning lives here,
//! one concept a file, so that following a config key through the code
//! takes one hop:
//!
//! | file | owns |
//! |---|---|
//! | [`config`] | the whole course file: every section, its defaults, its checks, the resolved copy written to `config.toml` |
//! | [`base`] | the base model and tokenizer ([`Base`]), and a model with an adapter for evaluation ([`Loaded`]) |
//! | [`data`] | the course's data split over its clients, tokenized and batched |
//! | [`scripts`] | the `[aggregator]`, `[hooks]` and `[pfl]` scripts, found and compiled |
//! | [`trainer`] | the clients' trainer: round-robin adapters, hooks, pFL, FedOT's client |
//! | [`offsite`] | FedOT: the emulator clients train on, and the adapter plugged back into the full model |
//! | [`store`] | checkpoints and final adapters in PEFT's layout |
//! | [`run`] | the LLM course in one process, in the fed, global and local scenarios |
//! | [`run_dir`] | the run directory: one run at a time, never mixed with an earlier one, resumed only by its own configuration |
//! | [`numeric`] | the kernel's numeric reference course (least squares) |
//! | [`process`] | a course's server or one client as a process of its own (the transport is the caller's) |
//! | [`held_out`] | held-out loss and the `[eval]` tasks at the end of a course |
//! | [`summary`] | what a finished course reports: losses per client, traffic, time, memory |
//! | [`hpo`] | FedHPO's trials: a course per configuration, on one loaded base model |
//!
//! The command line only parses arguments, calls one function of this
//! module per command and prints what it returns.

pub mod base;
pub mod config;
pub mod data;
pub mod held_out;
pub mod hpo;
pub mod numeric;
pub mod offsite;
pub mod process;
pub mod run;
pub mod run_dir;
pub mod scaffold;
pub mod scripts;
pub mod store;
pub mod summary;
pub mod trainer;

pub use base::{Base, Loaded};
pub use config::{CourseFile, LlmConfig, Task};
pub use run::{run_llm, run_llm_on};
pub use run_dir::{Output, RunLock};

use std::fmt::Display;

use thiserror::Error;

/// Why a course cannot start or did not finish.
#[derive(Debug, Error)]
pub enum CourseError {
    /// The configuration is wrong; the message names the file and key.
    #[error(transparent)]
    Config(#[from] fedtune_kernel::ConfigError),
    /// The configuration is valid TOML, but the course cannot run as configured.
    #[error("{0}")]
    Invalid(String),
    /// `[model] device` cannot be used here.
    #[error(transparent)]
    Device(#[from] crate::model::DeviceError),
    /// The kernel's course failed (a worker, a transport, a trainer).
    #[error(transparent)]
    Course(#[from] fedtune_kernel::course::CourseError),
    /// A checkpoint cannot be written or read.
    #[error(transparent)]
    Checkpoint(#[from] fedtune_kernel::CheckpointError),
    /// Something failed while doing what `context` says.
    #[error("{context}")]
    In {
        /// What was being done.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The result of course assembly.
pub type Result<T, E = CourseError> = std::result::Result<T, E>;

impl CourseError {
    /// An [`CourseError::Invalid`] with this message.
    pub fn invalid(message: impl Display) -> Self {
        Self::Invalid(message.to_string())
    }
}

/// Says what was being done when an error happened.
pub trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the error with the context `f` makes (only when there is an error).
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Context<T>
    for std::result::Result<T, E>
{
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| CourseError::In {
            context: context.to_string(),
            source: e.into(),
        })
    }

    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| CourseError::In {
            context: f().to_string(),
            source: e.into(),
        })
    }
}

/// Fails with [`CourseError::Invalid`] unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::course::CourseError::Invalid(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
