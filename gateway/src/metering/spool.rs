//! The metering buffer's write-ahead spool: each event is copied into a memory-mapped file
//! before the invocation's response completes, so a `kill -9` of the gateway loses none.
//!
//! Files in the spool directory are segments `seg-<seq>.wal`, each mapped shared and written
//! at offsets reserved under the buffer's lock (a copy, no system call per event). Each flush
//! seals the current segment; a sealed one is removed once JetStream acknowledged its events.
//! [`Spool::open`] hands every segment a crashed process left (and the older `current.wal` /
//! `sealed-*.wal` files) over for replay. It survives a crash of the process (the pages are
//! the file's), not a power loss.
//!
//! Every event line is written as `\n` + JSON + `\n`: a copy torn by a crash, or a reserved
//! region never written (zeros), cannot merge with a neighbour, and is left out at replay.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};

const SEGMENT_PREFIX: &str = "seg-";
const LEGACY_CURRENT: &str = "current.wal";
const LEGACY_SEALED_PREFIX: &str = "sealed-";
const SUFFIX: &str = ".wal";
/// A segment's mapped (virtual) size: tmpfs only holds the pages written.
const SEGMENT_BYTES: usize = 64 << 20;
/// Space allocated ahead of the writers (a mapped page of a full tmpfs would be SIGBUS, an
/// allocation that fails is an error): a flush's worth of events at the default N.
const ALLOCATE_STEP: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("metering spool {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// One mapped segment file.
struct Segment {
    path: PathBuf,
    map: MmapRaw,
    file: File,
    /// Bytes from the start backed by storage (changed under the buffer's lock only).
    allocated: AtomicUsize,
}

impl Segment {
    fn create(dir: &Path, seq: u64) -> Result<Self, SpoolError> {
        let path = dir.join(segment_name(seq));
        let err = |e| SpoolError::Io(path.clone(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(err)?;
        file.set_len(SEGMENT_BYTES as u64).map_err(err)?;
        let map = MmapOptions::new()
            .len(SEGMENT_BYTES)
            .map_raw(&file)
            .map_err(err)?;
        let seg = Self {
            path,
            map,
            file,
            allocated: AtomicUsize::new(0),
        };
        seg.allocate_to(ALLOCATE_STEP)?;
        Ok(seg)
    }

    /// Backs the file's first `len` bytes (rounded up to ALLOCATE_STEP) with storage now.
    fn allocate_to(&self, len: usize) -> Result<(), SpoolError> {
        let have = self.allocated.load(Ordering::Relaxed);
        if len <= have {
            return Ok(());
        }
        let want = (len.div_ceil(ALLOCATE_STEP) * ALLOCATE_STEP).min(SEGMENT_BYTES);
        nix::fcntl::fallocate(
            &self.file,
            nix::fcntl::FallocateFlags::empty(),
            have as i64,
            (want - have) as i64,
        )
        .map_err(|e| SpoolError::Io(self.path.clone(), io::Error::from(e)))?;
        self.allocated.store(want, Ordering::Relaxed);
        Ok(())
    }

    fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing a published spool file: {e}");
        }
    }
}

/// The open spool: the segment being written, the next one made ready by the flusher.
pub struct Spool {
    dir: PathBuf,
    current: Arc<Segment>,
    /// Bytes of `current` reserved so far.
    used: usize,
    /// Segments filled up before the flush that seals the current one, and their use.
    full: Vec<(Arc<Segment>, usize)>,
    spare: Option<Segment>,
    next_seq: u64,
}

/// A region of a segment reserved for some event lines; written outside the buffer's
/// lock (a region in a just-sealed segment is replayed with it, or was published).
pub struct SpoolWriter {
    segment: Arc<Segment>,
    at: usize,
    len: usize,
}

impl SpoolWriter {
    /// Copies `lines` (each ending with `\n`) into the region, each after a `\n`.
    pub fn write<L: AsRef<[u8]>>(&self, lines: &[L]) {
        let mut at = self.at;
        let end = self.at + self.len;
        let base = self.segment.map.as_mut_ptr();
        for line in lines {
            let line = line.as_ref();
            debug_assert!(
                at + 1 + line.len() <= end,
                "reserved by `reserve` for these lines"
            );
            if at + 1 + line.len() > end {
                return;
            }
            // SAFETY: `[self.at, end)` lies inside the mapping (`reserve` checked it against
            // SEGMENT_BYTES) and was handed to this writer alone; the mapping lives as long
            // as `self.segment`; the source is a separate heap buffer.
            unsafe {
                *base.add(at) = b'\n';
                std::ptr::copy_nonoverlapping(line.as_ptr(), base.add(at + 1), line.len());
            }
            at += 1 + line.len();
        }
    }
}

/// What holds one published batch (or what a crashed process left): segments of this
/// process and their use, or files; cleared once their events are published.
#[derive(Default)]
pub struct Sealed {
    live: Vec<(Arc<Segment>, usize)>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Spool {
    /// Opens the spool in `dir`; returns what a previous process left unpublished, oldest
    /// first, for replay.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Sealed>), SpoolError> {
        let err = |e| SpoolError::Io(dir.to_path_buf(), e);
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut old: Vec<(u8, u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let rank = if let Some(seq) = seq_of(&name, LEGACY_SEALED_PREFIX) {
                    (0, seq)
                } else if name == LEGACY_CURRENT {
                    (1, 0)
                } else {
                    (2, seq_of(&name, SEGMENT_PREFIX)?)
                };
                Some((rank.0, rank.1, e.path()))
            })
            .collect();
        old.sort();
        let next_seq = old
            .iter()
            .filter(|(kind, ..)| *kind == 2)
            .map(|(_, seq, _)| seq + 1)
            .max()
            .unwrap_or(0);
        let current = Arc::new(Segment::create(dir, next_seq)?);
        // A segment a crash left without a single event (just made, say) goes at once.
        let sealed = old
            .into_iter()
            .map(|(.., path)| Sealed {
                files: vec![path],
                ..Sealed::default()
            })
            .filter(|s| match s.lines() {
                Ok(lines) if lines.is_empty() => {
                    s.clear_files();
                    false
                }
                _ => true,
            })
            .collect();
        Ok((
            Self {
                dir: dir.to_path_buf(),
                current,
                used: 0,
                full: Vec::new(),
                spare: None,
                next_seq: next_seq + 1,
            },
            sealed,
        ))
    }

    /// Reserves room for `lines` (called under the buffer's lock, so regions follow the
    /// order events were buffered in).
    pub fn reserve<L: AsRef<[u8]>>(&mut self, lines: &[L]) -> Result<SpoolWriter, SpoolError> {
        let len: usize = lines.iter().map(|l| l.as_ref().len() + 1).sum();
        if len > SEGMENT_BYTES {
            return Err(SpoolError::Io(
                self.current.path.clone(),
                io::Error::other(format!("{len} bytes of events at once")),
            ));
        }
        if self.used + len > SEGMENT_BYTES {
            // Full before a flush sealed it (a burst, or NATS down): start the next one.
            let next = Arc::new(self.take_spare()?);
            let full = std::mem::replace(&mut self.current, next);
            self.full.push((full, self.used));
            self.used = 0;
        }
        self.current.allocate_to(self.used + len)?;
        let writer = SpoolWriter {
            segment: self.current.clone(),
            at: self.used,
            len,
        };
        self.used += len;
        Ok(writer)
    }

    fn take_spare(&mut self) -> Result<Segment, SpoolError> {
        match self.spare.take() {
            Some(s) => Ok(s),
            None => {
                self.next_seq += 1;
                Segment::create(&self.dir, self.next_seq - 1)
            }
        }
    }

    /// Seals everything reserved so far and moves on to a fresh segment.
    pub fn seal(&mut self) -> Result<Sealed, SpoolError> {
        let next = Arc::new(self.take_spare()?);
        let sealed = std::mem::replace(&mut self.current, next);
        let mut live = std::mem::take(&mut self.full);
        live.push((sealed, self.used));
        self.used = 0;
        Ok(Sealed {
            live,
            files: Vec::new(),
        })
    }

    /// Whether the next [`seal`](Self::seal) has a segment ready; if not, where to
    /// [`prepare`] one (outside the buffer's lock).
    pub fn needs_spare(&mut self) -> Option<(PathBuf, u64)> {
        if self.spare.is_some() {
            return None;
        }
        self.next_seq += 1;
        Some((self.dir.clone(), self.next_seq - 1))
    }

    /// Takes a segment made by [`prepare`] or [`Sealed::clear`] as the next one.
    pub fn set_spare(&mut self, spare: PreparedSegment) {
        if self.spare.is_none() {
            self.spare = Some(spare.0);
        } else {
            spare.discard();
        }
    }

    /// At a clean shutdown with everything published: removes the unused segments and
    /// the directory, if nothing else is in it.
    pub fn remove_if_empty(self) {
        if self.used > 0 || !self.full.is_empty() {
            return;
        }
        self.current.remove();
        if let Some(s) = &self.spare {
            s.remove();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A segment ready to be written from its start.
pub struct PreparedSegment(Segment);

impl PreparedSegment {
    /// Not needed after all: its file goes.
    pub fn discard(self) {
        self.0.remove();
    }
}

/// Creates segment `seq` in `dir` (mapping and allocating it takes a few system calls,
/// better done outside the buffer's lock).
pub fn prepare(dir: &Path, seq: u64) -> Result<PreparedSegment, SpoolError> {
    Segment::create(dir, seq).map(PreparedSegment)
}

impl Sealed {
    /// The event lines it holds (each with its final newline). A region never written is
    /// left out; a torn copy comes back as a line that is not JSON, which replay drops.
    pub fn lines(&self) -> Result<Vec<Vec<u8>>, SpoolError> {
        let mut out = Vec::new();
        let paths = self.live.iter().map(|(s, _)| &s.path).chain(&self.files);
        for path in paths {
            let bytes = read_written(path).map_err(|e| SpoolError::Io(path.clone(), e))?;
            let mut rest = bytes.as_slice();
            while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                let piece = &rest[..end];
                // Whatever precedes a zero byte belongs to a region written only in part.
                let line = match piece.iter().rposition(|b| *b == 0) {
                    Some(z) => &piece[z + 1..],
                    None => piece,
                };
                if !line.is_empty() {
                    let mut l = line.to_vec();
                    l.push(b'\n');
                    out.push(l);
                }
                rest = &rest[end + 1..];
            }
        }
        Ok(out)
    }

    /// Its events are safely published: a segment of this process is zeroed for reuse
    /// (its pages stay allocated and mapped: no page faults for the next batch) and
    /// returned; anything else is removed.
    pub fn clear(self) -> Option<PreparedSegment> {
        self.clear_files();
        let mut reusable = None;
        for (segment, used) in self.live {
            // A writer that reserved before the seal may still hold it: then it just goes.
            match Arc::try_unwrap(segment) {
                Ok(segment) if reusable.is_none() => {
                    // SAFETY: no writer holds the segment any more (this was the last
                    // reference) and `[0, used)` lies inside the mapping.
                    unsafe { std::ptr::write_bytes(segment.map.as_mut_ptr(), 0, used) };
                    reusable = Some(PreparedSegment(segment));
                }
                Ok(segment) => segment.remove(),
                Err(shared) => shared.remove(),
            }
        }
        reusable
    }

    fn clear_files(&self) {
        for path in &self.files {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), "removing a published spool file: {e}");
            }
        }
    }

    /// Its files.
    pub fn paths(&self) -> Vec<PathBuf> {
        let live = self.live.iter().map(|(s, _)| s.path.clone());
        live.chain(self.files.iter().cloned()).collect()
    }

    /// The files, for a log line.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.join(", ")
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

