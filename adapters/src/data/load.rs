//! Reading examples from the published data set formats.
//!
//! Files are JSON Lines (one object a line) or a JSON array of objects,
//! either plain or gzip-compressed (`.gz`, detected by name). Every record
//! error names the file and the line where the record starts; a broken gzip
//! stream names the line it broke at.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{DataError, Example};

/// A data set's record layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `instruction`, `input` (optional), `output`: Alpaca, Cleaned Alpaca, CodeAlpaca.
    Instruction,
    /// `instruction`, `context`, `response`, `category`: Dolly-15k.
    Dolly,
    /// `question`, `answer` ending in `#### <number>`: GSM8K.
    Gsm8k,
    /// `task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`: HumanEval.
    Humaneval,
    /// Any objects, through the field mapping of [`Fields`].
    Custom,
}

/// Which fields of a [`Format::Custom`] record fill an example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Field holding the instruction (prompt).
    pub instruction: String,
    /// Field holding extra input; absent or empty means none.
    #[serde(default)]
    pub input: Option<String>,
    /// Field holding the target response.
    pub output: String,
    /// Fields copied into the example's meta (strings, numbers or booleans).
    #[serde(default)]
    pub meta: Vec<String>,
}

/// What a load produced.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Records left out because `skip_bad` was set: `(line, reason)`.
    pub skipped: Vec<(usize, String)>,
}

