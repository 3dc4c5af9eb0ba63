//! The backup file format, shared by the control plane (which writes backups
//! and restores them) and `clawctl` (which verifies what it downloaded).
//!
//! A file is the magic bytes [`MAGIC`] followed by length-delimited
//! [`BackupFrame`]s (prost's `encode_length_delimited`): one header, the
//! entries, and one trailer holding the number of entries and the SHA-256 of
//! every byte before the trailer frame. [`Writer`] produces it; [`Reader`]
//! verifies it while streaming the entries out: the magic, that every frame
//! decodes, the tree names (when told which are known), the count and the
//! checksum, and that nothing follows the trailer. A truncated file is
//! refused because it has no trailer.
//!
//! The functions work on any `Read` / `Write`; the callers own the files.

use std::io::{self, Read, Write};

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::v1::{BackupEntry, BackupFrame, BackupHeader, BackupTrailer, backup_frame::Frame};

/// The first eight bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"CLAWBAK1";

/// The format version [`Writer`] writes and [`Reader`] reads.
pub const FORMAT_VERSION: u32 = 1;

/// The largest frame a reader accepts. An entry is one store value (a few
/// KiB at most); a damaged length prefix must not make the reader allocate
/// gigabytes.
pub const MAX_FRAME_BYTES: u64 = 64 * 1024 * 1024;

/// What a finished (or fully verified) backup file contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of entries.
    pub entries: u64,
    /// Size of the whole file in bytes.
    pub size: u64,
    /// Offset of the trailer frame: the checksum covers `[0, trailer_offset)`.
    pub trailer_offset: u64,
    /// SHA-256 of every byte before the trailer frame.
    pub sha256: [u8; 32],
}

impl Summary {
    /// The checksum as lowercase hex.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Writes a backup file: the magic and header on creation, then
/// [`Writer::entry`] per key, then [`Writer::finish`] for the trailer.
pub struct Writer<W: Write> {
    out: W,
    hasher: Sha256,
    entries: u64,
    size: u64,
}

impl<W: Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("entries", &self.entries)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Writer<W> {
    /// Starts a file on `out` with `header` (its `format_version` is set to
    /// [`FORMAT_VERSION`]).
    pub fn new(out: W, header: &BackupHeader) -> io::Result<Self> {
        let mut w = Writer {
            out,
            hasher: Sha256::new(),
            entries: 0,
            size: 0,
        };
        w.write_hashed(MAGIC)?;
        let header = BackupHeader {
            format_version: FORMAT_VERSION,
            ..header.clone()
        };
        w.frame(Frame::Header(header))?;
        Ok(w)
    }

    /// Appends one entry of tree `tree`.
    pub fn entry(&mut self, tree: &str, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.frame(Frame::Entry(BackupEntry {
            tree: tree.to_string(),
            key: key.to_vec(),
            value: value.to_vec(),
        }))?;
        self.entries += 1;
        Ok(())
    }

    /// Writes the trailer and flushes; returns the writer and what it wrote.
    pub fn finish(mut self) -> io::Result<(W, Summary)> {
        let trailer_offset = self.size;
        let sha256: [u8; 32] = self.hasher.clone().finalize().into();
        let frame = BackupFrame {
            frame: Some(Frame::Trailer(BackupTrailer {
                entries: self.entries,
                sha256: sha256.to_vec(),
            })),
        };
        let bytes = frame.encode_length_delimited_to_vec();
        self.out.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        self.out.flush()?;
        Ok((
            self.out,
            Summary {
                entries: self.entries,
                size: self.size,
                trailer_offset,
                sha256,
            },
        ))
    }

    fn frame(&mut self, frame: Frame) -> io::Result<()> {
        let bytes = BackupFrame { frame: Some(frame) }.encode_length_delimited_to_vec();
        self.write_hashed(&bytes)
    }

    fn write_hashed(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }
}

/// Why a backup file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading failed.
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with [`MAGIC`].
    #[error("not a Claw backup file (it does not start with CLAWBAK1)")]
    BadMagic,
    /// The file ends before the trailer.
    #[error("truncated: no trailer after {entries} entries")]
    Truncated {
        /// Entries read before the end.
        entries: u64,
    },
    /// A frame does not decode, or is out of place.
    #[error("frame at byte {offset} is invalid ({reason}): the file was altered or damaged")]
    BadFrame {
        /// Offset of the frame's length prefix.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The header names a format this reader does not know.
    #[error("format version {0} is not supported (this version reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// An entry names a tree the reader was not told about.
    #[error(
        "entry {index} belongs to unknown tree `{tree}`: the file was altered or damaged, or written by a newer version"
    )]
    UnknownTree {
        /// 0-based entry index.
        index: u64,
        /// The tree it names.
        tree: String,
    },
    /// The trailer's entry count differs from the entries read.
    #[error(
        "the trailer counts {expected} entries but the file holds {found}: the file was altered or damaged"
    )]
    CountMismatch {
        /// What the trailer says.
        expected: u64,
        /// What was read.
        found: u64,
    },
    /// The checksum differs.
    #[error("checksum mismatch: the file was altered or damaged")]
    ChecksumMismatch,
    /// Bytes follow the trailer.
    #[error("unexpected data after the trailer: the file was altered or damaged")]
    TrailingData,
}

