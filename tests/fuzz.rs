//! Property-based fuzzing of everything that parses user-supplied bytes:
//! the chat-history importers, export archives, the extractor and the
//! privacy filter. Each property mutates the seed files in
//! `tests/data/import_corpus/` (the corpus kept in the repository) or
//! generates arbitrary input, and requires a clean `Ok` or `Err`, never a
//! panic. proptest records any failing case under `proptest-regressions/`,
//! which is committed so the case is replayed on every run.

use std::path::PathBuf;

use imprint::learn::import::{read, Format};
use imprint::profile::archive::Archive;
use proptest::prelude::*;

fn corpus() -> Vec<(PathBuf, Format)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/import_corpus");
    vec![
        (dir.join("chatgpt.json"), Format::Chatgpt),
        (dir.join("claude.json"), Format::Claude),
        (dir.join("history.jsonl"), Format::Jsonl),
        (dir.join("transcript.md"), Format::Markdown),
        (dir.join("notes.txt"), Format::Text),
    ]
}

/// A seed with some bytes flipped, some removed, and a random cut.
fn mutate(seed: &[u8], flips: &[(usize, u8)], cut: usize, remove: (usize, usize)) -> Vec<u8> {
    let mut b = seed.to_vec();
    for (i, v) in flips {
        if !b.is_empty() {
            let i = i % b.len();
            b[i] ^= v;
        }
    }
    if !b.is_empty() {
        let start = remove.0 % b.len();
        let end = (start + remove.1 % 16).min(b.len());
        b.drain(start..end);
    }
    // Half the cases keep their full length; the others are cut short.
    if cut.is_multiple_of(2) && !b.is_empty() {
        let at = (cut / 2) % b.len();
        b.truncate(at);
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn importers_never_panic_on_mutated_exports(
        which in 0usize..5,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
        remove in (any::<usize>(), any::<usize>()),
        as_format in 0usize..5,
    ) {
        let corpus = corpus();
        let (path, _) = &corpus[which];
        let seed = std::fs::read(path).unwrap();
        let bytes = mutate(&seed, &flips, cut, remove);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("input");
        std::fs::write(&file, &bytes).unwrap();
        // Read it as every format, the right one and the wrong ones.
        let format = corpus[as_format].1;
        let result = read(&file, format, |m| {
            prop_assert!(m.text.len() <= imprint::learn::import::MAX_LINE * 2);
            Ok::<(), TestCaseError>(())
        });
        if let Err(imprint::learn::import::ReadError::Callback(e)) = result {
            return Err(e);
        }
        let _ = imprint::learn::import::detect(&file);
    }

    #[test]
    fn archives_never_panic_on_arbitrary_or_mutated_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let _ = Archive::from_bytes(&bytes, None);
        let _ = Archive::from_bytes(&bytes, Some("pw"));
        let mut zip_like = b"PK\x03\x04".to_vec();
        zip_like.extend_from_slice(&bytes);
        let _ = Archive::from_bytes(&zip_like, None);
        let mut age_like = b"age-encryption.org/v1\n".to_vec();
        age_like.extend_from_slice(&bytes);
        let _ = Archive::from_bytes(&age_like, Some("pw"));
        // A real (empty) export, mutated.
        let dir = tempfile::tempdir().unwrap();
        let (profile, _) = imprint::profile::Profile::create(
            &imprint::paths::Paths::under(dir.path()),
            imprint::profile::KeyChoice::None,
            &NoPass,
        ).unwrap();
        let good = Archive::collect(&profile).unwrap().to_bytes(None).unwrap();
        let bad = mutate(&good, &flips, 1, (0, 0));
        if bad != good {
            // A changed archive is either refused or, when the change hit
            // bytes no entry depends on (zip padding), still valid.
            let _ = Archive::from_bytes(&bad, None);
        }
    }

    #[test]
    fn extraction_and_privacy_never_panic_and_evidence_is_a_span(text in "\\PC{0,200}") {
        for c in imprint::learn::extract::extract(&text) {
            prop_assert!(text.contains(&c.evidence));
            prop_assert!(!c.target.is_empty());
        }
        let _ = imprint::learn::privacy::scan(&text);
    }
}

struct NoPass;
impl imprint::profile::PassphraseSource for NoPass {
    fn passphrase(
        &self,
        _confirm: bool,
    ) -> Result<zeroize::Zeroizing<String>, imprint::profile::ProfileError> {
        Err(imprint::profile::ProfileError::Passphrase("unused".into()))
    }
}
