//! The PROXY v1/v2 header parser: never panics, never claims more bytes than it was
//! given, and agrees with itself on prefixes (a prefix either needs more or gives the
//! answer the whole input gives), as its documentation promises.
#![no_main]

use coffer_archiver::smtp::proxy::{parse, Parsed, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Parsed::Done { consumed, .. }) = &whole {
        assert!(*consumed <= data.len() && *consumed <= MAX_HEADER);
        assert_eq!(parse(&data[..*consumed]), whole, "the header alone");
    }
    for cut in 0..data.len() {
        match parse(&data[..cut]) {
            Ok(Parsed::NeedMore) => {}
            prefix => assert_eq!(prefix, whole, "prefix of {cut} bytes"),
        }
    }
});