/// A refused backup file, naming it:
/// "backup file X is truncated: no trailer after N entries",
/// "backup file X: checksum mismatch: the file was altered or damaged".
#[derive(Debug, thiserror::Error)]
pub struct FileError {
    /// The file, as the operator named it.
    pub file: String,
    /// What is wrong.
    pub error: FormatError,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            FormatError::Truncated { .. } => {
                write!(f, "backup file {} is {}", self.file, self.error)
            }
            e => write!(f, "backup file {}: {e}", self.file),
        }
    }
}

impl FormatError {
    /// Names the file this error is about.
    pub fn in_file(self, file: impl std::fmt::Display) -> FileError {
        FileError {
            file: file.to_string(),
            error: self,
        }
    }
}

/// Reads and verifies a backup file while handing out its entries. The
/// entries of a file are only trustworthy once [`Reader::next_entry`] has
/// returned `Ok(None)` (the trailer checked out): callers that import must
/// verify the whole file first, or undo the import on an error.
pub struct Reader<'t, R: Read> {
    input: R,
    known_trees: Option<&'t [&'t str]>,
    hasher: Sha256,
    offset: u64,
    entries: u64,
    header: BackupHeader,
    summary: Option<Summary>,
}

impl<R: Read> std::fmt::Debug for Reader<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("offset", &self.offset)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl<'t, R: Read> Reader<'t, R> {
    /// Reads the magic and the header. With `known_trees`, an entry of any
    /// other tree is refused. Wrap `input` in a `BufReader`: frames are read
    /// a few bytes at a time.
    pub fn new(input: R, known_trees: Option<&'t [&'t str]>) -> Result<Self, FormatError> {
        let mut r = Reader {
            input,
            known_trees,
            hasher: Sha256::new(),
            offset: 0,
            entries: 0,
            header: BackupHeader::default(),
            summary: None,
        };
        let mut magic = [0u8; 8];
        match read_full(&mut r.input, &mut magic)? {
            8 if &magic == MAGIC => {}
            0 => return Err(FormatError::Truncated { entries: 0 }),
            _ => return Err(FormatError::BadMagic),
        }
        r.hasher.update(magic);
        r.offset = 8;
        let start = r.offset;
        match r.frame()? {
            Some((Frame::Header(h), raw)) => {
                if h.format_version != FORMAT_VERSION {
                    return Err(FormatError::UnsupportedVersion(h.format_version));
                }
                r.hasher.update(&raw);
                r.header = h;
            }
            Some(_) => {
                return Err(FormatError::BadFrame {
                    offset: start,
                    reason: "the first frame is not the header".into(),
                });
            }
            None => return Err(FormatError::Truncated { entries: 0 }),
        }
        Ok(r)
    }

    /// The file's header.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The next entry, or `None` once the trailer has been read and
    /// verified (count, checksum, end of file).
    pub fn next_entry(&mut self) -> Result<Option<BackupEntry>, FormatError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        let start = self.offset;
        let Some((frame, raw)) = self.frame()? else {
            return Err(FormatError::Truncated {
                entries: self.entries,
            });
        };
        match frame {
            Frame::Entry(e) => {
                if let Some(known) = self.known_trees
                    && !known.contains(&e.tree.as_str())
                {
                    return Err(FormatError::UnknownTree {
                        index: self.entries,
                        tree: e.tree,
                    });
                }
                self.hasher.update(&raw);
                self.entries += 1;
                Ok(Some(e))
            }
            Frame::Trailer(t) => {
                let sha256: [u8; 32] = self.hasher.clone().finalize().into();
                if t.sha256.as_slice() != sha256 {
                    return Err(FormatError::ChecksumMismatch);
                }
                if t.entries != self.entries {
                    return Err(FormatError::CountMismatch {
                        expected: t.entries,
                        found: self.entries,
                    });
                }
                let mut extra = [0u8; 1];
                if read_full(&mut self.input, &mut extra)? != 0 {
                    return Err(FormatError::TrailingData);
                }
                self.summary = Some(Summary {
                    entries: self.entries,
                    size: self.offset,
                    trailer_offset: start,
                    sha256,
                });
                Ok(None)
            }
            Frame::Header(_) => Err(FormatError::BadFrame {
                offset: start,
                reason: "a second header".into(),
            }),
        }
    }

    /// What the verified file holds; `None` until the trailer was read.
    pub fn summary(&self) -> Option<&Summary> {
        self.summary.as_ref()
    }

    /// Reads every remaining entry, handing each to `each`, and verifies
    /// the trailer.
    pub fn read_all(
        mut self,
        mut each: impl FnMut(BackupEntry) -> Result<(), FormatError>,
    ) -> Result<(BackupHeader, Summary), FormatError> {
        while let Some(e) = self.next_entry()? {
            each(e)?;
        }
        match self.summary {
            Some(s) => Ok((self.header, s)),
            None => Err(FormatError::Truncated {
                entries: self.entries,
            }),
        }
    }

    /// Reads one frame: `None` at a clean end of file. Returns the raw
    /// bytes (length prefix and body) so the caller can hash them.
    fn frame(&mut self) -> Result<Option<(Frame, Vec<u8>)>, FormatError> {
        let start = self.offset;
        let mut raw = Vec::new();
        let mut len: u64 = 0;
        let mut shift = 0u32;
        loop {
            let mut b = [0u8; 1];
            if read_full(&mut self.input, &mut b)? == 0 {
                if raw.is_empty() {
                    return Ok(None);
                }
                return Err(FormatError::Truncated {
                    entries: self.entries,
                });
            }
            raw.push(b[0]);
            len |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(FormatError::BadFrame {
                    offset: start,
                    reason: "bad length prefix".into(),
                });
            }
        }
        if len > MAX_FRAME_BYTES {
            return Err(FormatError::BadFrame {
                offset: start,
                reason: format!("length {len} exceeds {MAX_FRAME_BYTES}"),
            });
        }
        let prefix = raw.len();
        raw.resize(prefix + len as usize, 0);
        let got = read_full(&mut self.input, &mut raw[prefix..])?;
        if got < len as usize {
            return Err(FormatError::Truncated {
                entries: self.entries,
            });
        }
        self.offset += raw.len() as u64;
        let frame = BackupFrame::decode(&raw[prefix..]).map_err(|e| FormatError::BadFrame {
            offset: start,
            reason: e.to_string(),
        })?;
        match frame.frame {
            Some(f) => Ok(Some((f, raw))),
            None => Err(FormatError::BadFrame {
                offset: start,
                reason: "an empty frame".into(),
            }),
        }
    }
}

