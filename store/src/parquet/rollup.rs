//! Per-minute rollups of the Parquet store, the same shape as ClickHouse's `usage_1m` and
//! `latency_1m`: written beside each flushed events file (same day, same manifest commit) and
//! merged by compaction, so a query over whole minutes reads a few rows per minute instead of
//! every event. Rows are sums; a query sums them again, so files never need re-aggregating.
//!
//! `route_sketch_1m` holds one row per minute and route with the whole sketch in one binary
//! value (`sketch::encode`): a day of per-minute latency for a route is 1,440 rows whatever the
//! traffic, where one row per bucket would be hundreds of thousands (a 0.5 % sketch spreads a
//! minute of real latencies over hundreds of buckets). An earlier layout kept the sketch in two
//! list columns; decoding their repetition and definition levels took most of a day's
//! per-minute query, so the value is opaque to Parquet and decoded by the store.
//!
//! Coarser grains, as in ClickHouse: `usage_1h` and `usage_1d`, `route_sketch_1h`. Each rollup
//! file's first column is the start of its rows' period (`minute_us`, `hour_us`, `day_us`); a
//! query cuts its window with `time::plan` and reads each aligned span from the coarsest kind.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanArray, Int64Builder, PrimitiveArray,
    RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimestampMicrosecondType, UInt16Type, UInt64Type,
};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::TaskContext;
use datafusion::functions_aggregate::count::count_all;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{DataFrame, Expr, SessionContext, cast, ceil, col, lit, ln, when};
use futures::StreamExt;

use super::manifest::FileKind;
use crate::StoreError;
use crate::cpu;
use crate::sketch::{bucket_of, ln_gamma};

/// Schema of the usage files whose period column is `time`.
fn usage_schema(time: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(time, DataType::Int64, true),
        Field::new("consumer", DataType::Utf8, true),
        Field::new("route", DataType::Utf8, true),
        Field::new("plan", DataType::Utf8, true),
        Field::new("status", DataType::Int64, true),
        Field::new("requests", DataType::Int64, true),
        Field::new("billable_requests", DataType::Int64, true),
        Field::new("req_bytes", DataType::Int64, true),
        Field::new("resp_bytes", DataType::Int64, true),
    ]))
}

/// Schema of the `latency_1m` files.
fn latency_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("minute_us", DataType::Int64, true),
        Field::new("route", DataType::Utf8, true),
        Field::new("consumer", DataType::Utf8, true),
        Field::new("bucket", DataType::Int64, true),
        Field::new("n", DataType::Int64, true),
        Field::new("errors", DataType::Int64, true),
    ]))
}

/// Schema of the per-route sketch files whose period column is `time`.
fn route_sketch_schema(time: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(time, DataType::Int64, false),
        Field::new("route", DataType::Utf8, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("sketch", DataType::Binary, false),
    ]))
}

/// Schema of the retired list-column sketch files (`LatencyRoute1m`, `LatencyRoute1h`), kept
/// so that their manifest entries stay readable until upkeep deletes them.
fn retired_sketch_schema(time: &str) -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, false)));
    Arc::new(Schema::new(vec![
        Field::new(time, DataType::Int64, false),
        Field::new("route", DataType::Utf8, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("buckets", list(DataType::Int32), false),
        Field::new("counts", list(DataType::Int64), false),
    ]))
}

/// The schema of a file kind.
pub fn schema_of(kind: FileKind) -> SchemaRef {
    let time = kind.period().map_or("", |(t, _)| t);
    match kind {
        FileKind::Events => tollgate_schemas::arrow::schema(),
        FileKind::Usage1m | FileKind::Usage1h | FileKind::Usage1d => usage_schema(time),
        FileKind::Latency1m => latency_schema(),
        FileKind::RouteSketch1m | FileKind::RouteSketch1h => route_sketch_schema(time),
        FileKind::LatencyRoute1m | FileKind::LatencyRoute1h => retired_sketch_schema(time),
    }
}

/// Whether `kind` holds one whole latency sketch per row (and route).
pub fn is_sketch(kind: FileKind) -> bool {
    matches!(kind, FileKind::RouteSketch1m | FileKind::RouteSketch1h)
}

/// One route's sketch of one period: server errors, and the count of each latency bucket.
type RouteSketch = (i64, BTreeMap<i32, u64>);

