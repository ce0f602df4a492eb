//! Differential privacy in whole courses (the least-squares trainer): the
//! accountant's ε in every round's record, central and local noise that
//! still lets a course learn and repeats with its seed, and courses refused
//! before they start when they would overspend their budget.

mod common;

use fedtune_kernel::course::{CourseReport, LeastSquaresTrainer, SyntheticSpec};
use fedtune_kernel::privacy::accountant;
use fedtune_kernel::{CourseConfig, Event};

fn config(text: &str) -> CourseConfig {
    CourseConfig::from_toml(text, "<test>").unwrap()
}

async fn run(cfg: &CourseConfig) -> CourseReport {
    let spec = SyntheticSpec {
        clients: 4,
        ..SyntheticSpec::default()
    };
    common::run_least_squares(cfg, LeastSquaresTrainer::synthetic(spec, 0.1, 5)).await
}

const BASE: &str = "[federate]\nrounds = 5\nclients = 4\nsample_clients = 2\nseed = 5\n";

fn final_test_loss(r: &CourseReport) -> f64 {
    r.loss_curve("test").last().unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_dp_reports_the_accountants_epsilon_every_round_and_still_learns() {
    let plain = run(&config(BASE)).await;
    let text = format!(
        "{BASE}[privacy]\ndp = \"central\"\nclip_norm = 2.0\nnoise_multiplier = 0.5\ndelta = 1e-5\n"
    );
    let dp = run(&config(&text)).await;
    let rounds: Vec<_> = dp
        .records
        .iter()
        .filter(|r| r.event == Event::Round)
        .collect();
    assert_eq!(rounds.len(), 5);
    for r in &rounds {
        // Two of four clients a round: q = 0.5.
        let want = accountant::epsilon(0.5, 0.5, r.round, 1e-5);
        assert_eq!(r.extra["dp_epsilon"], want, "round {}", r.round);
        assert_eq!(r.extra["dp_clip_norm"], 2.0);
        assert_eq!(r.extra["dp_noise_std"], 0.5 * 2.0 / 2.0);
    }
    assert!(rounds[4].extra["dp_epsilon"] > rounds[0].extra["dp_epsilon"]);
    let start = dp.loss_curve("test")[0].1;
    assert!(
        final_test_loss(&dp) < 0.5 * start,
        "{:?}",
        dp.loss_curve("test")
    );
    assert_ne!(
        dp.final_params, plain.final_params,
        "the noise moved the result"
    );
    // The noise follows the course seed: the same course again is identical.
    assert_eq!(run(&config(&text)).await.final_params, dp.final_params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dp_noises_each_client_and_repeats_with_its_seed() {
    let text =
        format!("{BASE}[privacy]\ndp = \"local\"\nclip_norm = 5.0\nnoise_multiplier = 0.05\nreproducible_local_noise = true\n");
    let plain = run(&config(BASE)).await;
    let dp = run(&config(&text)).await;
    assert_ne!(dp.final_params, plain.final_params);
    assert_eq!(run(&config(&text)).await.final_params, dp.final_params);
    let start = dp.loss_curve("test")[0].1;
    assert!(
        final_test_loss(&dp) < 0.5 * start,
        "{:?}",
        dp.loss_curve("test")
    );
    // Each client's ε if it had taken part in every round so far: the
    // server's sampling hides nothing from the server.
    for r in dp.records.iter().filter(|r| r.event == Event::Round) {
        assert_eq!(
            r.extra["dp_epsilon"],
            accountant::epsilon(1.0, 0.05, r.round, 1e-5)
        );
        assert!(
            !r.extra.contains_key("dp_noise_std"),
            "the server adds no noise"
        );
    }
}

#[test]
fn a_course_over_its_budget_or_with_a_median_strategy_is_refused_with_the_key() {
    let over = format!(
        "{BASE}[privacy]\ndp = \"central\"\nnoise_multiplier = 0.5\ntarget_epsilon = 1.0\n"
    );
    let err = CourseConfig::from_toml(&over, "course.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("course.toml:9"), "{err}");
    assert!(err.contains("privacy.target_epsilon"), "{err}");
    assert!(err.contains("raise privacy.noise_multiplier to"), "{err}");
    let median = format!("{BASE}[aggregator]\nscript = \"median\"\n[privacy]\ndp = \"central\"\n");
    let err = CourseConfig::from_toml(&median, "course.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("aggregator.script") && err.contains("each client's own update"),
        "{err}"
    );
    let typo = format!("{BASE}[privacy]\ndp = \"centrall\"\n");
    let err = CourseConfig::from_toml(&typo, "course.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("privacy.dp") && err.contains("central"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_course_with_adaptive_clipping_ends_bit_for_bit_where_an_uninterrupted_one_does()
{
    use std::sync::{Arc, Mutex};

    use fedtune_kernel::course::{run_in_process_from, ServerSetup};
    use fedtune_kernel::{Checkpoints, FedAvg, MetricsLog, MsgpackStore};

    let text = format!(
        "{BASE}[privacy]\ndp = \"central\"\nclip_norm = 0.5\nnoise_multiplier = 0.3\nadaptive_clip = true\ncount_noise = 1.0\n"
    );
    let trainer = || {
        let spec = SyntheticSpec {
            clients: 4,
            ..SyntheticSpec::default()
        };
        LeastSquaresTrainer::synthetic(spec, 0.1, 5)
    };
    let dir = std::env::temp_dir().join(format!("fedtune-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let course = |text: &str, checkpoints: Option<Checkpoints>, resume: bool| {
        let cfg = config(text);
        let t = trainer();
        let mut setup = ServerSetup::new(
            cfg,
            t.initial_params(),
            Box::new(FedAvg),
            MetricsLog::in_memory(),
        );
        if let Some(cp) = checkpoints {
            if resume {
                let found = cp.latest().unwrap().unwrap();
                setup = setup.resumed_from(found).unwrap();
            }
            setup = setup.with_checkpoints(cp);
        }
        run_in_process_from(setup, Arc::new(Mutex::new(t)))
    };
    let full = course(&text, None, false).await.unwrap();
    let cp = || Checkpoints::new(&dir, 1, Arc::new(MsgpackStore));
    course(&text.replace("rounds = 5", "rounds = 3"), Some(cp()), false)
        .await
        .unwrap();
    let resumed = course(&text, Some(cp()), true).await.unwrap();
    assert_eq!(resumed.final_params, full.final_params, "bit for bit");
    // The clip norm moved, and the resumed course started from the moved one.
    let clip = |r: &CourseReport, round: u64| {
        r.records
            .iter()
            .find(|x| x.event == Event::Round && x.round == round)
            .unwrap()
            .extra["dp_clip_norm"]
    };
    assert_ne!(clip(&full, 4), 0.5);
    assert_eq!(clip(&resumed, 4), clip(&full, 4));
    let _ = std::fs::remove_dir_all(&dir);
}

/// By default a client's local noise comes from the OS, not from the
/// course seed the server knows: the same course twice draws other noise
/// (with the seed-derived noise the server could redraw and remove it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_noise_is_not_derived_from_the_config_unless_asked() {
    let text =
        format!("{BASE}[privacy]\ndp = \"local\"\nclip_norm = 5.0\nnoise_multiplier = 0.05\n");
    let a = run(&config(&text)).await;
    let b = run(&config(&text)).await;
    assert_ne!(a.final_params, b.final_params);
    let seeded = format!("{text}reproducible_local_noise = true\n");
    assert_eq!(
        run(&config(&seeded)).await.final_params,
        run(&config(&seeded)).await.final_params
    );
}
