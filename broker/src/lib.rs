//! fedtune's NATS side: where FL messages travel between machines.
//!
//! - [`subjects`]: the subject hierarchy, defined in one place so that the
//!   transport, the permission files and the docs can never disagree;
//! - [`transport`]: [`NatsTransport`], the kernel's transport over a NATS
//!   connection, with frames of any size sent as digested parts;
//! - [`auth`]: a nats-server configuration with one user per party and
//!   per-client permissions, and the credentials files;
//! - [`local`]: starts a local `nats-server` for development and tests.
//!
//! The `fedtune server` and `fedtune client` processes (the CLI's
//! `cmd/server.rs` and `cmd/client.rs`, with the parties assembled by
//! `fedtune_adapters::course::process`) run a course's parties on these
//! transports.
//!
//! ```text
//! fedtune.<course>.server.<client-id>   a client's messages to the server (only that client may publish here)
//! fedtune.<course>.client.<client-id>   the server's messages to one client (only that client may subscribe)
//! fedtune.<course>.all                  broadcasts from the server to every client
//! ```
//!
//! The server learns who sent a message from the subject it arrived on, never
//! from its payload.

pub mod auth;
pub mod local;
pub mod subjects;
pub mod transport;

pub use local::LocalNats;
pub use transport::{NatsOptions, NatsStats, NatsTransport};
