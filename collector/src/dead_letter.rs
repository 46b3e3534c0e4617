//! The dead-letter sink: messages that are not valid `RequestEvent`s, kept as JSON lines with the
//! reason, so that nothing is silently dropped: in a local file (`dead-letter/events.jsonl`)
//! with the embedded bus, or on the bus's dead-letter topic (Kafka), keyed like the original.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use std::sync::Arc;

use tollgate_bus::{Message, Publisher, Record};

/// Where rejected messages go.
pub enum DeadLetter {
    /// A JSON-lines file, fsynced before the offsets that cover it are committed.
    File { file: BufWriter<File>, dirty: bool },
    /// The bus's dead-letter topic; lines are published before the covering commit.
    Bus {
        publisher: Arc<dyn Publisher>,
        pending: Vec<Record>,
    },
}

impl DeadLetter {
    /// Opens (or creates) `dir/events.jsonl`.
    pub fn open(dir: &Path) -> std::io::Result<DeadLetter> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events.jsonl"))?;
        Ok(DeadLetter::File {
            file: BufWriter::new(file),
            dirty: false,
        })
    }

    /// Publishes rejected messages to the bus.
    pub fn to_bus(publisher: Arc<dyn Publisher>) -> DeadLetter {
        DeadLetter::Bus {
            publisher,
            pending: Vec::new(),
        }
    }

    /// Records one rejected message and why.
    pub fn write(&mut self, msg: &Message, error: &str) -> std::io::Result<()> {
        let mut line = serde_json::json!({
            "partition": msg.partition,
            "offset": msg.offset,
            "error": error,
            "received_at": chrono_now(),
        });
        match std::str::from_utf8(&msg.payload) {
            Ok(s) => line["payload"] = s.into(),
            Err(_) => line["payload_hex"] = hex::encode(&msg.payload).into(),
        }
        match self {
            DeadLetter::File { file, dirty } => {
                serde_json::to_writer(&mut *file, &line)?;
                file.write_all(b"\n")?;
                *dirty = true;
            }
            DeadLetter::Bus { pending, .. } => pending.push(Record {
                key: msg.key.clone(),
                payload: bytes::Bytes::from(line.to_string()),
            }),
        }
        Ok(())
    }

    /// Makes written lines durable (before the offsets that cover them are committed).
    pub async fn sync(&mut self) -> std::io::Result<()> {
        match self {
            DeadLetter::File { file, dirty } => {
                if *dirty {
                    file.flush()?;
                    file.get_ref().sync_data()?;
                    *dirty = false;
                }
            }
            DeadLetter::Bus { publisher, pending } => {
                if !pending.is_empty() {
                    let records = std::mem::take(pending);
                    let io = |e: tollgate_bus::BusError| std::io::Error::other(e.to_string());
                    publisher.publish(records).await.map_err(io)?;
                    publisher
                        .flush(std::time::Duration::from_secs(30))
                        .await
                        .map_err(io)?;
                }
            }
        }
        Ok(())
    }
}

fn chrono_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}
