//! Billing exports (`/v1/billing/export`, `/v1/billing/exports`): one line item per consumer ×
//! plan × route of a calendar month, published once the month is complete and immutable after.
//!
//! - **Complete.** A period is complete when the store holds every event of it: the collectors'
//!   watermark (`tollgate_store::ledger`) minus `query_api.billing.event_delay_ms` has passed
//!   its end. Before that, an export is a 409 that says how far the events are complete, unless
//!   `preliminary=true` asks for the lines so far (marked `preliminary`).
//! - **Published.** The first export asked of a complete period is computed, stored with a
//!   manifest (id, period, generated_at, rows, totals per consumer and currency, the SHA-256 of
//!   each format's bytes) and served from the store from then on: the same bytes every time.
//! - **Late events** never change a published export; they become adjustment lines of the next
//!   export made (`lines.rs`).

mod lines;
mod render;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_store::StoredExport;

use crate::AppState;
use crate::auth::Scope;
use crate::error::ApiError;
use crate::params::{Params, parse_period, rfc3339};
use lines::{Line, Total};
use render::{Format, Status};

/// The query parameters of the billing endpoints.
pub(crate) const EXPORT_PARAMS: &[&str] = &["period", "format", "consumer", "preliminary"];
pub(crate) const EXPORTS_PARAMS: &[&str] = &["consumer"];

/// What the manifest of a published export says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    pub id: String,
    pub period: String,
    pub generated_at: String,
    /// How far the events were complete when it was made (RFC 3339).
    pub complete_through: String,
    pub rows: u64,
    /// Hex SHA-256 of each format's bytes (`csv`, `jsonl`, `parquet`, `arrow`).
    pub sha256: BTreeMap<String, String>,
    /// Per consumer and currency (a consumer's own key sees its own only).
    pub totals: Vec<Total>,
}

/// The body of `/v1/billing/exports`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportsAnswer {
    /// How far the stored events are complete (RFC 3339); `null` until a collector reports.
    complete_through: Option<String>,
    exports: Vec<Manifest>,
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How far the stored events are complete, after the allowance for late events (µs).
pub(crate) async fn complete_through(s: &AppState) -> Result<Option<i64>, ApiError> {
    let progress = s.store.progress().await?;
    Ok(tollgate_store::ledger::complete_through(&progress)
        .map(|t| t - s.billing.event_delay_ms as i64 * 1000))
}

/// Every line of an export of `period` made now: its usage, then the adjustments.
async fn all_lines(
    s: &AppState,
    period: &str,
    start: i64,
    end: i64,
) -> Result<Vec<Line>, ApiError> {
    let mut out = lines::period_lines(s, period, start, end).await?;
    out.extend(lines::adjustments(s, period).await?);
    Ok(out)
}

/// Computes and stores the export of a complete period; returns the period's export (this
/// one, or one another query API published first).
async fn publish(
    s: &AppState,
    period: &str,
    start: i64,
    end: i64,
    through: i64,
) -> Result<StoredExport, ApiError> {
    let lines = all_lines(s, period, start, end).await?;
    let refs: Vec<&Line> = lines.iter().collect();
    let mut sha256 = BTreeMap::new();
    for f in Format::ALL {
        let bytes = render::render(f, period, Status::Final, &refs)?;
        sha256.insert(f.as_str().to_string(), hex_sha256(&bytes));
    }
    let generated_at_us = chrono::Utc::now().timestamp_micros();
    let manifest = Manifest {
        id: uuid::Uuid::now_v7().to_string(),
        period: period.to_string(),
        generated_at: rfc3339(generated_at_us),
        complete_through: rfc3339(through),
        rows: lines.len() as u64,
        sha256,
        totals: lines::totals(&lines),
    };
    let mut text = String::new();
    for l in &lines {
        text.push_str(&serde_json::to_string(l).expect("a line serializes"));
        text.push('\n');
    }
    let stored = s
        .store
        .publish_export(&StoredExport {
            id: manifest.id.clone(),
            period: period.to_string(),
            generated_at_us,
            manifest: serde_json::to_string(&manifest).expect("a manifest serializes"),
            lines: text,
        })
        .await?;
    tracing::info!(period, id = %stored.id, rows = lines.len(), "billing export published");
    Ok(stored)
}

fn manifest_of(e: &StoredExport) -> Result<Manifest, ApiError> {
    serde_json::from_str(&e.manifest).map_err(|err| {
        ApiError::Internal(format!(
            "published export {} of {} has a bad manifest: {err}",
            e.id, e.period
        ))
    })
}

pub async fn export(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::new(raw, EXPORT_PARAMS)?;
    let period = p
        .get("period")
        .ok_or_else(|| ApiError::bad("period", "required, a month like 2026-11"))?
        .to_string();
    let (start, end) = parse_period(&period)?;
    let format = Format::parse(p.get("format").unwrap_or("csv"))?;
    let preliminary = match p.get("preliminary") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "preliminary",
                format!("`{other}` is not true or false"),
            ));
        }
    };
    let mine = |l: &&Line| consumer.as_deref().is_none_or(|c| l.consumer == c);

    let published = match s.store.published_export(&period).await? {
        Some(e) => Some(e),
        None => match complete_through(&s).await? {
            Some(through) if through >= end => {
                Some(publish(&s, &period, start, end, through).await?)
            }
            through if !preliminary => {
                return Err(ApiError::Incomplete {
                    message: format!(
                        "billing period {period} is not complete yet: the store holds every event only through {}; ask again later, or add preliminary=true for the lines so far",
                        through.map_or("no time yet (no collector has reported)".into(), rfc3339)
                    ),
                    complete_through: through.map(rfc3339),
                });
            }
            _ => None,
        },
    };
    let (lines, status, mut headers) = match &published {
        Some(e) => {
            let manifest = manifest_of(e)?;
            let headers = vec![
                ("x-tollgate-export-id", manifest.id.clone()),
                ("x-tollgate-export-status", "final".to_string()),
            ];
            (lines::parse_lines(e)?, Status::Final, headers)
        }
        None => (
            all_lines(&s, &period, start, end).await?,
            Status::Preliminary,
            vec![("x-tollgate-export-status", "preliminary".to_string())],
        ),
    };
    let refs: Vec<&Line> = lines.iter().filter(mine).collect();
    let body = render::render(format, &period, status, &refs)?;
    headers.push(("x-tollgate-export-sha256", hex_sha256(&body)));
    Ok(render::file_response(body, format, &period, &headers))
}

/// `GET /v1/billing/exports`: the manifests of the published exports, by period. A partner's
/// key sees its own totals only.
pub async fn exports(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<ExportsAnswer>, ApiError> {
    Params::new(raw, EXPORTS_PARAMS)?;
    let mut out = Vec::new();
    for e in s.store.published_exports().await? {
        let mut m = manifest_of(&e)?;
        if let Some(c) = &consumer {
            m.totals.retain(|t| &t.consumer == c);
        }
        out.push(m);
    }
    Ok(Json(ExportsAnswer {
        complete_through: complete_through(&s).await?.map(rfc3339),
        exports: out,
    }))
}
