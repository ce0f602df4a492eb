//! `fedtune data fetch`: built-in data sets from their canonical URLs.
//!
//! Downloads go through `python3` (urllib; Python is already needed for the
//! default model), land in a `.part` file next to their destination under
//! the data root, and are moved into place only when their SHA-256 matches.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::DataError;
use crate::fetch::sha256_file;

/// Where a built-in file comes from and what it must hash to.
#[derive(Debug, Clone, Copy)]
pub struct FetchSource {
    /// The data set's name (as in `[data] name`).
    pub name: &'static str,
    /// Canonical URL, pinned to a commit.
    pub url: &'static str,
    /// Path under the data root.
    pub dest: &'static str,
    /// SHA-256 of the file, hex.
    pub sha256: &'static str,
}

/// The data sets with a canonical download and a known checksum. The others
/// (CodeAlpaca, Dolly, MMLU, …) were converted or re-assembled for
/// `../shared/data`, so no public file has their bytes; see that folder's README.
pub const SOURCES: [FetchSource; 3] = [
    FetchSource {
        name: "gsm8k",
        url: "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/train.jsonl",
        dest: "gsm8k/train.jsonl",
        sha256: "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    },
    FetchSource {
        name: "gsm8k-test",
        url: "https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/test.jsonl",
        dest: "gsm8k/test.jsonl",
        sha256: "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    },
    FetchSource {
        name: "humaneval",
        url: "https://raw.githubusercontent.com/openai/human-eval/6d43fb980f9fee3c892a914eda09951f772ad10d/data/HumanEval.jsonl.gz",
        dest: "humaneval/HumanEval.jsonl.gz",
        sha256: "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    },
];

const DOWNLOAD: &str = r#"
import sys, urllib.request
url, dest = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
    total = int(r.headers.get("Content-Length") or 0)
    done, shown = 0, -1
    while True:
        chunk = r.read(1 << 16)
        if not chunk:
            break
        f.write(chunk)
        done += len(chunk)
        pct = done * 100 // total if total else -1
        if pct != shown and (pct < 0 or pct % 10 == 0):
            shown = pct
            print(f"  {done:,} bytes" + (f" ({pct}%)" if total else ""), file=sys.stderr, flush=True)
"#;

/// Downloads the built-in data set `name` into `root` and returns its path.
/// `mirror`, when given, replaces the canonical URL by `mirror/dest`.
/// An existing file with the right checksum is kept as it is.
pub fn fetch_builtin(
    name: &str,
    root: &Path,
    mirror: Option<&str>,
    mut progress: impl FnMut(&str),
) -> Result<PathBuf, DataError> {
    let src = SOURCES.iter().find(|s| s.name == name).ok_or_else(|| {
        DataError::Config(format!(
            "no download for `{name}`: fetchable sets are {} (the others ship in ../shared/data)",
            SOURCES.map(|s| s.name).join(", ")
        ))
    })?;
    let dest = root.join(src.dest);
    let io = |path: &Path, e: std::io::Error| DataError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let hash = |path: &Path| {
        sha256_file(path).map_err(|e| DataError::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    };
    if dest.is_file() && hash(&dest)? == src.sha256 {
        progress(&format!(
            "{} is already there, checksum verified",
            dest.display()
        ));
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let part = dest.with_extension("part");
    let url = match mirror {
        Some(m) => format!("{}/{}", m.trim_end_matches('/'), src.dest),
        None => src.url.to_string(),
    };
    progress(&format!("downloading {name} from {url}"));
    let status = Command::new("python3")
        .arg("-c")
        .arg(DOWNLOAD)
        .arg(&url)
        .arg(&part)
        .status()
        .map_err(|e| DataError::Config(format!("python3 is needed to download ({e})")))?;
    if !status.success() {
        let _ = std::fs::remove_file(&part);
        return Err(DataError::Config(format!(
            "downloading {url} failed ({status}); is the network reachable?"
        )));
    }
    let actual = hash(&part)?;
    if actual != src.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(DataError::File {
            path: dest,
            msg: format!(
                "SHA-256 of the download is {actual}, expected {}; the file was not kept",
                src.sha256
            ),
        });
    }
    std::fs::rename(&part, &dest).map_err(|e| io(&dest, e))?;
    progress(&format!(
        "{} ({} verified)",
        dest.display(),
        &src.sha256[..12]
    ));
    Ok(dest)
}
