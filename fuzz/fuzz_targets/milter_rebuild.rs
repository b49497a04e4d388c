//! coffer-milter's header rebuild (milter/src/message.rs): `Name:` + value + CRLF with
//! every bare LF made CRLF. Checks that the output is exactly that: nothing but CRs added,
//! one per bare LF, every LF then preceded by CR, one space put back when the MTA took it.
#![no_main]

use coffer_milter::message::{push_end_of_headers, push_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let leading_space = flags & 1 != 0;
    let split = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    let (name, value) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
    let mut out = b"prefix".to_vec();
    push_header(&mut out, name, value, leading_space);
    let line = &out[6..];
    assert!(line.starts_with(name) && line[name.len()] == b':');
    assert!(line.ends_with(b"\r\n"));
    let mut got = &line[name.len() + 1..line.len() - 2];
    if !leading_space && !value.is_empty() {
        assert_eq!(got.first(), Some(&b' '));
        got = &got[1..];
    }
    let bare_lf = value
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || value[i - 1] != b'\r'))
        .count();
    assert_eq!(got.len(), value.len() + bare_lf);
    let no_cr = |s: &[u8]| {
        s.iter()
            .copied()
            .filter(|&b| b != b'\r')
            .collect::<Vec<u8>>()
    };
    assert_eq!(no_cr(got), no_cr(value));
    for (i, &b) in got.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && got[i - 1] == b'\r', "bare LF left at {i}");
        }
    }
    let before = out.len();
    push_end_of_headers(&mut out);
    assert_eq!(&out[before..], b"\r\n");
});
