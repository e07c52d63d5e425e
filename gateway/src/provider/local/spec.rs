//! Turns a `FunctionDeployment` into what the local provider runs: the command, the
//! mode, limits and watchdog settings, refusing anything it could not run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::cgroup::Limits;
use super::spawn::resolve_program;
use crate::config::parse_duration;
use crate::quantity::{parse_cpu, parse_memory};
use crate::types::FunctionDeployment;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Classic watchdog: one process per request.
    Fork,
    /// A long-running server on `PORT`.
    Http,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Fork => "fork",
            RunMode::Http => "http",
        }
    }
}

/// Everything needed to run one function's replicas.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub argv: Vec<String>,
    pub mode: RunMode,
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    pub max_inflight: usize,
    pub exec_timeout: Option<Duration>,
    pub min_replicas: u64,
    pub max_replicas: u64,
}

/// Validates `d`; the error message names the offending field.
pub fn run_spec(d: &FunctionDeployment, cwd: &Path) -> Result<RunSpec, String> {
    if d.image.trim().is_empty() {
        return Err("image is required (it is recorded, not pulled)".into());
    }
    let process = d
        .env_process
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or("envProcess is required: the local provider runs it as the function's command")?;
    let argv = shlex::split(process)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("envProcess {process:?} is not a valid command line"))?;
    if resolve_program(&argv[0], cwd).is_none() {
        return Err(format!(
            "envProcess command {:?} was not found or is not executable",
            argv[0]
        ));
    }
    let mode = match d.env("mode").unwrap_or("fork") {
        "fork" => RunMode::Fork,
        "http" => RunMode::Http,
        other => {
            return Err(format!(
                "envVars.mode {other:?} must be \"fork\" or \"http\""
            ));
        }
    };
    let limits = Limits {
        memory_bytes: quantity(d, "memory", parse_memory)?,
        cpu_millis: quantity(d, "cpu", parse_cpu)?,
    };
    let max_inflight = match d.env("max_inflight") {
        None => 0,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("envVars.max_inflight {v:?} must be a whole number"))?,
    };
    let exec_timeout = match d.env("exec_timeout") {
        None => None,
        Some(v) => {
            let t = parse_duration(v).map_err(|e| format!("envVars.exec_timeout: {e}"))?;
            (!t.is_zero()).then_some(t)
        }
    };
    let scale = crate::scaling::labels::ScaleLabels::parse(d.labels.as_ref())?;
    let (min_replicas, max_replicas) = (scale.min, scale.max);
    Ok(RunSpec {
        argv,
        mode,
        env: d.env_vars.clone().unwrap_or_default(),
        limits,
        max_inflight,
        exec_timeout,
        min_replicas,
        max_replicas,
    })
}

fn quantity(
    d: &FunctionDeployment,
    what: &str,
    parse: fn(&str) -> Result<u64, crate::quantity::QuantityError>,
) -> Result<Option<u64>, String> {
    let value = d.limits.as_ref().and_then(|l| match what {
        "memory" => l.memory.as_deref(),
        _ => l.cpu.as_deref(),
    });
    value
        .map(|v| parse(v).map_err(|e| format!("limits.{what}: {e}")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(json: &str) -> FunctionDeployment {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn refuses_what_cannot_run() {
        let cwd = Path::new("/tmp");
        let cases = [
            (r#"{"service":"a","image":"x"}"#, "envProcess is required"),
            (
                r#"{"service":"a","image":"x","envProcess":"no-such-cmd-xyz"}"#,
                "not found",
            ),
            (
                r#"{"service":"a","image":"x","envProcess":"cat","envVars":{"mode":"grpc"}}"#,
                "envVars.mode",
            ),
            (
                r#"{"service":"a","image":"x","envProcess":"cat","limits":{"memory":"12Q"}}"#,
                "limits.memory",
            ),
            (
                r#"{"service":"a","image":"x","envProcess":"cat","envVars":{"max_inflight":"-1"}}"#,
                "max_inflight",
            ),
            (
                r#"{"service":"a","image":"x","envProcess":"cat","labels":{"com.openfaas.scale.min":"5","com.openfaas.scale.max":"2"}}"#,
                "greater",
            ),
            (r#"{"service":"a","image":"","envProcess":"cat"}"#, "image"),
        ];
        for (json, expect) in cases {
            let err = run_spec(&deployment(json), cwd).unwrap_err();
            assert!(err.contains(expect), "{json}: {err}");
        }
    }

    #[test]
    fn reads_watchdog_settings() {
        let d = deployment(
            r#"{"service":"a","image":"x","envProcess":"cat -n","envVars":{"mode":"http","max_inflight":"3","exec_timeout":"2s"},"limits":{"memory":"64Mi","cpu":"500m"}}"#,
        );
        let s = run_spec(&d, Path::new("/tmp")).unwrap();
        assert_eq!(s.argv, ["cat", "-n"]);
        assert_eq!(s.mode, RunMode::Http);
        assert_eq!(s.max_inflight, 3);
        assert_eq!(s.exec_timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.limits.memory_bytes, Some(64 << 20));
        assert_eq!(s.limits.cpu_millis, Some(500));
        assert_eq!((s.min_replicas, s.max_replicas), (1, 20));
    }
}