/// Verifies a whole file: its header and summary, or why it is refused.
pub fn verify<R: Read>(
    input: R,
    known_trees: Option<&[&str]>,
) -> Result<(BackupHeader, Summary), FormatError> {
    Reader::new(input, known_trees)?.read_all(|_| Ok(()))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TREES: &[&str] = &["meta", "backends"];

    fn file(n: usize) -> (Vec<u8>, Summary) {
        let header = BackupHeader {
            config_version: 7,
            server_version: "test".into(),
            ..Default::default()
        };
        let mut w = Writer::new(Vec::new(), &header).unwrap();
        for i in 0..n {
            w.entry(TREES[i % 2], format!("k{i}").as_bytes(), &[i as u8; 40])
                .unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn a_written_file_reads_back() {
        let (bytes, summary) = file(5);
        assert_eq!(summary.size, bytes.len() as u64);
        let mut r = Reader::new(bytes.as_slice(), Some(TREES)).unwrap();
        assert_eq!(r.header().config_version, 7);
        assert_eq!(r.header().format_version, FORMAT_VERSION);
        let mut keys = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            keys.push(String::from_utf8(e.key).unwrap());
        }
        assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
        assert_eq!(r.summary(), Some(&summary));
    }

    #[test]
    fn every_truncation_is_refused() {
        let (bytes, _) = file(3);
        for cut in 0..bytes.len() {
            let err = verify(&bytes[..cut], Some(TREES)).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated { .. } | FormatError::BadMagic),
                "cut {cut}: {err}"
            );
        }
        let err = verify(&bytes[..bytes.len() - 1], None).unwrap_err();
        assert_eq!(err.to_string(), "truncated: no trailer after 3 entries");
        assert_eq!(
            err.in_file("x.clawbak").to_string(),
            "backup file x.clawbak is truncated: no trailer after 3 entries"
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (bytes, _) = file(3);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(verify(bad.as_slice(), Some(TREES)).is_err(), "byte {i}");
        }
    }

    #[test]
    fn a_flipped_value_byte_is_a_checksum_mismatch() {
        let (mut bytes, summary) = file(3);
        bytes[summary.trailer_offset as usize - 1] ^= 0x40;
        let err = verify(bytes.as_slice(), Some(TREES)).unwrap_err();
        assert!(matches!(err, FormatError::ChecksumMismatch), "{err}");
        assert_eq!(
            err.in_file("f").to_string(),
            "backup file f: checksum mismatch: the file was altered or damaged"
        );
    }

    #[test]
    fn trailing_data_and_unknown_trees_are_refused() {
        let (mut bytes, _) = file(2);
        bytes.push(0);
        assert!(matches!(
            verify(bytes.as_slice(), None),
            Err(FormatError::TrailingData)
        ));
        let (bytes, _) = file(2);
        assert!(matches!(
            verify(bytes.as_slice(), Some(&["meta"])),
            Err(FormatError::UnknownTree { index: 1, .. })
        ));
        assert!(matches!(
            verify(&b"NOTABACKUPFILE"[..], None),
            Err(FormatError::BadMagic)
        ));
    }
}
