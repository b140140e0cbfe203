//! `imprint eval upqa` end to end on the real model and the real benchmark
//! files (read in place from ../shared/data). These check that the harness
//! runs and its reports are well-formed, not what it scores.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `../shared/data/upqa` beside the repository, or IMPRINT_SHARED_DATA/upqa.
fn upqa_dir() -> PathBuf {
    let root = std::env::var_os("IMPRINT_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let dir = root.join("upqa");
    assert!(
        dir.join("balanced_subset.json").is_file(),
        "UPQA data missing at {}: the benchmark folder must sit beside the repository (../shared/data) or be named by IMPRINT_SHARED_DATA",
        dir.display()
    );
    dir
}

/// The CLI, pinned to one thread: the test harness runs two of these at once
/// on a two-core machine, and llama.cpp's OpenMP workers spin while they
/// wait, so two 2-thread processes slow each other down many times over.
fn imprint() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imprint"));
    cmd.env("IMPRINT_ENGINE_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("OMP_WAIT_POLICY", "passive");
    cmd
}

fn eval(method: &str, extra: &[&str]) -> serde_json::Value {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("report");
    let data = upqa_dir();
    let status = imprint()
        .env("IMPRINT_HOME", home.path())
        .args(["eval", "upqa", "--method", method, "--model"])
        .arg(common::model_path())
        .arg("--data")
        .arg(data.join("balanced_subset.json"))
        .arg("--clusters")
        .arg(data.join("balanced_subset_cluster9.json"))
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| method | explicit | paraphrased | implicit | product |"),
        "{md}"
    );
    assert_png(&out.join("accuracy.png"));
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn check_shape(report: &serde_json::Value, items: usize) {
    assert_eq!(report["items"], items);
    let scores = report["scores"].as_array().unwrap();
    let kinds: Vec<&str> = scores.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["explicit", "paraphrased", "implicit", "product"]);
    for s in scores {
        assert_eq!(s["n"], items);
        let acc = s["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    assert_eq!(report["model_sha256"].as_str().unwrap().len(), 64);
    for r in report["results"].as_array().unwrap() {
        assert_eq!(r["questions"].as_array().unwrap().len(), 4);
    }
}

#[test]
fn prompt_baseline_smoke_run_on_five_items() {
    let report = eval("prompt", &["--limit", "5"]);
    check_shape(&report, 5);
    assert!(report["edits_accepted"].is_null());
}

#[test]
fn rag_baseline_smoke_run_on_three_items() {
    let report = eval("rag", &["--limit", "3"]);
    check_shape(&report, 3);
    assert_eq!(report["method"], "rag");
}

#[test]
fn ftm_sequential_smoke_run_on_five_items() {
    // One item of each of five attribute types, one training question each.
    let report = eval(
        "ftm",
        &["--every", "20", "--limit", "5", "--cluster-size", "1"],
    );
    check_shape(&report, 5);
    assert_eq!(
        report["profiles"], 1,
        "five attribute types fit one profile"
    );
    let accepted = report["edits_accepted"].as_u64().unwrap();
    assert!(accepted <= 5);
    // The cost of a run: the process's peak memory, in MB (read from
    // /proc on Linux; absent elsewhere).
    if cfg!(target_os = "linux") {
        let rss = report["peak_rss_mb"].as_f64().unwrap();
        assert!(rss > 50.0 && rss < 24_000.0, "peak RSS {rss} MB");
    }
    for r in report["results"].as_array().unwrap() {
        assert!(r["edit_seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(r["training_questions"].as_array().unwrap().len(), 1);
    }
    // Sequential edit runs measure the whole profile's locality.
    let l = &report["locality"];
    let total = l["unrelated_total"].as_u64().unwrap();
    assert!(total >= 90, "{l}");
    assert!(l["unrelated_unchanged"].as_u64().unwrap() <= total);
    assert_eq!(l["knowledge_total"], 100);
    assert!(l["perplexity_before"].as_f64().unwrap() > 1.0);
    assert!(l["perplexity_after"].as_f64().unwrap() > 1.0);
}

#[test]
fn held_out_explicit_trains_on_the_cluster_questions_before_it() {
    let report = eval(
        "ftm",
        &[
            "--limit",
            "1",
            "--cluster-size",
            "2",
            "--hold-out-explicit",
            "--no-locality",
        ],
    );
    check_shape(&report, 1);
    assert_eq!(report["explicit_held_out"], true);
    let r = &report["results"][0];
    let explicit = r["questions"][0]["question"].as_str().unwrap();
    let trained: Vec<&str> = r["training_questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap())
        .collect();
    assert_eq!(trained.len(), 2);
    assert!(
        !trained.contains(&explicit),
        "{trained:?} holds {explicit:?}"
    );
    assert!(report["locality"].is_null());
    // UPQA's cluster questions ask "What's your …"; the edit trains on them
    // as the user would ask them, about themself.
    assert_eq!(report["cluster_person"], "first");
    for q in &trained {
        let words: Vec<String> = q
            .split(|c: char| !c.is_alphanumeric())
            .map(str::to_lowercase)
            .collect();
        assert!(
            !words.iter().any(|w| w == "you" || w == "your"),
            "{q:?} still asks the listener"
        );
    }
}

#[test]
fn multi_turn_prompt_in_first_turn_with_the_papers_budget() {
    let report = eval(
        "prompt-turn",
        &["--limit", "2", "--turns", "2", "--paper-budget"],
    );
    check_shape(&report, 2);
    assert_eq!(report["style"]["turns"], 2);
    assert_eq!(report["style"]["paper_budget"], true);
    assert!(report["max_new_tokens_rule"]
        .as_str()
        .unwrap()
        .contains("paper"));
}

/// Runs `imprint eval prefeval` on the first two items into `home/report`
/// and returns its report.json.
fn prefeval(home: &std::path::Path, method: &str, extra: &[&str]) -> serde_json::Value {
    let out = home.join("report");
    let data = upqa_dir().join("../prefeval/prefeval_pro_balanced.json");
    let status = imprint()
        .env("IMPRINT_HOME", home)
        .args(["eval", "prefeval", "--method", method, "--model"])
        .arg(common::model_path())
        .arg("--data")
        .arg(&data)
        .args(["--limit", "2"])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn prefeval_smoke_run_reports_a_rate_per_turn_count() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("report");
    let report = prefeval(
        home.path(),
        "prompt-turn",
        &["--turns", "0,2", "--max-tokens", "16"],
    );
    let rates = report["rates"].as_array().unwrap();
    let turns: Vec<u64> = rates.iter().map(|r| r["turns"].as_u64().unwrap()).collect();
    assert_eq!(turns, [0, 2]);
    for r in rates {
        assert_eq!(r["total"], 2);
        assert!(r["acknowledged"].as_u64().unwrap() <= 2);
    }
    assert_eq!(report["answers"].as_array().unwrap().len(), 4);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| turns | acknowledged |"), "{md}");
    assert_png(&out.join("acknowledgment.png"));

    // Several runs into one chart and one table: this run twice, under two
    // folder names.
    let copy = home.path().join("second-run");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(out.join("report.json"), copy.join("report.json")).unwrap();
    let charts = home.path().join("charts");
    let status = imprint()
        .env("IMPRINT_HOME", home.path())
        .args(["eval", "chart"])
        .arg(&out)
        .arg(&copy)
        .arg("--out")
        .arg(&charts)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_png(&charts.join("acknowledgment.png"));
    let summary = std::fs::read_to_string(charts.join("summary.md")).unwrap();
    assert_eq!(summary.matches("| prompt-turn |").count(), 2, "{summary}");
    assert!(summary.contains("| second-run |"), "{summary}");
    // A file that is no report is refused by name, and nothing is drawn.
    std::fs::write(copy.join("report.json"), "{\"hello\": 1}").unwrap();
    let status = imprint()
        .env("IMPRINT_HOME", home.path())
        .args(["eval", "chart"])
        .arg(&copy)
        .arg("--out")
        .arg(home.path().join("charts2"))
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("second-run/report.json"), "{err}");
}

#[test]
fn prefeval_rag_retrieves_the_stated_preferences() {
    let home = tempfile::tempdir().unwrap();
    let report = prefeval(home.path(), "rag", &["--turns", "0", "--max-tokens", "8"]);
    assert_eq!(report["method"], "rag");
    assert_eq!(report["rates"][0]["total"], 2);
    assert_eq!(report["answers"].as_array().unwrap().len(), 2);
}

/// A PNG file of plausible size (the chart tests in `eval::charts` check
/// what is drawn).
fn assert_png(path: &std::path::Path) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("{} was not written: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert!(
        bytes.len() > 5_000,
        "{} is suspiciously small",
        path.display()
    );
}

#[test]
fn malformed_benchmark_files_get_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let bad = home.path().join("bad.json");
    std::fs::write(&bad, "[{\"topic\": 1}").unwrap();
    let out = imprint()
        .env("IMPRINT_HOME", home.path())
        .args(["eval", "prefeval", "--method", "none", "--model"])
        .arg(common::model_path())
        .arg("--data")
        .arg(&bad)
        .arg("--out")
        .arg(home.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.json") && err.contains("line 1"), "{err}");
}

#[test]
fn the_calibration_set_shares_nothing_with_upqa() {
    let mut texts = std::collections::HashSet::new();
    let dir = upqa_dir();
    for file in [
        "UPQA_1000.json",
        "balanced_subset_cluster9.json",
        "balanced_subset_200_cluster9.json",
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        for item in v.as_array().unwrap() {
            for key in [
                "question",
                "question_paraphrased",
                "implicit_question",
                "target",
            ] {
                match &item[key] {
                    serde_json::Value::String(s) => {
                        texts.insert(s.to_lowercase());
                    }
                    serde_json::Value::Array(a) => {
                        for s in a.iter().filter_map(|s| s.as_str()) {
                            texts.insert(s.to_lowercase());
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(texts.len() > 1000);
    for item in imprint::editor::calibrate::calibration_set(usize::MAX) {
        for q in item.request.questions.iter().chain([&item.held_out]) {
            assert!(!texts.contains(&q.to_lowercase()), "{q:?} is in UPQA");
        }
        assert!(
            !texts.contains(&item.request.target.to_lowercase()),
            "{:?}",
            item.request.target
        );
    }
}

/// `imprint eval extract` reads all 1000 UPQA sentences and the PrefEval
/// statements in place, and every planted secret in the negative set is
/// caught by the privacy filter before extraction.
#[test]
fn eval_extract_reports_and_never_extracts_secrets() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("report");
    let prefeval = upqa_dir().join("../prefeval/explicit_preference");
    let status = imprint()
        .env("IMPRINT_HOME", home.path())
        .args(["eval", "extract", "--data"])
        .arg(upqa_dir().join("UPQA_1000.json"))
        .arg("--prefeval")
        .arg(&prefeval)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["upqa_sentences"], 1000);
    assert!(report["prefeval_statements"].as_u64().unwrap() > 0);
    assert!(report["negatives"].as_u64().unwrap() >= 200);
    let secrets = &report["false_positives_by_category"]["secrets"];
    assert_eq!(secrets[0], 0, "a secret became a candidate: {secrets}");
    assert!(
        report["secrets_skipped"]["counts"]
            .as_object()
            .unwrap()
            .len()
            >= 5
    );
    let several = report["several_candidates"].as_u64().unwrap();
    let later = report["later_candidate_matches"].as_u64().unwrap();
    assert!(later <= several, "{later} > {several}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| target |"));
    assert!(md.contains("state more than one"));
}
