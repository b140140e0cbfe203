//! Where the profile's encryption key comes from.
//!
//! The database is encrypted with a random 256-bit key. That key lives in
//! the OS keyring (Secret Service, Keychain, Credential Manager). Where no
//! keyring can be reached (a headless server, a container), the key is
//! derived from a passphrase with Argon2id and a stored salt instead. A
//! plaintext profile exists only when the user asked for one.
//!
//! Which of the three a profile uses is written next to it in
//! `profile.key.json`, which holds no secret: the keyring entry's name, or
//! the salt and Argon2 parameters, plus a short key check. The check lets a
//! wrong key or passphrase be told apart from a damaged database (SQLCipher
//! reports both as "file is not a database").

use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::ProfileError;

/// The keyring service every imprint entry is filed under.
pub const KEYRING_SERVICE: &str = "imprint";

/// How the profile is protected at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protection", rename_all = "lowercase")]
pub enum Protection {
    /// A random key kept in the OS keyring under (`imprint`, `user`).
    Keyring { user: String },
    /// A key derived from the user's passphrase with Argon2id.
    Passphrase {
        salt_hex: String,
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    },
    /// No encryption: only on the user's explicit `--no-encryption`.
    None,
}

impl Protection {
    pub fn describe(&self) -> String {
        match self {
            Protection::Keyring { user } => {
                format!("encrypted (SQLCipher); key in the OS keyring as {KEYRING_SERVICE}/{user}")
            }
            Protection::Passphrase { .. } => {
                "encrypted (SQLCipher); key derived from your passphrase (Argon2id)".into()
            }
            Protection::None => {
                "NOT encrypted: created with --no-encryption; anyone who can read the file can read your profile".into()
            }
        }
    }
}

/// The sidecar file: how to get the key, and a check that it is the right one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    #[serde(flatten)]
    pub protection: Protection,
    /// First 16 hex digits of sha256("imprint key check" ‖ key); empty when
    /// unencrypted.
    #[serde(default)]
    pub key_check: String,
}

/// What the user asked for when creating a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// The keyring, or a passphrase where no keyring can be reached (said
    /// out loud, never silently).
    Auto,
    Keyring,
    Passphrase,
    /// Plaintext, explicitly.
    None,
}

/// Where the passphrase comes from when one is needed.
pub trait PassphraseSource {
    /// `confirm`: the passphrase is being set, ask twice.
    fn passphrase(&self, confirm: bool) -> Result<Zeroizing<String>, ProfileError>;
}

/// Asks another source once and remembers the answer, so a process that
/// opens the profile more than once (the daemon: one connection per worker)
/// asks the user only once. The passphrase is wiped when this is dropped.
pub struct Remembered<S> {
    inner: S,
    answer: std::sync::Mutex<Option<Zeroizing<String>>>,
}

impl<S: PassphraseSource> Remembered<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            answer: std::sync::Mutex::new(None),
        }
    }
}

impl<S> Remembered<S> {
    /// The passphrase given, if one was asked for.
    pub fn remembered(&self) -> Option<Zeroizing<String>> {
        self.answer.lock().ok().and_then(|a| a.clone())
    }
}

impl<S: PassphraseSource> PassphraseSource for Remembered<S> {
    fn passphrase(&self, confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        let mut answer = self
            .answer
            .lock()
            .map_err(|_| ProfileError::Passphrase("the passphrase cache was poisoned".into()))?;
        if let Some(p) = answer.as_ref() {
            return Ok(p.clone());
        }
        let p = self.inner.passphrase(confirm)?;
        *answer = Some(p.clone());
        Ok(p)
    }
}

/// `IMPRINT_PASSPHRASE`, else an interactive prompt on the terminal.
pub struct EnvOrPrompt;

