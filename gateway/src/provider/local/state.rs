//! Deployed functions and their replica counts, kept in the data directory so the stack
//! comes back the same after a restart. Written atomically (temp file + rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::FunctionDeployment;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedFunction {
    pub deployment: FunctionDeployment,
    pub replicas: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    version: u32,
    functions: Vec<SavedFunction>,
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("functions.json"),
        }
    }

    pub fn load(&self) -> Result<Vec<SavedFunction>, String> {
        match fs::read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
            Ok(bytes) => serde_json::from_slice::<SavedState>(&bytes)
                .map(|s| s.functions)
                .map_err(|e| format!("parsing {}: {e}", self.path.display())),
        }
    }

    pub fn save(&self, functions: Vec<SavedFunction>) -> std::io::Result<()> {
        let state = SavedState {
            version: 1,
            functions,
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)
    }
}

/// Writes snapshots in the order they were taken: one older than the last written is
/// skipped, so writes may run off the request path without going back in time.
pub struct StateWriter {
    file: StateFile,
    last: std::sync::Mutex<u64>,
}

impl StateWriter {
    pub fn new(file: StateFile) -> Self {
        Self {
            file,
            last: std::sync::Mutex::new(0),
        }
    }

    /// Writes snapshot number `seq` unless a newer one was written already.
    pub fn write(&self, seq: u64, functions: Vec<SavedFunction>) -> std::io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= *last {
            return Ok(());
        }
        self.file.save(functions)?;
        *last = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert!(file.load().unwrap().is_empty());
        let d: FunctionDeployment =
            serde_json::from_str(r#"{"service":"a","image":"x","envProcess":"cat"}"#).unwrap();
        file.save(vec![SavedFunction {
            deployment: d.clone(),
            replicas: 3,
            created_at: Utc::now(),
        }])
        .unwrap();
        let back = file.load().unwrap();
        assert_eq!(back[0].deployment, d);
        assert_eq!(back[0].replicas, 3);
        let writer = StateWriter::new(StateFile::new(dir.path()));
        writer.write(2, vec![]).unwrap();
        writer.write(1, back.clone()).unwrap();
        assert!(
            file.load().unwrap().is_empty(),
            "an older snapshot must not win"
        );
        fs::write(dir.path().join("functions.json"), b"{").unwrap();
        assert!(file.load().unwrap_err().contains("parsing"));
    }
}
