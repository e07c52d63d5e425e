//! Joins kernel records into usage events: finds the replica by cgroup id, the call id in
//! the request head or environment, and folds a fork-mode invocation's children into it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{HttpRecord, ProcessRecord, proc_flag, rfc3339::Rfc3339};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::{
    event::{Text, UsageEvent},
    records,
};

/// What the joiner needs to know about a watched cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub namespace: Arc<str>,
    pub function: Arc<str>,
    pub replica: Arc<str>,
    pub memory_limit_bytes: Option<u64>,
}

/// How long a replica that went away still names late records, and how long a child's
/// record waits for its invocation's root process.
const GRACE: Duration = Duration::from_secs(60);

/// Children's peaks waiting for the root process of their invocation.
struct Pending {
    peak: u64,
    cpu_ns: u64,
    seen: Instant,
}

/// Turns kernel records into [`UsageEvent`]s.
pub struct Joiner {
    replicas: HashMap<u64, ReplicaInfo>,
    gone: HashMap<u64, (ReplicaInfo, Instant)>,
    children: HashMap<String, Pending>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, ns.
    clock_offset: i128,
    /// Whether `sched_switch` is attached: without it `cpu_ns` is not measured.
    cpu_time: bool,
    /// The last `started` written, by its Unix second: events come in bursts of the same
    /// second, which then cost nine digits instead of the calendar.
    last_second: Option<(u64, Rfc3339)>,
}

/// Why a record produced no event.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its cgroup is not (or no longer) a known replica.
    UnknownCgroup(u64),
    /// A child process: folded into its invocation's event.
    Child,
}

impl Joiner {
    pub fn new(clock_offset: i128) -> Self {
        Self {
            replicas: HashMap::new(),
            gone: HashMap::new(),
            children: HashMap::new(),
            clock_offset,
            cpu_time: true,
            last_second: None,
        }
    }

    /// Reports `cpu_ns` only if `on` (the `sched_switch` program is attached).
    pub fn with_cpu_time(mut self, on: bool) -> Self {
        self.cpu_time = on;
        self
    }

    /// Makes `cgroup_id` name `info` (a new or changed replica).
    pub fn watch(&mut self, cgroup_id: u64, info: ReplicaInfo) {
        self.gone.remove(&cgroup_id);
        self.replicas.insert(cgroup_id, info);
    }

    /// Forgets `cgroup_id` after a grace period for records still in flight.
    pub fn unwatch(&mut self, cgroup_id: u64) {
        if let Some(info) = self.replicas.remove(&cgroup_id) {
            self.gone.insert(cgroup_id, (info, Instant::now()));
        }
    }

    /// Drops state older than the grace period.
    pub fn expire(&mut self) {
        let now = Instant::now();
        self.gone.retain(|_, (_, t)| now.duration_since(*t) < GRACE);
        self.children
            .retain(|_, p| now.duration_since(p.seen) < GRACE);
    }

    fn replica(&self, cgroup_id: u64) -> Option<&ReplicaInfo> {
        self.replicas
            .get(&cgroup_id)
            .or_else(|| self.gone.get(&cgroup_id).map(|(i, _)| i))
    }

