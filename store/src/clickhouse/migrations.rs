//! Numbered schema migrations (`migrations/NNNN_name.sql`, embedded at compile time), applied
//! in order at start-up and recorded in `tollgate_migrations`. Every statement is idempotent
//! (`IF NOT EXISTS`), so processes starting together may apply the same migration twice
//! without harm; a migration is recorded once it has fully applied.

/// `(version, name, sql)` of every migration, in order. `{db}` stands for the database, and
/// `{since_us}` (`{coarse_since_us}` in 0003) for where the views a migration adds start
/// counting: see [`coarse_since_us`].
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "events", include_str!("migrations/0001_events.sql")),
    (2, "rollups", include_str!("migrations/0002_rollups.sql")),
    (
        3,
        "coarse_rollups",
        include_str!("migrations/0003_coarse_rollups.sql"),
    ),
    (
        4,
        "route_sketches",
        include_str!("migrations/0004_route_sketches.sql"),
    ),
    (5, "billing", include_str!("migrations/0005_billing.sql")),
];

/// The placeholders a migration may use for where its views start.
#[cfg(feature = "clickhouse")]
const SINCE_PLACEHOLDERS: [&str; 2] = ["{coarse_since_us}", "{since_us}"];

/// Where views added by a migration start in a database: 0 when it holds no events yet (they
/// cover everything), else the next UTC midnight (rows before it keep being answered by what
/// answered them before). A view sees only rows inserted after it exists, so starting it at a
/// boundary still ahead is what keeps it exact without copying old rows.
pub fn coarse_since_us(holds_events: bool, now_us: i64) -> i64 {
    if holds_events {
        (now_us.div_euclid(crate::time::DAY_US) + 1) * crate::time::DAY_US
    } else {
        0
    }
}

/// The statements of one migration file for database `db`: comments dropped, split on `;`.
/// The since placeholders are replaced by the caller.
pub fn statements(sql: &str, db: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| s.trim().replace("{db}", &format!("`{db}`")))
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(feature = "clickhouse")]
pub(super) async fn apply(
    client: &::clickhouse::Client,
    db: &str,
) -> Result<(), crate::StoreError> {
    use super::ch_err;

    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Version {
        version: u32,
    }

    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS `{db}`"))
        .execute()
        .await
        .map_err(|e| {
            crate::StoreError::ClickHouse(format!(
                "cannot reach ClickHouse or create database `{db}`: {e}"
            ))
        })?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.tollgate_migrations \
             (version UInt32, name String, applied_at DateTime DEFAULT now()) \
             ENGINE = MergeTree ORDER BY version"
        ))
        .execute()
        .await
        .map_err(ch_err)?;
    let applied: Vec<u32> = client
        .query(&format!(
            "SELECT DISTINCT version FROM `{db}`.tollgate_migrations"
        ))
        .fetch_all::<Version>()
        .await
        .map_err(ch_err)?
        .into_iter()
        .map(|v| v.version)
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let since = if SINCE_PLACEHOLDERS.iter().any(|p| sql.contains(p)) {
            let n: u64 = client
                .query(&format!("SELECT count() FROM `{db}`.events"))
                .fetch_one()
                .await
                .map_err(ch_err)?;
            let now_us = chrono::Utc::now().timestamp_micros();
            coarse_since_us(n > 0, now_us)
        } else {
            0
        };
        for statement in statements(sql, db) {
            let statement = SINCE_PLACEHOLDERS
                .iter()
                .fold(statement, |s, p| s.replace(p, &since.to_string()));
            client.query(&statement).execute().await.map_err(|e| {
                crate::StoreError::ClickHouse(format!("migration {version:04}_{name}: {e}"))
            })?;
        }
        client
            .query(&format!(
                "INSERT INTO `{db}`.tollgate_migrations (version, name) VALUES (?, ?)"
            ))
            .bind(*version)
            .bind(*name)
            .execute()
            .await
            .map_err(ch_err)?;
        tracing::info!(version, name, database = db, "applied ClickHouse migration");
    }
    Ok(())
}

/// Where the views recorded in `table` (`tollgate_rollup_since` for 0003,
/// `tollgate_sketch_since` for 0004) start in this database: the latest recorded, when processes
/// starting together recorded more than one (each view covers from its own, so the latest is
/// safe for all).
#[cfg(feature = "clickhouse")]
pub(super) async fn since(
    client: &::clickhouse::Client,
    db: &str,
    table: &str,
) -> Result<i64, crate::StoreError> {
    client
        .query(&format!("SELECT max(since_us) FROM `{db}`.{table}"))
        .fetch_one::<i64>()
        .await
        .map_err(super::ch_err)
}
