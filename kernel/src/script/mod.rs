//! The Rhai script host: user-editable FL logic around native tensors.
//!
//! One [`ScriptHost`] holds one `rhai::Engine`, built once with the fedtune API
//! registered (see [`api`]) and sandboxed: operation, call-depth, expression,
//! string, array and map limits; no module loading, no `eval`; Rhai itself has
//! no file, network or process access. Scripts are compiled once to an `AST`
//! and their functions called per event.
//!
//! A [`ScriptFile`] is one script on disk. [`ScriptFile::refresh`] re-reads the
//! file; when its text changed it recompiles, and a script that no longer
//! compiles keeps the previous version running and says why. Callers refresh at
//! round boundaries, so an edit takes effect from the next round.
//!
//! Every error is a [`ScriptError`] naming the file, line and column and what
//! the host was doing (`aggregate, round 3`), whether it comes from the parser,
//! from the script, from a native helper the script called, or from a limit.

pub mod aggregator;
pub mod api;
pub mod state;

pub use aggregator::{
    shipped_name, toml_to_dynamic, AggregatorSection, ScriptAggregator, ScriptSection,
};
pub use aggregator::{
    ScriptLoadError, ScriptNotFound, ScriptSource, BUILT_IN as BUILT_IN_AGGREGATORS,
};
pub use api::{Tensor, Update};
/// The Rhai crate, for callers that register more of their own API.
pub use rhai;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, Position, Scope, AST};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Sandbox limits and error policy: the `[scripting]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptingSection {
    /// Most Rhai operations one call may run before it is stopped.
    pub max_operations: u64,
    /// Deepest function-call nesting.
    pub max_call_levels: usize,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Most elements of one array.
    pub max_array_size: usize,
    /// Most entries of one object map.
    pub max_map_size: usize,
    /// Most MiB of tensor data one script call may create (every `ParamSet`
    /// or `Tensor` an operation returns counts).
    pub max_tensor_mib: u64,
    /// What a script error does: stop the course, or log it and run the native default.
    pub on_script_error: OnScriptError,
}

/// The deepest `max_call_levels` allowed: scripts run on threads with 2 MiB
/// stacks, which hold 256 levels of Rhai calls with room to spare (1,024
/// overflow them, which aborts the process instead of failing the call).
pub const MAX_CALL_LEVELS: usize = 256;

impl ScriptingSection {
    /// Checks the limits: none may be 0 (which Rhai reads as "unlimited"),
    /// and the call depth must fit the stack. Returns the key at fault.
    pub fn validate(&self) -> Result<(), crate::config::KeyError> {
        use crate::config::KeyError;
        let positive = [
            ("max_operations", self.max_operations),
            ("max_call_levels", self.max_call_levels as u64),
            ("max_string_size", self.max_string_size as u64),
            ("max_array_size", self.max_array_size as u64),
            ("max_map_size", self.max_map_size as u64),
            ("max_tensor_mib", self.max_tensor_mib),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(KeyError::new(
                format!("scripting.{key}"),
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        if self.max_call_levels > MAX_CALL_LEVELS {
            return Err(KeyError::new(
                "scripting.max_call_levels",
                format!(
                    "must be at most {MAX_CALL_LEVELS} (deeper script recursion would overflow the worker's stack), got {}",
                    self.max_call_levels
                ),
            ));
        }
        Ok(())
    }

    /// `max_tensor_mib` in `f32` elements.
    fn max_tensor_elements(&self) -> usize {
        usize::try_from(self.max_tensor_mib.saturating_mul(1 << 18)).unwrap_or(usize::MAX)
    }
}

impl Default for ScriptingSection {
    fn default() -> Self {
        Self {
            max_operations: 5_000_000,
            max_call_levels: 32,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_tensor_mib: 4096,
            on_script_error: OnScriptError::Fail,
        }
    }
}

/// What happens when a script call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnScriptError {
    /// Stop the course with the error.
    #[default]
    Fail,
    /// Log the error and use the native default for that call.
    Skip,
}

/// A value a script gave that is not what the host asked of it.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("{0}")]
pub struct BadValue(pub String);

impl From<String> for BadValue {
    fn from(why: String) -> Self {
        Self(why)
    }
}

impl From<BadValue> for String {
    fn from(e: BadValue) -> Self {
        e.0
    }
}

/// A script that failed to load, compile or run.
#[derive(Debug, Error, Clone, PartialEq)]
#[error("{file}:{line}:{column}: {message} (while {doing})")]
pub struct ScriptError {
    /// The script file (or `<built-in NAME>`).
    pub file: String,
    /// 1-based line; 0 when the error has no position (a missing file, a missing function).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// What went wrong.
    pub message: String,
    /// What the host was doing.
    pub doing: String,
}

impl ScriptError {
    /// An error about the script `file` as a whole (no line: a missing file,
    /// a missing function, a result of the wrong type), while `doing`.
    pub fn unplaced(file: &str, message: impl Into<String>, doing: &str) -> Self {
        Self {
            file: file.to_string(),
            line: 0,
            column: 0,
            message: message.into(),
            doing: doing.to_string(),
        }
    }

    fn new(file: &str, pos: Position, message: String, doing: &str) -> Self {
        Self {
            file: file.to_string(),
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message,
            doing: doing.to_string(),
        }
    }

    /// From a runtime error: the innermost failure's position and message.
    fn from_eval(file: &str, err: EvalAltResult, doing: &str) -> Self {
        let (pos, message) = innermost(err);
        Self::new(file, pos, message, doing)
    }
}

/// Follows nested function-call errors to the statement that failed.
fn innermost(err: EvalAltResult) -> (Position, String) {
    match err {
        EvalAltResult::ErrorInFunctionCall(name, _, inner, pos) => {
            let (p, m) = innermost(*inner);
            if p.is_none() {
                (pos, format!("in fn {name}: {m}"))
            } else {
                (p, m)
            }
        }
        EvalAltResult::ErrorTooManyOperations(pos) => (
            pos,
            "the script ran past its operation limit (scripting.max_operations): an endless loop?"
                .to_string(),
        ),
        EvalAltResult::ErrorStackOverflow(pos) => (
            pos,
            "the script nested calls past scripting.max_call_levels".to_string(),
        ),
        mut other => {
            let pos = other.take_position();
            (pos, other.to_string())
        }
    }
}

/// The engine with the fedtune API and the sandbox limits.
#[derive(Clone)]
pub struct ScriptHost {
    engine: Arc<Engine>,
    policy: OnScriptError,
    /// The tensor budget of one call, in `f32` elements.
    max_tensor_elements: usize,
}

impl std::fmt::Debug for ScriptHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptHost")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ScriptHost {
    /// Builds the engine once: limits from `limits`, the fedtune API registered,
    /// `print`/`debug` routed to the log.
    pub fn new(limits: &ScriptingSection) -> Self {
        Self::with_api(limits, |_| {})
    }

    /// [`Self::new`], with more API registered by `extra` (the trainer's hook context, …).
    pub fn with_api(limits: &ScriptingSection, extra: impl FnOnce(&mut Engine)) -> Self {
        let mut engine = Engine::new();
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(64, 32)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");
        engine.on_print(|text| tracing::info!(target: "fedtune::script", "{text}"));
        engine.on_debug(|text, source, pos| {
            tracing::debug!(target: "fedtune::script", source = source.unwrap_or("?"), %pos, "{text}")
        });
        api::register(&mut engine);
        extra(&mut engine);
        Self {
            engine: Arc::new(engine),
            policy: limits.on_script_error,
            max_tensor_elements: limits.max_tensor_elements(),
        }
    }

    /// The error policy of this host.
    pub fn policy(&self) -> OnScriptError {
        self.policy
    }

    /// The engine, for callers that register more of their own API.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `text`; `file` names it in errors.
    pub fn compile(&self, text: &str, file: &str) -> Result<AST, ScriptError> {
        let mut ast = self.engine.compile(text).map_err(|e| {
            ScriptError::new(file, e.position(), e.err_type().to_string(), "compiling")
        })?;
        ast.set_source(file);
        Ok(ast)
    }

    /// Calls script function `name` with `args`, `this` bound to `state`.
    /// On error `state` is left as it was before the call.
    pub fn call(
        &self,
        script: &ScriptFile,
        name: &str,
        state: &mut Dynamic,
        args: impl rhai::FuncArgs,
        doing: &str,
    ) -> Result<Dynamic, ScriptError> {
        let before = state.clone();
        let _budget = api::TensorBudget::start(self.max_tensor_elements);
        let options = CallFnOptions::new().eval_ast(false).bind_this_ptr(state);
        let result = self.engine.call_fn_with_options::<Dynamic>(
            options,
            &mut Scope::new(),
            &script.ast,
            name,
            args,
        );
        result.map_err(|e| {
            *state = before;
            let mut err = ScriptError::from_eval(&script.origin, *e, doing);
            if err.line == 0 {
                // Rhai reports limit hits at the call site, which is the host
                // here: point at the function's definition instead.
                if let Some((line, column)) = script.fn_location(name) {
                    (err.line, err.column) = (line, column);
                    err.message = format!("in fn {name}: {}", err.message);
                }
            }
            err
        })
    }
}

/// One compiled script and where it came from.
#[derive(Debug, Clone)]
pub struct ScriptFile {
    origin: String,
    path: Option<PathBuf>,
    /// The text of the version in force.
    text: String,
    /// The file's text when last read (differs from `text` after a broken edit).
    seen: String,
    ast: AST,
    reloads: u64,
}

impl ScriptFile {
    /// Reads and compiles a script file.
    pub fn load(host: &ScriptHost, path: &Path) -> Result<Self, ScriptError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ScriptError::unplaced(&origin, format!("cannot read the script: {e}"), "loading")
        })?;
        let ast = host.compile(&text, &origin)?;
        Ok(Self {
            origin,
            path: Some(path.to_path_buf()),
            seen: text.clone(),
            text,
            ast,
            reloads: 0,
        })
    }

    /// Compiles script text that has no file (a built-in copy); it never reloads.
    pub fn from_text(host: &ScriptHost, text: &str, origin: &str) -> Result<Self, ScriptError> {
        Ok(Self {
            origin: origin.to_string(),
            path: None,
            text: text.to_string(),
            seen: text.to_string(),
            ast: host.compile(text, origin)?,
            reloads: 0,
        })
    }

    /// Loads a script file, or compiles a built-in copy.
    pub fn from_source(host: &ScriptHost, source: &ScriptSource) -> Result<Self, ScriptError> {
        match source {
            ScriptSource::File(path) => Self::load(host, path),
            ScriptSource::BuiltIn { name, text } => {
                Self::from_text(host, text, &format!("<built-in {name}>"))
            }
        }
    }

    /// A short name: the file stem, or the built-in's name.
    pub fn name(&self) -> &str {
        match &self.path {
            Some(p) => p.file_stem().and_then(|s| s.to_str()).unwrap_or("script"),
            None => self
                .origin
                .strip_prefix("<built-in ")
                .and_then(|s| s.strip_suffix('>'))
                .unwrap_or(&self.origin),
        }
    }

    /// Where the script came from, as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How many times the script was reloaded after a change.
    pub fn reloads(&self) -> u64 {
        self.reloads
    }

    /// Whether the script defines `name` with `arity` parameters.
    pub fn has_fn(&self, name: &str, arity: usize) -> bool {
        self.ast
            .iter_functions()
            .any(|f| f.name == name && f.params.len() == arity)
    }

    /// The 1-based line and column of `fn name(` in the script text.
    fn fn_location(&self, name: &str) -> Option<(usize, usize)> {
        let needle = format!("fn {name}(");
        self.text.lines().enumerate().find_map(|(i, line)| {
            line.find(&needle)
                .filter(|&col| !line[..col].contains("//"))
                .map(|col| (i + 1, col + 1))
        })
    }

    /// Fails unless the script defines `name` with `arity` parameters.
    pub fn require_fn(&self, name: &str, arity: usize) -> Result<(), ScriptError> {
        if self.has_fn(name, arity) {
            return Ok(());
        }
        Err(ScriptError::unplaced(
            &self.origin,
            format!("the script defines no function `{name}` with {arity} parameters"),
            "loading",
        ))
    }

    /// Re-reads the file; recompiles when its text changed. Returns `Ok(true)`
    /// when a new version took over, `Ok(false)` when nothing changed, and the
    /// compile error when the new text does not compile — the previous version
    /// stays in force then. A file that vanished also keeps the previous version.
    pub fn refresh(&mut self, host: &ScriptHost) -> Result<bool, ScriptError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(false);
        };
        if text == self.seen {
            return Ok(false);
        }
        // Remember the text either way, so a broken edit is reported once.
        self.seen = text.clone();
        self.ast = host.compile(&text, &self.origin)?;
        self.text = text;
        self.reloads += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> ScriptHost {
        ScriptHost::new(&ScriptingSection::default())
    }

    #[test]
    fn a_syntax_error_names_line_and_column() {
        let err = host()
            .compile("fn f(x) {\n    let y = x +;\n    y\n}\n", "bad.rhai")
            .unwrap_err();
        assert_eq!((err.file.as_str(), err.line), ("bad.rhai", 2), "{err}");
        assert!(err.column > 0, "{err}");
        assert!(err.to_string().starts_with("bad.rhai:2:"), "{err}");
    }

    #[test]
    fn an_endless_loop_is_stopped_by_the_operation_limit() {
        let host = ScriptHost::new(&ScriptingSection {
            max_operations: 10_000,
            ..Default::default()
        });
        let text = "fn spin() {\n    let x = 0;\n    while x >= 0 {\n        x += 1;\n    }\n}\n";
        let script = ScriptFile::from_text(&host, text, "spin.rhai").unwrap();
        let mut state = Dynamic::UNIT;
        let err = host
            .call(&script, "spin", &mut state, (), "spinning")
            .unwrap_err();
        assert!(err.message.contains("operation limit"), "{err}");
        // Rhai reports limit hits without a position: the error points at the function.
        assert_eq!((err.line, err.column), (1, 1), "{err}");
        assert!(err.message.contains("in fn spin"), "{err}");
        assert_eq!(err.doing, "spinning");
    }

    #[test]
    fn runtime_errors_name_the_failing_line_and_restore_state() {
        let host = host();
        let text = "fn f() {\n    this.n = 1;\n    g()\n}\nfn g() {\n    throw \"boom\";\n}\n";
        let script = ScriptFile::from_text(&host, text, "t.rhai").unwrap();
        let mut state = Dynamic::from_map(rhai::Map::new());
        let err = host
            .call(&script, "f", &mut state, (), "testing")
            .unwrap_err();
        assert_eq!(err.line, 6, "{err}");
        assert!(err.message.contains("boom"), "{err}");
        assert!(
            state.read_lock::<rhai::Map>().unwrap().is_empty(),
            "the half-done change to `this` was rolled back"
        );
    }

    #[test]
    fn the_sandbox_refuses_modules_and_eval() {
        let host = host();
        let err = ScriptFile::from_text(&host, "fn f() { eval(\"1\") }", "e.rhai");
        assert!(err.is_err(), "eval is disabled");
        let script =
            ScriptFile::from_text(&host, "fn f() { import \"x\" as m; 1 }", "m.rhai").unwrap();
        let err = host
            .call(&script, "f", &mut Dynamic::from(()), (), "importing")
            .unwrap_err();
        assert!(err.message.contains('x'), "{err}");
    }

    #[test]
    fn refresh_picks_up_edits_and_keeps_the_old_version_on_a_broken_one() {
        let dir = std::env::temp_dir().join(format!("fedtune-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.rhai");
        std::fs::write(&path, "fn v() { 1 }").unwrap();
        let host = host();
        let mut script = ScriptFile::load(&host, &path).unwrap();
        let value = |s: &ScriptFile| {
            host.call(s, "v", &mut Dynamic::from(()), (), "t")
                .unwrap()
                .as_int()
                .unwrap()
        };
        assert_eq!(value(&script), 1);
        assert!(!script.refresh(&host).unwrap(), "unchanged");
        std::fs::write(&path, "fn v() { 2 }").unwrap();
        assert!(script.refresh(&host).unwrap());
        assert_eq!(value(&script), 2);
        std::fs::write(&path, "fn v() { 3 ").unwrap();
        let err = script.refresh(&host).unwrap_err();
        assert_eq!(err.doing, "compiling");
        assert_eq!(value(&script), 2, "the previous version keeps running");
        assert!(
            !script.refresh(&host).unwrap(),
            "a broken edit is reported once"
        );
        assert_eq!(script.reloads(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
