-- Billing arithmetic in one place: per-row billed seconds and GB-seconds.
-- GB-s on the limit = billed seconds x memory_bytes / 1024^3 (OpenFaaS / Lambda style);
-- GB-s on peak      = billed seconds x memory_peak_bytes / 1024^3 (NULL when not measured).
CREATE VIEW function_usage_billed AS
SELECT
    u.*,
    u.duration_ns::numeric / 1e9                                        AS duration_s,
    u.billed_duration_ms::numeric / 1000                                AS billed_s,
    u.billed_duration_ms::numeric * u.memory_bytes / (1000::numeric * 1073741824)
                                                                        AS gb_s_limit,
    u.billed_duration_ms::numeric * u.memory_peak_bytes / (1000::numeric * 1073741824)
                                                                        AS gb_s_peak
FROM function_usage u;

-- Per-function totals for everything ever received (handy for ad-hoc queries).
CREATE VIEW function_usage_totals AS
SELECT namespace, function_name,
       count(*)                 AS invocations,
       sum(duration_s)          AS duration_s,
       sum(billed_s)            AS billed_s,
       sum(gb_s_limit)          AS gb_s_limit,
       sum(gb_s_peak)           AS gb_s_peak,
       count(memory_peak_bytes) AS peak_measured
FROM function_usage_billed
GROUP BY namespace, function_name;

-- The report over a period [p_from, p_to) of `started`, optionally for one namespace.
CREATE FUNCTION usage_report(p_from timestamptz, p_to timestamptz, p_namespace text DEFAULT NULL)
RETURNS TABLE (
    namespace      text,
    function_name  text,
    invocations    bigint,
    duration_s     numeric,
    billed_s       numeric,
    gb_s_limit     numeric,
    gb_s_peak      numeric,
    peak_measured  bigint
)
LANGUAGE sql STABLE AS $$
    SELECT b.namespace, b.function_name,
           count(*),
           coalesce(sum(b.duration_s), 0),
           coalesce(sum(b.billed_s), 0),
           coalesce(sum(b.gb_s_limit), 0),
           coalesce(sum(b.gb_s_peak), 0),
           count(b.memory_peak_bytes)
    FROM function_usage_billed b
    WHERE b.started >= p_from AND b.started < p_to
      AND (p_namespace IS NULL OR b.namespace = p_namespace)
    GROUP BY b.namespace, b.function_name
    ORDER BY b.namespace, b.function_name
$$;
