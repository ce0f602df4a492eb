//! `fedtune data`: the built-in federated sets split as FS-LLM splits them,
//! checked against independent counts of the files in ../shared/data, and
//! downloads verified against a loopback HTTP server.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("FEDTUNE_DATA_ROOT")
        .output()
        .expect("the fedtune binary runs")
}

/// `fedtune data split CONFIG --no-tokens` as JSON.
fn split(config: &str) -> serde_json::Value {
    let root = shared();
    let o = fedtune(&[
        "data",
        "split",
        config,
        "--no-tokens",
        "--data-root",
        root.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every JSON object of a gzip JSON Lines file, read without fedtune's loader.
fn records(rel: &str) -> Vec<serde_json::Value> {
    let f = std::fs::File::open(shared().join(rel)).unwrap();
    BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

fn sizes(report: &serde_json::Value) -> Vec<(String, u64)> {
    report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["samples"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn fed_gsm8k_3_deals_the_train_split_evenly_to_three_clients() {
    let r = split("configs/fed-gsm8k-3.toml");
    let s: Vec<u64> = sizes(&r).into_iter().map(|(_, n)| n).collect();
    assert_eq!(s.len(), 3);
    assert!(
        s.iter().max().unwrap() - s.iter().min().unwrap() <= 1,
        "{s:?}"
    );
    assert_eq!(
        s.iter().sum::<u64>() as usize,
        records("gsm8k/train.jsonl.gz").len()
    );
    for c in r["clients"].as_array().unwrap() {
        let (train, test) = (c["train"].as_u64().unwrap(), c["test"].as_u64().unwrap());
        assert_eq!(train + test, c["samples"].as_u64().unwrap());
        assert_eq!(test, c["samples"].as_u64().unwrap() / 10, "10% held out");
    }
}

#[test]
fn fed_dolly_makes_one_client_per_category_of_the_file() {
    let mut want = BTreeMap::new();
    for r in records("dolly-15k/databricks-dolly-15k.jsonl.gz") {
        *want
            .entry(r["category"].as_str().unwrap().to_string())
            .or_insert(0u64) += 1;
    }
    let got: BTreeMap<String, u64> = sizes(&split("configs/fed-dolly.toml"))
        .into_iter()
        .collect();
    assert_eq!(got.len(), 8);
    assert_eq!(got, want);
}

/// Whether `text` names `word` (ASCII case-insensitive) not inside another
/// word: written by hand, independent of the regex rules in the config.
fn names(text: &str, word: &str) -> bool {
    let (t, w) = (text.to_ascii_lowercase(), word.to_ascii_lowercase());
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    t.match_indices(&w).any(|(i, _)| {
        let before = t[..i].chars().next_back().is_none_or(|c| !is_word(c));
        let after = t[i + w.len()..].chars().next().is_none_or(|c| !is_word(c));
        // A symbol-ended name (C++, C#) needs no boundary after it.
        before && (after || !w.ends_with(|c: char| c.is_ascii_alphanumeric()))
    })
}

#[test]
fn fed_codealpaca_clients_match_a_hand_count_of_the_languages_named() {
    // The config's rule order: the first language an instruction names wins.
    let order: [(&str, &[&str]); 8] = [
        ("Python", &["python"]),
        ("JavaScript", &["javascript"]),
        ("C++", &["c++"]),
        ("Java", &["java"]),
        ("C#", &["c#"]),
        ("PHP", &["php"]),
        ("Shell", &["bash", "shell"]),
        ("SQL", &["sql"]),
    ];
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut none = 0;
    let all = records("codealpaca/new_codealpaca.jsonl.gz");
    for r in &all {
        let text = r["instruction"].as_str().unwrap();
        match order
            .iter()
            .find(|(_, ws)| ws.iter().any(|w| names(text, w)))
        {
            Some((lang, _)) => *want.entry(lang.to_string()).or_insert(0) += 1,
            None => none += 1,
        }
    }
    let report = split("configs/fed-codealpaca.toml");
    let got: BTreeMap<String, u64> = sizes(&report).into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(
        report["unlabelled"].as_u64().unwrap(),
        none,
        "records naming no language are counted"
    );
    assert_eq!(
        report["examples"].as_u64().unwrap() + none,
        all.len() as u64
    );
}

#[test]
fn a_data_set_with_a_bad_record_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mine.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": 7}\n",
    )
    .unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[federate]\nclients = 1\n[data]\npath = {:?}\nformat = \"instruction\"\ntest_fraction = 0.0\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let o = fedtune(&["data", "split", cfg.to_str().unwrap(), "--no-tokens"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("mine.jsonl:2: field `output` is a number"),
        "{err}"
    );
    // With skip_bad_records the record is left out and reported.
    let o = fedtune(&[
        "data",
        "split",
        cfg.to_str().unwrap(),
        "--no-tokens",
        "--set",
        "data.skip_bad_records=true",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["examples"], 1);
    assert_eq!(r["skipped_records"][0]["line"], 2);
}

/// Serves `body` for every GET on a loopback port, `requests` times.
fn serve(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut paths = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut s = stream.unwrap();
            let mut req = [0u8; 4096];
            let n = s.read(&mut req).unwrap();
            let line = String::from_utf8_lossy(&req[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            paths.push(line.split_whitespace().nth(1).unwrap_or("").to_string());
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            s.write_all(&body).unwrap();
        }
        paths
    });
    (url, handle)
}

#[test]
fn data_fetch_verifies_the_checksum_and_keeps_only_a_good_file() {
    let good = std::fs::read(shared().join("humaneval/HumanEval.jsonl.gz")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let root_s = root.path().to_str().unwrap();
    let dest = root.path().join("humaneval/HumanEval.jsonl.gz");

    // A corrupted download is refused and leaves nothing behind.
    let mut bad = good.clone();
    bad[100] ^= 0xFF;
    let (url, server) = serve(bad, 1);
    let o = fedtune(&[
        "data",
        "fetch",
        "humaneval",
        "--data-root",
        root_s,
        "--mirror",
        &url,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("SHA-256 of the download is"));
    assert!(!dest.exists() && !dest.with_extension("part").exists());
    assert_eq!(
        server.join().unwrap(),
        vec!["/humaneval/HumanEval.jsonl.gz"]
    );

    // The real bytes are kept, and a data split can read them.
    let (url, server) = serve(good.clone(), 1);
    let o = fedtune(&[
        "data",
        "fetch",
        "humaneval",
        "--data-root",
        root_s,
        "--mirror",
        &url,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&dest).unwrap(), good);
    server.join().unwrap();

    // Unknown names say which ones exist.
    let o = fedtune(&["data", "fetch", "mmlu", "--data-root", root_s]);
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("fetchable sets are gsm8k, gsm8k-test, humaneval"));
}
