//! Function logs: a bounded history per function plus a live feed, behind
//! `/system/logs` (tail, since, instance filters and `follow`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::broadcast;

use crate::names::FunctionRef;
use crate::types::LogLine;

/// Lines kept per function for non-follow queries and the start of a follow.
const HISTORY_PER_FUNCTION: usize = 2000;
/// Lines a slow follower may fall behind before it skips ahead.
const LIVE_CAPACITY: usize = 4096;
/// Longest line kept; the rest is cut.
const MAX_LINE_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct Entry {
    pub function: FunctionRef,
    pub instance: String,
    pub at: DateTime<Utc>,
    pub text: String,
}

impl Entry {
    pub fn to_line(&self) -> LogLine {
        LogLine {
            name: self.function.name.to_string(),
            namespace: self.function.namespace.to_string(),
            instance: self.instance.clone(),
            timestamp: self.at.to_rfc3339_opts(SecondsFormat::Nanos, true),
            text: self.text.clone(),
        }
    }
}

/// What a `/system/logs` request selects.
#[derive(Clone, Debug)]
pub struct Filter {
    pub function: FunctionRef,
    pub instance: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, e: &Entry) -> bool {
        e.function == self.function
            && self.instance.as_ref().is_none_or(|i| *i == e.instance)
            && self.since.is_none_or(|s| e.at >= s)
    }
}

pub struct LogHub {
    history: Mutex<HashMap<FunctionRef, VecDeque<Entry>>>,
    live: broadcast::Sender<Entry>,
}

impl Default for LogHub {
    fn default() -> Self {
        Self {
            history: Mutex::default(),
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }
}

impl LogHub {
    pub fn push(&self, function: &FunctionRef, instance: &str, text: &str) {
        let mut text = text.trim_end_matches(['\n', '\r']).to_string();
        if text.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let entry = Entry {
            function: function.clone(),
            instance: instance.to_string(),
            at: Utc::now(),
            text,
        };
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let lines = history.entry(function.clone()).or_default();
            if lines.len() == HISTORY_PER_FUNCTION {
                lines.pop_front();
            }
            lines.push_back(entry.clone());
        }
        let _ = self.live.send(entry);
    }

    /// The last `tail` matching lines (all when `None`), oldest first.
    pub fn history(&self, filter: &Filter, tail: Option<usize>) -> Vec<Entry> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lines) = history.get(&filter.function) else {
            return Vec::new();
        };
        let matching: Vec<&Entry> = lines.iter().filter(|e| filter.matches(e)).collect();
        let skip = tail.map_or(0, |t| matching.len().saturating_sub(t));
        matching.into_iter().skip(skip).cloned().collect()
    }

    /// A live feed of new lines (filter them with [`Filter::matches`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Entry> {
        self.live.subscribe()
    }

    pub fn forget(&self, function: &FunctionRef) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.remove(function);
    }
}

/// Reads `reader` line by line, handing each line (cut at [`MAX_LINE_BYTES`], the rest
/// of a longer line dropped) to `emit`; memory stays bounded whatever the process writes.
pub async fn pump_lines<R>(reader: R, mut emit: impl FnMut(&str))
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(b) if !b.is_empty() => b,
            _ => break,
        };
        let (chunk, ends_line) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len() + usize::from(ends_line);
        reader.consume(used);
        if ends_line {
            emit(&String::from_utf8_lossy(&line));
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&String::from_utf8_lossy(&line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Namespace;

    #[tokio::test]
    async fn long_lines_are_cut() {
        let mut input = vec![b'a'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\nshort\nlast");
        let mut lines = Vec::new();
        pump_lines(&input[..], |l| lines.push(l.to_string())).await;
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1..], ["short", "last"]);
    }

    #[test]
    fn tail_and_instance_filters() {
        let hub = LogHub::default();
        let ns = Namespace::new("openfaas-fn").unwrap();
        let f = FunctionRef::parse_qualified("a", &ns).unwrap();
        let g = FunctionRef::parse_qualified("b", &ns).unwrap();
        for i in 0..5 {
            hub.push(
                &f,
                if i % 2 == 0 { "a-0" } else { "a-1" },
                &format!("line {i}\n"),
            );
        }
        hub.push(&g, "b-0", "other");
        let all = Filter {
            function: f.clone(),
            instance: None,
            since: None,
        };
        let last2: Vec<String> = hub
            .history(&all, Some(2))
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(last2, ["line 3", "line 4"]);
        let only = Filter {
            instance: Some("a-1".into()),
            ..all
        };
        assert_eq!(hub.history(&only, None).len(), 2);
    }
}