/// The part of a spool file that can hold events: segments are allocated from the start,
/// so what lies past the allocated blocks of a (sparse) segment is a hole.
fn read_written(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let len = meta.len().min(meta.blocks() * 512);
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn segment_name(seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{seq:020}{SUFFIX}")
}

fn seq_of(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn line(s: &str) -> Bytes {
        Bytes::from(format!("{s}\n"))
    }

    #[test]
    fn a_crash_leaves_everything_for_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, old) = Spool::open(dir.path()).unwrap();
        assert!(old.is_empty());
        let a = [line("{\"a\":1}")];
        spool.reserve(&a).unwrap().write(&a);
        let first = spool.seal().unwrap();
        let b = [line("{\"b\":2}"), line("{\"c\":3}")];
        spool.reserve(&b).unwrap().write(&b);
        // Reserved, but the process died before the copy: zeros.
        let _never = spool.reserve(&[line("{\"lost\":0}")]).unwrap();
        let d = [line("{\"d\":4}")];
        spool.reserve(&d).unwrap().write(&d);
        drop(spool); // the process dies here: `first` was never published
        let (_spool, old) = Spool::open(dir.path()).unwrap();
        assert_eq!(old.len(), 2, "{old:?}");
        assert_eq!(old[0].paths(), first.paths());
        assert_eq!(old[0].lines().unwrap(), vec![b"{\"a\":1}\n".to_vec()]);
        assert_eq!(
            old[1].lines().unwrap(),
            [&b[0], &b[1], &d[0]].map(|l| l.to_vec()).to_vec()
        );
        for s in old {
            assert!(
                s.clear().is_none(),
                "files of a crashed process are not reused"
            );
        }
        let (spool, old) = Spool::open(dir.path()).unwrap();
        assert!(old.is_empty(), "only the new, empty segment: {old:?}");
        spool.remove_if_empty();
        assert!(!dir.path().exists(), "a clean stop leaves nothing");
    }

    #[test]
    fn a_torn_copy_does_not_take_its_neighbour_along() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(7));
        let mut bytes = b"\n{\"a\":1}\n\n{\"to".to_vec();
        bytes.extend([0u8; 9]); // the rest of the torn region never written
        bytes.extend(b"\n{\"b\":2}\n\n{\"c"); // torn with no zero after it
        bytes.extend(b"\n{\"d\":4}\n");
        bytes.extend([0u8; 100]);
        std::fs::write(&path, bytes).unwrap();
        let sealed = Sealed {
            files: vec![path],
            ..Sealed::default()
        };
        let lines = sealed.lines().unwrap();
        let text: Vec<String> = lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        // The torn `{"c` comes back as text that is not JSON (replay drops it); every
        // whole line comes back whole.
        assert_eq!(
            text,
            ["{\"a\":1}\n", "{\"b\":2}\n", "{\"c\n", "{\"d\":4}\n"]
        );
    }

    #[test]
    fn files_of_the_write_based_spool_are_replayed_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sealed-00000000000000000003.wal"),
            "{\"x\":1}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join(LEGACY_CURRENT), "{\"y\":2}\n").unwrap();
        let (_spool, old) = Spool::open(dir.path()).unwrap();
        let lines: Vec<Vec<u8>> = old.iter().flat_map(|s| s.lines().unwrap()).collect();
        assert_eq!(lines, [b"{\"x\":1}\n".to_vec(), b"{\"y\":2}\n".to_vec()]);
    }

    #[test]
    fn a_full_segment_moves_on_and_is_sealed_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        let big = [Bytes::from(vec![b'x'; SEGMENT_BYTES / 2])];
        spool.reserve(&big).unwrap();
        spool.reserve(&big).unwrap(); // does not fit: a second segment
        let sealed = spool.seal().unwrap();
        assert_eq!(sealed.paths().len(), 2, "{sealed:?}");
        let reused = sealed.clear().expect("a segment to reuse");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "the current segment and the one kept for reuse"
        );
        spool.set_spare(reused);
    }

    #[test]
    fn a_published_segment_is_zeroed_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        let a = [line("{\"a\":1}")];
        spool.reserve(&a).unwrap().write(&a);
        let sealed = spool.seal().unwrap();
        let path = sealed.paths()[0].clone();
        let reused = sealed.clear().expect("reusable: no writer holds it");
        spool.set_spare(reused);
        let b = [line("{\"b\":2}")];
        spool.reserve(&b).unwrap().write(&b);
        let sealed = spool.seal().unwrap(); // the second segment
        let held = spool.reserve(&b).unwrap(); // in the reused one
        held.write(&b);
        drop(sealed);
        drop(spool); // a crash: the reused segment holds `b` alone, not `a` any more
        let replayed = Sealed {
            files: vec![path],
            ..Sealed::default()
        };
        assert_eq!(replayed.lines().unwrap(), vec![b"{\"b\":2}\n".to_vec()]);
        // A writer still holding a sealed segment: it is removed, not reused.
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        let w = spool.reserve(&a).unwrap();
        let sealed = spool.seal().unwrap();
        assert!(sealed.clear().is_none());
        w.write(&a); // harmless: the mapping outlives the file
    }
}
