//! The `function_usage` event and the batch parser: JSON array in, validated rows out.
//! Policy: one bad event rejects the whole batch (400 naming the index and field); nothing is written.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// Longest `duration` accepted: 7 days in nanoseconds. Anything above is a metering bug.
pub const MAX_DURATION_NS: i64 = 7 * 24 * 3600 * 1_000_000_000;

/// The event type this receiver bills (`event` field and `X-Openfaas-Event` header).
pub const EVENT_TYPE: &str = "function_usage";

/// One validated usage event, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub id: String,
    pub namespace: String,
    pub function_name: String,
    pub started: DateTime<Utc>,
    pub duration_ns: i64,
    pub billed_duration_ms: i64,
    pub memory_bytes: i64,
    pub memory_peak_bytes: Option<i64>,
    pub cpu_ns: Option<i64>,
    pub status_code: Option<i32>,
    pub call_id: Option<String>,
    pub source: String,
    pub cold_start: bool,
    pub init_duration_ns: Option<i64>,
}

/// Why a batch was refused. `index` is the event's position in the array.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON array of events")]
    NotArray,
    #[error("event[{index}] must be a JSON object")]
    NotObject { index: usize },
    #[error("event[{index}].{field}: missing")]
    Missing { index: usize, field: &'static str },
    #[error("event[{index}].{field}: expected {expected}")]
    WrongType {
        index: usize,
        field: &'static str,
        expected: &'static str,
    },
    #[error("event[{index}].{field}: {reason}")]
    Invalid {
        index: usize,
        field: &'static str,
        reason: String,
    },
}

/// Parses and validates a whole webhook body.
pub fn parse_batch(body: &[u8]) -> Result<Vec<UsageEvent>, BatchError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| BatchError::NotJson(e.to_string()))?;
    let Value::Array(items) = value else {
        return Err(BatchError::NotArray);
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::Object(obj) => Fields { index, obj }.event(),
            _ => Err(BatchError::NotObject { index }),
        })
        .collect()
}

