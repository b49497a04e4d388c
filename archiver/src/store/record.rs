//! The log's byte layout: segment headers and records (docs/store-format.md).
//!
//! All integers little-endian. A record is
//!
//! ```text
//! 0   magic      b"CREC"
//! 4   kind       u8    1 = message blob, 2 = arrival, 3 = repeat
//! 5   flags      u8    bit 0: the message could not be parsed for the index
//! 6   codec      u8    0 = stored, 1 = zstd frame
//! 7   reserved   u8    0
//! 8   dict_id    u32   zstd dictionary id, 0 = none
//! 12  key_id     u32   encryption key id, 0 = not encrypted
//! 16  stored_len u32   bytes of payload as stored
//! 20  raw_len    u32   bytes of payload once decoded
//! 24  message    [32]  the message id this record belongs to
//! 56  payload    stored_len bytes
//! ..  crc        u32   CRC-32C of everything before it
//! ```

use crate::ids::MessageId;

pub const SEGMENT_MAGIC: &[u8; 8] = b"COFFSEG\0";
pub const RECORD_MAGIC: &[u8; 4] = b"CREC";
/// Format version of segments. Checked on open.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of the index (META `format`): 2 added block locations and the
/// `segments` table. An index of format 1 is read as is and marked 2 on open, so that
/// an older build, which cannot read compacted segments, refuses the store instead.
/// 3 stores `arrivals` and `summaries` values in the binary form of [`super::codec`]
/// instead of JSON; an index of format 1 or 2 has those two tables re-encoded on open
/// (every other table, `cursors`, `parked` and the counters included, stays as it is).
/// 4 drops the `summaries` and `arrivals` rows a compacted segment's catalog holds
/// ([`super::catalog`]); an index of format 3 has no catalogs yet and is marked 4 on
/// open, so that an older build refuses the store.
/// 5 keeps arrival ids and arrival keys as 8-byte hashes beside their local numbers
/// (checked against the arrival on every hit), locations in LEB128, and catalogs by
/// column; an index of format 4 or older has those tables re-encoded on open (catalogs
/// of either layout are read).
pub const INDEX_FORMAT: u32 = 5;
pub const SEGMENT_HEADER_LEN: u64 = 64;
pub const RECORD_HEADER_LEN: usize = 56;
pub const RECORD_TRAILER_LEN: usize = 4;
/// No record payload is larger than this (a guard against reading garbage lengths).
pub const MAX_PAYLOAD: u32 = 1 << 30;

pub const KIND_MESSAGE: u8 = 1;
pub const KIND_ARRIVAL: u8 = 2;
/// A client's retry of an arrival already stored: counted, nothing else added.
pub const KIND_REPEAT: u8 = 3;

pub const CODEC_STORED: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

pub const FLAG_UNPARSED: u8 = 1;

/// Magic of a compacted segment (`NNNNNNNN.blk`).
pub const BLK_MAGIC: &[u8; 8] = b"COFFBLK\0";
/// Format version of compacted segments.
pub const BLK_VERSION: u32 = 1;
pub const BLOCK_MAGIC: &[u8; 4] = b"CBLK";
pub const BLOCK_HEADER_LEN: usize = 32;
/// Codec of a block: one zstd frame of records.
pub const BLOCK_CODEC_ZSTD: u8 = 1;
/// Codec of the last block of a `.blk`: one zstd frame of its catalog
/// ([`super::catalog`]).
pub const BLOCK_CODEC_CATALOG: u8 = 2;
/// Codec of a block: one zstd frame of records, message records bare (their bytes
/// alone, found by a table of [`BARE_ENTRY_LEN`]-byte entries; the id is their hash).
pub const BLOCK_CODEC_BARE: u8 = 3;
/// One table entry in a decoded block of codec 1: message id, offset, length.
pub const TABLE_ENTRY_LEN: usize = 40;
/// One table entry in a decoded block of codec 3: offset, length, record flags.
pub const BARE_ENTRY_LEN: usize = 9;

