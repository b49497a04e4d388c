//! Compaction: a sealed segment rewritten as blocks (docs/store-format.md "Compacted
//! segments").
//!
//! [`rewrite`] does steps 1–3 of the commit order (write `NNNNNNNN.blk.tmp`, sync it,
//! read it back and check it against the segment, rename it into place, sync the
//! folder) and returns the moves of every message; the caller then commits the switch
//! through the index stage ([`super::index::StateOp::Relocate`]) and only then deletes the
//! segment. [`read_block`] and [`scan_blk`] read what it wrote, for readers, recovery and
//! `verify`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::catalog::{self, Catalog};
use super::engine::io_err;
use super::index::{Loc, Move, SegmentInfo};
use super::io::{VFile, Vfs};
use super::log::{self, blk_path, blk_tmp_path, segment_path};
use super::record::{
    decode_payload, encode_block, encode_record, parse_record, zstd_decode, BlockHeader,
    DictLookup, RecordHeader, TableEntry, BARE_ENTRY_LEN, BLOCK_CODEC_BARE, BLOCK_CODEC_CATALOG,
    BLOCK_HEADER_LEN, KIND_ARRIVAL, KIND_MESSAGE, RECORD_TRAILER_LEN, SEGMENT_HEADER_LEN,
    TABLE_ENTRY_LEN,
};
use super::StoreError;
use crate::ids::MessageId;

/// How sealed segments are compacted (`[store]` `block_size`, `block_level`).
#[derive(Clone, Debug)]
pub struct CompactOptions {
    /// A block is closed once its records reach this many raw bytes.
    pub block_size: u64,
    /// zstd level of blocks.
    pub level: i32,
    /// Train (once) and use a dictionary on the archive's own mail.
    pub dictionary: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            block_size: 4 << 20,
            level: 19,
            dictionary: true,
        }
    }
}

/// What one rewrite produced.
#[derive(Debug)]
pub struct Rewritten {
    pub segment: u32,
    pub moves: Vec<Move>,
    pub info: SegmentInfo,
    /// What its last block holds of the index.
    pub catalog: Arc<Catalog>,
    /// Raw bytes of the messages in it.
    pub raw_bytes: u64,
}

/// A block read back and decoded.
pub struct DecodedBlock {
    pub header: BlockHeader,
    /// Bytes of the block on disk.
    pub len: u64,
    pub payload: Vec<u8>,
}

fn corrupt(path: &Path, at: u64, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{} at {at}: {what}", path.display()))
}

/// Reads, checks and decodes the block at `offset`. An `Err(io)` of kind `UnexpectedEof`
/// or `InvalidData` means the bytes there are no valid block.
///
/// # Errors
/// I/O errors; damage as `InvalidData`.
pub fn read_block(
    file: &dyn VFile,
    offset: u64,
    dicts: DictLookup<'_>,
) -> io::Result<DecodedBlock> {
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut head = [0u8; BLOCK_HEADER_LEN];
    file.read_exact_at(&mut head, offset)?;
    let header = BlockHeader::decode(&head).map_err(bad)?;
    let len = header.total_len();
    let whole = super::log::read_declared(file, offset, len)?;
    if !super::record::check_crc(&whole) {
        return Err(bad("block checksum mismatch".into()));
    }
    let frame = &whole[BLOCK_HEADER_LEN..whole.len() - RECORD_TRAILER_LEN];
    let payload =
        zstd_decode(frame, header.raw_len as usize, header.dict_id, dicts).map_err(bad)?;
    if payload.len() != header.raw_len as usize
        || (header.messages as usize).saturating_mul(entry_len(header.codec)) > payload.len()
    {
        return Err(bad("block payload does not match its header".into()));
    }
    Ok(DecodedBlock {
        header,
        len,
        payload,
    })
}

/// Bytes of one table entry in a block of `codec`.
fn entry_len(codec: u8) -> usize {
    if codec == BLOCK_CODEC_BARE {
        BARE_ENTRY_LEN
    } else {
        TABLE_ENTRY_LEN
    }
}

