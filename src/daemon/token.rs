//! The bearer token of the HTTP endpoint.
//!
//! Kept in the OS keyring (`imprint/http-token`) where one answers, else in
//! `<config>/http-token` (mode 0600). Either way `imprint daemon token`
//! shows it, and `--rotate` replaces it.

use std::path::PathBuf;

use rand::RngCore;

use crate::paths::Paths;
use crate::profile::key::{keyring_reachable, KEYRING_SERVICE};
use crate::profile::ProfileError;

const KEYRING_USER: &str = "http-token";

/// Where the token is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenStore {
    Keyring,
    File(PathBuf),
}

impl std::fmt::Display for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenStore::Keyring => write!(f, "the OS keyring ({KEYRING_SERVICE}/{KEYRING_USER})"),
            TokenStore::File(p) => write!(f, "{}", p.display()),
        }
    }
}

fn file(paths: &Paths) -> PathBuf {
    paths.config_dir.join("http-token")
}

fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("imp-{}", hex::encode(bytes))
}

fn entry() -> Result<keyring::Entry, ProfileError> {
    keyring::Entry::new(KEYRING_SERVICE, KEYRING_USER)
        .map_err(|e| ProfileError::Keyring(e.to_string()))
}

/// The token, created on first use. `rotate`: replace it.
pub fn load_or_create(paths: &Paths, rotate: bool) -> Result<(String, TokenStore), ProfileError> {
    let path = file(paths);
    // A token file, once there, stays the store: no silent move between
    // stores that would leave an old token valid somewhere.
    if keyring_reachable().is_ok() && !path.exists() {
        let e = entry()?;
        if !rotate {
            match e.get_password() {
                Ok(t) if !t.is_empty() => return Ok((t, TokenStore::Keyring)),
                Ok(_) | Err(keyring::Error::NoEntry) => {}
                Err(err) => return Err(ProfileError::Keyring(err.to_string())),
            }
        }
        let token = new_token();
        e.set_password(&token)
            .map_err(|err| ProfileError::Keyring(format!("cannot store the HTTP token: {err}")))?;
        return Ok((token, TokenStore::Keyring));
    }
    if !rotate {
        if let Ok(t) = std::fs::read_to_string(&path) {
            let t = t.trim().to_string();
            if !t.is_empty() {
                return Ok((t, TokenStore::File(path)));
            }
        }
    }
    crate::paths::create_private_dir(&paths.config_dir).map_err(|source| ProfileError::Io {
        path: paths.config_dir.clone(),
        source,
    })?;
    let token = new_token();
    crate::profile::write_private_file(&path, format!("{token}\n").as_bytes())?;
    Ok((token, TokenStore::File(path)))
}

/// Removes the token wherever it is (profile deletion does not touch it;
/// `imprint daemon token --revoke` does).
pub fn revoke(paths: &Paths) -> Result<(), ProfileError> {
    let _ = std::fs::remove_file(file(paths));
    if keyring_reachable().is_ok() {
        match entry()?.delete_credential() {
            Ok(()) | Err(keyring::Error::NoEntry) => {}
            Err(e) => return Err(ProfileError::Keyring(e.to_string())),
        }
    }
    Ok(())
}

/// Compares without an early exit, so response time says nothing about
/// how much of a guess was right.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_by_content() {
        assert!(super::same("imp-abc", "imp-abc"));
        assert!(!super::same("imp-abc", "imp-abd"));
        assert!(!super::same("imp-abc", "imp-ab"));
    }
}
