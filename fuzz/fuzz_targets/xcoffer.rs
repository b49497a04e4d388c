//! The XCOFFER= value decoder: never panics, and whatever it accepts encodes back to a
//! value that decodes to the same thing (decode(encode(x)) == x).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(x) = coffer_proto::decode(value) {
        let again = coffer_proto::encode(&x);
        assert_eq!(coffer_proto::decode(&again).as_ref(), Ok(&x), "{again}");
    }
    // The JSON inside, encoded as a value: the decoder must hold up to any JSON too.
    let encoded = base64_url(data);
    if let Ok(x) = coffer_proto::decode(&encoded) {
        assert_eq!(coffer_proto::decode(&coffer_proto::encode(&x)), Ok(x));
    }
});

/// Unpadded base64url, written out here so the target needs no other crate.
fn base64_url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len() * 4 / 3 + 4);
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