/// One record found in a block.
pub struct BlockRecord<'a> {
    pub header: RecordHeader,
    pub payload: &'a [u8],
    /// Its entry in the block's table (message records only).
    pub position: Option<u32>,
}

impl DecodedBlock {
    fn bare(&self) -> bool {
        self.header.codec == BLOCK_CODEC_BARE
    }

    /// The `i`th entry of the block's table (with codec 3, its id is not known here).
    pub fn entry(&self, i: u32) -> Option<TableEntry> {
        if i >= self.header.messages {
            return None;
        }
        if self.bare() {
            TableEntry::read_bare(&self.payload, i as usize)
        } else {
            TableEntry::read(&self.payload, i as usize)
        }
    }

    /// The share of this block's bytes counted for a message record of `entry_len` bytes:
    /// its part of the decoded payload (the rest is arrivals and the table).
    pub fn share(&self, entry_len: u32) -> u32 {
        share(self.len, entry_len, u64::from(self.header.raw_len))
    }

    /// The raw bytes of the message at table entry `position`, which must be `id`'s (with
    /// codec 3 the caller checks that they hash to it).
    ///
    /// # Errors
    /// The entry is missing, is not that message's, or its record is damaged.
    pub fn message(&self, position: u32, id: &MessageId) -> Result<Vec<u8>, String> {
        let e = self
            .entry(position)
            .ok_or_else(|| format!("no entry {position} in the block"))?;
        if self.bare() {
            let end = e.offset as usize + e.len as usize;
            return Ok(self
                .payload
                .get(e.offset as usize..end)
                .ok_or("entry points past the block")?
                .to_vec());
        }
        if e.message != *id {
            return Err(format!("entry {position} of the block is another message"));
        }
        let rec = self
            .payload
            .get(e.offset as usize..)
            .ok_or("entry points past the block")?;
        let (h, payload) = parse_record(rec)?;
        if h.kind != KIND_MESSAGE || h.message != *id {
            return Err("entry does not point at the message's record".into());
        }
        decode_payload(&h, payload, &super::record::no_dicts)
    }

    /// Every record of the block in order, each checked; message records with their
    /// table position. With codec 3 a message's record header is made from its table
    /// entry, its id by hashing its bytes.
    ///
    /// # Errors
    /// A damaged record, or a table that does not match the records.
    pub fn records(&self) -> Result<Vec<BlockRecord<'_>>, String> {
        let table: Vec<TableEntry> = (0..self.header.messages)
            .map(|i| self.entry(i).ok_or("the block's table is cut short"))
            .collect::<Result<_, _>>()?;
        let mut at = table.len() * entry_len(self.header.codec);
        let mut out = Vec::with_capacity(self.header.records as usize);
        let mut next_msg = 0usize;
        while at < self.payload.len() {
            let bare = self.bare() && table.get(next_msg).is_some_and(|e| e.offset as usize == at);
            let (header, payload) = if bare {
                let e = table[next_msg];
                let payload = self
                    .payload
                    .get(at..at + e.len as usize)
                    .ok_or("entry points past the block")?;
                let header = RecordHeader::stored_message(MessageId::of(payload), e.len, e.flags);
                (header, payload)
            } else {
                parse_record(&self.payload[at..])?
            };
            let position = if header.kind == KIND_MESSAGE {
                let e = table
                    .get(next_msg)
                    .ok_or("more message records than table entries")?;
                if e.offset as usize != at || (!bare && e.message != header.message) {
                    return Err("the block's table does not match its records".into());
                }
                next_msg += 1;
                Some(u32::try_from(next_msg - 1).unwrap_or(u32::MAX))
            } else {
                None
            };
            at += if bare {
                payload.len()
            } else {
                usize::try_from(header.total_len()).unwrap_or(usize::MAX)
            };
            out.push(BlockRecord {
                header,
                payload,
                position,
            });
        }
        if out.len() != self.header.records as usize || next_msg != table.len() {
            return Err("the block's counts do not match its records".into());
        }
        Ok(out)
    }
}

