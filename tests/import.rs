//! Chat-history import end to end on real profile files: realistic exports
//! with planted preferences and planted non-preferences, idempotence, bad
//! input, and a 1 GiB file read with bounded memory.

use std::path::{Path, PathBuf};

use imprint::learn::capture::CaptureSettings;
use imprint::learn::import::{detect, import_history, Format, ImportError, ReadError};
use imprint::paths::Paths;
use imprint::profile::{KeyChoice, PassphraseSource, Profile, ProfileError, SourceRef};
use zeroize::Zeroizing;

struct Fixed;
impl PassphraseSource for Fixed {
    fn passphrase(&self, _confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        Ok(Zeroizing::new("import test".into()))
    }
}

fn settings() -> CaptureSettings {
    CaptureSettings {
        auto_apply_threshold: 0.85,
        cluster_size: 3,
    }
}

fn profile(dir: &Path) -> Profile {
    Profile::create(&Paths::under(dir), KeyChoice::Passphrase, &Fixed)
        .unwrap()
        .0
}

const CHATGPT: &str = r#"[
 {"title": "Moving plans", "conversation_id": "c-1", "current_node": "n5",
  "mapping": {
   "root": {"id": "root", "message": null, "parent": null, "children": ["n1"]},
   "n1": {"id": "n1", "parent": "root", "children": ["n2", "x2"],
          "message": {"author": {"role": "system"}, "content": {"content_type": "text", "parts": [""]}, "create_time": 1.0}},
   "x2": {"id": "x2", "parent": "n1", "children": [],
          "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["I live in Madrid."]}, "create_time": 2.0}},
   "n2": {"id": "n2", "parent": "n1", "children": ["n3"],
          "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["Hi! I live in Lisbon. I work as a nurse."]}, "create_time": 3.0}},
   "n3": {"id": "n3", "parent": "n2", "children": ["n4"],
          "message": {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": ["I love Lisbon too! I'm a big fan of the tiles."]}, "create_time": 4.0}},
   "n4": {"id": "n4", "parent": "n3", "children": ["n5"],
          "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["My brother loves golf. If I were rich, I'd buy a boat. My password is hunter2."]}, "create_time": 5.0}},
   "n5": {"id": "n5", "parent": "n4", "children": [],
          "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["I'm allergic to peanuts."]}, "create_time": 6.0}}
  }}
]"#;

const CLAUDE: &str = r#"[
 {"uuid": "k-1", "name": "Weekend", "chat_messages": [
   {"sender": "human", "text": "My favorite sport is ultimate frisbee.", "content": [{"type": "text", "text": "My favorite sport is ultimate frisbee."}]},
   {"sender": "assistant", "text": "I love ultimate frisbee as well!"},
   {"sender": "human", "text": "What's my favorite color?"}
 ]}
]"#;

const JSONL: &str = concat!(
    r#"{"role": "user", "content": "I can't stand cilantro."}"#,
    "\n",
    r#"{"role": "assistant", "content": "I hate cilantro too."}"#,
    "\n\n",
    r#"{"id": "conv-7", "messages": [{"role": "user", "content": "My wife is allergic to cats."}, {"role": "user", "content": [{"type": "text", "text": "I drive a Toyota Prius."}]}]}"#,
    "\n"
);

const MARKDOWN: &str = "# Chat with my assistant\n\n**User:** I grew up in Ohio.\n\n**Assistant:** I grew up in the cloud!\nI live in a data center.\n\nUser: Suppose I moved to Mars.\n";

const TEXT: &str = "I have two kids.\nMy SSN is 078-05-1120.\nWhat should I cook tonight?\n";

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn every_format_yields_exactly_the_planted_preferences_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = profile(dir.path());
    let files = [
        (
            write(dir.path(), "conversations.json", CHATGPT.as_bytes()),
            Format::Chatgpt,
        ),
        (
            write(dir.path(), "claude-conversations.json", CLAUDE.as_bytes()),
            Format::Claude,
        ),
        (
            write(dir.path(), "history.jsonl", JSONL.as_bytes()),
            Format::Jsonl,
        ),
        (
            write(dir.path(), "transcript.md", MARKDOWN.as_bytes()),
            Format::Markdown,
        ),
        (
            write(dir.path(), "notes.txt", TEXT.as_bytes()),
            Format::Text,
        ),
    ];
    let mut secrets = 0;
    for (path, format) in &files {
        assert_eq!(detect(path).unwrap(), *format, "{}", path.display());
        let s =
            import_history(&mut profile, path, *format, &settings(), Some("m"), |_| {}).unwrap();
        secrets += s.capture.secrets_skipped.total();
    }
    let mut got: Vec<(String, String)> = profile
        .preferences(None)
        .unwrap()
        .into_iter()
        .map(|p| (p.attribute, p.target))
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = [
        ("allergy", "peanuts"),
        ("dislikes", "cilantro"),
        ("family", "two kids"),
        ("hometown", "Ohio"),
        ("location", "Lisbon"),
        ("profession", "nurse"),
        ("sport", "ultimate frisbee"),
        ("vehicle", "Toyota Prius"),
    ]
    .iter()
    .map(|(a, t)| (a.to_string(), t.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(secrets, 2, "the password and the SSN");

    // Provenance down to the conversation and message index.
    let lisbon = profile
        .preferences(None)
        .unwrap()
        .into_iter()
        .find(|p| p.target == "Lisbon")
        .unwrap();
    match &lisbon.sources[0].reference {
        SourceRef::Import {
            file,
            conversation,
            message_index,
        } => {
            assert!(file.ends_with("conversations.json"));
            assert_eq!((conversation.as_str(), *message_index), ("c-1", 1));
        }
        other => panic!("unexpected source {other:?}"),
    }

    // Importing everything again adds nothing.
    for (path, format) in &files {
        let s =
            import_history(&mut profile, path, *format, &settings(), Some("m"), |_| {}).unwrap();
        assert_eq!(s.already_imported, s.user_messages, "{}", path.display());
        assert!(s.capture.learned.is_empty() && s.capture.pending.is_empty());
    }
    assert_eq!(profile.preferences(None).unwrap().len(), want.len());
}

#[test]
fn bad_files_name_the_file_and_position_and_keep_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = profile(dir.path());
    let good = write(dir.path(), "notes.txt", b"I live in Porto.\n");
    import_history(&mut profile, &good, Format::Text, &settings(), None, |_| {}).unwrap();
    let before = profile.preferences(None).unwrap();
    assert_eq!(before.len(), 1);

    let cases: Vec<(PathBuf, Format, &str)> = vec![
        (
            write(dir.path(), "truncated.json", b"[\n {\"mapping\": {\"a\": "),
            Format::Chatgpt,
            "truncated.json, line 2, column",
        ),
        (
            write(dir.path(), "wrong-schema.json", b"[{\"title\": \"x\"}]"),
            Format::Chatgpt,
            "no \"mapping\"",
        ),
        (
            write(dir.path(), "claude-wrong.json", b"[{\"uuid\": \"x\"}]"),
            Format::Claude,
            "no \"chat_messages\"",
        ),
        (
            write(
                dir.path(),
                "bad.jsonl",
                b"{\"role\": \"user\", \"content\": \"ok\"}\n{oops\n",
            ),
            Format::Jsonl,
            "bad.jsonl, line 2",
        ),
        (
            write(
                dir.path(),
                "latin1.txt",
                b"I live in Porto.\nS\xe3o Paulo is nice\n",
            ),
            Format::Text,
            "latin1.txt, line 2: not valid UTF-8",
        ),
    ];
    for (path, format, expected) in cases {
        let err =
            import_history(&mut profile, &path, format, &settings(), None, |_| {}).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expected), "{}: {text}", path.display());
    }
    let binary = write(dir.path(), "photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00");
    assert!(matches!(detect(&binary), Err(ImportError::Binary { .. })));
    // Nothing stored was lost or changed (lines read before an error, like
    // latin1.txt's first line, may add sources).
    let after = profile.preferences(None).unwrap();
    assert_eq!(after.len(), before.len());
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(
            (&a.attribute, &a.target, a.status),
            (&b.attribute, &b.target, b.status)
        );
        assert!(b.sources.iter().all(|s| a.sources.contains(s)));
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A 1 GiB file (one endless line, then a real message) is streamed: the
/// process's peak memory grows by far less than the file, the long line is
/// skipped and counted, and the message after it is still read.
#[test]
fn a_one_gib_file_is_streamed_with_bounded_memory() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..1024 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\nI live in Porto.\n").unwrap();
    }
    let mut profile = profile(dir.path());
    let before = peak_rss_kib();
    let s = import_history(&mut profile, &path, Format::Text, &settings(), None, |_| {}).unwrap();
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    assert_eq!(s.read.oversized_lines, 1);
    assert_eq!(s.user_messages, 1);
    assert_eq!(profile.preferences(None).unwrap()[0].target, "Porto");
    assert!(
        grown_mib < 64,
        "peak memory grew by {grown_mib} MiB reading a 1 GiB file"
    );
    eprintln!("peak memory grew by {grown_mib} MiB while importing 1 GiB");
}

#[test]
fn a_callback_error_stops_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "notes.txt", b"one\ntwo\nthree\n");
    let mut n = 0;
    let r = imprint::learn::import::read(&path, Format::Text, |_| {
        n += 1;
        if n == 2 {
            Err("stop")
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(ReadError::Callback("stop"))));
    assert_eq!(n, 2);
}

