-- Per-minute rollups, filled by materialized views as events are inserted. Summing tables: a
-- query sums its rows with GROUP BY, so it is exact whether or not the background merges have
-- run (no FINAL). Null keys are stored as '' (every id in the schema is non-empty). Rollup
-- columns are named apart from the raw columns (`route_key`, not `route`): in ClickHouse an
-- alias equal to a column name would replace that column everywhere in the view's query.
CREATE TABLE IF NOT EXISTS {db}.usage_1m
(
    minute_us Int64,
    consumer_key String,
    route_key String,
    plan_key String,
    status_code UInt16,
    requests UInt64,
    billable_requests UInt64,
    req_bytes_total UInt64,
    resp_bytes_total UInt64
)
ENGINE = SummingMergeTree((requests, billable_requests, req_bytes_total, resp_bytes_total))
PARTITION BY toYYYYMM(toDateTime(intDiv(minute_us, 1000000)))
ORDER BY (minute_us, consumer_key, route_key, plan_key, status_code);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_1m_mv TO {db}.usage_1m AS
SELECT
    intDiv(ts_us, 60000000) * 60000000 AS minute_us,
    ifNull(consumer, '') AS consumer_key,
    ifNull(route, '') AS route_key,
    ifNull(plan, '') AS plan_key,
    status AS status_code,
    count() AS requests,
    sum(toUInt64(billable)) AS billable_requests,
    sum(req_bytes) AS req_bytes_total,
    sum(resp_bytes) AS resp_bytes_total
FROM {db}.events
GROUP BY minute_us, consumer_key, route_key, plan_key, status_code;

-- Latency sketch buckets (see store/src/sketch.rs) of requests forwarded upstream, with the
-- 5xx count carried on the same rows.
CREATE TABLE IF NOT EXISTS {db}.latency_1m
(
    minute_us Int64,
    route_key String,
    consumer_key String,
    bucket Int16,
    n UInt64,
    errors UInt64
)
ENGINE = SummingMergeTree((n, errors))
PARTITION BY toYYYYMM(toDateTime(intDiv(minute_us, 1000000)))
ORDER BY (minute_us, route_key, consumer_key, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latency_1m_mv TO {db}.latency_1m AS
SELECT
    intDiv(ts_us, 60000000) * 60000000 AS minute_us,
    ifNull(route, '') AS route_key,
    ifNull(consumer, '') AS consumer_key,
    latency_bucket AS bucket,
    count() AS n,
    sum(toUInt64(status >= 500)) AS errors
FROM {db}.events
WHERE isNotNull(route) AND isNotNull(upstream_latency_us)
GROUP BY minute_us, route_key, consumer_key, bucket
