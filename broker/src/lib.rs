//! fedtune's NATS side: where FL messages travel between machines.
//!
//! This crate will hold the NATS transport (async-nats), large-payload
//! handling through JetStream, credentials and helpers that write a
//! nats-server configuration or start a local server for tests. What exists
//! now is the part everything else builds on: the subject hierarchy, defined in
//! one place so that the transport, the permission files and the docs can
//! never disagree.
//!
//! ```text
//! fedtune.<course>.server.<client-id>   a client's messages to the server (only that client may publish here)
//! fedtune.<course>.client.<client-id>   the server's messages to one client (only that client may subscribe)
//! fedtune.<course>.all                  broadcasts from the server to every client
//! ```
//!
//! The server learns who sent a message from the subject it arrived on, never
//! from its payload.

pub mod subjects;
