//! The quota state: what the query API computes from the store and serves at `/v1/quota`, and
//! what every gateway reads, enforces and keeps on disk as its last known state. One type for
//! both sides of the wire.

use serde::{Deserialize, Serialize};

/// `/v1/quota`.
///
/// Gateways poll it with `?since=<version>&epoch=<epoch>` from their last answer and get only
/// the consumers whose entry changed after that version (`full: false`), so an idle deployment
/// with 100,000 consumers sends next to nothing. Versions are comparable only within one
/// query-API process (`epoch`); an answer to any other `since` is the whole state
/// (`full: true`), which replaces what the caller held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Quota))]
pub struct QuotaSnapshot {
    /// When the state was computed (unix milliseconds); newer snapshots have larger versions.
    pub version: i64,
    /// The query-API process that computed it (random per start); `since` only applies to the
    /// same epoch.
    #[serde(default)]
    pub epoch: u64,
    /// True: every consumer (replace the state). False: only the entries that changed after
    /// the requested `since` (merge them; an entry without a limit removes one).
    #[serde(default = "full_by_default")]
    pub full: bool,
    pub consumers: Vec<QuotaEntry>,
}

fn full_by_default() -> bool {
    true
}

impl Default for QuotaSnapshot {
    fn default() -> Self {
        QuotaSnapshot {
            version: 0,
            epoch: 0,
            full: true,
            consumers: Vec::new(),
        }
    }
}

/// One consumer's quota in the current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuotaEntry {
    pub consumer: String,
    /// The consumer's plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// The billing period, `YYYY-MM`.
    pub period: String,
    /// End of the period (RFC 3339, exclusive): the quota resets then.
    pub period_end: String,
    /// Billable requests allowed in the period; `None`: unlimited.
    pub limit: Option<u64>,
    /// Billable requests counted so far in the period.
    pub used: u64,
    /// `limit - used`, never negative; `None` when unlimited.
    pub remaining: Option<u64>,
    pub state: QuotaLevel,
}

impl QuotaEntry {
    /// An entry whose `remaining` and `state` follow from `limit` and `used`.
    pub fn new(
        consumer: String,
        plan: Option<String>,
        period: String,
        period_end: String,
        limit: Option<u64>,
        used: u64,
    ) -> QuotaEntry {
        QuotaEntry {
            consumer,
            plan,
            period,
            period_end,
            limit,
            used,
            remaining: limit.map(|l| l.saturating_sub(used)),
            state: QuotaLevel::of(limit, used),
        }
    }
}

/// A [`QuotaEntry`] over borrowed text, written as the same JSON: what whole states are
/// written from (the query API's full answers, the state a gateway keeps on disk), one entry
/// at a time, without building 100,000 entries of four strings each first.
/// Also how a gateway reads an answer's entries (text borrowed from the answer).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QuotaEntryRef<'a> {
    pub consumer: &'a str,
    pub plan: Option<&'a str>,
    pub period: &'a str,
    pub period_end: &'a str,
    pub limit: Option<u64>,
    pub used: u64,
    remaining: Option<u64>,
    state: QuotaLevel,
}

impl<'a> QuotaEntryRef<'a> {
    /// See [`QuotaEntry::new`].
    pub fn new(
        consumer: &'a str,
        plan: Option<&'a str>,
        period: &'a str,
        period_end: &'a str,
        limit: Option<u64>,
        used: u64,
    ) -> QuotaEntryRef<'a> {
        QuotaEntryRef {
            consumer,
            plan,
            period,
            period_end,
            limit,
            used,
            remaining: limit.map(|l| l.saturating_sub(used)),
            state: QuotaLevel::of(limit, used),
        }
    }
}

impl<'a> From<&'a QuotaEntry> for QuotaEntryRef<'a> {
    fn from(e: &'a QuotaEntry) -> QuotaEntryRef<'a> {
        QuotaEntryRef::new(
            &e.consumer,
            e.plan.as_deref(),
            &e.period,
            &e.period_end,
            e.limit,
            e.used,
        )
    }
}

impl From<QuotaEntryRef<'_>> for QuotaEntry {
    fn from(e: QuotaEntryRef<'_>) -> QuotaEntry {
        QuotaEntry::new(
            e.consumer.to_owned(),
            e.plan.map(str::to_owned),
            e.period.to_owned(),
            e.period_end.to_owned(),
            e.limit,
            e.used,
        )
    }
}

