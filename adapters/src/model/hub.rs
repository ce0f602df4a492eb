//! Models named by their Hugging Face id: `hf:ORG/NAME[@REVISION]`.
//!
//! The files a [`super::load_hf_dir`] directory needs — `config.json`,
//! `tokenizer.json` (and `tokenizer_config.json`, for the chat template,
//! when there is one), and the weights as `model.safetensors` or as the shards
//! that `model.safetensors.index.json` lists — are downloaded through the
//! `hf-hub` crate into the standard Hugging Face cache
//! (`$HF_HOME/hub/models--ORG--NAME/…`, shared with Python's
//! `huggingface_hub`), and the snapshot directory that holds them is
//! returned. The usual environment is honoured: `HF_HOME` (the cache),
//! `HF_ENDPOINT` (another hub or a mirror), `HF_HUB_OFFLINE` (the cache
//! only, no network) and a token from `HF_TOKEN` or the token file `hf auth
//! login` writes. A file the hub stores in LFS (the weights) carries its
//! SHA-256 as its ETag; each such file is hashed after download and a
//! mismatch is an error that leaves nothing in the cache.
//!
//! What this trusts: the endpoint itself (as pip trusts its index). Ids,
//! revisions and the shard names an index lists are checked before they
//! become paths.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

/// How a model id starts in `[model] path` and `--model`.
pub const HUB_PREFIX: &str = "hf:";

/// A model on the hub: `ORG/NAME` at a revision (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

/// Why a model could not be had from the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The id is not `hf:ORG/NAME[@REVISION]`.
    #[error("`{0}` is not a Hugging Face model id (hf:ORG/NAME or hf:ORG/NAME@REVISION): {1}")]
    BadId(String, String),
    /// Offline, and the cache lacks a file.
    #[error(
        "HF_HUB_OFFLINE is set and {file} of {id} is not in the cache {cache}; \
         unset HF_HUB_OFFLINE to download it"
    )]
    NotCached {
        /// The model.
        id: String,
        /// The missing file.
        file: String,
        /// The cache searched.
        cache: String,
    },
    /// The hub refused or could not be reached.
    #[error("downloading {file} of {id} from {endpoint}: {message}")]
    Download {
        /// The model.
        id: String,
        /// The file.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// A downloaded file does not hash to what the hub announced.
    #[error(
        "{file} of {id}: SHA-256 is {actual}, the hub announced {expected}; the file was not kept"
    )]
    Checksum {
        /// The model.
        id: String,
        /// The file.
        file: String,
        /// What it hashed to.
        actual: String,
        /// The hub's ETag.
        expected: String,
    },
    /// The repository lacks what a model needs, or lists odd files.
    #[error("{id}: {message}")]
    Layout {
        /// The model.
        id: String,
        /// What is wrong.
        message: String,
    },
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

/// A name part the hub allows: letters, digits, `-`, `_`, `.`, not `.` or `..`.
fn plain(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part.len() <= 96
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A relative path of plain parts (a revision such as `refs/pr/1`, a shard
/// in a folder).
fn plain_path(path: &str) -> bool {
    !path.is_empty() && path.len() <= 256 && path.split('/').all(plain)
}

impl HubId {
    /// Parses `hf:ORG/NAME[@REVISION]`; `None` when `spec` does not start
    /// with `hf:` (a local path).
    pub fn parse(spec: &str) -> Option<Result<Self, HubError>> {
        let rest = spec.strip_prefix(HUB_PREFIX)?;
        let bad = |why: &str| Some(Err(HubError::BadId(spec.to_string(), why.to_string())));
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| plain(p)) {
            return bad("the id must be ORG/NAME of letters, digits, `-`, `_` and `.`");
        }
        if !plain_path(revision) {
            return bad("the revision must be a branch, tag or commit name");
        }
        Some(Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }))
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// True when `HF_HUB_OFFLINE` asks for the cache only.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The token: `HF_TOKEN`, else the file in `HF_HOME` (read by hf-hub).
fn token(cache: &Cache) -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token())
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// Where one repository's files come from: the cache, then the hub
/// (none when offline).
struct Source {
    cache: hf_hub::CacheRepo,
    hub: Option<hf_hub::api::sync::ApiRepo>,
}

impl Source {
    fn get(&self, id: &HubId, file: &str, say: &dyn Fn(&str)) -> Result<PathBuf, HubError> {
        if let Some(path) = self.cache.get(file) {
            return Ok(path);
        }
        let Some(hub) = &self.hub else {
            return Err(HubError::NotCached {
                id: id.to_string(),
                file: file.to_string(),
                cache: Cache::from_env().path().display().to_string(),
            });
        };
        say(&format!("downloading {file} of {id}"));
        let path = hub.download(file).map_err(|e| HubError::Download {
            id: id.to_string(),
            file: file.to_string(),
            endpoint: endpoint(),
            message: e.to_string(),
        })?;
        verify(id, file, &path)?;
        Ok(path)
    }
}

