-- Billing completeness and published exports (see store/src/ledger.rs).
--
-- progress: per bus partition, the times its collector found it stored up to its end. A
-- ReplacingMergeTree keeps the latest per partition after merges; readers take max() per
-- partition, so the answer is the same before and after the merges (no FINAL).
CREATE TABLE IF NOT EXISTS {db}.progress
(
    bus_partition UInt32,
    partitions UInt32,
    caught_up_us Int64
)
ENGINE = ReplacingMergeTree(caught_up_us)
ORDER BY bus_partition;

-- billing_exports: one row per published export, written once and never changed. When two
-- query APIs publish one period at once both rows stay, and readers take the earliest
-- (generated_at_us, id).
CREATE TABLE IF NOT EXISTS {db}.billing_exports
(
    period String,
    generated_at_us Int64,
    id String,
    manifest String,
    lines String
)
ENGINE = MergeTree
ORDER BY (period, generated_at_us, id);
