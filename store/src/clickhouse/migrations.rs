//! Numbered schema migrations (`migrations/NNNN_name.sql`, embedded at compile time), applied
//! in order at start-up and recorded in `tollgate_migrations`. Every statement is idempotent
//! (`IF NOT EXISTS`), so processes starting together may apply the same migration twice
//! without harm; a migration is recorded once it has fully applied.

/// `(version, name, sql)` of every migration, in order. `{db}` stands for the database.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "events", include_str!("migrations/0001_events.sql")),
    (2, "rollups", include_str!("migrations/0002_rollups.sql")),
];

/// The statements of one migration file for database `db`: comments dropped, split on `;`.
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
        for statement in statements(sql, db) {
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