fn share(block_len: u64, entry_len: u32, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    u32::try_from(block_len * u64::from(entry_len) / total).unwrap_or(u32::MAX)
}

/// Outcome of scanning a compacted segment.
pub struct BlkScan {
    /// Offset just past the last valid block.
    pub valid_end: u64,
    pub file_len: u64,
    /// Why the scan stopped before the end, if it did.
    pub stopped: Option<String>,
    /// Offset of the catalog block, if the scan met one (it is the last block).
    pub catalog: Option<u64>,
}

/// Reads every block of records of a compacted segment in order and calls `f(block
/// offset, block, records)` for each; notes where the catalog block is; stops at the
/// first damaged block.
///
/// # Errors
/// I/O errors other than damage, or an error from `f`.
pub fn scan_blk<E: From<io::Error>>(
    file: &dyn VFile,
    dicts: DictLookup<'_>,
    mut f: impl FnMut(u64, &DecodedBlock, Vec<BlockRecord<'_>>) -> Result<(), E>,
) -> Result<BlkScan, E> {
    let file_len = file.len()?;
    let mut at = SEGMENT_HEADER_LEN;
    let mut catalog = None;
    while at < file_len {
        let block = match read_block(file, at, dicts) {
            Ok(b) => b,
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.kind() == io::ErrorKind::InvalidData =>
            {
                return Ok(BlkScan {
                    valid_end: at,
                    file_len,
                    stopped: Some(e.to_string()),
                    catalog,
                })
            }
            Err(e) => return Err(e.into()),
        };
        if block.header.codec == BLOCK_CODEC_CATALOG {
            catalog = Some(at);
            at += block.len;
            continue;
        }
        let records = match block.records() {
            Ok(r) => r,
            Err(e) => {
                return Ok(BlkScan {
                    valid_end: at,
                    file_len,
                    stopped: Some(e),
                    catalog,
                })
            }
        };
        f(at, &block, records)?;
        at += block.len;
    }
    Ok(BlkScan {
        valid_end: at,
        file_len,
        stopped: None,
        catalog,
    })
}

/// The offset of a compacted segment's catalog block, found by its block headers alone.
/// `None` if it has none, or if damage comes first (a scan names it).
///
/// # Errors
/// I/O errors other than damage.
pub fn find_catalog(file: &dyn VFile) -> io::Result<Option<u64>> {
    let file_len = file.len()?;
    let mut at = SEGMENT_HEADER_LEN;
    let mut head = [0u8; BLOCK_HEADER_LEN];
    while at + BLOCK_HEADER_LEN as u64 <= file_len {
        file.read_exact_at(&mut head, at)?;
        let Ok(h) = BlockHeader::decode(&head) else {
            return Ok(None);
        };
        if h.codec == BLOCK_CODEC_CATALOG {
            return Ok(Some(at));
        }
        at += h.total_len();
    }
    Ok(None)
}

/// The location of a message record found at `position` of the block at `offset`.
pub fn block_loc(segment: u32, offset: u64, block: &DecodedBlock, rec: &BlockRecord<'_>) -> Loc {
    let position = rec.position.unwrap_or(0);
    let entry_len = block.entry(position).map_or(0, |e| e.len);
    Loc {
        segment,
        offset,
        record_len: block.share(entry_len),
        raw_len: rec.header.raw_len,
        position: Some(position),
    }
}

/// A block being filled: its records (codec 0) and its table.
#[derive(Default)]
struct Filling {
    records: Vec<u8>,
    count: u32,
    /// (entry, where the record was in the segment)
    messages: Vec<(TableEntry, Loc)>,
}

/// Compresses and appends blocks to the `.tmp` file, noting where each message went.
struct BlockWriter<'a> {
    out: &'a dyn VFile,
    path: &'a Path,
    segment: u32,
    compressor: zstd::bulk::Compressor<'static>,
    dict_id: u32,
    /// With a dictionary: a compressor without it, tried on the segment's first block.
    /// The smaller frame decides for the whole segment — a dictionary pays for small
    /// blocks, while inside a block of megabytes the earlier messages are the better one.
    plain: Option<zstd::bulk::Compressor<'static>>,
    pos: u64,
    moves: Vec<Move>,
    blocks: u64,
}