/// Writes the JSON of a [`QuotaSnapshot`] whose entries are `entries` to `out`, as they come.
pub fn write_snapshot<'a>(
    out: impl std::io::Write,
    version: i64,
    epoch: u64,
    full: bool,
    entries: impl Iterator<Item = QuotaEntryRef<'a>>,
) -> std::io::Result<()> {
    use serde::ser::{SerializeStruct, Serializer};
    /// The entries, taken on the one call of `serialize`.
    struct Entries<I>(std::cell::Cell<Option<I>>);
    impl<'a, I: Iterator<Item = QuotaEntryRef<'a>>> Serialize for Entries<I> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.take().into_iter().flatten())
        }
    }
    let mut ser = serde_json::Serializer::new(out);
    // The fields of `QuotaSnapshot`, in its order.
    let mut s = (&mut ser).serialize_struct("QuotaSnapshot", 4)?;
    s.serialize_field("version", &version)?;
    s.serialize_field("epoch", &epoch)?;
    s.serialize_field("full", &full)?;
    s.serialize_field("consumers", &Entries(std::cell::Cell::new(Some(entries))))?;
    s.end()?;
    Ok(())
}

/// How close a consumer is to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum QuotaLevel {
    Unlimited,
    Ok,
    /// 80 % or more used.
    Warning,
    Exceeded,
}

impl QuotaLevel {
    /// The level of `used` against `limit`.
    pub fn of(limit: Option<u64>, used: u64) -> QuotaLevel {
        match limit {
            None => QuotaLevel::Unlimited,
            Some(l) if used >= l => QuotaLevel::Exceeded,
            Some(l) if used.saturating_mul(5) >= l.saturating_mul(4) => QuotaLevel::Warning,
            Some(_) => QuotaLevel::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_thresholds() {
        assert_eq!(QuotaLevel::of(None, 5), QuotaLevel::Unlimited);
        assert_eq!(QuotaLevel::of(Some(10), 7), QuotaLevel::Ok);
        assert_eq!(QuotaLevel::of(Some(10), 8), QuotaLevel::Warning);
        assert_eq!(QuotaLevel::of(Some(10), 10), QuotaLevel::Exceeded);
    }

    #[test]
    fn a_snapshot_written_entry_by_entry_is_the_snapshot_s_json() {
        let entries = [
            QuotaEntry::new(
                "a \"quoted\" é".into(),
                Some("pro".into()),
                "2026-11".into(),
                "2026-12-01T00:00:00Z".into(),
                Some(10),
                9,
            ),
            QuotaEntry::new(
                "b".into(),
                None,
                "2026-11".into(),
                "2026-12-01T00:00:00Z".into(),
                None,
                3,
            ),
        ];
        let whole = QuotaSnapshot {
            version: 12,
            epoch: u64::MAX,
            full: false,
            consumers: entries.to_vec(),
        };
        let json = |version, epoch, full, entries: &[QuotaEntry]| {
            let mut out = Vec::new();
            write_snapshot(
                &mut out,
                version,
                epoch,
                full,
                entries.iter().map(QuotaEntryRef::from),
            )
            .unwrap();
            out
        };
        let written = json(12, u64::MAX, false, &entries);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            serde_json::to_string(&whole).unwrap()
        );
        let empty = json(1, 2, true, &[]);
        assert_eq!(
            serde_json::from_slice::<QuotaSnapshot>(&empty).unwrap(),
            QuotaSnapshot {
                version: 1,
                epoch: 2,
                full: true,
                consumers: vec![]
            }
        );
    }

    #[test]
    fn round_trips_through_json() {
        let s = QuotaSnapshot {
            version: 7,
            epoch: 3,
            full: false,
            consumers: vec![QuotaEntry {
                consumer: "a".into(),
                plan: Some("pro".into()),
                period: "2026-11".into(),
                period_end: "2026-12-01T00:00:00Z".into(),
                limit: Some(10),
                used: 3,
                remaining: Some(7),
                state: QuotaLevel::Ok,
            }],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"state\":\"ok\""), "{json}");
        assert_eq!(serde_json::from_str::<QuotaSnapshot>(&json).unwrap(), s);
    }
}
