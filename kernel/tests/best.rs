//! `federate.keep_best` and `early_stop_patience` in whole courses (the
//! least-squares trainer) whose loss is forced to rise after round 2: the
//! best is round 2's parameters, the course stops after `patience`
//! evaluations without improvement, and a resumed course keeps the best an
//! uninterrupted one found.

use std::sync::{Arc, Mutex};

use fedtune_kernel::aggregate::{AggregateError, ClientUpdate};
use fedtune_kernel::course::{
    run_in_process_from, CourseReport, LeastSquaresTrainer, ServerSetup, SyntheticSpec,
};
use fedtune_kernel::{
    Aggregator, Checkpoints, CourseConfig, FedAvg, MetricsLog, MsgpackStore, ParamSet,
};

/// FedAvg for rounds 1 and 2; from round 3 on, the mean pushed far off (a
/// course whose loss rises).
struct SpoiledAfterTwo;

impl Aggregator for SpoiledAfterTwo {
    fn name(&self) -> &str {
        "spoiled-after-two"
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError> {
        let mean = FedAvg.aggregate(global, updates, round)?;
        Ok(if round <= 2 {
            mean
        } else {
            mean.map_values(|v| v + 0.5)
        })
    }
}

fn config(rounds: u64, extra: &str) -> CourseConfig {
    let text = format!(
        "[federate]\nrounds = {rounds}\nclients = 3\nseed = 9\nkeep_best = \"test_loss\"\n{extra}"
    );
    CourseConfig::from_toml(&text, "<test>").unwrap()
}

async fn run(cfg: CourseConfig, checkpoints: Option<(Checkpoints, bool)>) -> CourseReport {
    // 41 rows a client: batches that do not divide evenly.
    let spec = SyntheticSpec {
        clients: 3,
        samples_per_client: 41,
        ..SyntheticSpec::default()
    };
    let t = LeastSquaresTrainer::synthetic(spec, 0.1, 5);
    let mut setup = ServerSetup::new(
        cfg,
        t.initial_params(),
        Box::new(SpoiledAfterTwo),
        MetricsLog::in_memory(),
    );
    if let Some((cp, resume)) = checkpoints {
        if resume {
            setup = setup.resumed_from(cp.latest().unwrap().unwrap()).unwrap();
        }
        setup = setup.with_checkpoints(cp);
    }
    run_in_process_from(setup, Arc::new(Mutex::new(t)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_best_round_is_kept_and_patience_ends_the_course() {
    let two = run(config(2, ""), None).await;
    let full = run(config(8, ""), None).await;
    let curve = full.loss_curve("test");
    assert!(
        curve[3].1 > curve[2].1,
        "the loss rose after round 2: {curve:?}"
    );
    let best = full.best.clone().unwrap();
    assert_eq!(best.round, 2);
    assert_eq!(
        best.params, two.final_params,
        "round 2's parameters, bit for bit"
    );
    assert_eq!(best.loss, curve[2].1);
    assert_ne!(full.final_params, best.params);
    assert_eq!(full.stopped_early, None, "no patience set");
    assert_eq!(curve.len(), 9);

    // Patience 2: evaluations after rounds 3 and 4 do not improve; stop.
    let stopped = run(config(8, "early_stop_patience = 2\n"), None).await;
    assert_eq!(stopped.stopped_early, Some(4));
    assert_eq!(stopped.loss_curve("test").len(), 5, "rounds 0–4 evaluated");
    assert_eq!(stopped.best.unwrap().params, two.final_params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_course_keeps_the_best_an_uninterrupted_one_found() {
    let dir = std::env::temp_dir().join(format!("fedtune-best-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cp = || Checkpoints::new(&dir, 1, Arc::new(MsgpackStore));
    let patience = "early_stop_patience = 3\n";
    let straight = run(config(8, patience), None).await;
    // Interrupted after round 4, when the best (round 2) lies behind.
    run(config(4, patience), Some((cp(), false))).await;
    let resumed = run(config(8, patience), Some((cp(), true))).await;
    assert_eq!(straight.stopped_early, Some(5));
    assert_eq!(resumed.stopped_early, straight.stopped_early);
    assert_eq!(resumed.best, straight.best);
    assert_eq!(resumed.final_params, straight.final_params);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn settings_that_cannot_work_are_refused_with_the_key() {
    let text = "[federate]\nrounds = 2\nearly_stop_patience = 2\n";
    let e = CourseConfig::from_toml(text, "c.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("federate.early_stop_patience") && e.contains("keep_best"),
        "{e}"
    );
    let text = "[federate]\nrounds = 2\nkeep_best = \"accuracy\"\n";
    let e = CourseConfig::from_toml(text, "c.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c.toml:3") && e.contains("federate.keep_best"),
        "{e}"
    );
}