/// Builds per-route sketch rows (`route_sketch_1m` / `_1h`) from event batches: requests
/// forwarded upstream (a route and an upstream latency), bucketed by
/// `sketch::bucket_of(latency_us)` as the SQL rollups are.
pub struct RouteSketches {
    kind: FileKind,
    period_us: i64,
    /// period -> route -> sketch; by period first so that a row's route is looked up without
    /// copying it.
    groups: HashMap<i64, HashMap<String, RouteSketch>>,
}

impl RouteSketches {
    /// An empty builder of `kind` (a sketch kind).
    pub fn new(kind: FileKind) -> RouteSketches {
        let (_, period_us) = kind.period().expect("a rollup kind");
        RouteSketches {
            kind,
            period_us,
            groups: HashMap::default(),
        }
    }

    /// Adds the events of one batch (the events schema).
    pub fn add(&mut self, events: &RecordBatch) -> Result<(), StoreError> {
        let col = |name: &str| {
            events
                .column_by_name(name)
                .ok_or_else(|| StoreError::Corrupt(format!("events batch has no column {name}")))
        };
        let ts = col("ts")?.as_primitive::<TimestampMicrosecondType>();
        // Utf8 whichever string layout the batch was read with.
        let route = datafusion::arrow::compute::cast(col("route")?, &DataType::Utf8)
            .map_err(|e| StoreError::Corrupt(format!("route column: {e}")))?;
        let route = route.as_string::<i32>();
        let latency = col("latency_us")?.as_primitive::<UInt64Type>();
        let upstream = col("upstream_latency_us")?;
        let status = col("status")?.as_primitive::<UInt16Type>();
        for i in 0..events.num_rows() {
            cpu::tick_at(i);
            if route.is_null(i) || upstream.is_null(i) {
                continue;
            }
            let period = ts.value(i).div_euclid(self.period_us) * self.period_us;
            let routes = self.groups.entry(period).or_default();
            let (errors, buckets) = match routes.get_mut(route.value(i)) {
                Some(group) => group,
                None => routes.entry(route.value(i).to_owned()).or_default(),
            };
            *errors += i64::from(status.value(i) >= 500);
            *buckets.entry(bucket_of(latency.value(i))).or_default() += 1;
        }
        Ok(())
    }

    /// Adds the events of one flush's batch, grouped by route number ([`Callers`]) first and
    /// by route name once per period and route: what [`RouteSketches::add`] gives (a test
    /// checks it), without hashing each row's route as text.
    fn add_numbered(&mut self, c: &EventColumns<'_>, callers: &Callers<'_>) {
        let mut by_number: HashMap<(i64, u32), RouteSketch> = HashMap::default();
        for (i, &caller) in callers.of_row.iter().enumerate() {
            cpu::tick_at(i);
            let route = callers.route_of[caller as usize];
            if callers.routes[route as usize].is_none() || c.upstream.is_null(i) {
                continue;
            }
            let period = c.ts.value(i).div_euclid(self.period_us) * self.period_us;
            let (errors, buckets) = by_number.entry((period, route)).or_default();
            *errors += i64::from(c.status.value(i) >= 500);
            *buckets.entry(bucket_of(c.latency.value(i))).or_default() += 1;
        }
        for ((period, route), (errors, buckets)) in by_number {
            let name = callers.routes[route as usize].expect("rows without a route were skipped");
            let (e, b) = self
                .groups
                .entry(period)
                .or_default()
                .entry(name.to_owned())
                .or_default();
            *e += errors;
            for (bucket, n) in buckets {
                *b.entry(bucket).or_default() += n;
            }
        }
    }

    /// The same sketches over the periods of `kind`, a sketch kind whose period is a multiple
    /// of this one's: errors and bucket counts summed, which is exactly what adding the events
    /// to a builder of `kind` gives (a test checks it), for a few rows per period and route
    /// instead of every event again.
    pub fn coarsened(&self, kind: FileKind) -> RouteSketches {
        let mut out = RouteSketches::new(kind);
        for (period, routes) in &self.groups {
            let coarse = period.div_euclid(out.period_us) * out.period_us;
            let into = out.groups.entry(coarse).or_default();
            for (route, (errors, buckets)) in routes {
                let (e, b) = into.entry(route.clone()).or_default();
                *e += errors;
                for (bucket, n) in buckets {
                    *b.entry(*bucket).or_default() += n;
                }
            }
        }
        out
    }