impl BlockWriter<'_> {
    fn flush(&mut self, filling: &mut Filling) -> Result<(), StoreError> {
        if filling.count == 0 {
            return Ok(());
        }
        let f = std::mem::take(filling);
        let table_len = f.messages.len() * BARE_ENTRY_LEN;
        let mut payload = Vec::with_capacity(table_len + f.records.len());
        for (e, _) in &f.messages {
            let mut e = *e;
            e.offset += u32::try_from(table_len).expect("table under 4 GiB");
            e.encode_bare(&mut payload);
        }
        payload.extend_from_slice(&f.records);
        drop(f.records);
        let zstd_err = |e: std::io::Error| StoreError::Unsupported(format!("zstd: {e}"));
        let mut frame = self.compressor.compress(&payload).map_err(zstd_err)?;
        if let Some(mut plain) = self.plain.take() {
            let without = plain.compress(&payload).map_err(zstd_err)?;
            // The dictionary must save at least 1 %: a few bytes' difference is chance.
            if frame.len() + without.len() / 100 >= without.len() {
                frame = without;
                self.compressor = plain;
                self.dict_id = 0;
            }
        }
        let bh = BlockHeader {
            codec: BLOCK_CODEC_BARE,
            dict_id: self.dict_id,
            stored_len: u32::try_from(frame.len()).expect("block under 4 GiB"),
            raw_len: u32::try_from(payload.len()).expect("block under 4 GiB"),
            records: f.count,
            messages: u32::try_from(f.messages.len()).expect("count under 4 G"),
        };
        drop(payload);
        let mut buf = Vec::with_capacity(frame.len() + BLOCK_HEADER_LEN + 4);
        encode_block(&mut buf, &bh, &frame);
        self.out
            .write_all_at(&buf, self.pos)
            .map_err(io_err(self.path))?;
        let block_len = buf.len() as u64;
        let total = u64::from(bh.raw_len);
        for (i, (e, from)) in f.messages.iter().enumerate() {
            self.moves.push(Move {
                message: e.message,
                from: *from,
                to: Loc {
                    segment: self.segment,
                    offset: self.pos,
                    record_len: share(block_len, e.len, total),
                    raw_len: from.raw_len,
                    position: Some(u32::try_from(i).expect("count under 4 G")),
                },
            });
        }
        self.pos += block_len;
        self.blocks += 1;
        Ok(())
    }
}

