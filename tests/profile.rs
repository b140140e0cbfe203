//! The profile store on real SQLCipher files, with a real Secret Service
//! keyring (scripts/test.sh runs the suite inside `dbus-run-session` with an
//! unlocked gnome-keyring) and real child processes for the crash tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use imprint::editor::{Edit, EditMetrics, EditRequest, LoraFactors, Method};
use imprint::paths::Paths;
use imprint::profile::archive::{Archive, ArchiveError, ImportMode};
use imprint::profile::{
    ClusterMember, KeyChoice, NewPreference, PassphraseSource, Polarity, PreferenceStatus, Profile,
    ProfileError, Protection, SourceRef,
};
use zeroize::Zeroizing;

const MARKER: &str = "Zyxwquartz marker preference 7741";

struct Fixed(&'static str);
impl PassphraseSource for Fixed {
    fn passphrase(&self, _confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        Ok(Zeroizing::new(self.0.to_string()))
    }
}

fn home() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::under(dir.path());
    (dir, paths)
}

/// Keyring tests need a Secret Service. They fail (not skip) without one
/// unless the person running them opts out explicitly.
fn keyring_available() -> bool {
    match imprint::profile::key::keyring_reachable() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var_os("IMPRINT_SKIP_KEYRING_TESTS").is_some() {
                eprintln!("SKIPPED: no Secret Service ({e}) and IMPRINT_SKIP_KEYRING_TESTS is set");
                false
            } else {
                panic!("no Secret Service keyring is reachable ({e}). Run the suite with scripts/test.sh (it starts gnome-keyring inside dbus-run-session), or set IMPRINT_SKIP_KEYRING_TESTS=1 to skip these tests knowingly");
            }
        }
    }
}

fn preference(attribute: &str, target: &str, source: SourceRef) -> NewPreference {
    NewPreference {
        attribute: attribute.into(),
        target: target.into(),
        polarity: Polarity::Like,
        statement: format!("My {attribute} is {target}."),
        confidence: 0.9,
        status: PreferenceStatus::Active,
        source,
        cluster: vec![ClusterMember {
            attribute: attribute.into(),
            question: format!("What is my {attribute}?"),
        }],
    }
}

fn manual() -> SourceRef {
    SourceRef::Manual {
        note: "test".into(),
    }
}