/// Checks a fresh download against its blob's name, which is the hub's
/// ETag: for files in LFS, the SHA-256 of the content. (Small files in git
/// carry a git object id there, which is not checked.)
fn verify(id: &HubId, file: &str, path: &Path) -> Result<(), HubError> {
    let blob = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let expected = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(());
    }
    let io = |e: std::io::Error| HubError::Layout {
        id: id.to_string(),
        message: format!("reading {}: {e}", blob.display()),
    };
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(&blob).map_err(io)?;
    std::io::copy(&mut f, &mut hasher).map_err(io)?;
    let actual = format!("{:x}", hasher.finalize());
    if actual != expected.to_ascii_lowercase() {
        // Neither the blob nor the snapshot's link to it stays behind.
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(path);
        return Err(HubError::Checksum {
            id: id.to_string(),
            file: file.to_string(),
            actual,
            expected,
        });
    }
    Ok(())
}

/// Downloads (or finds in the cache) what `id` needs to load and returns
/// the snapshot directory holding it, ready for [`super::load_hf_dir`].
/// `say` reports each file as its download starts; hf-hub draws a progress
/// bar on a terminal.
pub fn fetch_model(id: &HubId, say: &dyn Fn(&str)) -> Result<PathBuf, HubError> {
    let cache = Cache::from_env();
    let cached = cache.repo(id.repo());
    let hub = if offline() {
        None
    } else {
        let api = ApiBuilder::from_cache(cache.clone())
            .with_endpoint(endpoint())
            .with_token(token(&cache))
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| HubError::Download {
                id: id.to_string(),
                file: String::new(),
                endpoint: endpoint(),
                message: e.to_string(),
            })?;
        Some(api.repo(id.repo()))
    };
    let source = Source { cache: cached, hub };
    let layout = |message: String| HubError::Layout {
        id: id.to_string(),
        message,
    };
    let config = source.get(id, "config.json", say)?;
    let dir = config
        .parent()
        .ok_or_else(|| layout("the cache path has no parent".into()))?
        .to_path_buf();
    source.get(id, "tokenizer.json", say)?;
    // The chat template lives here; a repository without one is fine.
    let _ = source.get(id, "tokenizer_config.json", say);
    // One file of weights, else the shards an index lists (asking for the
    // single file first, as transformers does).
    let mut files = vec![];
    match source.get(id, "model.safetensors", &|_| {}) {
        Ok(path) => files.push(path),
        Err(single) => {
            let index = source.get(id, "model.safetensors.index.json", say).map_err(|e| {
                layout(format!(
                    "has neither model.safetensors ({single}) nor model.safetensors.index.json ({e}); \
                     only safetensors weights are read"
                ))
            })?;
            let text = std::fs::read_to_string(&index)
                .map_err(|e| layout(format!("reading the weight index: {e}")))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| layout(format!("the weight index is not JSON: {e}")))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| layout("the weight index has no weight_map".into()))?;
            let mut shards = map
                .values()
                .map(|v| v.as_str())
                .collect::<Option<Vec<&str>>>()
                .ok_or_else(|| layout("the weight index maps a tensor to a non-string".into()))?;
            shards.sort_unstable();
            shards.dedup();
            if shards.is_empty() {
                return Err(layout("the weight index lists no shards".into()));
            }
            for shard in shards {
                if !plain_path(shard) || !shard.ends_with(".safetensors") {
                    return Err(layout(format!(
                        "the weight index lists `{shard}`, not a safetensors file in the repository"
                    )));
                }
                files.push(source.get(id, shard, say)?);
            }
        }
    }
    // A branch that moved between two downloads would scatter the files
    // over two snapshots.
    if let Some(other) = files.iter().find(|f| !f.starts_with(&dir)) {
        return Err(layout(format!(
            "{} moved during the download ({} is in another snapshot than {}); run again",
            id.revision,
            other.display(),
            dir.display()
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_cannot_escape_the_cache() {
        let id = HubId::parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct")
            .unwrap()
            .unwrap();
        assert_eq!(id.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(id.revision, "main");
        assert_eq!(id.to_string(), "HuggingFaceTB/SmolLM2-135M-Instruct");
        let pinned = HubId::parse("hf:Qwen/Qwen2.5-0.5B-Instruct@refs/pr/7")
            .unwrap()
            .unwrap();
        assert_eq!(pinned.revision, "refs/pr/7");
        assert_eq!(pinned.to_string(), "Qwen/Qwen2.5-0.5B-Instruct@refs/pr/7");
        assert!(HubId::parse("models/tiny").is_none(), "a local path");
        for bad in [
            "hf:",
            "hf:gpt2",
            "hf:a/b/c",
            "hf:../x",
            "hf:org/..",
            "hf:org/name@../../etc",
            "hf:org/name@",
            "hf:org/na me",
            "hf:org/name@a//b",
        ] {
            assert!(
                matches!(HubId::parse(bad), Some(Err(HubError::BadId(..)))),
                "{bad}"
            );
        }
    }
}