/// `imprint import --watch` as a real process: a file written in two steps
/// and renamed into place is imported once, complete, and moved to
/// processed/; a broken one lands in failed/ with the reason beside it.
#[test]
fn the_watched_inbox_imports_complete_files_and_sets_bad_ones_aside() {
    use std::io::Write;
    let home = tempfile::tempdir().unwrap();
    let inbox = home.path().join("data/inbox");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imprint"))
        .env("IMPRINT_HOME", home.path())
        .env("IMPRINT_PASSPHRASE", "watch test")
        .args(["import", "--watch", "--settle", "0.5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |p: &Path| {
        let start = std::time::Instant::now();
        while !p.exists() {
            assert!(
                start.elapsed().as_secs() < 60,
                "{} never appeared",
                p.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_for(&inbox);
    // Written in two steps under a partial name, then renamed into place.
    let partial = inbox.join("notes.txt.part");
    let mut f = std::fs::File::create(&partial).unwrap();
    f.write_all(b"I live in Porto.\n").unwrap();
    f.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    f.write_all(b"I'm allergic to peanuts.\n").unwrap();
    drop(f);
    std::fs::rename(&partial, inbox.join("notes.txt")).unwrap();
    std::fs::write(inbox.join("broken.json"), b"[{\"mapping\": ").unwrap();
    wait_for(&inbox.join("processed/notes.txt"));
    wait_for(&inbox.join("failed/broken.json.error.txt"));
    let _ = child.kill();
    let _ = child.wait();
    let note = std::fs::read_to_string(inbox.join("failed/broken.json.error.txt")).unwrap();
    assert!(
        note.contains("broken.json") && note.contains("line 1"),
        "{note}"
    );
    let profile = Profile::open(&Paths::under(home.path()), &WatchPass).unwrap();
    let mut targets: Vec<String> = profile
        .preferences(None)
        .unwrap()
        .into_iter()
        .map(|p| p.target)
        .collect();
    targets.sort();
    assert_eq!(targets, vec!["Porto".to_string(), "peanuts".to_string()]);
}

struct WatchPass;
impl PassphraseSource for WatchPass {
    fn passphrase(&self, _confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        Ok(Zeroizing::new("watch test".into()))
    }
}
