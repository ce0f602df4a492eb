//! A party's connection to the NATS broker, shared by `fedtune server` and
//! `fedtune client`: credentials from `--creds` or `$FEDTUNE_NATS_CREDS`,
//! and a worker stopped with a clear error as soon as the broker refuses it
//! a subject (another party's credentials).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fedtune_adapters::course::CourseFile;
use fedtune_broker::auth::Credentials;
use fedtune_broker::transport::NatsStats;
use fedtune_broker::{NatsOptions, NatsTransport};
use fedtune_kernel::worker::WorkerOutcome;
use fedtune_kernel::{Party, ShutdownHandle, Transport, Worker};

/// The environment variable naming a credentials file when `--creds` is not given.
pub const CREDS_ENV: &str = "FEDTUNE_NATS_CREDS";

/// What the broker refused a party, once it refuses something.
pub type Refusals = tokio::sync::watch::Receiver<Option<String>>;

/// A party's connection: its transport, what the broker refused it, and
/// what its receivers dropped.
pub struct Connection {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// Refusals by the broker (wrong credentials).
    pub refusals: Refusals,
    /// Messages the receivers delivered and dropped.
    pub stats: Arc<NatsStats>,
}

/// Connects `party` of `course` to the broker at `url` with the credentials
/// in `creds` (or `$FEDTUNE_NATS_CREDS`; none: an open broker), its
/// receivers bounded as the course's `[wire]` and `[broker]` say.
pub async fn connect(
    url: &str,
    course: &CourseFile,
    party: Party,
    creds: Option<&Path>,
) -> Result<Connection> {
    let name = &course.cfg.course.name;
    let creds = creds
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(CREDS_ENV).map(PathBuf::from));
    let credentials = match &creds {
        Some(path) => Some(Credentials::load(path)?),
        None => None,
    };
    let broker = &course.broker;
    let options = NatsOptions {
        name: format!("fedtune-{name}-{party}").replace(' ', "-"),
        credentials,
        max_frame_bytes: course.cfg.wire.limits().max_frame_bytes,
        max_bad_frames: broker.max_bad_frames,
        max_inflight_bytes: usize::try_from(broker.max_inflight_mib.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        tls_ca: broker.tls_ca.clone(),
        ..NatsOptions::default()
    };
    let transport = NatsTransport::connect(url, name, options)
        .await
        .with_context(|| match &creds {
            Some(p) => format!("{party} with the credentials in {}", p.display()),
            None => format!("{party} without credentials (--creds or ${CREDS_ENV})"),
        })?;
    Ok(Connection {
        refusals: transport.refusals(),
        stats: transport.stats(),
        transport: Arc::new(transport),
    })
}

/// Runs `worker` until it ends, or stops it as soon as the broker refuses
/// it a subject (wrong credentials for this party): then fails saying so.
pub async fn run_guarded<S: Send + 'static>(
    worker: Worker<S>,
    refusals: Refusals,
) -> Result<WorkerOutcome<S>> {
    let party = worker.party();
    let (handle, signal) = ShutdownHandle::new();
    let mut watch = refusals.clone();
    let watcher = tokio::spawn(async move {
        if watch.wait_for(|r| r.is_some()).await.is_ok() {
            handle.trigger();
        }
    });
    let out = worker.run(signal).await;
    watcher.abort();
    if let Some(m) = refusals.borrow().clone() {
        bail!("the NATS server refused {party}: {m} (are these {party}'s credentials?)");
    }
    Ok(out?)
}

/// The runtime a party's worker runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