/// A synthetic edit with pseudo-random factors (no model needed: the
/// store and the adapter writer only see numbers).
fn synthetic_edit(id: &str, seed: u32, sha: &str) -> Edit {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32) - 0.5
    };
    let (rank, n_in, n_out) = (2, 24, 16);
    Edit {
        id: id.into(),
        request: EditRequest {
            attribute: "hobby".into(),
            target: "chess".into(),
            questions: vec!["What is my hobby?".into()],
        },
        method: Method::Ftm,
        model_sha256: sha.into(),
        layer: 3,
        factors: vec![LoraFactors {
            tensor: "blk.3.ffn_down.weight".into(),
            rank,
            n_in,
            n_out,
            a: (0..rank * n_in).map(|_| next()).collect(),
            b: (0..n_out * rank).map(|_| next()).collect(),
        }],
        metrics: EditMetrics {
            efficacy_hits: 1,
            efficacy_total: 1,
            ..Default::default()
        },
        active: true,
        rejection: None,
        created: 1_700_000_000 + seed as u64,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file below `dirs` whose bytes contain `needle`.
fn files_containing(dirs: &[&Path], needle: &[u8]) -> Vec<PathBuf> {
    fn walk(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_symlink() {
                continue;
            }
            if p.is_dir() {
                walk(&p, needle, out);
            } else if std::fs::read(&p).is_ok_and(|b| contains(&b, needle)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(d, needle, &mut out);
    }
    out
}

fn all_bytes(profile_files: &[PathBuf]) -> Vec<u8> {
    profile_files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .flatten()
        .collect()
}

#[test]
fn keyring_profile_hides_the_marker_refuses_a_wrong_key_and_deletes_everything() {
    if !keyring_available() {
        return;
    }
    let (_dir, paths) = home();
    let (mut profile, notice) =
        Profile::create(&paths, KeyChoice::Keyring, &Fixed("unused")).unwrap();
    assert!(notice.is_none());
    let Protection::Keyring { user } = profile.protection().clone() else {
        panic!("expected a keyring profile, got {:?}", profile.protection());
    };
    assert!(imprint::profile::key::keyring_has(&user).unwrap());
    let id = profile
        .add_preference(&preference("favourite stone", MARKER, manual()))
        .unwrap();
    profile
        .save_edit(id, &synthetic_edit("e1", 1, "m"), None)
        .unwrap();
    let files = profile.files().clone();
    // While open, the WAL holds the data too: it must be encrypted as well.
    assert!(!contains(
        &all_bytes(&files.database_files()),
        MARKER.as_bytes()
    ));
    profile.close().unwrap();
    let on_disk = all_bytes(&files.database_files());
    assert!(on_disk.len() > 4096);
    assert!(
        !contains(&on_disk, MARKER.as_bytes()),
        "the marker is readable on disk"
    );
    assert!(
        !on_disk.starts_with(b"SQLite format 3"),
        "the header is plaintext"
    );
    // The key file names the entry but holds no key.
    let key_file = std::fs::read_to_string(&files.key_file).unwrap();
    assert!(key_file.contains(&user));

    // Reopens with the keyring's key and finds the marker.
    let profile = Profile::open(&paths, &Fixed("unused")).unwrap();
    assert_eq!(profile.preference(id).unwrap().target, MARKER);
    profile.close().unwrap();

    // A different key in the keyring: a clean refusal, and the file is untouched.
    let entry = keyring::Entry::new("imprint", &user).unwrap();
    let real = entry.get_password().unwrap();
    entry.set_password(&"ab".repeat(32)).unwrap();
    let before = std::fs::read(&files.db).unwrap();
    let err = Profile::open(&paths, &Fixed("unused")).unwrap_err();
    assert!(matches!(err, ProfileError::WrongKey(_)), "{err}");
    assert!(
        std::fs::read(&files.db).unwrap() == before,
        "the file was changed"
    );
    entry.set_password(&real).unwrap();

    // Deletion: files, adapters and the keyring entry go; nothing under
    // the data, cache or config dirs holds the marker.
    let profile = Profile::open(&paths, &Fixed("unused")).unwrap();
    profile
        .assemble_adapter(&paths.cache_dir, "m", "llama")
        .unwrap();
    profile.close().unwrap();
    assert!(files.adapters_dir.join("m.gguf").is_file());
    let receipt = imprint::profile::delete::delete_profile(&paths, &Fixed("unused")).unwrap();
    assert_eq!(receipt.preferences, Some(1));
    assert_eq!(
        receipt.keyring_entry.as_deref(),
        Some(format!("imprint/{user}").as_str())
    );
    assert!(receipt.removed.contains(&files.db));
    assert!(!files.db.exists() && !files.key_file.exists() && !files.adapters_dir.exists());
    assert!(!imprint::profile::key::keyring_has(&user).unwrap());
    let leftovers = files_containing(
        &[&paths.data_dir, &paths.cache_dir, &paths.config_dir],
        MARKER.as_bytes(),
    );
    assert!(leftovers.is_empty(), "marker left in {leftovers:?}");
}

#[test]
fn passphrase_profile_derives_its_key_and_rejects_a_wrong_passphrase() {
    let (_dir, paths) = home();
    let (mut profile, _) =
        Profile::create(&paths, KeyChoice::Passphrase, &Fixed("correct horse")).unwrap();
    assert!(matches!(
        profile.protection(),
        Protection::Passphrase { .. }
    ));
    profile
        .add_preference(&preference("city", MARKER, manual()))
        .unwrap();
    let db = profile.files().db.clone();
    profile.close().unwrap();
    assert!(!contains(&std::fs::read(&db).unwrap(), MARKER.as_bytes()));
    let err = Profile::open(&paths, &Fixed("wrong horse")).unwrap_err();
    assert!(
        matches!(err, ProfileError::WrongKey(ref m) if m.contains("passphrase")),
        "{err}"
    );
    let profile = Profile::open(&paths, &Fixed("correct horse")).unwrap();
    assert_eq!(profile.preferences(None).unwrap()[0].target, MARKER);
}

#[test]
fn plaintext_only_when_asked_and_it_says_so() {
    let (_dir, paths) = home();
    let (mut profile, _) = Profile::create(&paths, KeyChoice::None, &Fixed("x")).unwrap();
    assert_eq!(profile.protection(), &Protection::None);
    assert!(profile.protection().describe().contains("NOT encrypted"));
    profile
        .add_preference(&preference("city", MARKER, manual()))
        .unwrap();
    let db = profile.files().db.clone();
    profile.close().unwrap();
    // The contrast with the encrypted tests: here the marker is visible.
    assert!(contains(&std::fs::read(&db).unwrap(), MARKER.as_bytes()));
}

#[test]
fn files_are_private_to_the_user() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, paths) = home();
    let (mut profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p")).unwrap();
    profile
        .add_preference(&preference("city", "Porto", manual()))
        .unwrap();
    let files = profile.files().clone();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // While open: the database, its WAL and shared-memory files.
    let mut seen = 0;
    for f in files.database_files().iter().chain([&files.key_file]) {
        if f.exists() {
            assert_eq!(mode(f), 0o600, "{} is mode {:o}", f.display(), mode(f));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected the database, its WAL and the key file");
    assert_eq!(mode(&paths.data_dir), 0o700);
}

#[test]
fn damaged_database_gives_a_clear_error_and_is_left_alone() {
    let (_dir, paths) = home();
    let (mut profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p")).unwrap();
    profile
        .add_preference(&preference("city", "Porto", manual()))
        .unwrap();
    let db = profile.files().db.clone();
    profile.close().unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    for b in &mut bytes[100..4000] {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = Profile::open(&paths, &Fixed("p")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ProfileError::Corrupt { .. }), "{text}");
    assert!(
        text.contains(&db.display().to_string()),
        "the error names the file: {text}"
    );
    assert!(
        text.contains("import") || text.contains("delete"),
        "says what to do: {text}"
    );
    assert!(
        std::fs::read(&db).unwrap() == bytes,
        "the damaged file was changed"
    );
}

#[test]
fn a_newer_schema_is_refused_untouched() {
    let (_dir, paths) = home();
    let (profile, _) = Profile::create(&paths, KeyChoice::None, &Fixed("x")).unwrap();
    let db = profile.files().db.clone();
    profile.close().unwrap();
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        conn.execute_batch("PRAGMA journal_mode = DELETE").unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let err = Profile::open(&paths, &Fixed("x")).unwrap_err();
    assert!(
        matches!(err, ProfileError::NewerSchema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Upgrade imprint"));
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the file was changed"
    );
}

#[test]
fn a_missing_key_file_is_explained() {
    let (_dir, paths) = home();
    let (profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p")).unwrap();
    let key_file = profile.files().key_file.clone();
    profile.close().unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let err = Profile::open(&paths, &Fixed("p")).unwrap_err();
    assert!(err.to_string().contains("profile.key.json"), "{err}");
}

fn plain_profile_with_history() -> (tempfile::TempDir, Paths, Profile, [i64; 3]) {
    let (dir, paths) = home();
    let (mut profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p")).unwrap();
    let c1 = profile.create_conversation("morning").unwrap();
    let c2 = profile.create_conversation("evening").unwrap();
    let m1 = profile.add_message(c1, "user", "I love chess.").unwrap();
    profile.add_message(c1, "assistant", "Nice!").unwrap();
    let m2 = profile.add_message(c1, "user", "I live in Porto.").unwrap();
    let m3 = profile.add_message(c2, "user", "Porto is home.").unwrap();
    let only_c1 = profile
        .add_preference(&preference(
            "hobby",
            "chess",
            SourceRef::Message { message_id: m1 },
        ))
        .unwrap();
    let both = profile
        .add_preference(&preference(
            "city",
            "Porto",
            SourceRef::Message { message_id: m2 },
        ))
        .unwrap();
    profile
        .add_source(both, &SourceRef::Message { message_id: m3 })
        .unwrap();
    let manual_pref = profile
        .add_preference(&preference("drink", "tea", manual()))
        .unwrap();
    profile
        .save_edit(only_c1, &synthetic_edit("e-chess", 1, "m"), None)
        .unwrap();
    profile
        .save_edit(both, &synthetic_edit("e-porto", 2, "m"), None)
        .unwrap();
    profile
        .save_edit(manual_pref, &synthetic_edit("e-tea", 3, "m"), None)
        .unwrap();
    (dir, paths, profile, [only_c1, both, manual_pref])
}

#[test]
fn deleting_a_conversation_removes_preferences_learned_only_from_it() {
    let (_dir, _paths, mut profile, [only_c1, both, manual_pref]) = plain_profile_with_history();
    let c1 = profile
        .conversations()
        .unwrap()
        .into_iter()
        .find(|c| c.title == "morning")
        .unwrap()
        .id;
    let (removal, models) = profile.delete_conversation(c1).unwrap();
    assert_eq!(removal.messages, 3);
    assert_eq!(removal.preferences_removed, vec![only_c1]);
    assert_eq!(removal.preferences_kept, vec![both]);
    assert_eq!(models, vec!["m".to_string()]);
    assert!(matches!(
        profile.preference(only_c1),
        Err(ProfileError::UnknownPreference(_))
    ));
    assert!(profile.edits_for_preference(only_c1).unwrap().is_empty());
    let kept = profile.preference(both).unwrap();
    assert_eq!(
        kept.sources.len(),
        1,
        "the other conversation's source stays"
    );
    assert_eq!(profile.edits_for_preference(both).unwrap().len(), 1);
    assert!(profile.preference(manual_pref).is_ok());
    let active: Vec<String> = profile
        .active_edits("m")
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(active, vec!["e-porto".to_string(), "e-tea".to_string()]);
}

#[test]
fn forgetting_removes_the_preference_and_edits_and_logs_only_the_fact() {
    let (_dir, _paths, mut profile, [only_c1, ..]) = plain_profile_with_history();
    let models = profile.forget(only_c1).unwrap();
    assert_eq!(models, vec!["m".to_string()]);
    assert!(profile.edits_for_preference(only_c1).unwrap().is_empty());
    let log = profile.audit_log(100).unwrap();
    let entry = log.iter().rev().find(|e| e.action == "forgotten").unwrap();
    assert_eq!(entry.subject, format!("preference {only_c1}"));
    assert!(!entry.detail.contains("chess"));
    assert!(matches!(
        profile.forget(only_c1),
        Err(ProfileError::UnknownPreference(_))
    ));
}

#[test]
fn superseding_deactivates_the_old_edit() {
    let (_dir, _paths, mut profile, [_, both, _]) = plain_profile_with_history();
    let new = profile
        .supersede(both, &preference("city", "Lisbon", manual()))
        .unwrap();
    assert_eq!(
        profile.preference(both).unwrap().status,
        PreferenceStatus::Superseded
    );
    assert_eq!(profile.preference(new).unwrap().supersedes, Some(both));
    assert!(profile
        .active_edits("m")
        .unwrap()
        .iter()
        .all(|e| e.id != "e-porto"));
}

#[test]
fn export_delete_import_round_trips_preferences_and_a_bit_identical_adapter() {
    let (dir, paths, profile, _) = plain_profile_with_history();
    let adapter = profile
        .assemble_adapter(&paths.cache_dir, "m", "llama")
        .unwrap()
        .unwrap();
    let adapter_before = std::fs::read(&adapter).unwrap();
    let prefs_before = profile.preferences(None).unwrap();
    let conversations_before = profile.conversations().unwrap();
    let bytes = Archive::collect(&profile)
        .unwrap()
        .to_bytes(Some("export pw"))
        .unwrap();
    assert!(Archive::is_encrypted(&bytes));
    assert!(
        !contains(&bytes, b"chess"),
        "the encrypted export leaks its contents"
    );
    profile.close().unwrap();
    imprint::profile::delete::delete_profile(&paths, &Fixed("p")).unwrap();
    assert!(!adapter.exists());

    let (mut profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p2")).unwrap();
    let archive = Archive::from_bytes(&bytes, Some("export pw")).unwrap();
    let report = profile.import(&archive, ImportMode::Replace).unwrap();
    assert_eq!(report.edits, 3);
    assert_eq!(report.edit_models, vec!["m".to_string()]);
    assert_eq!(profile.preferences(None).unwrap(), prefs_before);
    assert_eq!(profile.conversations().unwrap(), conversations_before);
    let rebuilt = profile
        .assemble_adapter(&paths.cache_dir, "m", "llama")
        .unwrap()
        .unwrap();
    assert!(
        std::fs::read(&rebuilt).unwrap() == adapter_before,
        "the adapter differs"
    );

    // Merging the same export again adds sources, not duplicates.
    let report = profile.import(&archive, ImportMode::Merge).unwrap();
    assert_eq!(report.preferences_added, 0);
    assert_eq!(report.preferences_merged, prefs_before.len());
    assert_eq!(profile.preferences(None).unwrap().len(), prefs_before.len());
    drop(dir);
}

#[test]
fn malformed_exports_are_refused_before_anything_is_written() {
    let (_dir, _paths, mut profile, _) = plain_profile_with_history();
    let archive = Archive::collect(&profile).unwrap();
    let plain = archive.to_bytes(None).unwrap();
    let encrypted = archive.to_bytes(Some("pw")).unwrap();
    let before = profile.preferences(None).unwrap();

    // Not an export at all.
    assert!(matches!(
        Archive::from_bytes(b"hello, this is a text file", None),
        Err(ArchiveError::NotAnExport)
    ));
    // Wrong passphrase, and no passphrase.
    let err = Archive::from_bytes(&encrypted, Some("nope")).unwrap_err();
    assert!(err.to_string().contains("passphrase is wrong"), "{err}");
    assert!(matches!(
        Archive::from_bytes(&encrypted, None),
        Err(ArchiveError::NeedsPassphrase)
    ));
    // Truncated, and a flipped byte in the encrypted payload.
    assert!(Archive::from_bytes(&plain[..plain.len() / 2], None).is_err());
    let mut flipped = encrypted.clone();
    let at = flipped.len() - 40;
    flipped[at] ^= 1;
    assert!(Archive::from_bytes(&flipped, Some("pw")).is_err());

    // A zip whose profile.json was changed after the manifest: checksum.
    let tampered = rewrite_zip(&plain, |name, bytes| {
        if name == "profile.json" {
            String::from_utf8(bytes.to_vec())
                .unwrap()
                .replace("chess", "poker")
                .into_bytes()
        } else {
            bytes.to_vec()
        }
    });
    let err = Archive::from_bytes(&tampered, None).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");

    // A newer format version.
    let newer = rewrite_zip(&plain, |name, bytes| {
        if name == "manifest.json" {
            String::from_utf8(bytes.to_vec())
                .unwrap()
                .replace("\"version\": 1", "\"version\": 2")
                .into_bytes()
        } else {
            bytes.to_vec()
        }
    });
    let err = Archive::from_bytes(&newer, None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::UnknownVersion { found: 2 }),
        "{err}"
    );

    // Factors of the wrong size.
    let short = rewrite_zip(&plain, |name, bytes| {
        if name.starts_with("factors/") {
            bytes[..bytes.len() - 4].to_vec()
        } else {
            bytes.to_vec()
        }
    });
    assert!(Archive::from_bytes(&short, None).is_err());

    assert_eq!(profile.preferences(None).unwrap(), before);
    // The good archive still imports.
    profile
        .import(
            &Archive::from_bytes(&plain, None).unwrap(),
            ImportMode::Merge,
        )
        .unwrap();
}

/// Rewrites every entry of a zip with `f` (tampering for the tests above).
fn rewrite_zip(bytes: &[u8], f: impl Fn(&str, &[u8]) -> Vec<u8>) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut zout = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let name = e.name().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        zout.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
            .unwrap();
        zout.write_all(&f(&name, &data)).unwrap();
    }
    zout.finish().unwrap().into_inner()
}

#[test]
fn jobs_survive_a_restart() {
    let (_dir, paths, mut profile, [only_c1, ..]) = plain_profile_with_history();
    let job = imprint::learn::queue_edit(&profile, only_c1, "m").unwrap();
    let claimed = profile.claim_job().unwrap().unwrap();
    assert_eq!(claimed.id, job);
    profile.close().unwrap();
    // The process "died" with the job running: reopening requeues it.
    let mut profile = Profile::open(&paths, &Fixed("p")).unwrap();
    assert_eq!(profile.requeue_interrupted_jobs().unwrap(), 1);
    let again = profile.claim_job().unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (job, 2));
}

// ---- the CLI and real processes ----

fn imprint(home: &Path) -> Command {
    let mut cmd = common::imprint_at(home);
    cmd.env_remove("IMPRINT_EXPORT_PASSPHRASE")
        .env("IMPRINT_PASSPHRASE", "cli passphrase");
    cmd
}

#[test]
fn without_a_keyring_the_cli_says_so_and_uses_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let out = imprint(dir.path())
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .args(["profile", "status"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = imprint(dir.path())
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .args([
            "prefs",
            "add",
            "--attribute",
            "city",
            "--target",
            "Porto",
            "--pending",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("No OS keyring could be reached"),
        "not announced: {stderr}"
    );
    let status = imprint(dir.path())
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .args(["profile", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("derived from your passphrase"), "{text}");
    // Without the passphrase and without a terminal: a clear refusal.
    let out = imprint(dir.path())
        .env_remove("IMPRINT_PASSPHRASE")
        .args(["prefs", "list"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("IMPRINT_PASSPHRASE"));
}

#[test]
fn cli_import_rejects_garbage_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-an-export.bin");
    std::fs::write(&bad, b"garbage").unwrap();
    let out = imprint(dir.path())
        .args(["profile", "init", "--passphrase"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = imprint(dir.path())
        .args(["profile", "import"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not-an-export.bin") && stderr.contains("not an imprint export"),
        "{stderr}"
    );
}

/// SIGKILL an import of many preferences at random moments: every reopen
/// passes the integrity check and sees all of it or none of it.
#[test]
fn killed_mid_write_leaves_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::under(dir.path());
    // A big archive, made in another profile.
    let src = tempfile::tempdir().unwrap();
    let (mut source, _) =
        Profile::create(&Paths::under(src.path()), KeyChoice::None, &Fixed("x")).unwrap();
    let n = 1500;
    for i in 0..n {
        let id = source
            .add_preference(&preference(
                &format!("attr {i}"),
                &format!("value {i}"),
                manual(),
            ))
            .unwrap();
        source
            .save_edit(id, &synthetic_edit(&format!("e{i}"), i, "m"), None)
            .unwrap();
    }
    let export = dir.path().join("big.zip");
    std::fs::write(
        &export,
        Archive::collect(&source).unwrap().to_bytes(None).unwrap(),
    )
    .unwrap();
    let out = imprint(dir.path())
        .args(["profile", "init", "--passphrase"])
        .output()
        .unwrap();
    assert!(out.status.success());

    let mut outcomes = std::collections::BTreeSet::new();
    for delay_ms in [30u64, 80, 150, 250, 400, 600] {
        let mut child = imprint(dir.path())
            .args(["profile", "import", "--replace"])
            .arg(&export)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let profile = Profile::open(&paths, &Fixed("cli passphrase")).unwrap();
        assert_eq!(profile.integrity_check().unwrap(), "ok");
        let count = profile.preferences(None).unwrap().len();
        let edits = profile.edits().unwrap().len();
        assert!(
            count == 0 || count == n as usize,
            "half an import is visible: {count}"
        );
        assert_eq!(count, edits, "preferences and edits disagree");
        outcomes.insert(count);
        // Start every round from empty.
        drop(profile);
        let mut profile = Profile::open(&paths, &Fixed("cli passphrase")).unwrap();
        for p in profile.preferences(None).unwrap() {
            profile.forget(p.id).unwrap();
        }
    }
    eprintln!("outcomes seen across kills: {outcomes:?}");
}

/// SIGKILL `imprint prefs add` while it computes the edit on the real
/// model: the preference and its queued job are stored, no edit is
/// visible, the database is sound, and `imprint jobs list` shows the job
/// to resume.
#[test]
fn killed_during_a_real_edit_leaves_no_half_written_edit() {
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::under(dir.path());
    let mut child = imprint(dir.path())
        .args([
            "prefs",
            "add",
            "--attribute",
            "hobby",
            "--target",
            "Dancing at clubs",
            "--model",
        ])
        .arg(&model)
        .env("IMPRINT_ENGINE_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut running = false;
    while started.elapsed() < std::time::Duration::from_secs(180) {
        std::thread::sleep(std::time::Duration::from_millis(300));
        if let Ok(p) = Profile::open(&paths, &Fixed("cli passphrase")) {
            if p.jobs(Some(imprint::profile::JobState::Running))
                .is_ok_and(|j| !j.is_empty())
            {
                running = true;
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("imprint prefs add exited ({status}) before the edit started");
        }
    }
    assert!(running, "the edit job never started");
    // Into the computation, then SIGKILL.
    std::thread::sleep(std::time::Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let profile = Profile::open(&paths, &Fixed("cli passphrase")).unwrap();
    assert_eq!(profile.integrity_check().unwrap(), "ok");
    let prefs = profile.preferences(None).unwrap();
    assert_eq!(prefs.len(), 1);
    assert!(
        profile.edits().unwrap().is_empty(),
        "a half-computed edit is visible"
    );
    let jobs = profile.jobs(None).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, imprint::profile::JobState::Running);
    drop(profile);
    let out = imprint(dir.path()).args(["jobs", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("running") && text.contains("\"preference_id\":1"),
        "{text}"
    );
}

/// A full disk (a 1 MiB tmpfs) and a read-only data dir (the same tmpfs
/// remounted read-only) give clear errors and keep what was stored.
/// Mounting needs root; as another user the test says it skipped.
#[test]
fn full_disk_and_read_only_dir_fail_cleanly() {
    let uid = current_uid();
    if uid != 0 {
        eprintln!("SKIPPED: mounting a tmpfs needs root (uid {uid})");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let paths = Paths::under(mnt.path());
    let (mut profile, _) = Profile::create(&paths, KeyChoice::Passphrase, &Fixed("p")).unwrap();
    let keep = profile
        .add_preference(&preference("city", "Porto", manual()))
        .unwrap();
    // Fill the disk with one big edit after another until SQLite refuses.
    let mut err = None;
    for i in 0..200 {
        let mut e = synthetic_edit(&format!("big{i}"), i, "m");
        e.factors[0].n_in = 4096;
        e.factors[0].a = vec![0.5; e.factors[0].rank * 4096];
        if let Err(e) = profile.save_edit(keep, &e, None) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("a 1 MiB disk never filled up");
    assert!(matches!(err, ProfileError::DiskFull(_)), "{err}");
    assert!(err.to_string().contains("disk is full"));
    assert_eq!(profile.preference(keep).unwrap().target, "Porto");
    assert_eq!(profile.integrity_check().unwrap(), "ok");
    profile.close().unwrap();

    let ok = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot remount read-only");
    let result = Profile::open(&paths, &Fixed("p")).and_then(|mut p| {
        p.add_preference(&preference("drink", "tea", manual()))?;
        Ok(p)
    });
    let err = result.unwrap_err();
    assert!(
        matches!(err, ProfileError::ReadOnly(_) | ProfileError::Io { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("writable") || err.to_string().contains("Read-only"),
        "{err}"
    );
}

fn current_uid() -> u32 {
    // `id -u` rather than libc: no new dependency for one number.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// The line-mode chat keeps the conversation in the profile, and keeps
/// nothing with --incognito.
#[test]
fn chat_stores_conversations_unless_incognito() {
    use std::io::Write;
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut child = imprint(dir.path())
            .args(["chat", "--greedy", "--no-profile", "--model"])
            .arg(&model)
            .args(extra)
            .env("IMPRINT_GENERATION_MAX_TOKENS", "8")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"I live in Porto.\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["--incognito"]);
    let paths = Paths::under(dir.path());
    assert!(!Profile::exists(&paths), "incognito created a profile");
    run(&[]);
    let profile = Profile::open(&paths, &Fixed("cli passphrase")).unwrap();
    let conversations = profile.conversations().unwrap();
    assert_eq!(conversations.len(), 1);
    let messages = profile.messages(conversations[0].id).unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0].role.as_str(), messages[0].content.as_str()),
        ("user", "I live in Porto.")
    );
    assert_eq!(messages[1].role, "assistant");
}

/// A profile written by the previous schema version is migrated in place
/// on open, and keeps its contents.
#[test]
fn an_older_schema_is_migrated_and_keeps_its_data() {
    let (_dir, paths) = home();
    let (mut profile, _) = Profile::create(&paths, KeyChoice::None, &Fixed("x")).unwrap();
    let id = profile
        .add_preference(&preference("city", "Porto", manual()))
        .unwrap();
    let db = profile.files().db.clone();
    profile.close().unwrap();
    {
        // Back to version 1: without the table migration 2 adds and the
        // column migration 3 adds.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP TABLE import_seen; ALTER TABLE conversations DROP COLUMN learning; PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let profile = Profile::open(&paths, &Fixed("x")).unwrap();
    assert_eq!(profile.schema_version_before(), 1);
    assert_eq!(
        profile.schema_version().unwrap(),
        imprint::profile::schema::current_version()
    );
    assert!(profile.mark_imported("abc", "f").unwrap());
    assert!(!profile.mark_imported("abc", "f").unwrap());
    let conversation = profile.create_conversation("after the upgrade").unwrap();
    assert!(
        profile.conversation(conversation).unwrap().learning,
        "learning is on by default"
    );
    profile
        .set_conversation_learning(conversation, false)
        .unwrap();
    assert!(!profile.conversation(conversation).unwrap().learning);
    assert_eq!(profile.preference(id).unwrap().target, "Porto");
    assert_eq!(profile.integrity_check().unwrap(), "ok");
}
