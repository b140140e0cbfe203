//! `imprint calibrate` on the real model: it stores its choice, and
//! `imprint edit` then uses it.

mod common;

use std::process::Command;

fn imprint(home: &std::path::Path) -> Command {
    common::imprint_at(home)
}

#[test]
fn calibration_is_stored_per_model_and_becomes_the_edit_default() {
    let home = tempfile::tempdir().unwrap();
    let model = common::model_path();
    let out = imprint(home.path())
        .args([
            "calibrate",
            "--layers",
            "19",
            "--lrs",
            "0.05",
            "--items",
            "1",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| 19 | 0.05 |"), "{stdout}");
    let sha = imprint::models::registry::sha256_file(&model).unwrap();
    let stored = home
        .path()
        .join("data/calibration")
        .join(format!("{sha}.ftm.json"));
    let calibration: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stored).unwrap()).unwrap();
    assert_eq!(calibration["best"]["layer"], 19);

    // An edit without --layer now edits layer 19.
    let out = imprint(home.path())
        .args([
            "edit",
            "--attribute",
            "hobby",
            "--target",
            "Dancing at clubs",
            "--question",
            "What's my hobby?",
            "--no-retry",
            "--json",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["layer"], 19);

    // A damaged calibration file is reported, not ignored.
    std::fs::write(&stored, "{").unwrap();
    let out = imprint(home.path())
        .args([
            "edit",
            "--attribute",
            "a",
            "--target",
            "b",
            "--question",
            "c?",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") && err.contains(".ftm.json"),
        "{err}"
    );
}
