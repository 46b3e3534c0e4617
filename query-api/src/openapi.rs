//! The OpenAPI document, generated from the API's types (cargo feature `openapi`).
//!
//! Every response body in it is the schema of the type its handler returns (`UsageAnswer`,
//! `RevenueAnswer`, `LatencyAnswer`, `QuotaSnapshot`, `ExportsAnswer`, `ErrorBody`), and every
//! endpoint's parameters are checked against the list its handler accepts (`tests/openapi.rs`).
//! The API serves `openapi.json`, this document as generated: the test fails when the file
//! differs from what the types generate, and `scripts/openapi.sh` writes it anew. So the spec and
//! the code cannot drift, and the demo's build does not compile the generator.
//!
//! The operations below are the documentation of the handlers in `reports.rs`, `revenue.rs`,
//! `billing/` and `quota.rs`; their bodies are never called.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::error::ErrorBody;

/// `from` and `to`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Window {
    /// Window start (inclusive): RFC 3339 or unix milliseconds. Default: `to` minus 24 hours.
    #[param(
        pattern = r"^([0-9]{1,15}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2}))$"
    )]
    from: Option<String>,
    /// Window end (exclusive): RFC 3339 or unix milliseconds. Default: now.
    #[param(
        pattern = r"^([0-9]{1,15}|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2}))$"
    )]
    to: Option<String>,
}

/// `consumer` and `route`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct Filters {
    /// Only this consumer. A consumer's own key may only name itself.
    #[param(min_length = 1, max_length = 200)]
    consumer: Option<String>,
    /// Only this route id.
    #[param(min_length = 1, max_length = 200)]
    route: Option<String>,
}

/// `consumer` alone.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ConsumerFilter {
    /// Only this consumer. A consumer's own key may only name itself.
    #[param(min_length = 1, max_length = 200)]
    consumer: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/latency",
    summary = "Latency quantiles per route over time",
    description = "Requests forwarded upstream only. Quantiles come from a log-bucketed sketch with relative error 0.5% (nearest rank). Without `step`, one point covers the whole window. `errors` counts responses with status >= 500.",
    params(
        Window,
        ("step" = Option<String>, Query, description = "Bucket width: 30s, 5m, 1h, 1d or seconds. At most 10,000 points per series: a step too small for the window is a 400.", pattern = "^[1-9][0-9]{0,5}(ms|s|m|h|d)?$"),
        Filters,
        ("quantiles" = Option<String>, Query, description = "Comma-separated quantiles between 0 and 1. Default 0.5,0.9,0.99.", pattern = r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)(,(0(\.[0-9]{1,6})?|1(\.0{1,6})?)){0,19}$"),
        ("group_by" = Option<String>, Query, description = "`route` (default) or `route,consumer`.", pattern = "^(route|route,consumer|consumer,route)$"),
    ),
    responses((status = 200, description = "One series per route (and consumer)", body = crate::reports::LatencyAnswer)),
)]
#[allow(dead_code)]
fn latency() {}

#[utoipa::path(
    get,
    path = "/v1/usage",
    summary = "Exact request counts and bytes",
    description = "Counts every request the gateways saw, rejected ones included; `billable_requests` are the ones billed.",
    params(
        Window,
        Filters,
        ("group_by" = Option<String>, Query, description = "Comma-separated from consumer, route, day, hour, minute, status, plan. Default consumer. Grouped by hour or minute, a window may hold at most 10,080 of them (a week of minutes).", pattern = "^(consumer|route|day|hour|minute|status|plan)(,(consumer|route|day|hour|minute|status|plan))*$"),
    ),
    responses((status = 200, description = "One row per group", body = crate::reports::UsageAnswer)),
)]
#[allow(dead_code)]
fn usage() {}