/// Writes segment `n`'s compacted form: steps 1–3 of the commit order. `pause` is called
/// between blocks (the background compactor yields there); when it returns true the
/// rewrite stops, removes its `.tmp` and returns `Ok(None)`. `catalog(moves, arrival
/// ids)` gives the catalog, from the index, of the messages and arrivals written; it
/// becomes the last block.
///
/// # Errors
/// I/O errors, or damage in the segment (nothing is renamed into place then).
#[allow(clippy::too_many_arguments)]
pub fn rewrite(
    vfs: &dyn Vfs,
    log_dir: &Path,
    n: u32,
    epoch: [u8; 16],
    opts: &CompactOptions,
    dict: Option<(u32, &[u8])>,
    dicts: DictLookup<'_>,
    pause: &mut dyn FnMut() -> bool,
    catalog: &mut catalog::CatalogOf<'_>,
) -> Result<Option<Rewritten>, StoreError> {
    let seg = segment_path(log_dir, n);
    let src = vfs.open_read(&seg).map_err(io_err(&seg))?;
    let header = log::read_header(&*src).map_err(io_err(&seg))?;
    if header.number != n || header.epoch != epoch {
        return Err(corrupt(&seg, 0, "header names another segment or store"));
    }
    let from_bytes = src.len().map_err(io_err(&seg))?;
    let tmp = blk_tmp_path(log_dir, n);
    if vfs.exists(&tmp) {
        vfs.remove_file(&tmp).map_err(io_err(&tmp))?;
    }
    let out = vfs.create_new(&tmp).map_err(io_err(&tmp))?;
    out.write_all_at(&header.encode_blk(), 0)
        .map_err(io_err(&tmp))?;
    let level_err = |e| StoreError::Unsupported(format!("zstd level {}: {e}", opts.level));
    let compressor = match dict {
        Some((_, d)) => zstd::bulk::Compressor::with_dictionary(opts.level, d),
        None => zstd::bulk::Compressor::new(opts.level),
    }
    .map_err(level_err)?;
    let plain = match dict {
        Some(_) => Some(zstd::bulk::Compressor::new(opts.level).map_err(level_err)?),
        None => None,
    };
    let mut w = BlockWriter {
        out: &*out,
        path: &tmp,
        segment: n,
        compressor,
        dict_id: dict.map_or(0, |(id, _)| id),
        plain,
        pos: SEGMENT_HEADER_LEN,
        moves: Vec::new(),
        blocks: 0,
    };
    let mut raw_bytes = 0u64;
    // Records written into blocks.
    let mut records_in = 0u64;
    let mut filling = Filling::default();
    let mut stopped = false;
    // (arrival id, its catalog form, its record) of every arrival record.
    let mut arrivals = Vec::new();
    let scan = log::scan(&*src, SEGMENT_HEADER_LEN, |rec| -> Result<(), StoreError> {
        if stopped {
            return Ok(());
        }
        records_in += 1;
        let h = rec.header;
        let at = u32::try_from(filling.records.len()).expect("block under 4 GiB");
        if h.kind == KIND_MESSAGE {
            let raw = decode_payload(&h, &rec.payload, dicts)
                .map_err(|e| corrupt(&seg, rec.offset, e))?;
            filling.records.extend_from_slice(&raw);
            raw_bytes += raw.len() as u64;
            let from = Loc {
                segment: n,
                offset: rec.offset,
                record_len: u32::try_from(h.total_len()).unwrap_or(u32::MAX),
                raw_len: h.raw_len,
                position: None,
            };
            filling.messages.push((
                TableEntry {
                    message: h.message,
                    offset: at,
                    len: u32::try_from(raw.len()).expect("message under 4 GiB"),
                    flags: h.flags,
                },
                from,
            ));
        } else if h.kind == KIND_ARRIVAL {
            // Held back: the catalog may stand for it (below).
            let a: super::Arrival = serde_json::from_slice(&rec.payload)
                .map_err(|e| corrupt(&seg, rec.offset, format!("arrival record: {e}")))?;
            let encoded = a
                .message
                .parse::<MessageId>()
                .is_ok()
                .then(|| super::codec::encode_arrival(&a));
            arrivals.push((a.id.to_string(), encoded, h, rec.payload));
            records_in -= 1; // not (yet) in a block
            return Ok(());
        } else {
            encode_record(&mut filling.records, &h, &rec.payload);
        }
        filling.count += 1;
        if filling.records.len() as u64 >= opts.block_size {
            w.flush(&mut filling)?;
            stopped = pause();
        }
        Ok(())
    })?;
    if scan.valid_end != scan.file_len || stopped {
        drop(out);
        let _ = vfs.remove_file(&tmp);
        if stopped {
            return Ok(None);
        }
        return Err(corrupt(
            &seg,
            scan.valid_end,
            format!(
                "damaged in a sealed segment ({}); not compacted",
                scan.stopped.unwrap_or_default()
            ),
        ));
    }
    w.flush(&mut filling)?;
    let ids: Vec<String> = arrivals.iter().map(|a| a.0.clone()).collect();
    let cat = Arc::new(catalog(&w.moves, &ids)?);
    drop(ids);
    // An arrival record the catalog holds exactly leaves the log's blocks: the catalog is
    // its durable form. One it does not (none, in a store without damage) stays, in a
    // block of its own.
    let held: std::collections::HashSet<&[u8]> =
        cat.arrivals.iter().map(|(_, v)| v.as_slice()).collect();
    for (_, encoded, h, payload) in &arrivals {
        if encoded.as_deref().is_some_and(|e| held.contains(e)) {
            continue;
        }
        encode_record(&mut filling.records, h, payload);
        filling.count += 1;
        records_in += 1;
    }
    drop(held);
    drop(arrivals);
    w.flush(&mut filling)?;
    let BlockWriter {
        mut pos,
        moves,
        blocks,
        dict_id,
        ..
    } = w;
    let catalog_at = pos;
    let block = catalog::encode_block(&cat, opts.level).map_err(level_err)?;
    out.write_all_at(&block, pos).map_err(io_err(&tmp))?;
    pos += block.len() as u64;
    // 2. Durable, then read back and checked against what was read.
    out.sync_data().map_err(io_err(&tmp))?;
    drop(out);
    check_rewritten(vfs, &tmp, n, records_in, &moves, (catalog_at, &cat), dicts)?;
    // 3. Into place, the name durable.
    let blk = blk_path(log_dir, n);
    vfs.rename(&tmp, &blk).map_err(io_err(&blk))?;
    vfs.sync_dir(log_dir).map_err(io_err(log_dir))?;
    let mut info = SegmentInfo {
        compacted: true,
        blocks,
        bytes: pos,
        from_bytes,
        dict: dict_id,
        ..SegmentInfo::default()
    };
    info.set_catalog(catalog_at, &cat);
    Ok(Some(Rewritten {
        segment: n,
        moves,
        info,
        catalog: cat,
        raw_bytes,
    }))
}

