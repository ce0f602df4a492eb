//! Per-party NATS users: a nats-server configuration in which each client may
//! publish only on its own subject to the server and read only its own
//! subjects, and the matching credentials files.
//!
//! | user | may publish | may subscribe |
//! |---|---|---|
//! | `server` | `fedtune.<course>.client.*`, `fedtune.<course>.all` | `fedtune.<course>.server.*` |
//! | `client-<id>` | `fedtune.<course>.server.<id>` | `fedtune.<course>.client.<id>`, `fedtune.<course>.all` |
//!
//! So a client can neither read another client's messages nor post as another
//! client: the server takes the sender from the subject, and the broker lets
//! only client `id` publish on `…server.<id>`. Passwords are 128 random bits,
//! written in plain text into the server configuration and the credentials
//! files (mode 0600); keep the directory private, and use TLS (see
//! docs/distributed.md) when traffic leaves the machine.

use std::io::Read;
use std::path::{Path, PathBuf};

use fedtune_kernel::Party;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::subjects::{Route, SubjectError, Subjects, ROOT};

/// Why credentials or a broker configuration cannot be read or written.
#[derive(Debug, Error)]
pub enum AuthError {
    /// A file or folder cannot be read or written.
    #[error("cannot {doing} {path}: {source}")]
    Io {
        /// What was being done (`read credentials`, `write`, `create`).
        doing: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A credentials file is not JSON of a user and a password.
    #[error("{path}: not a fedtune credentials file: {source}")]
    NotCredentials {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// The course name cannot name subjects.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// A course without clients.
    #[error("a course needs at least one client")]
    NoClients,
}

fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuthError + 'a {
    move |source| AuthError::Io {
        doing,
        path: path.to_path_buf(),
        source,
    }
}

/// One party's login, as a credentials file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The NATS user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl Credentials {
    /// Reads a credentials file written by [`write_config`].
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(io("read credentials", path))?;
        serde_json::from_str(&text).map_err(|source| AuthError::NotCredentials {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// What [`write_config`] wrote.
#[derive(Debug, Clone)]
pub struct BrokerFiles {
    /// The nats-server configuration.
    pub config: PathBuf,
    /// The server's credentials.
    pub server: PathBuf,
    /// Each client's credentials, client 1 first.
    pub clients: Vec<PathBuf>,
}

/// Writes `dir/nats-server.conf` (listening on `host:port`, JetStream stored
/// in `dir/jetstream`) and `dir/server.json`, `dir/client-<id>.json` for a
/// course of `clients` clients.
pub fn write_config(
    course: &str,
    clients: u32,
    (host, port): (&str, u16),
    dir: &Path,
) -> Result<BrokerFiles, AuthError> {
    let subjects = Subjects::new(course)?;
    if clients == 0 {
        return Err(AuthError::NoClients);
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let all = subjects.subject(Route::Broadcast);
    let mut users = Vec::new();
    let server = Credentials {
        user: "server".into(),
        password: random_password()?,
    };
    let probe = subjects.probe(Party::Server);
    users.push(user_block(
        &server,
        &[&format!("{ROOT}.{course}.client.*"), &all, &probe],
        &[&subjects.server_inbox(), &probe],
    ));
    let server_path = dir.join("server.json");
    write_private(&server_path, &credentials_json(&server))?;
    let mut client_paths = Vec::new();
    for id in 1..=clients {
        let c = Credentials {
            user: format!("client-{id}"),
            password: random_password()?,
        };
        let probe = subjects.probe(Party::Client(id));
        users.push(user_block(
            &c,
            &[&subjects.subject(Route::ToServerFrom(id)), &probe],
            &[&subjects.subject(Route::ToClient(id)), &all, &probe],
        ));
        let path = dir.join(format!("client-{id}.json"));
        write_private(&path, &credentials_json(&c))?;
        client_paths.push(path);
    }
    let store = dir.join("jetstream");
    let config = format!(
        "# nats-server configuration for the fedtune course `{course}` ({clients} clients),\n\
         # written by `fedtune broker config`. Start: nats-server -c {conf}\n\
         # TLS: `fedtune broker config --tls-cert FILE --tls-key FILE` adds a `tls {{ … }}` block.\n\
         host: {host:?}\n\
         port: {port}\n\
         max_payload: 1MB\n\
         jetstream {{ store_dir: {store:?} }}\n\
         authorization {{\n  users = [\n{users}\n  ]\n}}\n",
        conf = dir.join("nats-server.conf").display(),
        store = store.display().to_string(),
        users = users.join(",\n"),
    );
    let config_path = dir.join("nats-server.conf");
    write_private(&config_path, &config)?;
    Ok(BrokerFiles {
        config: config_path,
        server: server_path,
        clients: client_paths,
    })
}

/// Makes the broker of `config` (a file [`write_config`] wrote) speak only
/// TLS, with the certificate `cert` and its private key `key` (PEM files);
/// parties then connect with `[broker] tls_ca` naming the authority that
/// signed `cert`.
pub fn add_tls(config: &Path, cert: &Path, key: &Path) -> Result<(), AuthError> {
    for file in [cert, key] {
        std::fs::metadata(file).map_err(io("read", file))?;
    }
    let mut text = std::fs::read_to_string(config).map_err(io("read", config))?;
    text.push_str(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    write_private(config, &text)
}

fn user_block(c: &Credentials, publish: &[&str], subscribe: &[&str]) -> String {
    // Nothing else: fedtune uses no request/reply, so no `_INBOX.>` either
    // (the probe subject is the party's own echo, see `Subjects::probe`).
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "    {{ user: {:?}, password: {:?}, permissions: {{ publish: [{}], subscribe: [{}] }} }}",
        c.user,
        c.password,
        list(publish),
        list(subscribe)
    )
}

/// A credentials file's text (two strings: nothing that can fail to serialize).
fn credentials_json(c: &Credentials) -> String {
    format!(
        "{:#}",
        serde_json::json!({ "user": c.user, "password": c.password })
    )
}

fn random_password() -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("read", urandom))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io("write", path))
}
