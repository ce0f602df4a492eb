//! The commands, one file each. A command parses its arguments, calls the
//! library (`fedtune_adapters::course`, the kernel, the broker) and prints
//! what comes back; the work itself is never here.

pub mod broker;
pub mod client;
pub mod course_args;
pub mod data;
pub mod eval;
pub mod generate;
pub mod hpo;
pub mod init;
pub mod model;
pub mod nats;
pub mod report;
pub mod run;
pub mod server;
pub mod spawn;
pub mod sweep;
