//! The `imprint` binary as a user runs it.

mod common;

use std::process::Command;

fn imprint(home: &std::path::Path) -> Command {
    let mut cmd = common::imprint_at(home);
    cmd.env_remove("IMPRINT_LOG");
    cmd
}

#[test]
fn ask_streams_a_greedy_answer_and_exits_zero() {
    let home = tempfile::tempdir().unwrap();
    let model = common::model_path();
    let run = || {
        imprint(home.path())
            .args(["ask", "--greedy", "--max-tokens", "20", "--model"])
            .arg(&model)
            .arg("What is the capital of France?")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(!answer.trim().is_empty());
    assert_eq!(
        answer,
        String::from_utf8(run().stdout).unwrap(),
        "greedy is deterministic"
    );
}

#[test]
fn model_add_registers_a_real_gguf_and_refuses_garbage() {
    let home = tempfile::tempdir().unwrap();
    let out = imprint(home.path())
        .args(["model", "add", "--name", "smol"])
        .arg(common::model_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = imprint(home.path())
        .args(["model", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    assert!(list.contains("* smol"), "{list}");

    let garbage = home.path().join("garbage.gguf");
    std::fs::write(&garbage, vec![7u8; 1000]).unwrap();
    let out = imprint(home.path())
        .args(["model", "add"])
        .arg(&garbage)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("garbage.gguf") && err.contains("not a GGUF"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn ask_with_a_missing_model_fails_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let out = imprint(home.path())
        .args(["ask", "--model", "/nope/missing.gguf", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("/nope/missing.gguf") && err.contains("does not exist"),
        "{err}"
    );
    // With no model at all, the user is told how to get one.
    let out = imprint(home.path()).args(["ask", "hi"]).output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("imprint model pull"), "{err}");
}

#[test]
fn config_show_names_where_each_value_comes_from() {
    let home = tempfile::tempdir().unwrap();
    let config_dir = home.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.toml"),
        "[engine]\ncontext_size = 1024\n",
    )
    .unwrap();
    let out = imprint(home.path())
        .args(["config", "show"])
        .env("IMPRINT_GENERATION_MAX_TOKENS", "77")
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("context_size = 1024    # ") && shown.contains("config.toml"),
        "{shown}"
    );
    assert!(
        shown.contains("max_tokens = 77    # environment variable IMPRINT_GENERATION_MAX_TOKENS"),
        "{shown}"
    );
    assert!(
        shown.contains("threads = 0    # built-in default"),
        "{shown}"
    );

    std::fs::write(
        config_dir.join("config.toml"),
        "[engine]\ncontext_sise = 1024\n",
    )
    .unwrap();
    let out = imprint(home.path())
        .args(["config", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("context_sise"));

    // The editor's anchor mode is a choice among names, checked on load.
    std::fs::remove_file(config_dir.join("config.toml")).unwrap();
    let out = imprint(home.path())
        .args(["config", "show"])
        .env("IMPRINT_EDITOR_ANCHORS", "loss")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("anchors = \"loss\"    # environment variable IMPRINT_EDITOR_ANCHORS"));
    let out = imprint(home.path())
        .args(["config", "show"])
        .env("IMPRINT_EDITOR_ANCHORS", "fast")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("editor.anchors") && err.contains("keys") && err.contains("fast"),
        "{err}"
    );
}

#[test]
fn a_target_margin_that_is_not_a_finite_number_is_refused_before_any_work() {
    let home = tempfile::tempdir().unwrap();
    for bad in ["nan", "inf", "one"] {
        let out = imprint(home.path())
            .args([
                "edit",
                "--attribute",
                "hobby",
                "--target",
                "Dancing",
                "--question",
                "What's my hobby?",
                "--target-margin",
                bad,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("--target-margin") && err.contains("number of logits"),
            "{bad}: {err}"
        );
    }
}
