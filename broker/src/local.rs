//! A local `nats-server` for development and tests: a free loopback port,
//! JetStream on, a temporary store directory, stopped on drop.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server` child process.
#[derive(Debug)]
pub struct LocalNats {
    child: Child,
    port: u16,
    config: Option<PathBuf>,
    store: tempfile::TempDir,
}

/// Where `nats-server` is: `$NATS_SERVER`, the `PATH`, or Debian's `/usr/sbin`.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

impl LocalNats {
    /// Starts `nats-server` on a free loopback port, with `config` (a
    /// nats-server configuration file) when given, else with JetStream in a
    /// temporary directory; waits until it accepts connections.
    pub fn start(config: Option<&Path>) -> std::io::Result<Self> {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = spawn(port, config, store.path())?;
        Ok(Self {
            child,
            port,
            config: config.map(Path::to_path_buf),
            store,
        })
    }

    /// Stops the server and starts it again on the same port with the same
    /// settings: a broker restart, for what must survive one. Parties'
    /// connections drop and reconnect; messages in flight are lost.
    pub fn restart(&mut self, down_for: Duration) -> std::io::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = spawn(self.port, self.config.as_deref(), self.store.path())?;
        Ok(())
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `nats-server` on `port` and waits until it accepts connections.
fn spawn(port: u16, config: Option<&Path>, store: &Path) -> std::io::Result<Child> {
    let binary = nats_server_binary().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "nats-server not found (apt-get install nats-server, or set NATS_SERVER)",
        )
    })?;
    let mut cmd = Command::new(binary);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match config {
        // The configuration names its own JetStream store.
        Some(c) => cmd.arg("-c").arg(c),
        None => cmd.arg("-js").arg("-sd").arg(store),
    };
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    while TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "nats-server exited at start ({status})"
            )));
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            return Err(std::io::Error::other(
                "nats-server did not accept connections within 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}
