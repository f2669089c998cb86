//! The embedded store's append-only log: the only thing on disk.
//!
//! Each record is framed as `len: u32 LE | crc32(payload): u32 LE | payload` and every append
//! is fsynced before the write is acknowledged. A crash can only tear the tail: replay stops at
//! the first short or bad record and truncates the file there, so an acknowledged write is never
//! lost and an unacknowledged one is either fully there or gone. A rewrite (compaction of the
//! file) writes a new file next to the old one, fsyncs it, renames it over and fsyncs the
//! directory, so a crash leaves either the old or the new file.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use bytes::Bytes;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_META: u8 = 3;
/// Larger than any value the API server accepts (3 MiB bodies), far below what would be absurd.
const MAX_RECORD: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Put {
        revision: i64,
        create_revision: i64,
        key: String,
        value: Bytes,
    },
    Delete {
        revision: i64,
        key: String,
    },
    /// Written first in a rewritten log: the revision counter and compaction point at rewrite.
    Meta {
        revision: i64,
        compacted: i64,
    },
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Record::Put { revision, create_revision, key, value } => {
                out.push(TAG_PUT);
                out.extend_from_slice(&revision.to_le_bytes());
                out.extend_from_slice(&create_revision.to_le_bytes());
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value);
            }
            Record::Delete { revision, key } => {
                out.push(TAG_DELETE);
                out.extend_from_slice(&revision.to_le_bytes());
                put_bytes(&mut out, key.as_bytes());
            }
            Record::Meta { revision, compacted } => {
                out.push(TAG_META);
                out.extend_from_slice(&revision.to_le_bytes());
                out.extend_from_slice(&compacted.to_le_bytes());
            }
        }
        out
    }

    fn decode(payload: &[u8]) -> Option<Record> {
        let mut cur = Cursor { buf: payload, pos: 0 };
        let record = match cur.u8()? {
            TAG_PUT => Record::Put {
                revision: cur.i64()?,
                create_revision: cur.i64()?,
                key: String::from_utf8(cur.bytes()?.to_vec()).ok()?,
                value: Bytes::copy_from_slice(cur.bytes()?),
            },
            TAG_DELETE => Record::Delete {
                revision: cur.i64()?,
                key: String::from_utf8(cur.bytes()?.to_vec()).ok()?,
            },
            TAG_META => Record::Meta { revision: cur.i64()?, compacted: cur.i64()? },
            _ => return None,
        };
        (cur.pos == payload.len()).then_some(record)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }
}

fn frame(record: &Record) -> Vec<u8> {
    let payload = record.encode();
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes records from the start of `data`; returns them and the length of the valid prefix.
pub(crate) fn decode_all(data: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut pos = 0;
    while let Some(header) = data.get(pos..pos + 8) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = data.get(pos + 8..pos + 8 + len) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(record) = Record::decode(payload) else { break };
        records.push(record);
        pos += 8 + len;
    }
    (records, pos)
}

pub(crate) struct Log {
    path: PathBuf,
    file: File,
    /// Records in the current file (drives rewrites).
    pub(crate) records: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> super::StoreError + '_ {
    move |source| super::StoreError::Io { path: path.display().to_string(), source }
}

impl Log {
    /// Opens (creating if needed) the log at `path`, returns it and its valid records. A torn
    /// tail is truncated away.
    pub(crate) fn open(path: &Path) -> super::Result<(Log, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err(path))?;
        let (records, valid) = decode_all(&data);
        if valid < data.len() {
            log::warn!(
                "store log {}: dropping a torn tail of {} bytes after {} records (crash during \
                 an unacknowledged write)",
                path.display(),
                data.len() - valid,
                records.len()
            );
            file.set_len(valid as u64).map_err(io_err(path))?;
            file.sync_all().map_err(io_err(path))?;
        }
        let count = records.len() as u64;
        Ok((Log { path: path.to_path_buf(), file, records: count }, records))
    }

    /// Appends and fsyncs one record.
    pub(crate) fn append(&mut self, record: &Record) -> super::Result<()> {
        self.file.write_all(&frame(record)).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.records += 1;
        Ok(())
    }

    /// Replaces the log with `records` atomically.
    pub(crate) fn rewrite(&mut self, records: impl Iterator<Item = Record>) -> super::Result<()> {
        let tmp = self.path.with_extension("rewrite");
        let mut out = Vec::new();
        let mut count = 0;
        for record in records {
            out.extend_from_slice(&frame(&record));
            count += 1;
        }
        {
            let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
            file.write_all(&out).map_err(io_err(&tmp))?;
            file.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(io_err(&self.path))?;
        self.records = count;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Meta { revision: 7, compacted: 3 },
            Record::Put {
                revision: 8,
                create_revision: 8,
                key: "/a".into(),
                value: Bytes::from_static(b"{}"),
            },
            Record::Delete { revision: 9, key: "/a".into() },
        ]
    }

    #[test]
    fn records_round_trip() {
        let data: Vec<u8> = sample().iter().flat_map(frame).collect();
        let (records, valid) = decode_all(&data);
        assert_eq!(records, sample());
        assert_eq!(valid, data.len());
    }

    #[test]
    fn torn_or_corrupt_tail_is_cut_at_the_last_good_record() {
        let data: Vec<u8> = sample().iter().flat_map(frame).collect();
        let good = frame(&sample()[0]).len() + frame(&sample()[1]).len();
        for cut in good..data.len() {
            let (records, valid) = decode_all(&data[..cut]);
            assert_eq!(records.len(), 2, "cut at {cut}");
            assert_eq!(valid, good);
        }
        let mut flipped = data.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(decode_all(&flipped).0.len(), 2);
    }
}