/// Reads a freshly written compacted segment back: every block and record checks, every
/// message hashes to its id, the records and message places are the expected ones, and
/// the catalog is the one written, last.
fn check_rewritten(
    vfs: &dyn Vfs,
    path: &Path,
    n: u32,
    records: u64,
    moves: &[Move],
    (catalog_at, cat): (u64, &Catalog),
    dicts: DictLookup<'_>,
) -> Result<(), StoreError> {
    let file = vfs.open_read(path).map_err(io_err(path))?;
    let h = log::read_blk_header(&*file).map_err(io_err(path))?;
    if h.number != n {
        return Err(corrupt(path, 0, "wrong segment number"));
    }
    let mut seen = 0u64;
    let mut next = moves.iter();
    let scan = scan_blk(&*file, dicts, |at, block, recs| -> Result<(), StoreError> {
        for rec in recs {
            seen += 1;
            if rec.header.kind != KIND_MESSAGE {
                continue;
            }
            let m = next
                .next()
                .ok_or_else(|| corrupt(path, at, "more messages than written"))?;
            let loc = block_loc(n, at, block, &rec);
            if m.to != loc || m.message != rec.header.message {
                return Err(corrupt(path, at, "a message is not where it was written"));
            }
            if MessageId::of(rec.payload) != rec.header.message {
                return Err(corrupt(path, at, "a message does not hash to its id"));
            }
        }
        Ok(())
    })?;
    if scan.catalog != Some(catalog_at)
        || catalog::read(&*file, catalog_at).ok().as_ref() != Some(cat)
    {
        return Err(corrupt(path, catalog_at, "the catalog does not read back"));
    }
    if scan.stopped.is_some() || seen != records || next.next().is_some() {
        return Err(corrupt(
            path,
            scan.valid_end,
            format!(
                "the compacted segment does not read back whole ({} of {records} records{})",
                seen,
                scan.stopped.map(|s| format!(": {s}")).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}