/// Reads every record of `path` in `format`. With `skip_bad`, malformed
/// records are left out and listed in [`Loaded::skipped`]; otherwise the first
/// one is an error. File-level faults (unreadable file, broken gzip, a JSON
/// array that does not parse) are always errors.
pub fn load(
    path: &Path,
    format: Format,
    fields: Option<&Fields>,
    skip_bad: bool,
) -> Result<Loaded, DataError> {
    if format == Format::Custom && fields.is_none() {
        return Err(DataError::file(
            path,
            "format `custom` needs a field mapping ([data.fields])",
        ));
    }
    let records = read_records(path)?;
    let mut out = Loaded::default();
    for (line, record) in records {
        let parsed = match record {
            Ok(Value::Object(obj)) => convert(&obj, format, fields),
            Ok(other) => Err(RecordError::NotAnObject(kind(&other))),
            Err(e) => Err(e),
        };
        match parsed {
            Ok(ex) => out.examples.push(ex),
            Err(e) if skip_bad => out.skipped.push((line, e.to_string())),
            Err(e) => {
                return Err(DataError::Record {
                    path: path.to_path_buf(),
                    line,
                    msg: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Why one record of a data file cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// The line is not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// The line is not UTF-8 text.
    #[error("not UTF-8 text: {0}")]
    NotUtf8(String),
    /// The record is JSON but not an object.
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(String),
    /// A field has the wrong type.
    #[error("field `{name}` is {found}, expected {expected}")]
    WrongType {
        /// The field.
        name: String,
        /// What it holds.
        found: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// `format = "custom"` without `[data.fields]`.
    #[error("format `custom` needs a field mapping")]
    NoMapping,
    /// A GSM8K answer without its `#### N` line.
    #[error("the answer has no `#### <number>` line")]
    NoGsm8kAnswer,
    /// A GSM8K answer whose `####` line is empty.
    #[error("the `####` line of the answer is empty")]
    EmptyGsm8kAnswer,
}

/// Each record with the line it starts on: parsed, or why not.
type Records = Vec<(usize, Result<Value, RecordError>)>;

/// Every record of a JSON Lines or JSON array file (gzip or not) with the
/// line it starts on; the first malformed one is an error naming file and line.
pub fn json_records(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    read_records(path)?
        .into_iter()
        .map(|(line, r)| {
            r.map(|v| (line, v)).map_err(|e| DataError::Record {
                path: path.to_path_buf(),
                line,
                msg: e.to_string(),
            })
        })
        .collect()
}

fn read_records(path: &Path) -> Result<Records, DataError> {
    let file = File::open(path).map_err(|e| DataError::file(path, &format!("cannot open: {e}")))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn Read> = if gz {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::new(reader);
    // Peek at the first non-blank byte: `[` is a JSON array, anything else JSON Lines.
    let first = loop {
        let buf = reader.fill_buf().map_err(|e| broken(path, 1, gz, &e))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == Some(b'[') {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(|e| {
            DataError::file(
                path,
                &format!(
                    "{}: {e}",
                    if gz {
                        "broken gzip stream or not UTF-8"
                    } else {
                        "not UTF-8"
                    }
                ),
            )
        })?;
        return array_records(path, &text);
    }
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        number += 1;
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| broken(path, number, gz, &e))?;
        if n == 0 {
            break;
        }
        // A line that is not UTF-8 is a bad record like any other (and
        // `skip_bad_records` leaves it out), not a broken file.
        let text = match std::str::from_utf8(&line) {
            Ok(text) => text.trim(),
            Err(e) => {
                out.push((number, Err(RecordError::NotUtf8(e.to_string()))));
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        out.push((
            number,
            serde_json::from_str::<Value>(text).map_err(|e| RecordError::NotJson(e.to_string())),
        ));
    }
    Ok(out)
}

fn broken(path: &Path, line: usize, gz: bool, e: &std::io::Error) -> DataError {
    let what = if gz {
        "broken gzip stream"
    } else {
        "read error"
    };
    DataError::Record {
        path: path.to_path_buf(),
        line,
        msg: format!("{what}: {e}"),
    }
}

/// The elements of a JSON array, each with the line it starts on.
fn array_records(path: &Path, text: &str) -> Result<Records, DataError> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| DataError::Record {
        path: path.to_path_buf(),
        line: e.line(),
        msg: format!("not a valid JSON array: {e}"),
    })?;
    let base = text.as_ptr() as usize;
    let mut line = 1;
    let mut scanned = 0;
    let mut out = Vec::with_capacity(items.len());
    for raw in items {
        let at = raw.get().as_ptr() as usize - base;
        line += text[scanned..at].bytes().filter(|&b| b == b'\n').count();
        scanned = at;
        out.push((
            line,
            serde_json::from_str::<Value>(raw.get())
                .map_err(|e| RecordError::NotJson(e.to_string())),
        ));
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field.
fn text(obj: &Map<String, Value>, name: &str) -> Result<String, RecordError> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(RecordError::WrongType {
            name: name.to_string(),
            found: kind(other),
            expected: "a string",
        }),
        None => Err(RecordError::Missing(name.to_string())),
    }
}

/// An optional string field (absent or null reads as empty).
fn optional_text(obj: &Map<String, Value>, name: &str) -> Result<String, RecordError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(_) => text(obj, name),
    }
}

/// A meta field: strings as they are, numbers and booleans written out.
fn meta_value(obj: &Map<String, Value>, name: &str) -> Result<String, RecordError> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other) => Err(RecordError::WrongType {
            name: name.to_string(),
            found: kind(other),
            expected: "a string, number or boolean",
        }),
        None => Err(RecordError::Missing(name.to_string())),
    }
}

fn convert(
    obj: &Map<String, Value>,
    format: Format,
    fields: Option<&Fields>,
) -> Result<Example, RecordError> {
    let mut meta = BTreeMap::new();
    let ex = match format {
        Format::Instruction => Example {
            instruction: text(obj, "instruction")?,
            input: optional_text(obj, "input")?,
            output: text(obj, "output")?,
            meta,
        },
        Format::Dolly => {
            meta.insert("category".into(), text(obj, "category")?);
            Example {
                instruction: text(obj, "instruction")?,
                input: optional_text(obj, "context")?,
                output: text(obj, "response")?,
                meta,
            }
        }
        Format::Gsm8k => {
            let answer = text(obj, "answer")?;
            meta.insert("gold".into(), gsm8k_gold(&answer)?);
            Example {
                instruction: text(obj, "question")?,
                input: String::new(),
                output: answer,
                meta,
            }
        }
        Format::Humaneval => {
            for name in ["task_id", "test", "entry_point"] {
                meta.insert(name.into(), text(obj, name)?);
            }
            Example {
                instruction: text(obj, "prompt")?,
                input: String::new(),
                output: text(obj, "canonical_solution")?,
                meta,
            }
        }
        Format::Custom => {
            let f = fields.ok_or(RecordError::NoMapping)?;
            for name in &f.meta {
                meta.insert(name.clone(), meta_value(obj, name)?);
            }
            Example {
                instruction: text(obj, &f.instruction)?,
                input: match &f.input {
                    Some(name) => optional_text(obj, name)?,
                    None => String::new(),
                },
                output: text(obj, &f.output)?,
                meta,
            }
        }
    };
    Ok(ex)
}

/// The phrase GSM8K answers end with in FS-LLM's training data and in the
/// 8-shot exemplars: `The answer is N.`
pub const GSM8K_TRIGGER: &str = "The answer is";

/// The number after the last `####` of a GSM8K answer, commas removed.
pub fn gsm8k_gold(answer: &str) -> Result<String, RecordError> {
    let (_, tail) = answer
        .rsplit_once("####")
        .ok_or(RecordError::NoGsm8kAnswer)?;
    let gold: String = tail.trim().chars().filter(|&c| c != ',').collect();
    if gold.is_empty() {
        return Err(RecordError::EmptyGsm8kAnswer);
    }
    Ok(gold)
}

impl DataError {
    fn file(path: &Path, msg: &str) -> Self {
        DataError::File {
            path: PathBuf::from(path),
            msg: msg.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn gz(body: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body).unwrap();
        e.finish().unwrap()
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn every_format_reads_jsonl_json_arrays_and_gzip_alike() {
        let d = tempdir();
        let jsonl = b"{\"instruction\": \"Add\", \"input\": \"1, 2\", \"output\": \"3\"}\n\n{\"instruction\": \"Hi\", \"output\": \"Hello\"}\n";
        let array = b"[\n  {\"instruction\": \"Add\", \"input\": \"1, 2\", \"output\": \"3\"},\n  {\"instruction\": \"Hi\", \"output\": \"Hello\"}\n]";
        for (name, body) in [
            ("a.jsonl", jsonl.to_vec()),
            ("a.jsonl.gz", gz(jsonl)),
            ("a.json", array.to_vec()),
            ("a.json.gz", gz(array)),
        ] {
            let p = write(d.path(), name, &body);
            let l = load(&p, Format::Instruction, None, false).unwrap();
            assert_eq!(l.examples.len(), 2, "{name}");
            assert_eq!(l.examples[0].input, "1, 2");
            assert_eq!(l.examples[1].input, "", "input is optional");
        }
        let p = write(
            d.path(),
            "g.jsonl",
            b"{\"question\": \"2+2?\", \"answer\": \"2+2=<<2+2=4>>4\\n#### 1,004\"}\n",
        );
        let l = load(&p, Format::Gsm8k, None, false).unwrap();
        assert_eq!(l.examples[0].meta["gold"], "1004");
        let p = write(
            d.path(),
            "d.jsonl",
            b"{\"instruction\": \"Q\", \"context\": \"\", \"response\": \"A\", \"category\": \"open_qa\"}\n",
        );
        let l = load(&p, Format::Dolly, None, false).unwrap();
        assert_eq!(l.examples[0].meta["category"], "open_qa");
        let p = write(
            d.path(),
            "c.jsonl",
            b"{\"q\": \"x\", \"a\": \"y\", \"n\": 3}\n",
        );
        let f = Fields {
            instruction: "q".into(),
            input: None,
            output: "a".into(),
            meta: vec!["n".into()],
        };
        let l = load(&p, Format::Custom, Some(&f), false).unwrap();
        assert_eq!(l.examples[0].meta["n"], "3");
    }

    #[test]
    fn malformed_records_name_file_and_line() {
        let d = tempdir();
        let cases: [(&str, &[u8], &str); 5] = [
            (
                "missing.jsonl",
                b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n",
                ":2: missing field `output`",
            ),
            (
                "type.jsonl",
                b"\n\n{\"instruction\": 3, \"output\": \"b\"}\n",
                ":3: field `instruction` is a number",
            ),
            (
                "syntax.jsonl",
                b"{\"instruction\": \"a\", \"output\": \"b\"}\n{oops\n",
                ":2: not valid JSON",
            ),
            (
                "array.json",
                b"[\n {\"instruction\": \"a\", \"output\": \"b\"},\n\n {\"instruction\": \"a\"}\n]",
                ":4: missing field `output`",
            ),
            ("scalar.jsonl", b"[1]\n", ":1: expected a JSON object"),
        ];
        for (name, body, want) in cases {
            let p = write(d.path(), name, body);
            let e = load(&p, Format::Instruction, None, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        // Truncated gzip: an error naming the line it broke at, never a silent short read.
        let body: Vec<u8> = (0..2000)
            .flat_map(|i| {
                format!("{{\"instruction\": \"{i}\", \"output\": \"x{i}\"}}\n").into_bytes()
            })
            .collect();
        let mut z = gz(&body);
        z.truncate(z.len() / 2);
        let p = write(d.path(), "cut.jsonl.gz", &z);
        let e = load(&p, Format::Instruction, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cut.jsonl.gz:") && e.contains("broken gzip"),
            "{e}"
        );
        let p = write(
            d.path(),
            "gsm.jsonl",
            b"{\"question\": \"q\", \"answer\": \"no marker\"}\n",
        );
        let e = load(&p, Format::Gsm8k, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gsm.jsonl:1: the answer has no `#### <number>` line"),
            "{e}"
        );
    }

    #[test]
    fn skipping_bad_records_counts_each_one() {
        let d = tempdir();
        let p = write(
            d.path(),
            "mixed.jsonl",
            b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\nnot json\n{\"instruction\": \"c\", \"output\": \"d\"}\n",
        );
        let l = load(&p, Format::Instruction, None, true).unwrap();
        assert_eq!(l.examples.len(), 2);
        assert_eq!(
            l.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
}
