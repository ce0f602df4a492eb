//! Scripted aggregation in whole courses: hot reload and failure policy.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fedtune_kernel::course::{run_in_process, LeastSquaresTrainer, SyntheticSpec};
use fedtune_kernel::script::{ScriptAggregator, ScriptHost, ScriptSource, ScriptingSection};
use fedtune_kernel::{
    aggregate_fedavg, AggregateError, Aggregator, ClientUpdate, CourseConfig, MetricsLog, ParamSet,
};

fn script(scale: f64) -> String {
    format!(
        "// Scales the averaged update.\nfn aggregate(global, updates, round) {{\n    global + (weighted_mean(updates) - global) * {scale:?}\n}}\n"
    )
}

/// One round as the aggregator saw it: round, global in, updates, global out.
type Seen = (u64, ParamSet, Vec<ClientUpdate>, ParamSet);

/// What the aggregator saw and returned, per round; after round `edit_after`
/// it rewrites the script file, as a user editing it mid-course would.
struct Watch {
    inner: ScriptAggregator,
    path: PathBuf,
    edit_after: u64,
    new_text: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Aggregator for Watch {
    fn name(&self) -> &str {
        "watch"
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError> {
        let next = self.inner.aggregate(global, updates, round)?;
        self.seen
            .lock()
            .unwrap()
            .push((round, global.clone(), updates.to_vec(), next.clone()));
        if round == self.edit_after {
            std::fs::write(&self.path, &self.new_text).unwrap();
        }
        Ok(next)
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedtune-scripts-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_aggregator_during_a_course_changes_the_next_round() {
    let dir = tempdir("reload");
    let path = dir.join("scaled.rhai");
    std::fs::write(&path, script(1.0)).unwrap();
    let cfg = CourseConfig::from_toml("[federate]\nrounds = 4\nclients = 3\n", "<t>").unwrap();
    let task = LeastSquaresTrainer::synthetic(SyntheticSpec::default(), 0.1, 5);
    let initial = task.initial_params();
    let host = ScriptHost::new(&ScriptingSection::default());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watch = Watch {
        inner: ScriptAggregator::new(host, &ScriptSource::File(path.clone()), &Default::default())
            .unwrap(),
        path: path.clone(),
        edit_after: 2,
        new_text: script(0.25),
        seen: seen.clone(),
    };
    run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(task)),
        Box::new(watch),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    for (round, global, updates, next) in seen.iter() {
        let mean = aggregate_fedavg(updates).unwrap();
        let step = next.sub(global).unwrap();
        let full = mean.sub(global).unwrap();
        // Rounds 1–2 ran the original script (scale 1), rounds 3–4 the edited one (0.25).
        let scale = if *round <= 2 { 1.0 } else { 0.25 };
        let off = step.sub(&full.scale(scale)).unwrap().l2_norm();
        assert!(
            off <= 1e-5 * full.l2_norm().max(1.0),
            "round {round}: the update was not scaled by {scale} (off by {off})"
        );
        assert!(
            full.l2_norm() > 1e-3,
            "round {round}: a trivial update proves nothing"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_stops_the_course_with_file_and_line() {
    let dir = tempdir("fail");
    let path = dir.join("broken.rhai");
    std::fs::write(
        &path,
        "fn aggregate(global, updates, round) {\n    let x = weighted_mean(updates);\n    x + global[\"missing\"]\n}\n",
    )
    .unwrap();
    let cfg = CourseConfig::from_toml("[federate]\nrounds = 2\nclients = 2\n", "<t>").unwrap();
    let task = LeastSquaresTrainer::synthetic(SyntheticSpec::default(), 0.1, 2);
    let initial = task.initial_params();
    let agg = ScriptAggregator::new(
        ScriptHost::new(&ScriptingSection::default()),
        &ScriptSource::File(path.clone()),
        &Default::default(),
    )
    .unwrap();
    let err = run_in_process(
        &cfg,
        initial,
        Arc::new(Mutex::new(task)),
        Box::new(agg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap_err()
    .to_string();
    let at = format!("{}:3:", path.display());
    assert!(err.contains(&at), "names file and line: {err}");
    assert!(err.contains("missing") && err.contains("round 1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A script aggregator of `text` under `limits`.
fn aggregator(text: &str, limits: &ScriptingSection) -> ScriptAggregator {
    let text: &'static str = Box::leak(text.to_string().into_boxed_str());
    ScriptAggregator::new(
        ScriptHost::new(limits),
        &ScriptSource::BuiltIn {
            name: "probe",
            text,
        },
        &toml::Table::new(),
    )
    .unwrap()
}

fn global(n: usize) -> ParamSet {
    let mut p = ParamSet::new();
    p.insert("w", vec![n], vec![0.5; n]).unwrap();
    p
}

#[test]
fn script_limits_that_would_mean_unlimited_or_overflow_the_stack_are_refused() {
    for (set, says) in [
        ("max_operations = 0", "scripting.max_operations"),
        ("max_array_size = 0", "scripting.max_array_size"),
        ("max_tensor_mib = 0", "scripting.max_tensor_mib"),
        ("max_call_levels = 1000000", "at most 256"),
    ] {
        let err = CourseConfig::from_toml(&format!("[scripting]\n{set}\n"), "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{set}: {err}");
        assert!(err.starts_with("c.toml:2:"), "{set}: {err}");
    }
}

#[test]
fn recursion_at_the_deepest_allowed_level_fails_the_call_not_the_process() {
    // Scripts run on 2 MiB stacks (tokio's workers and blocking threads).
    let outcome = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let limits = ScriptingSection {
                max_call_levels: fedtune_kernel::script::MAX_CALL_LEVELS,
                max_operations: 100_000_000,
                ..ScriptingSection::default()
            };
            let mut a = aggregator(
                "fn f(x) { if x == 0 { 0 } else { 1 + f(x - 1) } }\nfn aggregate(g, u, r) { f(1000000); g }",
                &limits,
            );
            let g = global(1);
            let u = [ClientUpdate::new(1, 1, g.clone())];
            a.aggregate(&g, &u, 1).unwrap_err().to_string()
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    assert!(outcome.contains("max_call_levels"), "{outcome}");
}

#[test]
fn a_script_hoarding_tensors_stops_at_its_memory_budget() {
    let limits = ScriptingSection {
        max_tensor_mib: 1,
        ..ScriptingSection::default()
    };
    let mut a = aggregator(
        "fn aggregate(g, u, r) { let keep = []; for i in 0..100000 { keep.push(g * 2.0); } g }",
        &limits,
    );
    let g = global(100_000); // 0.4 MB: the third copy passes 1 MiB
    let u = [ClientUpdate::new(1, 1, g.clone())];
    let err = a.aggregate(&g, &u, 1).unwrap_err().to_string();
    assert!(err.contains("scripting.max_tensor_mib"), "{err}");
    // The budget is per call: a modest script runs again afterwards.
    let mut b = aggregator("fn aggregate(g, u, r) { g * 2.0 + g }", &limits);
    assert!(b.aggregate(&g, &u, 1).is_ok());
}
