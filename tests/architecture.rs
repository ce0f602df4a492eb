//! The layout rules ARCHITECTURE.md promises, checked on the sources so a
//! change that breaks one fails here rather than in a reader's head: no file
//! of the command-line crate over 600 lines, no function over 120 lines
//! outside tests, no `Result<_, String>` in the library crates.
//!
//! The checks read rustfmt-formatted code (CI runs `cargo fmt --check`): a
//! function ends at the first line that is its opening line's indentation
//! followed by `}`; a file's `#[cfg(test)]` module is its last item.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const LIBRARIES: [&str; 3] = ["kernel/src", "adapters/src", "broker/src"];
const MAX_CLI_FILE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 120;

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The lines of `path` before its test module (`#[cfg(test)]` over a
/// `mod` at the left margin; a test-only method further in stays in).
fn non_test_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0] == "#[cfg(test)]" && w[1].starts_with("mod "))
        .unwrap_or(lines.len());
    lines[..end].iter().map(|l| l.to_string()).collect()
}

/// Whether `line` opens a function: `fn name` after visibility and qualifiers.
fn opens_function(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
        "extern \"C\" ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    Some(&name[..end])
}

/// Each function of `lines` as (name, first line number, length in lines).
fn functions(lines: &[String]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = opens_function(line) else {
            continue;
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        // A declaration without a body (a trait's required method).
        let body_opens = lines[i..]
            .iter()
            .position(|l| l.trim_end().ends_with('{') || l.trim_end().ends_with(';'));
        if body_opens.is_some_and(|k| lines[i + k].trim_end().ends_with(';')) {
            continue;
        }
        if line.trim_end().ends_with('}') {
            continue; // a one-line function
        }
        let close = format!("{indent}}}");
        if let Some(k) = lines[i + 1..].iter().position(|l| l.trim_end() == close) {
            out.push((name.to_string(), i + 1, k + 2));
        }
    }
    out
}

/// The generic arguments of every `Result<…>` in `line`, split at their
/// top-level commas.
fn result_arguments(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = line[from..].find("Result<") {
        let start = from + at + "Result<".len();
        let (mut depth, mut args, mut current) = (1usize, Vec::new(), String::new());
        for c in line[start..].chars() {
            match c {
                '<' | '(' | '[' => depth += 1,
                '>' | ')' | ']' => depth -= 1,
                ',' if depth == 1 => {
                    args.push(current.trim().to_string());
                    current.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                break;
            }
            current.push(c);
        }
        args.push(current.trim().to_string());
        out.push(args);
        from = start;
    }
    out
}

#[test]
fn no_file_of_the_command_line_crate_is_over_600_lines() {
    let long: Vec<String> = rust_files(&Path::new(ROOT).join("src"))
        .into_iter()
        .filter_map(|p| {
            let n = std::fs::read_to_string(&p).unwrap().lines().count();
            (n > MAX_CLI_FILE_LINES).then(|| format!("{} ({n} lines)", p.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}

#[test]
fn no_function_outside_tests_is_over_120_lines() {
    let mut long = Vec::new();
    for dir in ["src"].iter().chain(LIBRARIES.iter()) {
        for path in rust_files(&Path::new(ROOT).join(dir)) {
            for (name, line, len) in functions(&non_test_lines(&path)) {
                if len > MAX_FUNCTION_LINES {
                    long.push(format!("{}:{line} {name} ({len} lines)", path.display()));
                }
            }
        }
    }
    assert!(long.is_empty(), "split these functions: {long:?}");
}

#[test]
fn library_errors_are_types_not_strings() {
    let mut found = Vec::new();
    for dir in LIBRARIES {
        for path in rust_files(&Path::new(ROOT).join(dir)) {
            for (i, line) in non_test_lines(&path).iter().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if result_arguments(code)
                    .iter()
                    .any(|args| args.get(1).is_some_and(|e| e == "String"))
                {
                    found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "give these errors a type (thiserror): {found:#?}"
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // A check that never matches would pass for any code.
    let lines: Vec<String> = "pub fn long() {\n    let x = 1;\n    x\n}\nfn decl();\n    pub(crate) fn inner(a: u8) -> u8 {\n        a\n    }\n"
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        functions(&lines),
        vec![("long".to_string(), 1, 4), ("inner".to_string(), 6, 3)]
    );
    assert_eq!(
        result_arguments("fn f() -> Result<BTreeMap<String, String>, Oops> {"),
        vec![vec![
            "BTreeMap<String, String>".to_string(),
            "Oops".to_string()
        ]]
    );
    assert_eq!(
        result_arguments("fn f() -> std::result::Result<(u8, Vec<u8>), String>")[0][1],
        "String"
    );
    assert_eq!(
        opens_function("    pub(super) fn prepare("),
        Some("prepare")
    );
    assert_eq!(opens_function("    let f = 1;"), None);
}
