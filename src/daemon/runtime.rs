//! Where a running daemon can be found, and the lock that keeps it single.
//!
//! The socket and lock live in `$XDG_RUNTIME_DIR/imprint/` (a per-user
//! tmpfs the system cleans at logout), or in `<data>/run/` where there is no
//! such directory (macOS) or when `IMPRINT_HOME` moves everything (tests).
//! The folder is 0700 and the socket 0600: other users cannot even reach
//! it, and the server checks peer credentials as a second line.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::DaemonError;
use crate::paths::Paths;

/// The daemon's runtime files.
#[derive(Debug, Clone)]
pub struct RuntimeFiles {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
}

impl RuntimeFiles {
    pub fn new(paths: &Paths) -> Self {
        let moved = std::env::var_os("IMPRINT_HOME").is_some_and(|v| !v.is_empty());
        let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(run) if !moved && !run.is_empty() => PathBuf::from(run).join("imprint"),
            _ => paths.data_dir.join("run"),
        };
        Self {
            socket: dir.join("daemon.sock"),
            lock: dir.join("daemon.lock"),
            dir,
        }
    }
}

/// The single-instance lock: an exclusive `flock` on the lock file, held
/// for the daemon's whole life. The kernel drops it when the process dies,
/// however it dies, so a stale lock file never blocks a restart.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock and writes our pid into the file.
    pub fn acquire(files: &RuntimeFiles) -> Result<Self, DaemonError> {
        crate::paths::create_private_dir(&files.dir).map_err(|source| DaemonError::Io {
            path: files.dir.clone(),
            source,
        })?;
        let io = |source| DaemonError::Io {
            path: files.lock.clone(),
            source,
        };
        let mut file = open_private(&files.lock).map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let locked = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        if !locked {
            return Err(DaemonError::AlreadyRunning {
                pid: read_pid(&files.lock),
                socket: files.socket.clone(),
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Self {
            _file: file,
            path: files.lock.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_private(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// The pid in a lock file, if one can be read.
pub fn read_pid(lock: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(lock).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether some process holds the lock (a daemon is running or starting).
pub fn is_locked(files: &RuntimeFiles) -> bool {
    let Ok(file) = File::open(&files.lock) else {
        return false;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: as above.
    let free = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
    }
    !free
}

/// The effective user id of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}
