//! Query-string parsing. Every error names the parameter; unknown parameters are errors too, so
//! a typo never silently widens a report.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use tollgate_store::GroupKey;

use crate::error::ApiError;

/// The raw query string, checked against the parameters an endpoint knows.
pub struct Params(HashMap<String, String>);

impl Params {
    pub fn new(raw: HashMap<String, String>, known: &[&'static str]) -> Result<Params, ApiError> {
        if let Some(k) = raw.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::BadParam {
                param: "query",
                message: format!(
                    "unknown parameter `{k}`; this endpoint takes {}",
                    known.join(", ")
                ),
            });
        }
        for &param in known {
            let Some(v) = raw.get(param) else { continue };
            let max = if matches!(param, "consumer" | "route") {
                200
            } else {
                1000
            };
            if v.is_empty() {
                return Err(ApiError::bad(
                    param,
                    "is empty; leave it out for the default",
                ));
            }
            if v.len() > max {
                return Err(ApiError::bad(param, format!("is longer than {max} bytes")));
            }
        }
        Ok(Params(raw))
    }

    /// A parameter's value; never empty (`new` refuses empty values).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `from` and `to` as µs since the epoch; default: the last 24 hours.
    pub fn window(&self) -> Result<(i64, i64), ApiError> {
        let now = Utc::now().timestamp_micros();
        let to = self
            .get("to")
            .map(|v| parse_time("to", v))
            .transpose()?
            .unwrap_or(now);
        let from = self
            .get("from")
            .map(|v| parse_time("from", v))
            .transpose()?
            .unwrap_or(to - 86_400_000_000);
        if from >= to {
            return Err(ApiError::bad("from", "must be before `to`"));
        }
        Ok((from, to))
    }

    /// `group_by`, comma-separated from `allowed`; `default` when absent.
    pub fn group_by(
        &self,
        allowed: &[GroupKey],
        default: &[GroupKey],
    ) -> Result<Vec<GroupKey>, ApiError> {
        let Some(v) = self.get("group_by") else {
            return Ok(default.to_vec());
        };
        let mut keys = Vec::new();
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let k = GroupKey::parse(item)
                .filter(|k| allowed.contains(k))
                .ok_or_else(|| {
                    let names: Vec<&str> = allowed.iter().map(|k| k.as_str()).collect();
                    ApiError::bad(
                        "group_by",
                        format!("`{item}` is not one of {}", names.join(", ")),
                    )
                })?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Ok(keys)
    }
}

/// RFC 3339, or unix milliseconds.
pub fn parse_time(param: &'static str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return ms
            .checked_mul(1000)
            .filter(|us| *us >= 0)
            .ok_or_else(|| ApiError::bad(param, format!("`{v}` is out of range")));
    }
    // A `+` in an unencoded query string arrives as a space.
    DateTime::parse_from_rfc3339(&v.replace(' ', "+"))
        .map(|t| t.timestamp_micros())
        .map_err(|_| {
            ApiError::bad(
                param,
                format!("`{v}` is neither RFC 3339 nor unix milliseconds"),
            )
        })
}

/// A duration like `30s`, `5m`, `1h`, `1d`, or plain seconds; in µs.
pub fn parse_step(v: &str) -> Result<i64, ApiError> {
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| ApiError::bad("step", format!("`{v}` is not a duration like 60s, 5m, 1h")))?;
    let unit_us: i64 = match unit {
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => {
            return Err(ApiError::bad(
                "step",
                format!("`{v}`: unit must be ms, s, m, h or d"),
            ));
        }
    };
    let us = n
        .checked_mul(unit_us)
        .filter(|us| *us >= 1_000)
        .ok_or_else(|| ApiError::bad("step", format!("`{v}` must be at least 1ms")))?;
    Ok(us)
}

/// Quantiles like `0.5,0.9,0.99`.
pub fn parse_quantiles(v: Option<&str>) -> Result<Vec<f64>, ApiError> {
    let v = v.unwrap_or("0.5,0.9,0.99");
    let qs: Vec<f64> = v
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| {
            ApiError::bad(
                "quantiles",
                format!("`{v}` must be numbers between 0 and 1, comma-separated"),
            )
        })?;
    if qs.is_empty() || qs.len() > 20 {
        return Err(ApiError::bad(
            "quantiles",
            "give between 1 and 20 quantiles",
        ));
    }
    Ok(qs)
}

/// A calendar month `YYYY-MM`: its start and end (µs, UTC).
pub fn parse_period(v: &str) -> Result<(i64, i64), ApiError> {
    let bad = || ApiError::bad("period", format!("`{v}` is not a month like 2026-11"));
    let (y, m) = v.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let start = NaiveDate::from_ymd_opt(
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        1,
    )
    .ok_or_else(bad)?;
    Ok(month_bounds(start))
}

fn month_bounds(first: NaiveDate) -> (i64, i64) {
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    }
    .expect("valid month");
    let us = |d: NaiveDate| {
        Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
            .timestamp_micros()
    };
    (us(first), us(next))
}

/// The calendar month (UTC) containing `t_us`: `(start, end)`.
pub fn period_of(t_us: i64) -> (i64, i64) {
    let d = DateTime::from_timestamp_micros(t_us)
        .expect("in range")
        .date_naive();
    month_bounds(d.with_day(1).expect("day 1"))
}

/// `YYYY-MM` of the month starting at `start_us`.
pub fn period_name(start_us: i64) -> String {
    DateTime::from_timestamp_micros(start_us)
        .expect("in range")
        .format("%Y-%m")
        .to_string()
}

/// RFC 3339 with milliseconds.
pub fn rfc3339(t_us: i64) -> String {
    DateTime::from_timestamp_micros(t_us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_steps_and_periods() {
        assert_eq!(
            parse_time("from", "1764000000000").unwrap(),
            1_764_000_000_000_000
        );
        assert_eq!(
            parse_time("from", "2025-11-24T16:00:00Z").unwrap(),
            1_764_000_000_000_000
        );
        assert!(
            parse_time("from", "yesterday")
                .unwrap_err()
                .to_string()
                .contains("`from`")
        );
        assert_eq!(parse_step("5m").unwrap(), 300_000_000);
        assert_eq!(parse_step("60").unwrap(), 60_000_000);
        assert!(parse_step("5x").is_err());
        let (s, e) = parse_period("2026-12").unwrap();
        assert_eq!(rfc3339(s), "2026-12-01T00:00:00.000Z");
        assert_eq!(rfc3339(e), "2027-01-01T00:00:00.000Z");
        assert_eq!(period_of(s + 5), (s, e));
        assert_eq!(period_name(s), "2026-12");
        assert!(parse_period("2026-13").is_err());
        assert!(parse_quantiles(Some("0.5,2")).is_err());
    }
}
