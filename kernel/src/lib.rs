//! fedtune's microkernel: the parts of federated fine-tuning that know nothing of ML.
//!
//! A course is a set of workers — one server, N clients — exchanging FL events.
//! The kernel owns how that works and nothing else:
//!
//! - [`message`]: the [`Envelope`] and its vocabulary (`join_in`, `train`, `update`, …);
//! - [`params`]: [`ParamSet`], named `f32` tensors — what crosses the wire and what aggregators combine;
//! - [`codec`]: the versioned wire format (MessagePack, optional f16/bf16/int8 quantization, DEFLATE/gzip);
//! - [`bus`]: the [`Transport`] port and the in-process bus; NATS lives in `fedtune-broker`;
//! - [`worker`]: the event loop that decodes, dispatches by kind, runs heavy work off the executor, and sends;
//! - [`course`]: the server and client behaviours, the [`LocalTrainer`] port and the in-process runner;
//! - [`aggregate`]: the server's strategy ([`Aggregator`]: sampling, per-client instructions, aggregation, evaluation), FedAvg first;
//! - [`privacy`]: differential privacy (clipping, Gaussian noise, central or local) and its RDP accountant; secure aggregation's arithmetic and cryptography;
//! - [`linalg`]: small dense matrices (products, QR, truncated SVD) for strategy scripts;
//! - [`checkpoint`]: the checkpoint layout a server writes after rounds and a resumed course reads;
//! - [`script`]: the Rhai script host (sandboxed, hot-reloaded) and scripted aggregators;
//! - [`config`]: TOML course configuration with `--set` overrides and errors that name the key;
//! - [`metrics`]: per-round, per-client cost records as JSON lines; [`tensorboard`]: the same as TensorBoard scalars;
//! - [`hpo`]: hyperparameter search over whole courses (search spaces, a Gaussian process, searcher scripts).
//!
//! The ML side (models, adapters, data, the training core) lives in
//! `fedtune-adapters` and plugs in through [`LocalTrainer`]. A whole course runs
//! in milliseconds with the numeric [`course::LeastSquaresTrainer`]:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use fedtune_kernel::course::{run_in_process, LeastSquaresTrainer, SyntheticSpec};
//! use fedtune_kernel::{CourseConfig, FedAvg, MetricsLog};
//!
//! let cfg = CourseConfig::from_toml("[federate]\nrounds = 3\nclients = 3\n", "<doc>").unwrap();
//! let trainer = LeastSquaresTrainer::synthetic(SyntheticSpec::default(), 0.1, 10);
//! let initial = trainer.initial_params();
//! let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
//! let report = rt
//!     .block_on(run_in_process(&cfg, initial, Arc::new(Mutex::new(trainer)), Box::new(FedAvg), MetricsLog::in_memory()))
//!     .unwrap();
//! let curve = report.loss_curve("test");
//! assert!(curve.last().unwrap().1 < curve[0].1);
//! ```

pub mod aggregate;
pub mod bus;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod course;
pub mod hpo;
pub mod linalg;
pub mod message;
pub mod metrics;
pub mod params;
pub mod privacy;
pub mod script;
pub mod tensorboard;
pub mod worker;

pub use aggregate::{
    aggregate_fedavg, coordinate_median, trimmed_mean, AggregateError, Aggregator, ClientEval,
    ClientUpdate, FedAvg, FitConfig, FitInstruction,
};
pub use bus::{Delivery, InProcTransport, Subscription, Transport, TransportError};
pub use checkpoint::{CheckpointError, Checkpoints, MsgpackStore, ParamStore};
pub use codec::{
    decode, encode, CodecError, Compression, DecodeLimits, EncodeOptions, Quantization,
};
pub use config::{ConfigDoc, ConfigError, CourseConfig, KeyError};
pub use course::{LocalTrainer, LocalUpdate, SplitEval, TrainContext};
pub use message::{BodyError, Envelope, Meta, MsgKind, Party};
pub use metrics::{Event, MetricsLog, Record};
pub use params::{ParamError, ParamSet, ParamTensor};
pub use worker::{Ctx, Flow, HandlerError, Shutdown, ShutdownHandle, Worker, WorkerStats};
