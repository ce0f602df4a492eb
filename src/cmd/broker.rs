//! `fedtune broker config`: a nats-server configuration with one user per
//! party, and the matching credentials files.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Write a nats-server configuration with one user per party (each client may publish only
    /// as itself and read only its own subjects) and the matching credentials files.
    Config {
        /// The course name (`federate.name`), part of every subject.
        #[arg(long)]
        course: String,
        /// Number of clients.
        #[arg(long)]
        clients: u32,
        /// Where to write nats-server.conf, server.json and client-N.json.
        #[arg(long)]
        out: PathBuf,
        /// The address nats-server listens on (0.0.0.0 to accept other machines).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port nats-server listens on.
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// The broker's TLS certificate (PEM): with --tls-key, the broker
        /// speaks only TLS; parties set `[broker] tls_ca`.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The TLS certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

/// Runs a `fedtune broker` command.
pub fn broker(command: BrokerCommand) -> Result<()> {
    let BrokerCommand::Config {
        course,
        clients,
        out,
        host,
        port,
        tls_cert,
        tls_key,
    } = command;
    let files = fedtune_broker::auth::write_config(&course, clients, (&host, port), &out)?;
    if let (Some(cert), Some(key)) = (&tls_cert, &tls_key) {
        fedtune_broker::auth::add_tls(&files.config, cert, key)?;
        println!(
            "TLS with {} (parties: [broker] tls_ca = the authority that signed it)",
            cert.display()
        );
    }
    println!("nats-server configuration: {}", files.config.display());
    println!("server credentials:        {}", files.server.display());
    for (i, c) in files.clients.iter().enumerate() {
        println!("client {} credentials:     {}", i + 1, c.display());
    }
    println!(
        "start the broker with: nats-server -c {}",
        files.config.display()
    );
    Ok(())
}
