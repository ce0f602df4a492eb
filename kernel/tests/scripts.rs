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