    /// The rows, sorted by period and route.
    pub fn finish(self) -> RecordBatch {
        let mut groups: Vec<_> = self
            .groups
            .into_iter()
            .flat_map(|(period, routes)| routes.into_iter().map(move |(r, g)| ((period, r), g)))
            .collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        let mut minute = Int64Builder::new();
        let mut route = StringBuilder::new();
        let mut errors = Int64Builder::new();
        let mut sketches = BinaryBuilder::new();
        for ((m, r), (e, sketch)) in groups {
            minute.append_value(m);
            route.append_value(r);
            errors.append_value(e);
            sketches.append_value(crate::sketch::encode(sketch.iter().map(|(b, n)| (*b, *n))));
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(minute.finish()),
            Arc::new(route.finish()),
            Arc::new(errors.finish()),
            Arc::new(sketches.finish()),
        ];
        RecordBatch::try_new(schema_of(self.kind), columns).expect("columns match the schema")
    }
}

/// The sketch bucket of `latency_us` as a DataFusion expression (as `sketch::bucket_of`):
/// `ceil(ln(max(latency_us, 1)) / ln(gamma))`.
pub fn bucket_expr() -> Result<Expr, StoreError> {
    let latency = when(col("latency_us").lt(lit(1u64)), lit(1.0f64))
        .otherwise(cast(col("latency_us"), DataType::Float64))?;
    Ok(cast(ceil(ln(latency) / lit(ln_gamma())), DataType::Int64))
}

/// `(t / size) * size`: the start of the period of `size` holding `t` (microseconds).
pub fn period_of(t: Expr, size: i64) -> Expr {
    (t / lit(size)) * lit(size)
}

/// The timestamp of raw events as microseconds.
pub fn ts_us() -> Expr {
    cast(col("ts"), DataType::Int64)
}

/// The usage sums over raw events, in the order of the usage rollups' columns: requests,
/// billable requests, request bytes, response bytes.
pub fn usage_sums_of_events() -> Result<Vec<Expr>, StoreError> {
    Ok(vec![
        count_all().alias("requests"),
        sum(when(col("billable"), lit(1i64)).otherwise(lit(0i64))?).alias("billable_requests"),
        sum(cast(col("req_bytes"), DataType::Int64)).alias("req_bytes"),
        sum(cast(col("resp_bytes"), DataType::Int64)).alias("resp_bytes"),
    ])
}

/// The same sums over usage rollup rows (sums of sums).
pub fn usage_sums_of_rollups() -> Vec<Expr> {
    ["requests", "billable_requests", "req_bytes", "resp_bytes"]
        .into_iter()
        .map(|c| sum(col(c)).alias(c))
        .collect()
}

/// The events that have a latency to bucket: forwarded upstream on a route.
pub fn has_latency() -> Expr {
    col("route")
        .is_not_null()
        .and(col("upstream_latency_us").is_not_null())
}

/// The latency sums over raw events: count and server errors.
pub fn latency_sums_of_events() -> Result<Vec<Expr>, StoreError> {
    Ok(vec![
        count_all().alias("n"),
        sum(when(col("status").gt_eq(lit(500u16)), lit(1i64)).otherwise(lit(0i64))?)
            .alias("errors"),
    ])
}

/// Rolls up the events registered as `events` in `ctx` into one batch of `kind` (a usage kind
/// or `Latency1m`, with the kind's schema).
pub async fn roll_up(ctx: &SessionContext, kind: FileKind) -> Result<RecordBatch, StoreError> {
    let (_, size) = kind.period().expect("a rollup kind");
    let period = period_of(ts_us(), size);
    let events = ctx.table("events").await?;
    let df = match kind {
        FileKind::Usage1m | FileKind::Usage1h | FileKind::Usage1d => events.aggregate(
            vec![
                period,
                col("consumer"),
                col("route"),
                col("plan"),
                cast(col("status"), DataType::Int64),
            ],
            usage_sums_of_events()?,
        )?,
        FileKind::Latency1m => events.filter(has_latency())?.aggregate(
            vec![period, col("route"), col("consumer"), bucket_expr()?],
            latency_sums_of_events()?,
        )?,
        _ => unreachable!("not a grouped rollup: {kind:?}"),
    };
    collect_as(df, kind).await
}