impl PassphraseSource for EnvOrPrompt {
    fn passphrase(&self, confirm: bool) -> Result<Zeroizing<String>, ProfileError> {
        if let Some(p) = std::env::var_os("IMPRINT_PASSPHRASE") {
            let p = p.to_string_lossy().into_owned();
            if p.is_empty() {
                return Err(ProfileError::Passphrase(
                    "IMPRINT_PASSPHRASE is set but empty".into(),
                ));
            }
            return Ok(Zeroizing::new(p));
        }
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(ProfileError::Passphrase(
                "the profile needs a passphrase and no terminal is attached to ask for one; set IMPRINT_PASSPHRASE".into(),
            ));
        }
        let first = Zeroizing::new(
            rpassword::prompt_password("Profile passphrase: ")
                .map_err(|e| ProfileError::Passphrase(format!("cannot read it: {e}")))?,
        );
        if first.is_empty() {
            return Err(ProfileError::Passphrase("the passphrase is empty".into()));
        }
        if confirm {
            let again = Zeroizing::new(
                rpassword::prompt_password("Repeat it: ")
                    .map_err(|e| ProfileError::Passphrase(format!("cannot read it: {e}")))?,
            );
            if *again != *first {
                return Err(ProfileError::Passphrase(
                    "the two passphrases differ".into(),
                ));
            }
        }
        Ok(first)
    }
}

/// A raw 256-bit SQLCipher key, wiped from memory when dropped.
pub type RawKey = Zeroizing<[u8; 32]>;

pub fn key_check(key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"imprint key check");
    h.update(key);
    hex::encode(h.finalize())[..16].to_string()
}

pub fn key_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("profile.key.json")
}

impl KeyFile {
    pub fn load(path: &Path) -> Result<Option<Self>, ProfileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProfileError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| ProfileError::KeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if file.version != 1 {
            return Err(ProfileError::KeyFile {
                path: path.to_path_buf(),
                reason: format!(
                    "version {} is newer than this imprint understands (1); upgrade imprint",
                    file.version
                ),
            });
        }
        Ok(Some(file))
    }

    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| ProfileError::KeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        super::write_private_file(path, &json)
    }

    /// Fetches or derives the key this file describes (None: unencrypted)
    /// and checks it.
    pub fn unlock(
        &self,
        passphrase: &dyn PassphraseSource,
    ) -> Result<Option<RawKey>, ProfileError> {
        let key = match &self.protection {
            Protection::None => return Ok(None),
            Protection::Keyring { user } => keyring_get(user)?,
            Protection::Passphrase {
                salt_hex,
                memory_kib,
                iterations,
                parallelism,
            } => {
                let salt = hex::decode(salt_hex).map_err(|e| ProfileError::KeyFile {
                    path: PathBuf::from("profile.key.json"),
                    reason: format!("bad salt: {e}"),
                })?;
                let pass = passphrase.passphrase(false)?;
                derive_key(&pass, &salt, *memory_kib, *iterations, *parallelism)?
            }
        };
        if key_check(&key) != self.key_check {
            return Err(ProfileError::WrongKey(match &self.protection {
                Protection::Passphrase { .. } => "the passphrase is wrong".into(),
                _ => "the key in the keyring does not match this profile".into(),
            }));
        }
        Ok(Some(key))
    }

    /// Creates the key for a new profile as the user chose. Returns the
    /// file to store next to the database, the key, and a notice to show
    /// when the choice was not the first one (keyring unreachable).
    pub fn create(
        choice: KeyChoice,
        passphrase: &dyn PassphraseSource,
    ) -> Result<(KeyFile, Option<RawKey>, Option<String>), ProfileError> {
        let mut notice = None;
        let use_keyring = match choice {
            KeyChoice::None => {
                let file = KeyFile {
                    version: 1,
                    protection: Protection::None,
                    key_check: String::new(),
                };
                return Ok((file, None, None));
            }
            KeyChoice::Passphrase => false,
            KeyChoice::Keyring => true,
            KeyChoice::Auto => match keyring_reachable() {
                Ok(()) => true,
                Err(reason) => {
                    notice = Some(format!(
                        "No OS keyring could be reached ({reason}); the profile key is derived from a passphrase instead (IMPRINT_PASSPHRASE or a prompt)."
                    ));
                    false
                }
            },
        };
        if use_keyring {
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rng().fill_bytes(key.as_mut());
            let mut id = [0u8; 6];
            rand::rng().fill_bytes(&mut id);
            let user = format!("profile-{}", hex::encode(id));
            keyring_set(&user, &key)?;
            let file = KeyFile {
                version: 1,
                key_check: key_check(&key),
                protection: Protection::Keyring { user },
            };
            return Ok((file, Some(key), notice));
        }
        let pass = passphrase.passphrase(true)?;
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        // 64 MiB and 3 passes: well above OWASP's Argon2id minimum (19 MiB,
        // 2 passes); memory is what makes guessing expensive on GPUs.
        let (memory_kib, iterations, parallelism) = (64 * 1024, 3, 1);
        let key = derive_key(&pass, &salt, memory_kib, iterations, parallelism)?;
        let file = KeyFile {
            version: 1,
            key_check: key_check(&key),
            protection: Protection::Passphrase {
                salt_hex: hex::encode(salt),
                memory_kib,
                iterations,
                parallelism,
            },
        };
        Ok((file, Some(key), notice))
    }
}

