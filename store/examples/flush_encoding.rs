//! How long the store's Parquet encoding takes per event, and how many bytes it writes, for a
//! flush-sized batch (80,000 events of 1,000 consumers, four routes, distinct timestamps and
//! latencies, random trace ids), under the writer settings the store used before and uses now
//! (`parquet/files.rs`). Best of seven encodings into memory each.
//!
//! Usage: `cargo run --release -p tollgate-store --example flush_encoding`

use std::time::Instant;

use datafusion::arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use tollgate_schemas::{Outcome, RequestEvent};

fn events(n: u64) -> RecordBatch {
    let routes = ["orders-list", "orders-get", "search", "checkout"];
    let t0 = 1_700_000_000_000_000i64;
    let events: Vec<RequestEvent> = (0..n)
        .map(|i| {
            let status = if i % 50 == 0 { 503 } else { 200 };
            let latency = 1_000 + (i * 7_919) % 200_000;
            RequestEvent {
                v: 1,
                id: uuid::Uuid::now_v7(),
                ts: chrono::DateTime::from_timestamp_micros(t0 + i as i64 * 25).expect("in range"),
                gateway: "gw-1".into(),
                route: Some(routes[(i % 4) as usize].into()),
                method: "GET".into(),
                path: format!("/v1/items/{}", i % 5_000),
                status,
                latency_us: latency,
                upstream_latency_us: Some(latency - 100),
                req_bytes: 0,
                resp_bytes: 1_024 + i % 3,
                consumer: Some(format!("c{}", i % 1_000)),
                plan: Some("p".into()),
                outcome: if status < 500 {
                    Outcome::Ok
                } else {
                    Outcome::UpstreamError
                },
                billable: status < 500,
                // Random, as the gateway's own trace ids are.
                trace_id: Some(uuid::Uuid::new_v4().simple().to_string()),
            }
        })
        .collect();
    tollgate_schemas::arrow::to_batch(&events)
}

fn time(name: &str, batch: &RecordBatch, props: WriterPropertiesBuilder) {
    let props = props.set_max_row_group_row_count(Some(1 << 20)).build();
    let (mut best, mut bytes) = (f64::MAX, 0);
    for _ in 0..7 {
        let mut out = Vec::with_capacity(32 << 20);
        let started = Instant::now();
        let mut w =
            ArrowWriter::try_new(&mut out, batch.schema(), Some(props.clone())).expect("writer");
        // In steps of 2,048 rows, as the store writes (`cpu::STEP_ROWS`).
        for offset in (0..batch.num_rows()).step_by(2_048) {
            let len = 2_048.min(batch.num_rows() - offset);
            w.write(&batch.slice(offset, len)).expect("write");
        }
        w.close().expect("close");
        best = best.min(started.elapsed().as_secs_f64());
        bytes = out.len();
    }
    let n = batch.num_rows() as f64;
    println!(
        "{name:58} {:6.3} µs/event {:6.1} bytes/event",
        best * 1e6 / n,
        bytes as f64 / n
    );
}

fn without_dictionary(mut p: WriterPropertiesBuilder, columns: &[&str]) -> WriterPropertiesBuilder {
    for c in columns {
        p = p.set_column_dictionary_enabled(ColumnPath::from(*c), false);
    }
    p
}

fn main() {
    let batch = events(80_000);
    let before = || {
        without_dictionary(
            WriterProperties::builder().set_compression(Compression::SNAPPY),
            &["id", "trace_id"],
        )
    };
    let deltas = ["ts", "latency_us", "upstream_latency_us"];
    time(
        "before: a dictionary for all but id and trace_id",
        &batch,
        before(),
    );
    let deltas_only = || {
        let mut p = without_dictionary(before(), &deltas);
        for c in deltas {
            p = p.set_column_encoding(ColumnPath::from(c), Encoding::DELTA_BINARY_PACKED);
        }
        p
    };
    time(
        "then: ts and latencies as deltas, without a dictionary",
        &batch,
        deltas_only(),
    );
    let now = || {
        let mut p = deltas_only();
        for c in [
            "id", "trace_id", "path", "gateway", "method", "plan", "outcome",
        ] {
            p = p.set_column_statistics_enabled(ColumnPath::from(c), EnabledStatistics::None);
        }
        p
    };
    time(
        "then: statistics only on the columns queries filter on",
        &batch,
        now(),
    );
    time(
        "now: and trace ids (random) uncompressed",
        &batch,
        now().set_column_compression(ColumnPath::from("trace_id"), Compression::UNCOMPRESSED),
    );
    time(
        "(id uncompressed too)",
        &batch,
        now()
            .set_column_compression(ColumnPath::from("trace_id"), Compression::UNCOMPRESSED)
            .set_column_compression(ColumnPath::from("id"), Compression::UNCOMPRESSED),
    );
    time(
        "(ts and latencies plain, without a dictionary)",
        &batch,
        without_dictionary(before(), &deltas),
    );
    time(
        "(no dictionary at all)",
        &batch,
        before().set_dictionary_enabled(false),
    );
}