/// The first 64 bytes of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub number: u32,
    pub epoch: [u8; 16],
    pub created_us: i64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        self.encode_as(SEGMENT_MAGIC, FORMAT_VERSION)
    }

    /// The header of the compacted form of this segment (`.blk`).
    pub fn encode_blk(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        self.encode_as(BLK_MAGIC, BLK_VERSION)
    }

    fn encode_as(&self, magic: &[u8; 8], version: u32) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(magic);
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&self.number.to_le_bytes());
        b[16..32].copy_from_slice(&self.epoch);
        b[32..40].copy_from_slice(&self.created_us.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// # Errors
    /// A description of what is wrong with the header.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        Self::decode_as(b, SEGMENT_MAGIC, FORMAT_VERSION)
    }

    /// Decodes the header of a compacted segment.
    ///
    /// # Errors
    /// A description of what is wrong with the header.
    pub fn decode_blk(b: &[u8]) -> Result<Self, String> {
        Self::decode_as(b, BLK_MAGIC, BLK_VERSION)
    }

    fn decode_as(b: &[u8], magic: &[u8; 8], expected: u32) -> Result<Self, String> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err("segment header is short".into());
        }
        if &b[0..8] != magic {
            return Err("not a Coffer segment (bad magic)".into());
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().unwrap());
        if crc != crc32c::crc32c(&b[..60]) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if version != expected {
            return Err(format!(
                "segment format version {version}, this build reads {expected}"
            ));
        }
        Ok(Self {
            number: u32::from_le_bytes(b[12..16].try_into().unwrap()),
            epoch: b[16..32].try_into().unwrap(),
            created_us: i64::from_le_bytes(b[32..40].try_into().unwrap()),
        })
    }
}

/// A record's fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub flags: u8,
    pub codec: u8,
    pub dict_id: u32,
    pub key_id: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub message: MessageId,
}

impl RecordHeader {
    /// The header of message `message`'s record with its `len` bytes stored as they are.
    pub fn stored_message(message: MessageId, len: u32, flags: u8) -> RecordHeader {
        RecordHeader {
            kind: KIND_MESSAGE,
            flags,
            codec: CODEC_STORED,
            dict_id: 0,
            key_id: 0,
            stored_len: len,
            raw_len: len,
            message,
        }
    }

    /// Total bytes of the record on disk.
    pub fn total_len(&self) -> u64 {
        (RECORD_HEADER_LEN + RECORD_TRAILER_LEN) as u64 + u64::from(self.stored_len)
    }

    /// Parses the fixed header. Does not check the CRC (that needs the payload).
    ///
    /// # Errors
    /// Why the bytes are not a record header.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < RECORD_HEADER_LEN {
            return Err("short record header".into());
        }
        if &b[0..4] != RECORD_MAGIC {
            return Err("bad record magic".into());
        }
        let h = Self {
            kind: b[4],
            flags: b[5],
            codec: b[6],
            dict_id: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            key_id: u32::from_le_bytes(b[12..16].try_into().unwrap()),
            stored_len: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            raw_len: u32::from_le_bytes(b[20..24].try_into().unwrap()),
            message: MessageId(b[24..56].try_into().unwrap()),
        };
        if !matches!(h.kind, KIND_MESSAGE | KIND_ARRIVAL | KIND_REPEAT) {
            return Err(format!("unknown record kind {}", h.kind));
        }
        if h.stored_len > MAX_PAYLOAD || h.raw_len > MAX_PAYLOAD {
            return Err("record length out of range".into());
        }
        Ok(h)
    }
}

/// The fixed header of one block of a compacted segment (docs/store-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    pub codec: u8,
    pub dict_id: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub records: u32,
    pub messages: u32,
}

impl BlockHeader {
    /// Total bytes of the block on disk (header, frame, CRC).
    pub fn total_len(&self) -> u64 {
        (BLOCK_HEADER_LEN + RECORD_TRAILER_LEN) as u64 + u64::from(self.stored_len)
    }

