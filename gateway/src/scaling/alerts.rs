//! OpenFaaS's alert-driven scaling: AlertManager posts firing and resolved alerts for
//! `function_name`; firing adds `ceil(max × factor / 100)` replicas up to max, resolved
//! goes back to min; min == max or factor 0 turns it off for the function.

use serde::Deserialize;

use super::labels::ScaleLabels;

/// AlertManager's webhook body (the fields that matter).
#[derive(Debug, Deserialize)]
pub struct AlertBody {
    pub status: String,
    #[serde(default)]
    pub receiver: Option<String>,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
pub struct Alert {
    pub status: String,
    pub labels: std::collections::HashMap<String, String>,
}

/// OpenFaaS's answer to a body it cannot read.
pub const BAD_FORMAT: &str = "Unable to parse alert, bad format.";

/// The replica count an alert asks for, or `None` when nothing should change.
pub fn replicas_for(firing: bool, current: u64, labels: &ScaleLabels) -> Option<u64> {
    if labels.min == labels.max || labels.factor == 0 {
        return None;
    }
    let wanted = if firing {
        let step = (labels.max * labels.factor).div_ceil(100);
        (current + step).min(labels.max)
    } else if current < labels.min {
        // Resolved scales down; a function below min (scaled to zero) stays there.
        return None;
    } else {
        labels.min
    };
    (wanted != current).then_some(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(min: u64, max: u64, factor: u64) -> ScaleLabels {
        ScaleLabels {
            min,
            max,
            factor,
            ..ScaleLabels::default()
        }
    }

    #[test]
    fn openfaas_documented_results() {
        // Defaults (min 1, max 20, factor 20): +4 per firing alert, capped at 20.
        assert_eq!(replicas_for(true, 1, &l(1, 20, 20)), Some(5));
        assert_eq!(replicas_for(true, 5, &l(1, 20, 20)), Some(9));
        assert_eq!(replicas_for(true, 18, &l(1, 20, 20)), Some(20));
        assert_eq!(
            replicas_for(true, 20, &l(1, 20, 20)),
            None,
            "already at max: no call"
        );
        // max < 5: ceil rounds a fraction of a replica up to one.
        assert_eq!(replicas_for(true, 1, &l(1, 3, 20)), Some(2));
        assert_eq!(replicas_for(true, 1, &l(1, 4, 10)), Some(2));
        // factor 100: straight to max.
        assert_eq!(replicas_for(true, 1, &l(1, 10, 100)), Some(10));
        // Resolved: back to min, or nothing if already there.
        assert_eq!(replicas_for(false, 9, &l(1, 20, 20)), Some(1));
        assert_eq!(replicas_for(false, 1, &l(1, 20, 20)), None);
        assert_eq!(replicas_for(false, 3, &l(0, 20, 20)), Some(0));
        assert_eq!(
            replicas_for(false, 0, &l(1, 20, 20)),
            None,
            "a function scaled to zero stays there"
        );
        // Disabled.
        assert_eq!(replicas_for(true, 2, &l(2, 2, 20)), None);
        assert_eq!(replicas_for(true, 2, &l(1, 20, 0)), None);
    }

    #[test]
    fn parses_alertmanager_bodies() {
        let body: AlertBody = serde_json::from_str(
            r#"{"receiver":"scale-up","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"APIHighInvocationRate","function_name":"env.openfaas-fn"},"annotations":{},"startsAt":"2026-11-22T10:00:00Z"}],"groupLabels":{},"version":"4"}"#,
        )
        .unwrap();
        assert_eq!(body.alerts[0].labels["function_name"], "env.openfaas-fn");
        assert!(serde_json::from_str::<AlertBody>(r#"{"alerts":"x"}"#).is_err());
    }
}
