//! Logging: `--log` (or `RUST_LOG`) filters what reaches stderr; a run
//! directory additionally gets `run.log` with everything at `info` and above,
//! from the moment [`log_to_file`] names it.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static RUN_LOG: OnceLock<Mutex<File>> = OnceLock::new();

/// Writes to the run's log file once there is one, else nowhere.
#[derive(Clone, Copy)]
struct RunLog;

impl Write for RunLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match RUN_LOG.get() {
            Some(f) => f.lock().map_or(Ok(buf.len()), |mut f| f.write(buf)),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match RUN_LOG.get() {
            Some(f) => f.lock().map_or(Ok(()), |mut f| f.flush()),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for RunLog {
    type Writer = RunLog;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the global subscriber: stderr filtered by `filter`, the run log at `info`.
pub fn init(filter: &str) {
    let stderr_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(stderr_filter);
    let file = tracing_subscriber::fmt::layer()
        .with_writer(RunLog)
        .with_ansi(false)
        .with_filter(LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
}

/// From now on, also log to `path` (appending). Only the first call takes effect.
pub fn log_to_file(path: &Path) -> std::io::Result<()> {
    let f = File::options().create(true).append(true).open(path)?;
    let _ = RUN_LOG.set(Mutex::new(f));
    Ok(())
}
