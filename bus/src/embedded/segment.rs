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
use std::io::{self, BufReader, Read};
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
    let Some(len) = body_len(&header) else {
        return Ok(None);
    };
    // One allocation per frame: the key and the payload are views of it.
    let mut frame = vec![0u8; HEADER + len];
    frame[..HEADER].copy_from_slice(&header);
    if !read_full(r, &mut frame[HEADER..])? || !intact(&frame) {
        return Ok(None);
    }
    Ok(Some(view(bytes::Bytes::from(frame))))
}

/// The body length a frame's header announces, when a frame may have it.
fn body_len(header: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    (BODY_FIXED..=MAX_FRAME).contains(&len).then_some(len)
}

/// Whether a whole frame (header and the body it announces) checks out: its checksum, and a
/// key that fits its body.
fn intact(frame: &[u8]) -> bool {
    let crc = u32::from_le_bytes(frame[4..HEADER].try_into().unwrap());
    let body = &frame[HEADER..];
    let key_len = u16::from_le_bytes(body[8..10].try_into().unwrap()) as usize;
    crc32fast::hash(body) == crc && BODY_FIXED + key_len <= body.len()
}

/// A whole frame's parts, as views of its bytes (`intact` said it checks out).
fn view(frame: bytes::Bytes) -> Frame {
    let key_len = u16::from_le_bytes(frame[HEADER + 8..HEADER + 10].try_into().unwrap());
    let key_end = HEADER + BODY_FIXED + key_len as usize;
    Frame {
        offset: offset_of(&frame),
        key: frame.slice(HEADER + BODY_FIXED..key_end),
        payload: frame.slice(key_end..),
        size: frame.len() as u64,
    }
}

/// The offset in a frame's bytes (header included).
fn offset_of(frame: &[u8]) -> u64 {
    u64::from_le_bytes(frame[HEADER..HEADER + 8].try_into().unwrap())
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
///
/// It reads the file in chunks of its own (`READ_CHUNK`) and hands frames out as views of
/// them: the kernel copies the bytes once, into the chunk, and a frame's key and payload share
/// the chunk's one allocation. Reading each frame into a buffer of its own (through a
/// `BufReader`) cost a zeroed allocation, a second copy and a reference count made on first
/// clone per frame: 15 % of ingest's CPU per event (BENCHMARKS.md, fifteenth round).
pub struct SegmentReader {
    pub base: u64,
    file: File,
    /// Bytes read from the file and not yet handed out, from the next frame's first byte on.
    buf: bytes::BytesMut,
}

/// Bytes of a segment's chunk (more when one frame is larger).
const READ_CHUNK: usize = 256 * 1024;
/// At most this much of a chunk is zeroed and read into at a time: a reader that keeps up
/// with the log reads a few frames per call.
const READ_AT_ONCE: usize = 64 * 1024;

impl SegmentReader {
    /// Opens the segment at `base` and skips to the frame holding `offset`.
    pub fn open_at(dir: &Path, base: u64, offset: u64) -> io::Result<SegmentReader> {
        let mut r = SegmentReader {
            base,
            file: File::open(segment_path(dir, base))?,
            buf: bytes::BytesMut::new(),
        };
        while let Some(size) = r.complete_frame()? {
            if offset_of(&r.buf) >= offset {
                break;
            }
            bytes::Buf::advance(&mut r.buf, size);
        }
        Ok(r)
    }

    /// The next frame, if fully written. `None` leaves the reader where it was: a frame still
    /// being written is read again, whole, by a later call.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let Some(size) = self.complete_frame()? else {
            return Ok(None);
        };
        Ok(Some(view(self.buf.split_to(size).freeze())))
    }

    /// Reads until the buffer starts with a whole frame that checks out, and returns its size;
    /// `None` at the end of the file, or at a frame that is torn or corrupt (as `read_frame`).
    fn complete_frame(&mut self) -> io::Result<Option<usize>> {
        loop {
            let need = match self.buf.len() >= HEADER {
                false => HEADER,
                true => match body_len(&self.buf) {
                    Some(len) => HEADER + len,
                    None => return Ok(None),
                },
            };
            if self.buf.len() >= need && need > HEADER {
                return Ok(intact(&self.buf[..need]).then_some(need));
            }
            if !self.read_more(need)? {
                return Ok(None);
            }
        }
    }

    /// Reads what the file holds past the buffer, at least until it holds `need` bytes; false
    /// when the file ends first. A new chunk is taken when the current one is used up; frames
    /// handed out keep theirs alive.
    fn read_more(&mut self, need: usize) -> io::Result<bool> {
        while self.buf.len() < need {
            let have = self.buf.len();
            if self.buf.capacity() < need.max(have + 4096) {
                let mut chunk = bytes::BytesMut::with_capacity(READ_CHUNK.max(need));
                chunk.extend_from_slice(&self.buf);
                self.buf = chunk;
            }
            let room = self
                .buf
                .capacity()
                .min(have + READ_AT_ONCE.max(need - have));
            self.buf.resize(room, 0);
            let read = loop {
                match self.file.read(&mut self.buf[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            self.buf.truncate(have + *read.as_ref().unwrap_or(&0));
            if read? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
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

        /// A reader of a segment written in arbitrary pieces (a frame cut anywhere, frames
        /// larger than a read or a chunk) returns every frame once, whole and in order, and
        /// nothing of a frame until all of it is there; opened at an offset, it starts there.
        #[test]
        fn a_reader_of_a_growing_segment_returns_each_frame_once_whole(
            sizes in proptest::collection::vec(0usize..300_000, 1..12),
            cuts in proptest::collection::vec(0.0f64..1.0, 1..8),
            start_frac in 0.0f64..1.0,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = segment_path(dir.path(), 0);
            let mut full = Vec::new();
            let payloads: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| (0..*n).map(|j| (i * 7 + j) as u8).collect())
                .collect();
            let start = (payloads.len() as f64 * start_frac) as u64;
            // The reader is opened once the frames before `start` are written (a subscriber
            // opens one at an offset below the log's end).
            let mut before = 0;
            for (i, p) in payloads.iter().enumerate() {
                encode(&mut full, i as u64, format!("k{i}").as_bytes(), p);
                if i as u64 + 1 == start {
                    before = full.len();
                }
            }
            let rest = full.len() - before;
            let mut at: Vec<usize> =
                cuts.iter().map(|c| before + (rest as f64 * c) as usize).collect();
            at.push(full.len());
            at.sort_unstable();
            std::fs::write(&path, &full[..before]).unwrap();
            let mut reader = SegmentReader::open_at(dir.path(), 0, start).unwrap();
            let mut next = start;
            let mut written = before;
            for cut in at {
                let mut file = OpenOptions::new().append(true).open(&path).unwrap();
                std::io::Write::write_all(&mut file, &full[written..cut]).unwrap();
                written = cut;
                while let Some(f) = reader.next_frame().unwrap() {
                    prop_assert_eq!(f.offset, next);
                    let key = format!("k{next}");
                    prop_assert_eq!(&f.key[..], key.as_bytes());
                    prop_assert_eq!(&f.payload[..], &payloads[next as usize][..]);
                    next += 1;
                }
            }
            prop_assert_eq!(next, payloads.len() as u64);
        }
    }
}