    /// Parses the fixed header (the CRC needs the frame too).
    ///
    /// # Errors
    /// Why the bytes are not a block header.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < BLOCK_HEADER_LEN {
            return Err("short block header".into());
        }
        if &b[0..4] != BLOCK_MAGIC {
            return Err("bad block magic".into());
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let h = Self {
            codec: b[4],
            dict_id: u(8),
            stored_len: u(12),
            raw_len: u(16),
            records: u(20),
            messages: u(24),
        };
        if !matches!(
            h.codec,
            BLOCK_CODEC_ZSTD | BLOCK_CODEC_CATALOG | BLOCK_CODEC_BARE
        ) {
            return Err(format!("unknown block codec {}", h.codec));
        }
        if h.stored_len > MAX_PAYLOAD || h.raw_len > MAX_PAYLOAD {
            return Err("block length out of range".into());
        }
        Ok(h)
    }
}

/// Appends one complete block (header, frame, CRC) to `out`.
pub fn encode_block(out: &mut Vec<u8>, h: &BlockHeader, frame: &[u8]) {
    debug_assert_eq!(frame.len(), h.stored_len as usize);
    let start = out.len();
    out.extend_from_slice(BLOCK_MAGIC);
    out.extend_from_slice(&[h.codec, 0, 0, 0]);
    for v in [h.dict_id, h.stored_len, h.raw_len, h.records, h.messages, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(frame);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// One entry of a block's table: where a message record (codec 1) or a message's bare
/// bytes (codec 3) lie in the decoded payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub message: MessageId,
    pub offset: u32,
    pub len: u32,
    /// The message record's flags (codec 3; in the record itself with codec 1).
    pub flags: u8,
}

impl TableEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.message.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// The entry as codec 3 writes it: no id (the bytes hash to it).
    pub fn encode_bare(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.flags);
    }

    /// The `i`th entry of a codec-3 payload's table; its id is left zero.
    pub fn read_bare(payload: &[u8], i: usize) -> Option<Self> {
        let b = payload.get(i * BARE_ENTRY_LEN..(i + 1) * BARE_ENTRY_LEN)?;
        Some(Self {
            message: MessageId([0; 32]),
            offset: u32::from_le_bytes(b[0..4].try_into().ok()?),
            len: u32::from_le_bytes(b[4..8].try_into().ok()?),
            flags: b[8],
        })
    }

    /// The `i`th entry of a decoded payload's table, if the payload holds it.
    pub fn read(payload: &[u8], i: usize) -> Option<Self> {
        let b = payload.get(i * TABLE_ENTRY_LEN..(i + 1) * TABLE_ENTRY_LEN)?;
        Some(Self {
            message: MessageId(b[0..32].try_into().ok()?),
            offset: u32::from_le_bytes(b[32..36].try_into().ok()?),
            len: u32::from_le_bytes(b[36..40].try_into().ok()?),
            flags: 0,
        })
    }
}

/// Parses and checks one whole record at the start of `b` (a decoded block's payload
/// from some offset): header, CRC. Returns the header and the payload.
///
/// # Errors
/// Why the bytes are not a valid record.
pub fn parse_record(b: &[u8]) -> Result<(RecordHeader, &[u8]), String> {
    let h = RecordHeader::decode(b)?;
    let total = usize::try_from(h.total_len()).map_err(|_| "record too long".to_owned())?;
    let whole = b
        .get(..total)
        .ok_or("record runs past the end of its block")?;
    if !check_crc(whole) {
        return Err("record checksum mismatch".into());
    }
    Ok((h, &whole[RECORD_HEADER_LEN..total - RECORD_TRAILER_LEN]))
}