/// Typed access to one event's fields, with errors that name the field.
struct Fields<'a> {
    index: usize,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn event(&self) -> Result<UsageEvent, BatchError> {
        let event = self.string("event")?;
        if event != EVENT_TYPE {
            return Err(self.invalid("event", format!("expected \"{EVENT_TYPE}\", got {event:?}")));
        }
        let started_raw = self.string("started")?;
        let started = DateTime::parse_from_rfc3339(&started_raw)
            .map_err(|e| self.invalid("started", format!("not RFC3339 ({e})")))?
            .with_timezone(&Utc);
        let duration_ns = self.int("duration")?;
        if !(0..=MAX_DURATION_NS).contains(&duration_ns) {
            return Err(self.invalid(
                "duration",
                format!("{duration_ns} ns is outside 0..=7 days"),
            ));
        }
        let status_code = match self.opt_int("status_code")? {
            None => None,
            Some(c) => Some(
                i32::try_from(c)
                    .ok()
                    .filter(|c| (100..=999).contains(c))
                    .ok_or_else(|| {
                        self.invalid("status_code", format!("{c} is not an HTTP status"))
                    })?,
            ),
        };
        let id = self.string("id")?;
        if id.is_empty() {
            return Err(self.invalid("id", "must not be empty".into()));
        }
        Ok(UsageEvent {
            id,
            namespace: self.string("namespace")?,
            function_name: self.string("function_name")?,
            started,
            duration_ns,
            billed_duration_ms: self.non_negative("billed_duration_ms")?,
            memory_bytes: self.non_negative("memory_bytes")?,
            memory_peak_bytes: self.opt_non_negative("memory_peak_bytes")?,
            cpu_ns: self.opt_non_negative("cpu_ns")?,
            status_code,
            call_id: self.opt_string("call_id")?,
            source: self.string("source")?,
            cold_start: self.opt_bool("cold_start")?.unwrap_or(false),
            init_duration_ns: self.opt_non_negative("init_duration_ns")?,
        })
    }

    fn invalid(&self, field: &'static str, reason: String) -> BatchError {
        BatchError::Invalid {
            index: self.index,
            field,
            reason,
        }
    }

    fn wrong(&self, field: &'static str, expected: &'static str) -> BatchError {
        BatchError::WrongType {
            index: self.index,
            field,
            expected,
        }
    }

    /// The field's value, `None` when absent or `null`.
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn required(&self, field: &'static str) -> Result<&Value, BatchError> {
        self.get(field).ok_or(BatchError::Missing {
            index: self.index,
            field,
        })
    }

    fn string(&self, field: &'static str) -> Result<String, BatchError> {
        self.required(field)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.wrong(field, "a string"))
    }

    fn opt_string(&self, field: &'static str) -> Result<Option<String>, BatchError> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.wrong(field, "a string"))
            })
            .transpose()
    }

    fn opt_bool(&self, field: &'static str) -> Result<Option<bool>, BatchError> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(field, "a boolean")))
            .transpose()
    }

    fn as_int(&self, field: &'static str, v: &Value) -> Result<i64, BatchError> {
        match v {
            Value::Number(n) => n.as_i64().ok_or_else(|| {
                if n.is_u64() {
                    self.invalid(field, format!("{n} overflows a signed 64-bit integer"))
                } else {
                    self.wrong(field, "an integer")
                }
            }),
            _ => Err(self.wrong(field, "an integer")),
        }
    }

    fn int(&self, field: &'static str) -> Result<i64, BatchError> {
        self.as_int(field, self.required(field)?)
    }

    fn opt_int(&self, field: &'static str) -> Result<Option<i64>, BatchError> {
        self.get(field).map(|v| self.as_int(field, v)).transpose()
    }

    fn non_negative(&self, field: &'static str) -> Result<i64, BatchError> {
        let n = self.int(field)?;
        if n < 0 {
            return Err(self.invalid(field, format!("{n} is negative")));
        }
        Ok(n)
    }

    fn opt_non_negative(&self, field: &'static str) -> Result<Option<i64>, BatchError> {
        match self.opt_int(field)? {
            Some(n) if n < 0 => Err(self.invalid(field, format!("{n} is negative"))),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"event":"function_usage","id":"e1","namespace":"openfaas-fn","function_name":"env",
            "started":"2026-11-22T10:00:00.123456789Z","duration":1500000,"memory_bytes":134217728,
            "call_id":null,"status_code":200,"memory_peak_bytes":null,"cpu_ns":null,
            "cold_start":false,"init_duration_ns":null,"billed_duration_ms":2,"source":"gateway",
            "some_future_field":{"x":1}})
    }

    fn parse_one(v: Value) -> Result<Vec<UsageEvent>, BatchError> {
        parse_batch(&serde_json::to_vec(&json!([good(), v])).expect("serialize"))
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = good();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = good();
        v.as_object_mut().expect("object").remove(field);
        v
    }

    #[test]
    fn good_event_parses_and_ignores_unknown_fields() {
        let events = parse_one(good()).expect("valid");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].duration_ns, 1_500_000);
        assert_eq!(events[1].memory_peak_bytes, None);
        assert_eq!(events[1].started.timestamp_subsec_nanos(), 123_456_789);
    }

    #[test]
    fn body_shape_errors() {
        assert!(matches!(parse_batch(b"{"), Err(BatchError::NotJson(_))));
        assert_eq!(parse_batch(b"{}"), Err(BatchError::NotArray));
        assert_eq!(parse_batch(b"[1]"), Err(BatchError::NotObject { index: 0 }));
        assert_eq!(parse_batch(b"[]"), Ok(vec![]));
    }

    #[test]
    fn missing_and_wrong_types_name_the_field() {
        assert_eq!(
            parse_one(without("namespace")),
            Err(BatchError::Missing {
                index: 1,
                field: "namespace"
            })
        );
        assert_eq!(
            parse_one(with("duration", json!("15ms"))),
            Err(BatchError::WrongType {
                index: 1,
                field: "duration",
                expected: "an integer"
            })
        );
        assert_eq!(
            parse_one(with("memory_bytes", json!(1.5))),
            Err(BatchError::WrongType {
                index: 1,
                field: "memory_bytes",
                expected: "an integer"
            })
        );
        assert_eq!(
            parse_one(with("cold_start", json!("no"))),
            Err(BatchError::WrongType {
                index: 1,
                field: "cold_start",
                expected: "a boolean"
            })
        );
    }

    #[test]
    fn absurd_values_are_rejected() {
        let cases = [
            ("duration", json!(-1)),
            ("duration", json!(MAX_DURATION_NS + 1)),
            ("duration", json!(u64::MAX)),
            ("memory_bytes", json!(-5)),
            ("memory_peak_bytes", json!(-5)),
            ("billed_duration_ms", json!(-1)),
            ("started", json!("yesterday")),
            ("status_code", json!(70000)),
            ("event", json!("function_other")),
            ("id", json!("")),
        ];
        for (field, value) in cases {
            match parse_one(with(field, value.clone())) {
                Err(BatchError::Invalid {
                    index: 1, field: f, ..
                }) => assert_eq!(f, field),
                other => panic!("{field}={value}: expected Invalid, got {other:?}"),
            }
        }
        assert!(parse_one(with("duration", json!(MAX_DURATION_NS))).is_ok());
    }
}
