//! Completeness and published exports over ClickHouse (`crate::ledger`; tables of migration
//! 0005). Progress rows are appended (one per partition and probe) and read as the latest per
//! partition; exports are appended once and read as the earliest per period.

use serde::{Deserialize, Serialize};

use super::{ClickHouseStore, ch_err};
use crate::{PartitionProgress, StoreError, StoredExport};

#[derive(clickhouse::Row, Serialize, Deserialize)]
struct ProgressRow {
    bus_partition: u32,
    partitions: u32,
    caught_up_us: i64,
}

/// A row of `billing_exports` (column order of `0005_billing.sql`).
#[derive(clickhouse::Row, Serialize, Deserialize)]
struct ExportRow {
    period: String,
    generated_at_us: i64,
    id: String,
    manifest: String,
    lines: String,
}

impl From<ExportRow> for StoredExport {
    fn from(r: ExportRow) -> StoredExport {
        StoredExport {
            id: r.id,
            period: r.period,
            generated_at_us: r.generated_at_us,
            manifest: r.manifest,
            lines: r.lines,
        }
    }
}

impl ClickHouseStore {
    pub(super) async fn insert_progress(
        &self,
        progress: &[PartitionProgress],
    ) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<ProgressRow>("progress")
            .await
            .map_err(ch_err)?;
        for p in progress {
            insert
                .write(&ProgressRow {
                    bus_partition: p.partition,
                    partitions: p.partitions,
                    caught_up_us: p.caught_up_us,
                })
                .await
                .map_err(ch_err)?;
        }
        insert.end().await.map_err(ch_err)
    }

    pub(super) async fn read_progress(&self) -> Result<Vec<PartitionProgress>, StoreError> {
        let rows = self
            .client
            .query(&format!(
                // Aliases differ from the columns: ClickHouse would substitute an alias for the
                // column of the same name inside the other aggregate.
                "SELECT bus_partition AS p, argMax(partitions, caught_up_us) AS n, \
                 max(caught_up_us) AS t FROM {} GROUP BY bus_partition ORDER BY p",
                self.table("progress")
            ))
            .fetch_all::<ProgressRow>()
            .await
            .map_err(ch_err)?;
        Ok(rows
            .into_iter()
            .map(|r| PartitionProgress {
                partition: r.bus_partition,
                partitions: r.partitions,
                caught_up_us: r.caught_up_us,
            })
            .collect())
    }

    pub(super) async fn insert_export(
        &self,
        export: &StoredExport,
    ) -> Result<StoredExport, StoreError> {
        let mut insert = self
            .client
            .insert::<ExportRow>("billing_exports")
            .await
            .map_err(ch_err)?;
        insert
            .write(&ExportRow {
                period: export.period.clone(),
                generated_at_us: export.generated_at_us,
                id: export.id.clone(),
                manifest: export.manifest.clone(),
                lines: export.lines.clone(),
            })
            .await
            .map_err(ch_err)?;
        insert.end().await.map_err(ch_err)?;
        self.read_export(&export.period).await?.ok_or_else(|| {
            StoreError::ClickHouse(format!(
                "the export of {} is not readable after it was inserted",
                export.period
            ))
        })
    }

    pub(super) async fn read_export(
        &self,
        period: &str,
    ) -> Result<Option<StoredExport>, StoreError> {
        let row = self
            .client
            .query(&format!(
                "SELECT period, generated_at_us, id, manifest, lines FROM {} WHERE period = ? \
                 ORDER BY generated_at_us, id LIMIT 1",
                self.table("billing_exports")
            ))
            .bind(period)
            .fetch_optional::<ExportRow>()
            .await
            .map_err(ch_err)?;
        Ok(row.map(StoredExport::from))
    }

    pub(super) async fn list_exports(&self) -> Result<Vec<StoredExport>, StoreError> {
        let rows = self
            .client
            .query(&format!(
                "SELECT period, generated_at_us, id, manifest, '' AS lines FROM {} \
                 ORDER BY period, generated_at_us, id LIMIT 1 BY period",
                self.table("billing_exports")
            ))
            .fetch_all::<ExportRow>()
            .await
            .map_err(ch_err)?;
        Ok(rows.into_iter().map(StoredExport::from).collect())
    }
}
