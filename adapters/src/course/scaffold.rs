//! Editable copies of what fedtune ships: `fedtune scripts list|export` and
//! `fedtune init`. The shipped scripts are compiled into the binary (a bare
//! name works from any directory); a researcher starting a new algorithm
//! wants the file. `init` writes a course directory: the template config
//! (and what it extends), copies of every script the course runs, and a
//! `config.toml` that points at the copies, so editing a copy changes the
//! course.

use std::path::{Path, PathBuf};

use super::config::{CourseFile, Task};
use super::{ensure, Context, CourseError, Result};
use fedtune_kernel::script::shipped_name;

use crate::hooks::BUILT_IN_HOOKS;
use crate::pfl::BUILT_IN_PFL;

/// What a shipped script is for, and its folder under `scripts/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    /// The server's strategy (`[aggregator] script`).
    Aggregator,
    /// Trainer hooks (`[hooks] script`).
    Hook,
    /// Personalized FL (`[pfl] algorithm`).
    Pfl,
    /// A hyperparameter searcher (`fedtune hpo --method`).
    Searcher,
}

impl ScriptKind {
    /// The folder under `scripts/`.
    pub fn dir(self) -> &'static str {
        match self {
            ScriptKind::Aggregator => "aggregators",
            ScriptKind::Hook => "hooks",
            ScriptKind::Pfl => "pfl",
            ScriptKind::Searcher => "hpo",
        }
    }
}

/// One shipped script.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    /// What it is for.
    pub kind: ScriptKind,
    /// Its name (`fedadam`).
    pub name: &'static str,
    /// Its text.
    pub text: &'static str,
}

impl Shipped {
    /// `KIND/NAME`, as `export` takes it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind.dir(), self.name)
    }

    /// The first comment line: what the script does.
    pub fn summary(&self) -> &'static str {
        self.text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("//"))
            .map_or("", str::trim)
    }
}

/// Every shipped script.
pub fn shipped_scripts() -> Vec<Shipped> {
    let of = |kind, list: &'static [(&'static str, &'static str)]| {
        list.iter()
            .map(move |&(name, text)| Shipped { kind, name, text })
    };
    of(
        ScriptKind::Aggregator,
        &fedtune_kernel::script::BUILT_IN_AGGREGATORS,
    )
    .chain(of(ScriptKind::Hook, &BUILT_IN_HOOKS))
    .chain(of(ScriptKind::Pfl, &BUILT_IN_PFL))
    .chain(of(ScriptKind::Searcher, &fedtune_kernel::hpo::BUILT_IN))
    .collect()
}

