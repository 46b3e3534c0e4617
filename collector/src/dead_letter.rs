//! The dead-letter sink: messages that are not valid `RequestEvent`s, kept as JSON lines with the
//! reason, so that nothing is silently dropped (`dead-letter/events.jsonl`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use tollgate_bus::Message;

/// Appends rejected messages to a JSON-lines file.
pub struct DeadLetter {
    file: BufWriter<File>,
    dirty: bool,
}

impl DeadLetter {
    /// Opens (or creates) `dir/events.jsonl`.
    pub fn open(dir: &Path) -> std::io::Result<DeadLetter> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events.jsonl"))?;
        Ok(DeadLetter {
            file: BufWriter::new(file),
            dirty: false,
        })
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
        serde_json::to_writer(&mut self.file, &line)?;
        self.file.write_all(b"\n")?;
        self.dirty = true;
        Ok(())
    }

    /// Makes written lines durable (before the offsets that cover them are committed).
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.file.flush()?;
            self.file.get_ref().sync_data()?;
            self.dirty = false;
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