    /// `mono_ns` as the wall-clock time it was, in RFC 3339 (30 bytes: the time is at most
    /// `i64::MAX` ns after 1970, in the year 2262).
    fn rfc3339(&mut self, mono_ns: u64) -> Text<32> {
        let ns = (mono_ns as i128 + self.clock_offset).clamp(0, i64::MAX as i128) as i64;
        let (secs, nanos) = ((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
        if let Some((s, text)) = &mut self.last_second
            && *s == secs
        {
            text.set_nanos(nanos);
            return Text::new(text.as_str()).unwrap_or_default();
        }
        match Rfc3339::from_unix(secs, nanos) {
            Some(fast) => {
                self.last_second = Some((secs, fast));
                Text::new(fast.as_str()).unwrap_or_default()
            }
            None => Text::new(
                &DateTime::<Utc>::from_timestamp_nanos(ns)
                    .to_rfc3339_opts(SecondsFormat::Nanos, true),
            )
            .unwrap_or_default(),
        }
    }

    /// A fork-mode process exited.
    pub fn process(&mut self, r: &ProcessRecord) -> Result<UsageEvent, Skip> {
        let info = self
            .replica(r.cgroup_id)
            .cloned()
            .ok_or(Skip::UnknownCgroup(r.cgroup_id))?;
        let call_id = records::call_id_from_env(&r.call_id, r.call_id_len);
        if r.flags & proc_flag::CHILD != 0 {
            if let Some(id) = call_id {
                let p = self.children.entry(id).or_insert(Pending {
                    peak: 0,
                    cpu_ns: 0,
                    seen: Instant::now(),
                });
                p.peak = p.peak.max(r.peak_rss_bytes);
                p.cpu_ns += r.cpu_ns;
            }
            return Err(Skip::Child);
        }
        let (child_peak, child_cpu) = call_id
            .as_ref()
            .and_then(|id| self.children.remove(id))
            .map_or((0, 0), |p| (p.peak, p.cpu_ns));
        let cpu = r.cpu_ns + child_cpu;
        let started = self.rfc3339(r.start_ns);
        Ok(UsageEvent {
            id: crate::event::new_id(),
            call_id,
            namespace: info.namespace.clone(),
            function_name: info.function.clone(),
            replica: info.replica.clone(),
            started,
            duration_ns: r.end_ns.saturating_sub(r.start_ns),
            status_code: records::fork_status(r.exit_code),
            memory_peak_bytes: r.peak_rss_bytes.max(child_peak),
            memory_limit_bytes: info.memory_limit_bytes,
            cpu_ns: (self.cpu_time && cpu > 0).then_some(cpu),
            exit_code: Some(r.exit_code),
            source: crate::event::SOURCE,
        })
    }

    /// An http-mode request/response exchange completed.
    pub fn http(&mut self, r: &HttpRecord) -> Result<UsageEvent, Skip> {
        let started = self.rfc3339(r.request_ns);
        let info = self
            .replica(r.cgroup_id)
            .ok_or(Skip::UnknownCgroup(r.cgroup_id))?;
        let head_len = (r.head_len as usize).min(r.head.len());
        Ok(UsageEvent {
            id: crate::event::new_id(),
            call_id: records::call_id_from_head(&r.head[..head_len]),
            namespace: info.namespace.clone(),
            function_name: info.function.clone(),
            replica: info.replica.clone(),
            started,
            duration_ns: r.end_ns.saturating_sub(r.request_ns),
            status_code: r.status,
            memory_peak_bytes: r.peak_rss_bytes,
            memory_limit_bytes: info.memory_limit_bytes,
            cpu_ns: None,
            exit_code: None,
            source: crate::event::SOURCE,
        })
    }
}

#[cfg(test)]
mod tests {
    use agent_common::CALL_ID_LEN;

    use super::*;

    fn proc_record(flags: u32, call_id: &str, peak: u64, cpu: u64) -> ProcessRecord {
        let mut id = [0u8; CALL_ID_LEN];
        id[..call_id.len()].copy_from_slice(call_id.as_bytes());
        ProcessRecord {
            cgroup_id: 7,
            start_ns: 1_000,
            end_ns: 5_000,
            peak_rss_bytes: peak,
            cpu_ns: cpu,
            tgid: 42,
            exit_code: 0,
            flags,
            mm_id: 0,
            call_id_len: call_id.len() as u32,
            _pad: 0,
            call_id: id,
        }
    }

    fn joiner() -> Joiner {
        let mut j = Joiner::new(1_700_000_000_000_000_000);
        j.watch(
            7,
            ReplicaInfo {
                namespace: "ns".into(),
                function: "f".into(),
                replica: "f-0".into(),
                memory_limit_bytes: Some(64),
            },
        );
        j
    }

    #[test]
    fn children_fold_into_the_root() {
        let mut j = joiner();
        assert_eq!(
            j.process(&proc_record(proc_flag::CHILD, "c1", 900, 10)),
            Err(Skip::Child)
        );
        assert_eq!(
            j.process(&proc_record(proc_flag::CHILD, "c1", 300, 5)),
            Err(Skip::Child)
        );
        let ev = j
            .process(&proc_record(0, "c1", 500, 100))
            .expect("root event");
        assert_eq!(ev.call_id.as_deref(), Some("c1"));
        assert_eq!(ev.memory_peak_bytes, 900, "max of root and children");
        assert_eq!(ev.cpu_ns, Some(115), "sum of root and children");
        assert_eq!(ev.duration_ns, 4_000);
        assert_eq!(ev.started, "2023-11-14T22:13:20.000001000Z");
        // The children were consumed: the next invocation with that id starts clean.
        let ev = j
            .process(&proc_record(0, "c1", 500, 0))
            .expect("root event");
        assert_eq!((ev.memory_peak_bytes, ev.cpu_ns), (500, None));
    }

    #[test]
    fn each_event_gets_its_own_v4_id() {
        let mut j = joiner();
        let a = j.process(&proc_record(0, "a", 1, 1)).expect("event");
        let b = j.process(&proc_record(0, "a", 1, 1)).expect("event");
        assert_ne!(a.id, b.id, "same call, two events, two ids");
        for id in [&a.id, &b.id] {
            let u = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(u.get_version_num(), 4, "{id}");
        }
    }

    #[test]
    fn no_cpu_ns_without_the_switch_program() {
        let mut j = joiner().with_cpu_time(false);
        let ev = j
            .process(&proc_record(0, "c2", 500, 100))
            .expect("root event");
        assert_eq!(ev.cpu_ns, None, "a partial slice is not CPU time");
        assert_eq!(ev.memory_peak_bytes, 500);
    }

    #[test]
    fn unknown_and_departed_cgroups() {
        let mut j = joiner();
        let mut r = proc_record(0, "x", 1, 1);
        r.cgroup_id = 8;
        assert_eq!(j.process(&r), Err(Skip::UnknownCgroup(8)));
        j.unwatch(7);
        // Records still in flight after the replica went away keep its name.
        let ev = j
            .process(&proc_record(0, "late", 1, 1))
            .expect("late record");
        assert_eq!(&*ev.replica, "f-0");
    }
}
