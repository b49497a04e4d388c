//! What the store parses of a message for the index (top-level headers, store/summary.rs)
//! and the journal-report unwrapping every listener tries (journal.rs): any bytes give a
//! summary (perhaps flagged unparsed) and an unwrap result, never a panic.
#![no_main]

use coffer_archiver::journal;
use coffer_archiver::store::summary::Summary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = Summary::of(data);
    if s.unparsed {
        assert!(s.from.is_empty() && s.to.is_empty() && s.subject.is_none());
    }
    if let Some(Ok(u)) = journal::unwrap(data) {
        assert!(!u.original.is_empty() && !u.recipients.is_empty());
    }
});
