-- The raw events: one row per RequestEvent v1 (every column of the JSON Schema, a test checks),
-- plus where the row came from on the bus and its latency-sketch bucket.
--
-- ORDER BY (bus_partition, bus_offset): the collector's exactly-once resume looks up which
-- positions of a partition are stored, a primary-key range read. Partitions by UTC day: a time
-- window reads only the parts of its days (MergeTree keeps a min/max index of ts_us per part),
-- and dashboards read the per-minute rollups instead (0002).
CREATE TABLE IF NOT EXISTS {db}.events
(
    bus_partition UInt32,
    bus_offset UInt64,
    v UInt8,
    id String,
    ts_us Int64,
    gateway String,
    route Nullable(String),
    method String,
    path String,
    status UInt16,
    latency_us UInt64,
    upstream_latency_us Nullable(UInt64),
    req_bytes UInt64,
    resp_bytes UInt64,
    consumer Nullable(String),
    plan Nullable(String),
    outcome String,
    billable UInt8,
    trace_id Nullable(String),
    latency_bucket Int16
)
ENGINE = MergeTree
PARTITION BY toDate(toDateTime(intDiv(ts_us, 1000000)))
ORDER BY (bus_partition, bus_offset)
