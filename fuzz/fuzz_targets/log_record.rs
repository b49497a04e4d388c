//! The log's record decoder (archiver/src/store/record.rs) and the segment scan that
//! recovery runs over a file's bytes (store/log.rs): damaged or hostile bytes give an
//! error or a shorter valid prefix, never a panic. A record that decodes and passes its
//! CRC encodes back to the same bytes.
#![no_main]

use std::io;

use coffer_archiver::store::io::VFile;
use coffer_archiver::store::log::scan;
use coffer_archiver::store::record::{
    check_crc, decode_payload, encode_record, no_dicts, RecordHeader, SegmentHeader,
    RECORD_HEADER_LEN, RECORD_TRAILER_LEN,
};
use libfuzzer_sys::fuzz_target;

/// A segment file held in memory.
#[derive(Debug)]
struct MemFile(Vec<u8>);

impl VFile for MemFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    if let Ok(h) = RecordHeader::decode(data) {
        let total = usize::try_from(h.total_len()).unwrap();
        if let Some(record) = data.get(..total) {
            if check_crc(record) {
                let payload = &record[RECORD_HEADER_LEN..total - RECORD_TRAILER_LEN];
                let mut again = Vec::new();
                encode_record(&mut again, &h, payload);
                // Byte 7 is reserved: the decoder ignores it (segments carry a format
                // version), the encoder writes 0. Everything else must match.
                assert_eq!(
                    again[..7],
                    record[..7],
                    "a valid record re-encodes to itself"
                );
                assert_eq!(again[8..total - 4], record[8..total - 4]);
                // Bound what a hostile raw length may make the decoder allocate.
                if h.raw_len <= 1 << 20 {
                    if let Ok(raw) = decode_payload(&h, payload, &no_dicts) {
                        assert_eq!(raw.len(), h.raw_len as usize);
                    }
                }
            }
        }
    }
    // Recovery's scan from the start of the bytes: stops at the first bad record.
    let file = MemFile(data.to_vec());
    let mut seen = 0u64;
    let result = scan::<io::Error>(&file, 0, |rec| {
        seen += rec.header.total_len();
        Ok(())
    });
    let s = result.expect("a memory file has no I/O errors");
    assert_eq!(s.valid_end, seen);
    assert!(s.valid_end <= s.file_len);
    assert_eq!(s.stopped.is_none(), s.valid_end == s.file_len);
});
