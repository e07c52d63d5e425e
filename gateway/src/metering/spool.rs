//! The metering buffer's write-ahead spool: each event is appended (one `write`) before the
//! invocation's response completes, so a `kill -9` of the gateway loses none; replayed at start.
//!
//! Files in the spool directory: `current.wal` receives appends; at each flush it is sealed
//! (renamed `sealed-<seq>.wal`) and removed once JetStream acknowledged its events. A crash
//! leaves sealed files and a current one behind; [`Spool::open`] seals those for replay.
//! The spool survives a crash of the process (data is in the page cache), not a power loss.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CURRENT: &str = "current.wal";
const SEALED_PREFIX: &str = "sealed-";
const SUFFIX: &str = ".wal";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("metering spool {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// The open spool: where events are appended.
pub struct Spool {
    dir: PathBuf,
    file: Arc<File>,
    next_seq: u64,
}

/// Appends to the file that was current when it was taken; used outside the buffer's lock
/// (an append that lands in a just-sealed file is replayed with it, or was published).
#[derive(Clone)]
pub struct SpoolWriter {
    file: Arc<File>,
    path: PathBuf,
}

impl SpoolWriter {
    /// Appends event lines (each ends with `\n`) in a single `write`.
    pub fn append(&self, lines: &[u8]) -> Result<(), SpoolError> {
        (&*self.file)
            .write_all(lines)
            .map_err(|e| SpoolError::Io(self.path.clone(), e))
    }
}

/// A spool file whose events are (being) published; removed once they are.
#[derive(Debug)]
pub struct Sealed {
    pub path: PathBuf,
}

impl Spool {
    /// Opens the spool in `dir`, sealing what a previous process left unpublished; returns
    /// those sealed files oldest first, for replay.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Sealed>), SpoolError> {
        let err = |e| SpoolError::Io(dir.to_path_buf(), e);
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .filter_map(|e| sealed_seq(&e.file_name().to_string_lossy()))
            .collect();
        seqs.sort_unstable();
        let mut next_seq = seqs.last().map_or(0, |s| s + 1);
        let current = dir.join(CURRENT);
        if std::fs::metadata(&current).is_ok_and(|m| m.len() > 0) {
            let to = dir.join(sealed_name(next_seq));
            std::fs::rename(&current, &to).map_err(|e| SpoolError::Io(current.clone(), e))?;
            seqs.push(next_seq);
            next_seq += 1;
        }
        let file = Arc::new(open_append(&current)?);
        let sealed = seqs
            .into_iter()
            .map(|s| Sealed {
                path: dir.join(sealed_name(s)),
            })
            .collect();
        Ok((
            Self {
                dir: dir.to_path_buf(),
                file,
                next_seq,
            },
            sealed,
        ))
    }

    /// At a clean shutdown with everything published: removes the (empty) current file
    /// and the directory, if nothing else is in it.
    pub fn remove_if_empty(self) {
        let current = self.dir.join(CURRENT);
        if std::fs::metadata(&current).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&current);
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    /// The writer of the current file.
    pub fn writer(&self) -> SpoolWriter {
        SpoolWriter {
            file: self.file.clone(),
            path: self.dir.join(CURRENT),
        }
    }

    /// Seals everything appended so far and starts a new current file.
    pub fn seal(&mut self) -> Result<Sealed, SpoolError> {
        let current = self.dir.join(CURRENT);
        let to = self.dir.join(sealed_name(self.next_seq));
        std::fs::rename(&current, &to).map_err(|e| SpoolError::Io(current.clone(), e))?;
        self.next_seq += 1;
        self.file = Arc::new(open_append(&current)?);
        Ok(Sealed { path: to })
    }
}

impl Sealed {
    /// The event lines of this file (without their newlines); an unfinished last line
    /// (a torn write) is left out.
    pub fn lines(&self) -> Result<Vec<Vec<u8>>, SpoolError> {
        let bytes = std::fs::read(&self.path).map_err(|e| SpoolError::Io(self.path.clone(), e))?;
        Ok(bytes
            .split_inclusive(|b| *b == b'\n')
            .filter(|l| l.ends_with(b"\n") && l.len() > 1)
            .map(|l| l.to_vec())
            .collect())
    }

    /// Its events are safely published: forget them.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing a published spool file: {e}");
        }
    }
}

/// `/dev/shm/tally/<data dir, slashes as '_'>` when /dev/shm is there (made 0700 and
/// refused if someone else owns it), else `DATA_DIR/metering-spool`.
pub fn default_dir(data_dir: &Path) -> Result<PathBuf, SpoolError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return Ok(data_dir.join("metering-spool"));
    }
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let name: String = absolute
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    let base = shm.join("tally");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for dir in [base.clone(), base.join(name.trim_start_matches('_'))] {
        let err = |e| SpoolError::Io(dir.clone(), e);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(err)?;
        if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(err(io::Error::other(
                "exists but is not a private directory of this user (set --metering-spool-dir)",
            )));
        }
    }
    Ok(base.join(name.trim_start_matches('_')))
}

fn open_append(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| SpoolError::Io(path.to_path_buf(), e))
}

fn sealed_name(seq: u64) -> String {
    format!("{SEALED_PREFIX}{seq:020}{SUFFIX}")
}

fn sealed_seq(name: &str) -> Option<u64> {
    name.strip_prefix(SEALED_PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_leaves_everything_for_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, old) = Spool::open(dir.path()).unwrap();
        assert!(old.is_empty());
        spool.writer().append(b"{\"a\":1}\n").unwrap();
        let first = spool.seal().unwrap();
        spool.writer().append(b"{\"b\":2}\n").unwrap();
        spool.writer().append(b"{\"c\":3}\n{\"torn").unwrap();
        drop(spool); // the process dies here: `first` was never published
        let (_spool, old) = Spool::open(dir.path()).unwrap();
        assert_eq!(old.len(), 2);
        assert_eq!(old[0].path, first.path);
        assert_eq!(old[0].lines().unwrap(), vec![b"{\"a\":1}\n".to_vec()]);
        assert_eq!(
            old[1].lines().unwrap(),
            vec![b"{\"b\":2}\n".to_vec(), b"{\"c\":3}\n".to_vec()]
        );
        for s in old {
            s.remove();
        }
        let (_spool, old) = Spool::open(dir.path()).unwrap();
        assert!(
            old.is_empty(),
            "an empty current file is not sealed: {old:?}"
        );
    }
}
