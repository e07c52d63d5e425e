//! The on-disk queue that takes the usage events the in-memory buffer cannot hold while the
//! gateway is away: numbered JSON-lines segment files, oldest sent first, bounded in bytes.
//!
//! A segment is written to `*.tmp` and renamed, so a crash leaves whole segments or none;
//! a segment is removed only after the gateway accepted it (at-least-once: a crash between
//! the two sends it again). One agent at a time: the directory is locked (`.lock`).

use std::{
    collections::VecDeque,
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::event::UsageEvent;

/// Why the spool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool directory {0} is in use by another agent (its .lock is held)")]
    Locked(PathBuf),
}

/// Sequence numbers start here, so segments put back at the front (shutdown) have room.
const FIRST_SEQ: u64 = 1 << 40;

/// One segment file: `{seq:020}-{events}.jsonl`.
#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    events: usize,
    bytes: u64,
}

/// What a push had to give up to stay within the byte bound.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Events of the oldest segments removed to make room.
    pub events: usize,
}

/// The spool of one agent, locked for its lifetime.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segments: VecDeque<Segment>,
    bytes: u64,
    events: usize,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Spool {
    /// Opens (creating) `dir`, locks it, and finds the segments a previous run left;
    /// half-written `*.tmp` files are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.into())),
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some((seq, events)) = parse_name(&name) else {
                continue;
            };
            let bytes = entry.metadata().map_err(io(&entry.path()))?.len();
            segments.push(Segment { seq, events, bytes });
        }
        segments.sort_by_key(|s| s.seq);
        Ok(Self {
            dir: dir.into(),
            max_bytes,
            bytes: segments.iter().map(|s| s.bytes).sum(),
            events: segments.iter().map(|s| s.events).sum(),
            segments: segments.into(),
            _lock: lock,
        })
    }

    /// Events on disk.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Appends `batch` as the newest segment, removing the oldest segments if the bound
    /// would be passed (a batch larger than the whole bound is refused: all evicted).
    pub fn push_back(&mut self, batch: &[UsageEvent]) -> Result<Evicted, SpoolError> {
        let seq = self.segments.back().map_or(FIRST_SEQ, |s| s.seq + 1);
        self.write(seq, batch, false)
    }

    /// Puts `batch` back before every segment (events that were older than all of them).
    pub fn push_front(&mut self, batch: &[UsageEvent]) -> Result<Evicted, SpoolError> {
        let seq = self.segments.front().map_or(FIRST_SEQ, |s| s.seq - 1);
        self.write(seq, batch, true)
    }

    fn write(
        &mut self,
        seq: u64,
        batch: &[UsageEvent],
        front: bool,
    ) -> Result<Evicted, SpoolError> {
        if batch.is_empty() {
            return Ok(Evicted::default());
        }
        let mut text = Vec::with_capacity(batch.len() * 400);
        for e in batch {
            serde_json::to_writer(&mut text, e).expect("a UsageEvent always serialises");
            text.push(b'\n');
        }
        let bytes = text.len() as u64;
        if bytes > self.max_bytes {
            return Ok(Evicted {
                events: batch.len(),
            });
        }
        let mut evicted = Evicted::default();
        while self.bytes + bytes > self.max_bytes {
            // The oldest events go first, even when the new batch is put at the front.
            let Some(old) = self.segments.pop_front() else {
                break;
            };
            self.forget(&old);
            let _ = fs::remove_file(self.path(&old));
            evicted.events += old.events;
        }
        let segment = Segment {
            seq,
            events: batch.len(),
            bytes,
        };
        let path = self.path(&segment);
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text).map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        self.bytes += bytes;
        self.events += segment.events;
        if front {
            self.segments.push_front(segment);
        } else {
            self.segments.push_back(segment);
        }
        Ok(evicted)
    }

    /// The oldest segment's events and its sequence number (for [`remove`](Self::remove)).
    /// A segment that cannot be read or parsed is removed and reported as `Err(events)`.
    pub fn oldest(&mut self) -> Option<Result<(u64, Vec<UsageEvent>), usize>> {
        let segment = self.segments.front()?.clone();
        let path = self.path(&segment);
        let parsed: Option<Vec<UsageEvent>> = fs::read(&path).ok().and_then(|text| {
            text.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).ok())
                .collect()
        });
        match parsed {
            Some(events) => Some(Ok((segment.seq, events))),
            None => {
                self.remove(segment.seq);
                Some(Err(segment.events))
            }
        }
    }

    /// Removes the segment `seq` (sent, or unreadable).
    pub fn remove(&mut self, seq: u64) {
        if let Some(i) = self.segments.iter().position(|s| s.seq == seq) {
            let segment = self.segments.remove(i).expect("index found above");
            self.forget(&segment);
            let _ = fs::remove_file(self.path(&segment));
        }
    }

    fn forget(&mut self, s: &Segment) {
        self.bytes -= s.bytes;
        self.events -= s.events;
    }

    fn path(&self, s: &Segment) -> PathBuf {
        self.dir.join(format!("{:020}-{}.jsonl", s.seq, s.events))
    }
}

