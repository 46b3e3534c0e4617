//! The on-disk format of the embedded log: segment files of checksummed frames, and recovery of a
//! torn tail after a crash.
//!
//! A segment is named by the offset of its first record (`00000000000000000042.log`). A frame is
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE][offset: u64 LE][key_len: u16 LE][key][payload]
//!              \________________ crc32 covers these len bytes ________________/
//! ```
//!
//! On open, the last segment is scanned frame by frame; the first frame that is short, too long,
//! out of sequence or fails its checksum marks the torn tail, and the file is truncated there.
//! Earlier segments were fsynced before the log rolled past them.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes before the checksummed body.
pub const HEADER: usize = 8;
/// Fixed part of the checksummed body (offset + key length).
const BODY_FIXED: usize = 10;
/// A frame larger than this is treated as corruption.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Encodes one frame onto `out`.
pub fn encode(out: &mut Vec<u8>, offset: u64, key: &[u8], payload: &[u8]) {
    let key = &key[..key.len().min(u16::MAX as usize)];
    let len = BODY_FIXED + key.len() + payload.len();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub offset: u64,
    /// The key and the payload share the frame's one buffer.
    pub key: bytes::Bytes,
    pub payload: bytes::Bytes,
    /// Bytes the frame occupies on disk.
    pub size: u64,
}

/// Reads the next frame; `Ok(None)` at a clean end of file or at a torn / corrupt frame.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER];
    if !read_full(r, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
    if !(BODY_FIXED..=MAX_FRAME).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    if !read_full(r, &mut body)? || crc32fast::hash(&body) != crc {
        return Ok(None);
    }
    let offset = u64::from_le_bytes(body[..8].try_into().unwrap());
    let key_len = u16::from_le_bytes(body[8..10].try_into().unwrap()) as usize;
    if BODY_FIXED + key_len > len {
        return Ok(None);
    }
    // One allocation per frame: the key and the payload are views of the body (the collector
    // reads every record of the log, each of them once).
    let body = bytes::Bytes::from(body);
    let payload = body.slice(BODY_FIXED + key_len..);
    let key = body.slice(BODY_FIXED..BODY_FIXED + key_len);
    Ok(Some(Frame {
        offset,
        key,
        payload,
        size: (HEADER + len) as u64,
    }))
}

/// Fills `buf`; false when the input ended first (a short read is a torn frame, not an error).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The path of the segment starting at `base`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Segment base offsets present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// What recovery found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Offset of the next record to append.
    pub next_offset: u64,
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// Bytes cut off as a torn tail.
    pub truncated: u64,
}

/// Scans a segment, truncates a torn tail, and returns where appending resumes.
pub fn recover(path: &Path, base: u64) -> io::Result<Recovered> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let total = file.metadata()?.len();
    let mut reader = BufReader::new(&file);
    let mut next = base;
    let mut valid = 0u64;
    while let Some(frame) = read_frame(&mut reader)? {
        if frame.offset != next {
            break;
        }
        next += 1;
        valid += frame.size;
    }
    drop(reader);
    if valid < total {
        file.set_len(valid)?;
        file.sync_all()?;
    }
    Ok(Recovered {
        next_offset: next,
        valid_len: valid,
        truncated: total - valid,
    })
}

/// A sequential reader positioned inside one segment.
pub struct SegmentReader {
    pub base: u64,
    reader: BufReader<File>,
    /// Byte position of the next frame, kept here rather than asked of the file (`lseek`) for
    /// every frame.
    pos: u64,
}

impl SegmentReader {
    /// Opens the segment at `base` and skips to the frame holding `offset`.
    pub fn open_at(dir: &Path, base: u64, offset: u64) -> io::Result<SegmentReader> {
        let mut file = File::open(segment_path(dir, base))?;
        file.seek(SeekFrom::Start(0))?;
        let mut r = SegmentReader {
            base,
            reader: BufReader::with_capacity(256 * 1024, file),
            pos: 0,
        };
        let mut pos = 0u64;
        let mut at = base;
        while at < offset {
            match read_frame(&mut r.reader)? {
                Some(f) => {
                    pos += f.size;
                    at = f.offset + 1;
                }
                None => break,
            }
        }
        r.reader.seek(SeekFrom::Start(pos))?;
        r.pos = pos;
        Ok(r)
    }

    /// The next frame, if fully written.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let frame = read_frame(&mut self.reader)?;
        match &frame {
            Some(f) => self.pos += f.size,
            // Not yet complete (or end of segment): come back to the same place later.
            None => {
                self.reader.seek(SeekFrom::Start(self.pos))?;
            }
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write_frames(path: &Path, n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in 0..n {
            encode(
                &mut buf,
                i,
                format!("k{i}").as_bytes(),
                format!("payload-{i}").as_bytes(),
            );
        }
        std::fs::write(path, &buf).unwrap();
        buf
    }

    proptest! {
        /// Cutting the file anywhere recovers exactly the frames that were whole.
        #[test]
        fn torn_tail_is_truncated_never_read(n in 1u64..40, cut_frac in 0.0f64..1.0) {
            let dir = tempfile::tempdir().unwrap();
            let path = segment_path(dir.path(), 0);
            let full = write_frames(&path, n);
            let cut = (full.len() as f64 * cut_frac) as usize;
            std::fs::write(&path, &full[..cut]).unwrap();
            // Frames wholly inside the cut.
            let mut whole = 0u64;
            let mut pos = 0usize;
            let mut r = &full[..];
            while let Some(f) = read_frame(&mut r).unwrap() {
                if pos + f.size as usize > cut { break; }
                pos += f.size as usize;
                whole += 1;
            }
            let rec = recover(&path, 0).unwrap();
            prop_assert_eq!(rec.next_offset, whole);
            prop_assert_eq!(rec.valid_len as usize, pos);
            prop_assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, pos);
        }

        /// A flipped byte anywhere ends the valid prefix at (or before) the damaged frame.
        #[test]
        fn corruption_is_detected(n in 2u64..20, at_frac in 0.0f64..1.0, bit in 0u8..8) {
            let dir = tempfile::tempdir().unwrap();
            let path = segment_path(dir.path(), 0);
            let mut full = write_frames(&path, n);
            let at = ((full.len() - 1) as f64 * at_frac) as usize;
            full[at] ^= 1 << bit;
            std::fs::write(&path, &full).unwrap();
            let rec = recover(&path, 0).unwrap();
            prop_assert!(rec.valid_len as usize <= at);
            let mut f = File::open(&path).unwrap();
            let mut count = 0;
            while let Some(fr) = read_frame(&mut f).unwrap() {
                prop_assert_eq!(fr.payload, bytes::Bytes::from(format!("payload-{count}")));
                count += 1;
            }
            prop_assert_eq!(count, rec.next_offset);
        }
    }
}