/// Appends one complete record (header, payload, CRC) to `out`.
pub fn encode_record(out: &mut Vec<u8>, h: &RecordHeader, payload: &[u8]) {
    debug_assert_eq!(payload.len(), h.stored_len as usize);
    let start = out.len();
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&[h.kind, h.flags, h.codec, 0]);
    out.extend_from_slice(&h.dict_id.to_le_bytes());
    out.extend_from_slice(&h.key_id.to_le_bytes());
    out.extend_from_slice(&h.stored_len.to_le_bytes());
    out.extend_from_slice(&h.raw_len.to_le_bytes());
    out.extend_from_slice(&h.message.0);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Checks a whole record's CRC; `record` is header + payload + trailer.
pub fn check_crc(record: &[u8]) -> bool {
    let (body, trailer) = record.split_at(record.len() - RECORD_TRAILER_LEN);
    u32::from_le_bytes(trailer.try_into().unwrap()) == crc32c::crc32c(body)
}

/// Finds zstd dictionaries by id (`dict.rs`); `None` where none can be loaded.
pub type DictLookup<'a> = &'a dyn Fn(u32) -> Result<std::sync::Arc<Vec<u8>>, String>;

/// Decompresses one zstd frame of `raw_len` bytes, with dictionary `dict_id` (0: none).
///
/// # Errors
/// The dictionary cannot be had, or the frame does not decode.
pub fn zstd_decode(
    frame: &[u8],
    raw_len: usize,
    dict_id: u32,
    dicts: DictLookup<'_>,
) -> Result<Vec<u8>, String> {
    if dict_id == 0 {
        return zstd::bulk::decompress(frame, raw_len).map_err(|e| format!("zstd: {e}"));
    }
    let dict = dicts(dict_id)?;
    let mut d = zstd::bulk::Decompressor::with_dictionary(&dict)
        .map_err(|e| format!("zstd dictionary {dict_id}: {e}"))?;
    d.decompress(frame, raw_len)
        .map_err(|e| format!("zstd (dictionary {dict_id}): {e}"))
}

/// A dictionary lookup that has none: for records known to need no dictionary.
pub fn no_dicts(id: u32) -> Result<std::sync::Arc<Vec<u8>>, String> {
    Err(format!("record needs zstd dictionary {id}; none loaded"))
}

/// Decodes a message payload into the archived bytes.
///
/// # Errors
/// Unknown codec, encryption, a missing dictionary, or a payload that does not decode to
/// `raw_len` bytes.
pub fn decode_payload(
    h: &RecordHeader,
    payload: &[u8],
    dicts: DictLookup<'_>,
) -> Result<Vec<u8>, String> {
    if h.key_id != 0 {
        return Err(format!(
            "record is encrypted with key {}; no key store yet",
            h.key_id
        ));
    }
    let raw = match h.codec {
        CODEC_STORED if h.dict_id == 0 => payload.to_vec(),
        CODEC_ZSTD => zstd_decode(payload, h.raw_len as usize, h.dict_id, dicts)?,
        c => return Err(format!("unknown codec {c}")),
    };
    if raw.len() != h.raw_len as usize {
        return Err(format!(
            "decoded {} bytes, header says {}",
            raw.len(),
            h.raw_len
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_crc() {
        let id = MessageId::of(b"x");
        let h = RecordHeader {
            kind: KIND_MESSAGE,
            flags: 0,
            codec: CODEC_STORED,
            dict_id: 0,
            key_id: 0,
            stored_len: 3,
            raw_len: 3,
            message: id,
        };
        let mut buf = Vec::new();
        encode_record(&mut buf, &h, b"abc");
        assert_eq!(buf.len() as u64, h.total_len());
        assert_eq!(RecordHeader::decode(&buf).unwrap(), h);
        assert!(check_crc(&buf));
        buf[57] ^= 1;
        assert!(!check_crc(&buf));
    }

    #[test]
    fn segment_header_round_trip() {
        let h = SegmentHeader {
            number: 7,
            epoch: [9; 16],
            created_us: 123,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
    }
}