/// Collects `df` (grouped columns, then sums) as one batch with `kind`'s schema.
async fn collect_as(df: DataFrame, kind: FileKind) -> Result<RecordBatch, StoreError> {
    let schema = schema_of(kind);
    let batches = df.collect().await?;
    let batches: Vec<RecordBatch> = batches
        .into_iter()
        .map(|b| {
            RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                .map_err(|e| StoreError::Corrupt(format!("rollup columns: {e}")))
        })
        .collect::<Result<_, _>>()?;
    datafusion::arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// In-memory batches as a table DataFusion reads [`cpu::STEP_ROWS`] rows at a time, offering the
/// core between steps: the rollups of a flush aggregate tens of thousands of events, which
/// took about 25 ms in one go (see [`crate::cpu`]); queries read the events not yet flushed
/// the same way.
pub fn stepped_table(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<Arc<StreamingTable>, StoreError> {
    let steps = Arc::new(Stepped { schema, batches });
    Ok(Arc::new(StreamingTable::try_new(
        steps.schema.clone(),
        vec![steps as Arc<dyn PartitionStream>],
    )?))
}

#[derive(Debug)]
struct Stepped {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl PartitionStream for Stepped {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _: Arc<TaskContext>) -> SendableRecordBatchStream {
        let steps: Vec<RecordBatch> = self.batches.iter().flat_map(cpu::steps).collect();
        let steps = steps.into_iter().map(|step| {
            cpu::tick();
            Ok(step)
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(steps),
        ))
    }
}

/// Every rollup of an in-memory batch of events, in `FileKind::ROLLUPS` order.
///
/// Built by hand, not by DataFusion: a flush every two seconds set up a session (every
/// built-in function registered) and planned and ran four grouped queries. With the quota's
/// usage query (now `tally`), that kept most of the query engine's code resident in a
/// `tollgate up` that no one asked an analytics question: it idled at 61–67 MiB RSS with one
/// consumer, 42–43 MiB without (BENCHMARKS.md, "Many consumers"). The rows equal those of the
/// SQL rollups ([`roll_up`], which rebuilds missing rollups; a test compares the two), sorted
/// by their keys.
pub fn roll_up_batch(events: &RecordBatch) -> Result<Vec<(FileKind, RecordBatch)>, StoreError> {
    let columns = EventColumns::of(events)?;
    let callers = Callers::of(&columns);
    let minutes = UsageRollup::of_events(FileKind::Usage1m, &columns, &callers);
    let mut out: Vec<(FileKind, RecordBatch)> = Vec::new();
    // Per-hour sketches from the per-minute ones (`ROLLUPS` lists the minutes first).
    let mut hour_sketches = None;
    for kind in FileKind::ROLLUPS {
        let rows = match kind {
            _ if is_sketch(kind) => {
                let sketches = match hour_sketches.take() {
                    Some(hours) if kind == FileKind::RouteSketch1h => hours,
                    _ => {
                        let mut sketches = RouteSketches::new(kind);
                        sketches.add_numbered(&columns, &callers);
                        sketches
                    }
                };
                if kind == FileKind::RouteSketch1m {
                    hour_sketches = Some(sketches.coarsened(FileKind::RouteSketch1h));
                }
                sketches.finish()
            }
            FileKind::Usage1m => minutes.finish(kind, &callers),
            // Hours and days from the minutes: a few rows per minute, not every event again.
            FileKind::Usage1h | FileKind::Usage1d => minutes.coarsened(kind).finish(kind, &callers),
            FileKind::Latency1m => latency_minutes(&columns, &callers).finish(&callers),
            _ => unreachable!("not a rollup kind: {kind:?}"),
        };
        out.push((kind, rows));
    }
    Ok(out)
}

/// The columns of the events the rollups read ([`EventColumns`]).
const READ_COLUMNS: [&str; 10] = [
    "ts",
    "consumer",
    "route",
    "plan",
    "status",
    "billable",
    "req_bytes",
    "resp_bytes",
    "latency_us",
    "upstream_latency_us",
];

/// The columns the rollups read of `batches` (of the events schema), gathered into one batch
/// for [`roll_up_batch`]: about a third of the events' bytes. A flush used to gather every
/// column of what it held, a copy as large as the events in memory beside them (BENCHMARKS.md,
/// "Memory under load").
pub fn rollup_columns(batches: &[RecordBatch]) -> Result<RecordBatch, StoreError> {
    let err = |e: datafusion::arrow::error::ArrowError| StoreError::Corrupt(e.to_string());
    let schema = tollgate_schemas::arrow::schema();
    let indices = READ_COLUMNS
        .iter()
        .map(|c| schema.index_of(c).map_err(err))
        .collect::<Result<Vec<usize>, _>>()?;
    let projected = std::sync::Arc::new(schema.project(&indices).map_err(err)?);
    if batches.is_empty() {
        return Ok(RecordBatch::new_empty(projected));
    }
    // Column by column, offering the core between them: the copy of a flush's tens of
    // thousands of events is a few megabytes (see [`crate::cpu`]).
    let mut columns = Vec::with_capacity(indices.len());
    for &c in &indices {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
        columns.push(datafusion::arrow::compute::concat(&parts).map_err(err)?);
        cpu::tick();
    }
    RecordBatch::try_new(projected, columns).map_err(err)
}

/// The columns of an events batch the usage and latency rollups read.
struct EventColumns<'a> {
    rows: usize,
    ts: &'a PrimitiveArray<TimestampMicrosecondType>,
    consumer: &'a StringArray,
    route: &'a StringArray,
    plan: &'a StringArray,
    status: &'a PrimitiveArray<UInt16Type>,
    billable: &'a BooleanArray,
    req_bytes: &'a PrimitiveArray<UInt64Type>,
    resp_bytes: &'a PrimitiveArray<UInt64Type>,
    latency: &'a PrimitiveArray<UInt64Type>,
    upstream: &'a PrimitiveArray<UInt64Type>,
}

impl<'a> EventColumns<'a> {
    /// The columns of `events` (the events schema, text as `Utf8`), or what is missing.
    fn of(events: &'a RecordBatch) -> Result<EventColumns<'a>, StoreError> {
        fn get<'a, T: 'static>(events: &'a RecordBatch, name: &str) -> Result<&'a T, StoreError> {
            events
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<T>())
                .ok_or_else(|| StoreError::Corrupt(format!("events batch: bad column {name}")))
        }
        let [
            ts,
            consumer,
            route,
            plan,
            status,
            billable,
            req_bytes,
            resp_bytes,
            latency,
            upstream,
        ] = READ_COLUMNS;
        Ok(EventColumns {
            rows: events.num_rows(),
            ts: get(events, ts)?,
            consumer: get(events, consumer)?,
            route: get(events, route)?,
            plan: get(events, plan)?,
            status: get(events, status)?,
            billable: get(events, billable)?,
            req_bytes: get(events, req_bytes)?,
            resp_bytes: get(events, resp_bytes)?,
            latency: get(events, latency)?,
            upstream: get(events, upstream)?,
        })
    }
}

/// A text value of row `i`, `None` when null.
fn text(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

/// Who made each row's request: its (consumer, route, plan) as a small number, and its
/// (route, consumer) as another. The usage and latency rollups group by these numbers, so a
/// row's text is hashed once (here) instead of once per rollup: grouping by text was most of
/// the rollups' time, and they were a quarter of ingest's CPU with a thousand consumers
/// (BENCHMARKS.md, fourteenth round).
struct Callers<'a> {
    /// Per row, an index into `keys`.
    of_row: Vec<u32>,
    /// (consumer, route, plan), each distinct triple once.
    keys: Vec<(Option<&'a str>, Option<&'a str>, Option<&'a str>)>,
    /// Per entry of `keys`, an index into `pairs`.
    pair_of: Vec<u32>,
    /// (route, consumer), each distinct pair once.
    pairs: Vec<(Option<&'a str>, Option<&'a str>)>,
    /// Per entry of `keys`, an index into `routes`.
    route_of: Vec<u32>,
    /// The routes, each once.
    routes: Vec<Option<&'a str>>,
}

impl<'a> Callers<'a> {
    fn of(c: &EventColumns<'a>) -> Callers<'a> {
        type Triple<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let mut index: HashMap<Triple<'a>, u32> = HashMap::default();
        let mut pair_index: HashMap<(Option<&'a str>, Option<&'a str>), u32> = HashMap::default();
        let mut route_index: HashMap<Option<&'a str>, u32> = HashMap::default();
        let mut callers = Callers {
            of_row: Vec::with_capacity(c.rows),
            keys: Vec::new(),
            pair_of: Vec::new(),
            pairs: Vec::new(),
            route_of: Vec::new(),
            routes: Vec::new(),
        };
        let mut last: Option<(Triple<'a>, u32)> = None;
        for i in 0..c.rows {
            cpu::tick_at(i);
            let key = (text(c.consumer, i), text(c.route, i), text(c.plan, i));
            // Runs of one caller (one client's connection) skip the hash.
            let id = match last {
                Some((k, id)) if k == key => id,
                _ => {
                    let known = callers.keys.len();
                    let id = number(&mut index, &mut callers.keys, key);
                    if id as usize == known {
                        let pair = number(&mut pair_index, &mut callers.pairs, (key.1, key.0));
                        callers.pair_of.push(pair);
                        let route = number(&mut route_index, &mut callers.routes, key.1);
                        callers.route_of.push(route);
                    }
                    id
                }
            };
            last = Some((key, id));
            callers.of_row.push(id);
        }
        callers
    }
}

/// The number of `key` in `list`: its index, `key` appended first when `index` does not have it.
fn number<K: std::hash::Hash + Eq + Copy>(
    index: &mut HashMap<K, u32>,
    list: &mut Vec<K>,
    key: K,
) -> u32 {
    *index.entry(key).or_insert_with(|| {
        list.push(key);
        list.len() as u32 - 1
    })
}

/// A usage group: period start, caller (an index into [`Callers::keys`]), status.
type UsageKey = (i64, u32, i64);

/// A usage group's sums in the rollups' column order: requests, billable requests, request
/// bytes, response bytes (wrapping, as SQL's `sum` over `Int64` does).
type UsageSums = [i64; 4];

/// Usage rows of one grain, keyed by caller number.
struct UsageRollup {
    period_us: i64,
    groups: HashMap<UsageKey, UsageSums>,
}

impl UsageRollup {
    /// The usage of the events of `columns` by periods of `kind` (a usage kind).
    fn of_events(kind: FileKind, c: &EventColumns<'_>, callers: &Callers<'_>) -> UsageRollup {
        let (_, period_us) = kind.period().expect("a rollup kind");
        let mut groups: HashMap<UsageKey, UsageSums> = HashMap::default();
        for (i, &caller) in callers.of_row.iter().enumerate() {
            cpu::tick_at(i);
            let key = (
                c.ts.value(i).div_euclid(period_us) * period_us,
                caller,
                i64::from(c.status.value(i)),
            );
            let sums = groups.entry(key).or_default();
            sums[0] += 1;
            sums[1] += i64::from(c.billable.value(i));
            sums[2] = sums[2].wrapping_add(c.req_bytes.value(i) as i64);
            sums[3] = sums[3].wrapping_add(c.resp_bytes.value(i) as i64);
        }
        UsageRollup { period_us, groups }
    }

    /// The same usage by the periods of `kind`, a usage kind whose period is a multiple of
    /// this one's: sums of sums, as a query over the rollups adds them.
    fn coarsened(&self, kind: FileKind) -> UsageRollup {
        let (_, period_us) = kind.period().expect("a rollup kind");
        let mut groups: HashMap<UsageKey, UsageSums> = HashMap::default();
        for (&(t, caller, status), sums) in &self.groups {
            let t = t.div_euclid(period_us) * period_us;
            let into = groups.entry((t, caller, status)).or_default();
            for (into, n) in into.iter_mut().zip(sums) {
                *into = into.wrapping_add(*n);
            }
        }
        debug_assert!(period_us % self.period_us == 0);
        UsageRollup { period_us, groups }
    }

    /// The rows with `kind`'s schema, in no particular order (as the SQL rollups' were).
    /// Sorting them cost more than grouping: with 1,000 consumers, `latency_1m` has hundreds
    /// of thousands of rows a minute, and comparing their text was a fifth of an ingest's
    /// CPU (BENCHMARKS.md).
    fn finish(&self, kind: FileKind, callers: &Callers<'_>) -> RecordBatch {
        let rows = self.groups.iter();
        let mut cols: [Int64Builder; 6] = Default::default();
        let mut texts: [StringBuilder; 3] = Default::default();
        for ((t, caller, status), sums) in rows {
            let (consumer, route, plan) = callers.keys[*caller as usize];
            cols[0].append_value(*t);
            for (b, v) in texts.iter_mut().zip([consumer, route, plan]) {
                b.append_option(v);
            }
            cols[1].append_value(*status);
            for (b, n) in cols[2..].iter_mut().zip(sums) {
                b.append_value(*n);
            }
        }
        let [
            mut t,
            mut status,
            mut requests,
            mut billable,
            mut req,
            mut resp,
        ] = cols;
        let [mut consumer, mut route, mut plan] = texts;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(t.finish()),
            Arc::new(consumer.finish()),
            Arc::new(route.finish()),
            Arc::new(plan.finish()),
            Arc::new(status.finish()),
            Arc::new(requests.finish()),
            Arc::new(billable.finish()),
            Arc::new(req.finish()),
            Arc::new(resp.finish()),
        ];
        RecordBatch::try_new(schema_of(kind), columns).expect("columns match the schema")
    }
}

/// A `latency_1m` group: minute, (route, consumer) (an index into [`Callers::pairs`]), sketch
/// bucket.
type LatencyKey = (i64, u32, i64);

/// The `latency_1m` rows of events forwarded upstream on a route: count and server errors by
/// minute, route, consumer and bucket of `latency_us`.
struct LatencyMinutes {
    groups: HashMap<LatencyKey, [i64; 2]>,
}

fn latency_minutes(c: &EventColumns<'_>, callers: &Callers<'_>) -> LatencyMinutes {
    let (_, minute_us) = FileKind::Latency1m.period().expect("a rollup kind");
    let mut groups: HashMap<LatencyKey, [i64; 2]> = HashMap::default();
    for (i, &caller) in callers.of_row.iter().enumerate() {
        cpu::tick_at(i);
        let pair = callers.pair_of[caller as usize];
        if callers.pairs[pair as usize].0.is_none() || c.upstream.is_null(i) {
            continue;
        }
        let key = (
            c.ts.value(i).div_euclid(minute_us) * minute_us,
            pair,
            i64::from(bucket_of(c.latency.value(i))),
        );
        let group = groups.entry(key).or_default();
        group[0] += 1;
        group[1] += i64::from(c.status.value(i) >= 500);
    }
    LatencyMinutes { groups }
}

impl LatencyMinutes {
    /// The rows with the `latency_1m` schema, in no particular order (see
    /// [`UsageRollup::finish`]).
    fn finish(&self, callers: &Callers<'_>) -> RecordBatch {
        let rows = self.groups.iter();
        let [mut minute, mut bucket, mut n, mut errors]: [Int64Builder; 4] = Default::default();
        let [mut route, mut consumer]: [StringBuilder; 2] = Default::default();
        for ((m, pair, b), [count, errs]) in rows {
            let (r, c) = callers.pairs[*pair as usize];
            minute.append_value(*m);
            route.append_option(r);
            consumer.append_option(c);
            bucket.append_value(*b);
            n.append_value(*count);
            errors.append_value(*errs);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(minute.finish()),
            Arc::new(route.finish()),
            Arc::new(consumer.finish()),
            Arc::new(bucket.finish()),
            Arc::new(n.finish()),
            Arc::new(errors.finish()),
        ];
        RecordBatch::try_new(schema_of(FileKind::Latency1m), columns)
            .expect("columns match the schema")
    }
}

/// The rollup of `kind` over the events registered as `events` in `ctx` (streamed).
pub async fn roll_up_any(ctx: &SessionContext, kind: FileKind) -> Result<RecordBatch, StoreError> {
    if !is_sketch(kind) {
        return roll_up(ctx, kind).await;
    }
    let mut sketches = RouteSketches::new(kind);
    let mut stream = ctx.table("events").await?.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        sketches.add(&batch?)?;
    }
    Ok(sketches.finish())
}

/// The span `[min, max]` of the period starts of a rollup batch (`None` when empty).
pub fn period_span(batch: &RecordBatch) -> Option<(i64, i64)> {
    let col = batch
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()?;
    let min = col.iter().flatten().min()?;
    let max = col.iter().flatten().max()?;
    Some((min, max))
}
