//! Pricing maths, exact in decimals: the charge of a cumulative quantity under a flat price or
//! graduated / volume tiers, and revenue over a window as the difference of two charges.

use rust_decimal::Decimal;
use tollgate_schemas::config::{Charge, TierMode};

/// The charge for `quantity` billable units, cumulative within the period: nothing for the
/// charge's included units, then the price or tiers over the units beyond them.
pub fn charge(c: &Charge, quantity: u64) -> Decimal {
    let quantity = quantity.saturating_sub(c.included);
    if let Some(p) = c.unit_price {
        return p * Decimal::from(quantity);
    }
    let Some(tiers) = &c.tiers else {
        return Decimal::ZERO;
    };
    match c.mode {
        TierMode::Graduated => {
            let mut total = Decimal::ZERO;
            let mut lower = 0u64;
            for t in tiers {
                let upper = t.up_to.unwrap_or(u64::MAX);
                if quantity > lower {
                    let units = quantity.min(upper) - lower;
                    total += t.unit_price * Decimal::from(units);
                }
                if quantity <= upper {
                    break;
                }
                lower = upper;
            }
            total
        }
        TierMode::Volume => {
            if quantity == 0 {
                return Decimal::ZERO;
            }
            let tier = tiers
                .iter()
                .find(|t| t.up_to.is_none_or(|u| quantity <= u))
                .or(tiers.last());
            tier.map(|t| t.unit_price * Decimal::from(quantity))
                .unwrap_or_default()
        }
    }
}

/// Revenue of `added` units on top of `before` units already used in the period.
pub fn incremental(c: &Charge, before: u64, added: u64) -> Decimal {
    charge(c, before + added) - charge(c, before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;
    use tollgate_schemas::config::Tier;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn graduated() -> Charge {
        Charge {
            unit_price: None,
            mode: TierMode::Graduated,
            tiers: Some(vec![
                Tier {
                    up_to: Some(10),
                    unit_price: d("0"),
                },
                Tier {
                    up_to: Some(100),
                    unit_price: d("0.0010"),
                },
                Tier {
                    up_to: None,
                    unit_price: d("0.0005"),
                },
            ]),
            included: 0,
        }
    }

    fn volume() -> Charge {
        Charge {
            unit_price: None,
            mode: TierMode::Volume,
            tiers: Some(vec![
                Tier {
                    up_to: Some(1000),
                    unit_price: d("0.01"),
                },
                Tier {
                    up_to: None,
                    unit_price: d("0.008"),
                },
            ]),
            included: 0,
        }
    }

    /// The price of the n-th unit (1-based) under graduated tiers, by definition.
    fn unit_price_of(c: &Charge, n: u64) -> Decimal {
        let mut lower = 0;
        for t in c.tiers.as_ref().unwrap() {
            if n > lower && t.up_to.is_none_or(|u| n <= u) {
                return t.unit_price;
            }
            lower = t.up_to.unwrap_or(u64::MAX);
        }
        unreachable!()
    }

    #[test]
    fn known_values() {
        let flat = Charge {
            unit_price: Some(d("0.0005")),
            mode: TierMode::Graduated,
            tiers: None,
            included: 0,
        };
        assert_eq!(charge(&flat, 3), d("0.0015"));
        assert_eq!(charge(&graduated(), 5), d("0"));
        assert_eq!(charge(&graduated(), 10), d("0"));
        assert_eq!(charge(&graduated(), 11), d("0.0010"));
        assert_eq!(charge(&graduated(), 100), d("0.0900"));
        assert_eq!(charge(&graduated(), 102), d("0.0910"));
        assert_eq!(charge(&volume(), 1000), d("10.00"));
        assert_eq!(charge(&volume(), 1001), d("8.008"));
        assert_eq!(charge(&volume(), 0), d("0"));
    }

    proptest! {
        #[test]
        fn graduated_equals_the_sum_of_unit_prices(q in 0u64..400) {
            let c = graduated();
            let by_unit: Decimal = (1..=q).map(|n| unit_price_of(&c, n)).sum();
            prop_assert_eq!(charge(&c, q), by_unit);
        }

        #[test]
        fn window_revenues_add_up_to_the_period_charge(cuts in proptest::collection::vec(0u64..300, 0..8)) {
            // Splitting a period's usage into consecutive windows never changes the total.
            for c in [graduated(), volume()] {
                let mut points = cuts.clone();
                points.sort_unstable();
                let mut before = 0;
                let mut total = Decimal::ZERO;
                for p in points.iter().chain(std::iter::once(&300)) {
                    total += incremental(&c, before, p - before);
                    before = *p;
                }
                prop_assert_eq!(total, charge(&c, 300));
            }
        }

        #[test]
        fn included_units_are_free_and_the_price_counts_after_them(q in 0u64..3000, n in 0u64..500) {
            let flat = Charge { unit_price: Some(d("0.003")), mode: TierMode::Graduated, tiers: None, included: 0 };
            for base in [graduated(), volume(), flat] {
                let with = Charge { included: n, ..base.clone() };
                prop_assert_eq!(charge(&with, q), charge(&base, q.saturating_sub(n)));
                if q <= n {
                    prop_assert!(charge(&with, q).is_zero());
                }
            }
        }

        #[test]
        fn a_split_period_charges_what_the_whole_does(
            cuts in proptest::collection::vec(0u64..3000, 0..6), n in 0u64..200,
        ) {
            // However a period's usage is split into windows (with included units too), the
            // windows' charges add up to the charge of the whole period.
            for base in [graduated(), volume()] {
                let c = Charge { included: n, ..base };
                let mut points = cuts.clone();
                points.sort_unstable();
                let (mut before, mut total) = (0, Decimal::ZERO);
                for p in points.iter().chain(std::iter::once(&3000)) {
                    total += incremental(&c, before, p - before);
                    before = *p;
                }
                prop_assert_eq!(total, charge(&c, 3000));
            }
        }

        #[test]
        fn graduated_is_monotonic(a in 0u64..10_000, b in 0u64..10_000) {
            let c = graduated();
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(charge(&c, lo) <= charge(&c, hi));
        }

        #[test]
        fn volume_prices_every_unit_at_the_reached_tier(q in 1u64..5000) {
            let price = if q <= 1000 { d("0.01") } else { d("0.008") };
            prop_assert_eq!(charge(&volume(), q), price * Decimal::from(q));
        }
    }
}