/// The shipped script `spec` names: `NAME` when only one has that name,
/// else `KIND/NAME` (`aggregators/scaffold`, `hooks/scaffold`).
pub fn find_shipped(spec: &str) -> Result<Shipped> {
    let all = shipped_scripts();
    let spec = spec.trim_end_matches(".rhai");
    let matches: Vec<Shipped> = all
        .iter()
        .copied()
        .filter(|s| s.id() == spec || s.name == spec)
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(CourseError::invalid(format!(
            "no shipped script `{spec}` (fedtune scripts list shows them: {})",
            all.iter().map(Shipped::id).collect::<Vec<_>>().join(", ")
        ))),
        many => Err(CourseError::invalid(format!(
            "`{spec}` names {} shipped scripts: say which, as {}",
            many.len(),
            many.iter()
                .map(Shipped::id)
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
    }
}

/// Writes `script` to `dir/KIND/NAME.rhai`; an existing file is kept and
/// is an error (it may hold your edits).
pub fn export(script: &Shipped, dir: &Path) -> Result<PathBuf> {
    let path = dir
        .join(script.kind.dir())
        .join(format!("{}.rhai", script.name));
    ensure!(
        !path.exists(),
        "{} exists; it is kept (it may hold your edits): remove it or export elsewhere",
        path.display()
    );
    let parent = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::fs::write(&path, script.text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A shipped course config `init` starts from: its files, the template
/// first, then what it extends (by file name).
#[derive(Debug, Clone, Copy)]
pub struct Template {
    /// The name `--template` takes.
    pub name: &'static str,
    /// What the course is.
    pub about: &'static str,
    /// `(file name, text)`, the template's own first.
    pub files: &'static [(&'static str, &'static str)],
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Initialized {
    /// The course to run: `fedtune run DIR/config.toml`.
    pub config: PathBuf,
    /// The copied scripts the course now runs.
    pub scripts: Vec<PathBuf>,
}

/// Writes a course directory `dir` from `template` (see the module docs).
/// Refuses a `dir` that already holds a `config.toml`.
pub fn init(dir: &Path, template: &Template) -> Result<Initialized> {
    let config = dir.join("config.toml");
    ensure!(
        !config.exists(),
        "{} exists: fedtune init does not write over a course (choose another folder)",
        config.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in template.files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let (own, _) = template.files[0];
    let course = CourseFile::load(&dir.join(own), &[])?;
    let scripts_dir = dir.join("scripts");
    let mut lines = vec![
        format!("# Made by `fedtune init --template {}`: {}.", template.name, template.about),
        format!(
            "# The settings are in {own} (and what it extends); set what you change here, it wins."
        ),
        "# The scripts the course runs are the copies under scripts/: edit them freely".into(),
        "# (`fedtune scripts list` shows the other shipped ones, `fedtune scripts export NAME scripts` copies one).".into(),
        format!("extends = {own:?}"),
        String::new(),
    ];
    let mut scripts = Vec::new();
    let mut copy = |kind: ScriptKind, chosen: Option<&str>| -> Result<String> {
        // A path or a name: the shipped script it names, as resolving it would.
        let name = shipped_name(chosen.unwrap_or("fedavg"));
        let shipped = find_shipped(&format!("{}/{name}", kind.dir()))?;
        let path = export(&shipped, &scripts_dir)?;
        scripts.push(path);
        Ok(format!("scripts/{}/{}.rhai", kind.dir(), shipped.name))
    };
    let aggregator = copy(
        ScriptKind::Aggregator,
        course.cfg.aggregator.script.as_deref(),
    )?;
    lines.push("[aggregator]".into());
    lines.push(format!("script = {aggregator:?}"));
    if let Task::Llm(llm) = &course.task {
        if let Some(hooks) = llm.hooks.script.as_deref() {
            let path = copy(ScriptKind::Hook, Some(hooks))?;
            lines.extend([
                String::new(),
                "[hooks]".into(),
                format!("script = {path:?}"),
            ]);
        }
        if llm.pfl.algorithm != "none" {
            let path = copy(ScriptKind::Pfl, Some(&llm.pfl.algorithm))?;
            lines.extend([
                String::new(),
                "[pfl]".into(),
                format!("algorithm = {path:?}"),
            ]);
        }
    }
    lines.push(String::new());
    std::fs::write(&config, lines.join("\n"))
        .with_context(|| format!("writing {}", config.display()))?;
    // What was written must load, scripts and all.
    let written = CourseFile::load(&config, &[])?;
    super::scripts::check(&written)?;
    Ok(Initialized { config, scripts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_find_one_script_or_say_which() {
        assert_eq!(find_shipped("fedadam").unwrap().id(), "aggregators/fedadam");
        assert_eq!(find_shipped("pfl/ditto.rhai").unwrap().name, "ditto");
        let err = find_shipped("scaffold").unwrap_err().to_string();
        assert!(
            err.contains("aggregators/scaffold or hooks/scaffold"),
            "{err}"
        );
        let err = find_shipped("fedmagic").unwrap_err().to_string();
        assert!(
            err.contains("no shipped script `fedmagic`") && err.contains("pfl/ditto"),
            "{err}"
        );
        assert!(
            shipped_scripts().iter().all(|s| !s.summary().is_empty()),
            "every script says what it does"
        );
    }

    #[test]
    fn export_writes_the_shipped_text_and_keeps_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = find_shipped("hooks/fedprox").unwrap();
        let path = export(&s, dir.path()).unwrap();
        assert_eq!(path, dir.path().join("hooks/fedprox.rhai"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), s.text);
        std::fs::write(&path, "// mine").unwrap();
        assert!(export(&s, dir.path())
            .unwrap_err()
            .to_string()
            .contains("kept"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "// mine");
    }
}