fn derive_key(
    passphrase: &str,
    salt: &[u8],
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
) -> Result<RawKey, ProfileError> {
    let params = argon2::Params::new(memory_kib, iterations, parallelism, Some(32))
        .map_err(|e| ProfileError::Passphrase(format!("bad Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
        .map_err(|e| ProfileError::Passphrase(format!("key derivation failed: {e}")))?;
    Ok(key)
}

fn entry(user: &str) -> Result<keyring::Entry, ProfileError> {
    keyring::Entry::new(KEYRING_SERVICE, user)
        .map_err(|e| ProfileError::Keyring(format!("cannot address the keyring entry: {e}")))
}

/// Whether a keyring answers at all: looking up an entry that does not
/// exist must say "no entry" rather than fail.
pub fn keyring_reachable() -> Result<(), String> {
    let e =
        keyring::Entry::new(KEYRING_SERVICE, "reachability-probe").map_err(|e| e.to_string())?;
    match e.get_password() {
        Ok(_) | Err(keyring::Error::NoEntry) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn keyring_set(user: &str, key: &[u8; 32]) -> Result<(), ProfileError> {
    let hex_key = Zeroizing::new(hex::encode(key));
    entry(user)?
        .set_password(&hex_key)
        .map_err(|e| ProfileError::Keyring(format!("cannot store the profile key: {e}")))
}

fn keyring_get(user: &str) -> Result<RawKey, ProfileError> {
    let secret = match entry(user)?.get_password() {
        Ok(s) => Zeroizing::new(s),
        Err(keyring::Error::NoEntry) => {
            return Err(ProfileError::Keyring(format!(
                "the profile's key ({KEYRING_SERVICE}/{user}) is not in the keyring. Restore it, or start over with `imprint profile delete` (your preferences are lost unless you have an export)"
            )))
        }
        Err(e) => {
            return Err(ProfileError::Keyring(format!(
                "the profile is encrypted with a key kept in the OS keyring, and the keyring cannot be reached: {e}. Unlock your keyring (or start a desktop session) and try again"
            )))
        }
    };
    let bytes = Zeroizing::new(hex::decode(secret.as_str()).map_err(|_| {
        ProfileError::Keyring(format!(
            "the keyring entry {KEYRING_SERVICE}/{user} is not a 64-digit hex key"
        ))
    })?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(ProfileError::Keyring(format!(
            "the keyring entry {KEYRING_SERVICE}/{user} is not a 256-bit key"
        )));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Removes the keyring entry (profile deletion). Ok(false): there was none.
pub fn keyring_delete(user: &str) -> Result<bool, ProfileError> {
    match entry(user)?.delete_credential() {
        Ok(()) => Ok(true),
        Err(keyring::Error::NoEntry) => Ok(false),
        Err(e) => Err(ProfileError::Keyring(format!(
            "cannot remove the profile key from the keyring: {e}"
        ))),
    }
}

/// Whether the keyring holds an entry for `user` (tests, status).
pub fn keyring_has(user: &str) -> Result<bool, ProfileError> {
    match entry(user)?.get_password() {
        Ok(_) => Ok(true),
        Err(keyring::Error::NoEntry) => Ok(false),
        Err(e) => Err(ProfileError::Keyring(e.to_string())),
    }
}