#[utoipa::path(
    get,
    path = "/v1/revenue",
    summary = "Exact revenue",
    description = "Within each calendar month (UTC) tiers apply to the cumulative billable quantity per consumer x plan x route; revenue over a window is the charge up to its end minus the charge up to its start. Revenue is a decimal string. Minimum charges are billing's only (see /v1/billing/export).",
    params(
        Window,
        Filters,
        ("group_by" = Option<String>, Query, description = "Comma-separated from consumer, route, plan, day. Default consumer.", pattern = "^(consumer|route|plan|day)(,(consumer|route|plan|day))*$"),
        ("top" = Option<i64>, Query, description = "Only the N rows with the highest revenue, highest first (for example top consumers: group_by=consumer&top=10). Without it, rows are sorted by their keys.", minimum = 1, maximum = 10000),
    ),
    responses((status = 200, description = "One row per group", body = crate::revenue::RevenueAnswer)),
)]
#[allow(dead_code)]
fn revenue() {}

#[utoipa::path(
    get,
    path = "/v1/billing/export",
    summary = "Billing line items of a month: published once complete, or preliminary",
    description = "One line per consumer x plan x route: period, consumer, plan, route, quantity (billable requests), amount (exact decimal), currency, kind (usage; adjustment: late usage of an earlier published period; minimum: what reaches the plan's minimum charge; minimum_adjustment), for_period (the period the quantity was used in), status (final or preliminary). A complete period's export is published on first request and immutable after: the same bytes on every download (x-tollgate-export-id names it; its manifest is listed by /v1/billing/exports). A period the store does not yet hold completely is a 409 unless preliminary=true.",
    params(
        ("period" = String, Query, description = "Calendar month, YYYY-MM (UTC).", pattern = "^[0-9]{4}-(0[1-9]|1[0-2])$"),
        ("format" = Option<ExportFormat>, Query, description = "csv (default), jsonl, parquet or arrow."),
        ConsumerFilter,
        ("preliminary" = Option<Preliminary>, Query, description = "true: the lines so far of a period that is not complete yet, marked preliminary. Ignored once the period is published."),
    ),
    responses(
        (status = 200, description = "The line items",
            headers(
                ("x-tollgate-export-status" = String, description = "final or preliminary"),
                ("x-tollgate-export-id" = String, description = "The published export's id (final exports only)"),
                ("x-tollgate-export-sha256" = String, description = "Hex SHA-256 of this response's body"),
            ),
            content(
                (String = "text/csv"),
                (String = "application/x-ndjson"),
                (File = "application/vnd.apache.parquet"),
                (File = "application/vnd.apache.arrow.stream"),
            )),
        (status = 409, description = "The period is not complete yet (error code period_incomplete; error.complete_through says how far the events are complete, absent when no collector has reported)", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn billing_export() {}

/// A binary file.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
struct File(Vec<u8>);

/// The formats of an export.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum ExportFormat {
    Csv,
    Jsonl,
    Parquet,
    Arrow,
}

/// `true` or `false`.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum Preliminary {
    True,
    False,
}

#[utoipa::path(
    get,
    path = "/v1/billing/exports",
    summary = "Manifests of the published billing exports",
    description = "One manifest per published period: id, period, generated_at, complete_through, rows, the SHA-256 of each format's bytes, totals per consumer and currency. A consumer's own key sees only its own totals.",
    params(ConsumerFilter),
    responses((status = 200, description = "The manifests", body = crate::billing::ExportsAnswer)),
)]
#[allow(dead_code)]
fn billing_exports() {}

#[utoipa::path(
    get,
    path = "/v1/quota",
    summary = "Quota state for gateways and partners",
    description = "Gateways poll with the `since` and `epoch` of their last answer and get only the consumers whose entry changed after it (`full: false`); without them, or when they are not of this query-API process, the whole state (`full: true`).",
    params(
        ConsumerFilter,
        ("since" = Option<i64>, Query, description = "The `version` of the caller's last answer; given together with `epoch`."),
        ("epoch" = Option<u64>, Query, description = "The `epoch` of the caller's last answer; given together with `since`."),
    ),
    responses((status = 200, description = "OK", body = tollgate_schemas::quota::QuotaSnapshot)),
)]
#[allow(dead_code)]
fn quota() {}

