//! The consumer and plan model shared by the gateway (auth, rate limits, quotas) and the query
//! API (pricing, partner self-service). These are the `consumers:` and `plans:` sections of the
//! configuration file.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// An API consumer (a partner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Stable id; the unit of usage reports and billing.
    pub id: String,
    /// Name of a plan in `plans:`.
    pub plan: String,
    /// API keys as `sha256:<64 hex digits>` of the key; the keys themselves are never stored.
    #[serde(default, deserialize_with = "exact_list")]
    pub api_keys: Vec<String>,
}

/// A list read into a vector of its own length while it has one element: the usual consumer
/// has one key, and a vector grown by `push` has room for four (96 bytes, 9.6 MB for 100,000
/// consumers while the configuration is read). An empty list allocates nothing.
fn exact_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct List;
    impl<'de> serde::de::Visitor<'de> for List {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of strings")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element()? {
                if list.capacity() == 0 {
                    list.reserve_exact(1);
                }
                list.push(item);
            }
            Ok(list)
        }
    }
    d.deserialize_seq(List)
}

impl Consumer {
    /// The decoded sha256 digests of this consumer's keys.
    pub fn key_hashes(&self) -> Result<Vec<[u8; 32]>, String> {
        self.api_keys.iter().map(|k| parse_key_hash(k)).collect()
    }
}

/// Parses `sha256:<64 hex>` into a digest.
pub fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("`{s}` must start with `sha256:`"))?;
    let bytes =
        decode_hex(hex).ok_or_else(|| format!("`{s}` is not sha256: plus 64 hex digits"))?;
    bytes
        .try_into()
        .map_err(|_| format!("`{s}` is not sha256: plus 64 hex digits"))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A plan: what a consumer may do and what it pays.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Token bucket per consumer, enforced by each gateway locally. None: unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Requests allowed per period, counted by the store and enforced by gateways.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// How billable requests are priced. None: free.
    #[serde(default)]
    pub pricing: Option<Pricing>,
}

/// A token bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Largest burst; defaults to `per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Billing / quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Calendar month in UTC.
    #[default]
    Month,
}

/// A request quota per period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// The period the count resets on.
    #[serde(default)]
    pub period: Period,
    /// Billable requests allowed per period.
    pub requests: u64,
}

/// Prices of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
    /// Charge per route id; `default` prices every route not listed.
    pub charges: BTreeMap<String, Charge>,
    /// The least a consumer on this plan pays for a period in which it used the plan (decimal
    /// string): when its charges add up to less, the billing export adds a `minimum` line with
    /// the difference. With a plan change inside the period, each plan's part has its own.
    #[serde(
        default,
        deserialize_with = "de_opt_money",
        skip_serializing_if = "Option::is_none"
    )]
    pub minimum: Option<Decimal>,
}

impl Pricing {
    /// The charge that prices `route`.
    pub fn charge_for(&self, route: &str) -> Option<&Charge> {
        self.charges
            .get(route)
            .or_else(|| self.charges.get("default"))
    }
}

/// How tiers apply to the cumulative quantity of the period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Each unit at the price of the tier it falls in.
    #[default]
    Graduated,
    /// Every unit at the price of the tier the total reached.
    Volume,
}

/// One charge: a flat unit price, or tiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// Flat price per billable request (decimal string).
    #[serde(
        default,
        deserialize_with = "de_opt_money",
        skip_serializing_if = "Option::is_none"
    )]
    pub unit_price: Option<Decimal>,
    /// Tier mode, `graduated` unless set.
    #[serde(default)]
    pub mode: TierMode,
    /// Tiers by cumulative quantity, ascending; the last has `up_to: null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<Tier>>,
    /// Units of the period included free before the price applies: the price and tiers count
    /// from the first unit after them (with volume tiers, the tier is that of the units beyond
    /// the included ones). Per route: under `default`, each route has its own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub included: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One price tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Inclusive upper bound of the cumulative quantity; `null` for the last tier.
    pub up_to: Option<u64>,
    /// Price per unit within (graduated) or for all units reaching (volume) this tier.
    #[serde(deserialize_with = "de_money")]
    pub unit_price: Decimal,
}

impl Charge {
    /// Checks that the charge is well formed; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.unit_price, &self.tiers) {
            (Some(p), None) if p.is_sign_negative() => {
                Err("unit_price must not be negative".into())
            }
            (Some(_), None) => Ok(()),
            (None, Some(tiers)) => {
                if tiers.is_empty() {
                    return Err("tiers must not be empty".into());
                }
                let mut prev = 0u64;
                for (i, t) in tiers.iter().enumerate() {
                    if t.unit_price.is_sign_negative() {
                        return Err(format!("tiers[{i}].unit_price must not be negative"));
                    }
                    let last = i + 1 == tiers.len();
                    match (t.up_to, last) {
                        (None, true) => {}
                        (None, false) => {
                            return Err(format!("tiers[{i}].up_to: only the last tier is open"));
                        }
                        (Some(_), true) => {
                            return Err(format!("tiers[{i}].up_to: the last tier must be null"));
                        }
                        (Some(u), false) if u <= prev => {
                            return Err(format!("tiers[{i}].up_to: {u} must exceed {prev}"));
                        }
                        (Some(u), false) => prev = u,
                    }
                }
                Ok(())
            }
            (Some(_), Some(_)) => Err("set either unit_price or tiers, not both".into()),
            (None, None) => Err("set unit_price or tiers".into()),
        }
    }
}

/// Checks consumers against plans; each error names the key.
pub fn validate_consumers(
    consumers: &[Consumer],
    plans: &BTreeMap<String, Plan>,
) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for (i, c) in consumers.iter().enumerate() {
        if c.id.is_empty() {
            return Err(format!("consumers[{i}].id: must not be empty"));
        }
        if !seen.insert(c.id.as_str()) {
            return Err(format!("consumers[{i}].id: `{}` is listed twice", c.id));
        }
        if !plans.contains_key(&c.plan) {
            return Err(format!(
                "consumers[{i}].plan: no plan named `{}` in plans",
                c.plan
            ));
        }
        c.key_hashes()
            .map_err(|e| format!("consumers[{i}].api_keys: {e}"))?;
    }
    crate::directory::key_owners(consumers).map_err(|e| format!("consumers.api_keys: {e}"))?;
    for (name, plan) in plans {
        if let Some(rl) = &plan.rate_limit
            && rl.per_second == 0
        {
            return Err(format!(
                "plans.{name}.rate_limit.per_second: must be at least 1"
            ));
        }
        if let Some(p) = &plan.pricing {
            if p.minimum.is_some_and(|m| m.is_sign_negative()) {
                return Err(format!(
                    "plans.{name}.pricing.minimum: must not be negative"
                ));
            }
            for (route, charge) in &p.charges {
                charge
                    .validate()
                    .map_err(|e| format!("plans.{name}.pricing.charges.{route}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Money is read from decimal strings (or integers), never from floating-point numbers, so that
/// `0.1` means exactly one tenth.
fn de_money<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    struct Money;
    impl serde::de::Visitor<'_> for Money {
        type Value = Decimal;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a decimal string such as \"0.0005\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal, E> {
            v.trim()
                .parse::<Decimal>()
                .map_err(|_| E::custom(format!("`{v}` is not a decimal number")))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
            Err(E::custom(format!(
                "{v} is a floating-point number; write money as a decimal string, e.g. \"{v}\""
            )))
        }
    }
    d.deserialize_any(Money)
}

fn de_opt_money<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    de_money(d).map(Some)
}
