//! The billing report: `usage_report(from, to, namespace)` (SQL, migration 0002) as rows and
//! as an aligned text table with a total line.

use chrono::{DateTime, Utc};

use super::{DbError, Pool};

/// One function's totals over the period.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    pub namespace: String,
    pub function_name: String,
    pub invocations: i64,
    pub duration_s: f64,
    pub billed_s: f64,
    pub gb_s_limit: f64,
    pub gb_s_peak: f64,
    /// Invocations whose peak memory was measured (the rest add nothing to `gb_s_peak`).
    pub peak_measured: i64,
}

/// Runs the report for `[from, to)`, optionally restricted to one namespace.
pub async fn query(
    pool: &Pool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    namespace: Option<&str>,
) -> Result<Vec<ReportRow>, DbError> {
    let mut conn = pool.get().await?;
    let rows = conn
        .client()
        .query(
            "SELECT namespace, function_name, invocations, duration_s::float8,
                    billed_s::float8, gb_s_limit::float8, gb_s_peak::float8, peak_measured
             FROM usage_report($1, $2, $3)",
            &[&from, &to, &namespace],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows
        .iter()
        .map(|r| ReportRow {
            namespace: r.get(0),
            function_name: r.get(1),
            invocations: r.get(2),
            duration_s: r.get(3),
            billed_s: r.get(4),
            gb_s_limit: r.get(5),
            gb_s_peak: r.get(6),
            peak_measured: r.get(7),
        })
        .collect())
}

const HEADERS: [&str; 8] = [
    "NAMESPACE",
    "FUNCTION",
    "INVOCATIONS",
    "DURATION_S",
    "BILLED_S",
    "GB_S_LIMIT",
    "GB_S_PEAK",
    "PEAK_MEASURED",
];

/// Formats rows as a left/right aligned table followed by a TOTAL line.
pub fn format_table(rows: &[ReportRow]) -> String {
    let mut cells: Vec<[String; 8]> = rows.iter().map(cells_of).collect();
    let total = ReportRow {
        namespace: "TOTAL".into(),
        function_name: String::new(),
        invocations: rows.iter().map(|r| r.invocations).sum(),
        duration_s: rows.iter().map(|r| r.duration_s).sum(),
        billed_s: rows.iter().map(|r| r.billed_s).sum(),
        gb_s_limit: rows.iter().map(|r| r.gb_s_limit).sum(),
        gb_s_peak: rows.iter().map(|r| r.gb_s_peak).sum(),
        peak_measured: rows.iter().map(|r| r.peak_measured).sum(),
    };
    cells.push(cells_of(&total));
    let header = HEADERS.map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |row: &[String; 8]| {
        let mut s = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < 2 {
                s.push_str(&format!("{c:<w$}"));
            } else {
                s.push_str(&format!("{c:>w$}"));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header);
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

fn cells_of(r: &ReportRow) -> [String; 8] {
    [
        r.namespace.clone(),
        r.function_name.clone(),
        r.invocations.to_string(),
        format!("{:.3}", r.duration_s),
        format!("{:.3}", r.billed_s),
        format!("{:.6}", r.gb_s_limit),
        format!("{:.6}", r.gb_s_peak),
        r.peak_measured.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_aligned_with_total() {
        let row = |f: &str, n| ReportRow {
            namespace: "openfaas-fn".into(),
            function_name: f.into(),
            invocations: n,
            duration_s: 1.5,
            billed_s: 2.0,
            gb_s_limit: 0.25,
            gb_s_peak: 0.0,
            peak_measured: 0,
        };
        let t = format_table(&[row("env", 3), row("figlet-long-name", 12)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("NAMESPACE"));
        assert!(lines[3].starts_with("TOTAL"));
        assert!(lines[3].contains(" 15 "));
        assert!(lines[3].contains("0.500000"));
        // Right-aligned numeric columns end at the same offset.
        let end = |l: &str, pat: &str| l.find(pat).map(|i| i + pat.len());
        assert_eq!(end(lines[1], "0.250000"), end(lines[3], "0.500000"));
    }
}
