-- Compacted latency sketches: one row per route and minute (or hour) holding that period's whole
-- sketch as one byte string (`store/src/sketch.rs`, the Parquet store's format), so a dashboard
-- of a day per minute reads 5,760 short strings instead of two million bucket rows. The
-- collectors' upkeep builds them from `latency_route_1m` / `_1h` once a period has ended
-- (`sketches.rs`); they are derived data that a query uses only after checking them.
--
-- The check: `route_count_1m` counts the same events as the per-route latency rollups, per route
-- and minute (a few thousand rows a day). A compacted sketch is used for a period only when its
-- count equals the period's count now; a late event (a spool replayed after a broker outage)
-- makes the counts differ, the query then reads that period's buckets, and the next upkeep round
-- rebuilds its sketch. So answers never depend on whether, or when, compaction ran.
--
-- On a database that already holds events the count view starts at `{since_us}` (the next UTC
-- midnight, recorded in `tollgate_sketch_since`), like the rollups of 0003; periods before it
-- keep being answered from the bucket rollups.
CREATE TABLE IF NOT EXISTS {db}.tollgate_sketch_since
(
    since_us Int64,
    recorded_at DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY since_us;

INSERT INTO {db}.tollgate_sketch_since (since_us) VALUES ({since_us});

CREATE TABLE IF NOT EXISTS {db}.route_count_1m
(
    minute_us Int64,
    route_key String,
    n UInt64
)
ENGINE = SummingMergeTree(n)
PARTITION BY toYYYYMM(toDateTime(intDiv(minute_us, 1000000)))
ORDER BY (route_key, minute_us);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.route_count_1m_mv TO {db}.route_count_1m AS
SELECT
    intDiv(ts_us, 60000000) * 60000000 AS minute_us,
    ifNull(route, '') AS route_key,
    count() AS n
FROM {db}.events
WHERE ts_us >= {since_us} AND isNotNull(route) AND isNotNull(upstream_latency_us)
GROUP BY minute_us, route_key;

-- `quantile_buckets` holds the sketch's bucket at each of `sketch::STANDARD_LEVELS` (p50, p75,
-- p90, p95, p99, p99.9): a query for some of those, one point per period, reads them instead of
-- the sketch (a few bytes per point instead of about 800 for a busy minute).
--
-- `n` is the version: events only ever add to a period, so of two sketches of one period the
-- one with more events is the newer, and merges keep it. Queries do not rely on merges having
-- run: they pick the row whose `n` matches.
CREATE TABLE IF NOT EXISTS {db}.route_sketch
(
    grain_us Int64,
    route_key String,
    t_us Int64,
    n UInt64,
    errors UInt64,
    sketch String,
    quantile_buckets Array(Int32)
)
ENGINE = ReplacingMergeTree(n)
PARTITION BY toYYYYMM(toDateTime(intDiv(t_us, 1000000)))
ORDER BY (grain_us, route_key, t_us)