#[utoipa::path(get, path = "/openapi.json", summary = "This document", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

#[utoipa::path(get, path = "/healthz", summary = "Liveness", security(()),
    responses((status = 200, description = "ok", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", summary = "Readiness (the store answers)", security(()),
    responses(
        (status = 200, description = "ready", content_type = "text/plain", body = String),
        (status = 503, description = "store not ready", content_type = "text/plain", body = String),
    ))]
#[allow(dead_code)]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics", security(()),
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/", summary = "SRE dashboard", security(()),
    responses((status = 200, description = "Latency, traffic and errors per route", content_type = "text/html", body = String)))]
#[allow(dead_code)]
fn dashboards() {}

#[utoipa::path(get, path = "/business", summary = "Business dashboard", security(()),
    responses((status = 200, description = "Revenue per endpoint, consumer and plan; the month against the one before", content_type = "text/html", body = String)))]
#[allow(dead_code)]
fn business() {}

#[utoipa::path(get, path = "/partner", summary = "Partner self-service dashboard", security(()),
    responses((status = 200, description = "A partner's own usage, quota and latency, signed in with its API key", content_type = "text/html", body = String)))]
#[allow(dead_code)]
fn partner() {}

/// The bearer scheme, and the error answers every `/v1` operation may give.
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let errors = [
            (
                "400",
                "BadParameter",
                "A parameter is invalid; the message names it",
            ),
            ("401", "Unauthorized", "No or unknown token"),
            (
                "403",
                "Forbidden",
                "A consumer key asked for another consumer",
            ),
        ];
        for (_, name, description) in errors {
            components.responses.insert(
                name.to_string(),
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("Error")))
                            .build(),
                    )
                    .build()
                    .into(),
            );
        }
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            if let Some(op) = item.get.as_mut() {
                for (status, name, _) in errors {
                    op.responses.responses.insert(
                        status.to_string(),
                        Ref::new(format!("#/components/responses/{name}")).into(),
                    );
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate query API",
        version = "1.0.0",
        description = "Usage, latency, revenue, billing exports and quota state of a Tollgate deployment. Authenticate with `Authorization: Bearer <token>`: an admin token sees everything, a consumer's API key sees only that consumer."
    ),
    paths(latency, usage, revenue, billing_export, billing_exports, quota, openapi_json, healthz, readyz, metrics, dashboards, business, partner),
    components(schemas(ErrorBody, ExportFormat, File, Preliminary)),
    modifiers(&Common),
    security(("bearer" = [])),
)]
struct Doc;

/// The document as the API serves it (pretty JSON, with a final newline).
pub fn document() -> String {
    let mut text = Doc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

/// Each documented `/v1` operation's query parameter names, by path.
pub fn documented_params() -> Vec<(String, Vec<String>)> {
    Doc::openapi()
        .paths
        .paths
        .iter()
        .filter(|(p, _)| p.starts_with("/v1/"))
        .map(|(p, item)| {
            let names = item
                .get
                .as_ref()
                .and_then(|op| op.parameters.as_ref())
                .map(|ps| ps.iter().map(|x| x.name.clone()).collect())
                .unwrap_or_default();
            (p.clone(), names)
        })
        .collect()
}

/// What each `/v1` handler accepts, by path (what [`documented_params`] must list).
pub fn accepted_params() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("/v1/latency", crate::reports::LATENCY_PARAMS),
        ("/v1/usage", crate::reports::USAGE_PARAMS),
        ("/v1/revenue", crate::revenue::REVENUE_PARAMS),
        ("/v1/billing/export", crate::billing::EXPORT_PARAMS),
        ("/v1/billing/exports", crate::billing::EXPORTS_PARAMS),
        ("/v1/quota", crate::quota::QUOTA_PARAMS),
    ]
}
