//! The SMTP/LMTP codec: command lines, DATA and BDAT content, fed as one piece and split
//! at arbitrary points. Every split must give the same events as the whole input (TCP
//! may cut a stream anywhere), nothing may panic, and the codec must always progress.
//!
//! Input: byte 0 picks the limits (message size cap, XCOFFER-length MAIL lines), bytes 1
//! and 2 seed the split points; the rest is the client's byte stream. The driver acts as
//! the session does: data mode after DATA, chunk mode after BDAT (keeping the chunks
//! while the message fits the cap).
#![no_main]

use coffer_archiver::smtp::codec::{
    Codec, Command, Event, Limits, MAX_LINE, MAX_XCOFFER_MAIL_LINE,
};
use libfuzzer_sys::fuzz_target;

fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, limits: Limits, max: u64) -> Vec<Event> {
    let mut codec = Codec::new(limits);
    let mut out = Vec::new();
    let mut message: Vec<u8> = Vec::new();
    let mut last = false;
    for chunk in chunks {
        let mut rest = chunk;
        // Each event consumes input or is one of a bounded number of zero-length ones.
        let mut budget = 4 * chunk.len() + 16;
        loop {
            budget = budget.checked_sub(1).expect("the codec does not progress");
            let (n, ev) = codec.decode(rest);
            assert!(n <= rest.len());
            rest = &rest[n..];
            match &ev {
                Event::NeedMore => {
                    assert!(rest.is_empty(), "NeedMore must consume everything");
                    break;
                }
                Event::Command(Ok(Command::Data)) => codec.start_data(max),
                Event::Command(Ok(Command::Bdat { size, last: l })) => {
                    last = *l;
                    if (message.len() as u64).saturating_add(*size) > max {
                        message.clear();
                        codec.start_chunk(*size, None);
                    } else {
                        codec.start_chunk(*size, Some(std::mem::take(&mut message)));
                    }
                }
                Event::Chunk(Some(m)) if !last => message.clone_from(m),
                Event::Chunk(Some(m)) | Event::Message(m) => {
                    assert!(m.len() as u64 <= max, "content over the cap kept")
                }
                _ => {}
            }
            out.push(ev);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, wire) = data.split_at(3);
    let max = [0u64, 1, 16, 64, 1000, 4096][usize::from(head[0] & 7) % 6];
    let limits = Limits {
        max_line: MAX_LINE,
        max_mail_line: if head[0] & 8 != 0 {
            MAX_XCOFFER_MAIL_LINE
        } else {
            MAX_LINE
        },
    };
    let whole = run(std::iter::once(wire), limits, max);
    // Byte by byte.
    assert_eq!(run(wire.chunks(1), limits, max), whole, "byte by byte");
    // At pseudo-random points.
    let mut x = u32::from(head[1]) << 8 | u32::from(head[2]) | 1;
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let len = (x as usize % 97 + 1).min(wire.len() - at);
        pieces.push(&wire[at..at + len]);
        at += len;
    }
    assert_eq!(run(pieces.into_iter(), limits, max), whole, "split");
});