fn parse_name(name: &str) -> Option<(u64, usize)> {
    let stem = name.strip_suffix(".jsonl")?;
    let (seq, events) = stem.split_once('-')?;
    Some((seq.parse().ok()?, events.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Text;

    fn ev(i: usize) -> UsageEvent {
        UsageEvent {
            id: Text::new(&format!("00000000-0000-4000-8000-{i:012}")).unwrap(),
            call_id: Some(format!("c{i}")),
            namespace: "openfaas-fn".into(),
            function_name: "f".into(),
            replica: "f-0".into(),
            started: Text::new("2026-01-01T00:00:00.000000001Z").unwrap(),
            duration_ns: i as u64,
            status_code: 200,
            memory_peak_bytes: 1,
            memory_limit_bytes: None,
            cpu_ns: None,
            exit_code: None,
            source: "kernel".into(),
        }
    }

    fn ids(events: &[UsageEvent]) -> Vec<String> {
        events.iter().filter_map(|e| e.call_id.clone()).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tally-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn order_survives_a_reopen_and_front_goes_first() {
        let dir = tmp("order");
        let mut s = Spool::open(&dir, 1 << 20).expect("open");
        s.push_back(&[ev(3), ev(4)]).expect("push");
        s.push_back(&[ev(5)]).expect("push");
        s.push_front(&[ev(1), ev(2)]).expect("front");
        assert_eq!(s.events(), 5);
        assert!(matches!(
            Spool::open(&dir, 1 << 20),
            Err(SpoolError::Locked(_))
        ));
        drop(s);
        fs::write(dir.join("00000000000000000001-9.tmp"), b"half").expect("tmp");
        let mut s = Spool::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(s.events(), 5);
        let mut got = Vec::new();
        let mut event_ids = Vec::new();
        while let Some(Ok((seq, events))) = s.oldest() {
            got.extend(ids(&events));
            event_ids.extend(events.iter().map(|e| e.id));
            s.remove(seq);
        }
        assert_eq!(got, ["c1", "c2", "c3", "c4", "c5"]);
        // Each event keeps the id it was made with: a resend is recognisably the same event.
        assert_eq!(event_ids, (1..=5).map(|i| ev(i).id).collect::<Vec<_>>());
        assert_eq!((s.events(), s.bytes()), (0, 0));
        assert!(!dir.join("00000000000000000001-9.tmp").exists());
        drop(s);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn events_spooled_without_an_id_still_load() {
        let dir = tmp("legacy");
        let mut s = Spool::open(&dir, 1 << 20).expect("open");
        s.push_back(&[ev(1)]).expect("push");
        drop(s);
        // Rewrite the segment as an agent without event ids wrote it.
        let seg = fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .expect("segment");
        let mut v: serde_json::Value =
            serde_json::from_slice(&fs::read(seg.path()).expect("read")).expect("json");
        v.as_object_mut().expect("object").remove("id");
        fs::write(seg.path(), format!("{v}\n")).expect("write");
        let mut s = Spool::open(&dir, 1 << 20).expect("reopen");
        let (_, events) = s.oldest().expect("some").expect("readable");
        assert_eq!(ids(&events), ["c1"]);
        assert_eq!(events[0].id.len(), 36, "given a fresh id: {}", events[0].id);
        drop(s);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn full_spool_evicts_the_oldest_and_counts_them() {
        let dir = tmp("full");
        let one = serde_json::to_vec(&ev(0)).expect("json").len() as u64 + 1;
        let mut s = Spool::open(&dir, one * 4 + 2).expect("open");
        assert_eq!(s.push_back(&[ev(0), ev(1)]).expect("push").events, 0);
        assert_eq!(s.push_back(&[ev(2), ev(3)]).expect("push").events, 0);
        assert_eq!(s.push_back(&[ev(4)]).expect("push").events, 2);
        assert_eq!(
            s.push_back(&(10..20).map(ev).collect::<Vec<_>>())
                .expect("push")
                .events,
            10
        );
        let (seq, events) = s.oldest().expect("some").expect("readable");
        assert_eq!(ids(&events), ["c2", "c3"]);
        s.remove(seq);
        // A corrupt segment is removed and reported.
        let name = fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .expect("segment");
        fs::write(name.path(), b"{not json\n").expect("corrupt");
        assert_eq!(s.oldest().expect("some").expect_err("corrupt"), 1);
        assert!(s.is_empty());
        drop(s);
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
