//! Rebuilding the message bytes from what the MTA passes to a milter
//! (docs/interfaces.md "Bytes").
//!
//! The milter protocol hands over each header as a name and a value, then the body in
//! chunks. The archived bytes are:
//!
//! - for each header, `Name:` + value + CRLF. With the `LEADING_SPACE` protocol option
//!   (SMFIP_HDR_LEADSPC) the value is exactly what followed the colon, leading
//!   whitespace included; without it the MTA dropped one leading space, which is put
//!   back. Folded values arrive with bare LF between their lines (Postfix); each bare LF
//!   becomes CRLF, as on the wire. A CRLF already in a value is kept.
//! - a CRLF separating headers and body;
//! - the body chunks exactly as they came (Postfix passes the body with CRLF line ends).
//!
//! Nothing else is touched: 8-bit bytes, odd spacing and empty values stay as they are.

/// Appends one header line to `out`.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8], leading_space: bool) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.push(b':');
    if !leading_space && !value.is_empty() {
        // libmilter convention: the MTA strips the single space after the colon.
        out.push(b' ');
    }
    push_crlf_lines(out, value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `value`, turning every LF not preceded by CR into CRLF.
fn push_crlf_lines(out: &mut Vec<u8>, value: &[u8]) {
    let mut prev = 0u8;
    for &b in value {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
}

/// Appends the blank line that ends the header block.
pub fn push_end_of_headers(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &[u8], leading_space: bool) -> Vec<u8> {
        let mut v = Vec::new();
        push_header(&mut v, name.as_bytes(), value, leading_space);
        v
    }

    #[test]
    fn leading_space_is_kept_as_given() {
        assert_eq!(header("Subject", b" hi", true), b"Subject: hi\r\n");
        assert_eq!(header("Subject", b"   hi", true), b"Subject:   hi\r\n");
        assert_eq!(header("Subject", b"hi", true), b"Subject:hi\r\n");
        assert_eq!(header("Subject", b"\thi", true), b"Subject:\thi\r\n");
        assert_eq!(header("X-Empty", b"", true), b"X-Empty:\r\n");
    }

    #[test]
    fn without_leading_space_one_space_is_put_back() {
        assert_eq!(header("Subject", b"hi", false), b"Subject: hi\r\n");
        assert_eq!(header("Subject", b"  hi", false), b"Subject:   hi\r\n");
        assert_eq!(header("X-Empty", b"", false), b"X-Empty:\r\n");
    }

    #[test]
    fn folded_values_get_crlf() {
        assert_eq!(
            header("Received", b" from a\n\tby b\n    for c", true),
            b"Received: from a\r\n\tby b\r\n    for c\r\n"
        );
        // A CRLF already there stays one CRLF.
        assert_eq!(
            header("X-A", b" one\r\n two", true),
            b"X-A: one\r\n two\r\n"
        );
        // A bare CR is content, not a line end.
        assert_eq!(header("X-A", b" a\rb", true), b"X-A: a\rb\r\n");
    }

    #[test]
    fn eight_bit_bytes_pass_untouched() {
        let v = b" caf\xe9 \xc3\xa9t\xc3\xa9 \xff";
        let mut want = b"Subject:".to_vec();
        want.extend_from_slice(v);
        want.extend_from_slice(b"\r\n");
        assert_eq!(header("Subject", v, true), want);
        assert_eq!(
            header("X-\u{e9}", b" x", true),
            "X-\u{e9}: x\r\n".as_bytes()
        );
    }

    #[test]
    fn a_whole_header_block() {
        let mut v = Vec::new();
        push_header(&mut v, b"From", b" a@b.test", true);
        push_header(&mut v, b"To", b" c@d.test,\n e@f.test", true);
        push_end_of_headers(&mut v);
        v.extend_from_slice(b"body\r\n");
        assert_eq!(
            v,
            b"From: a@b.test\r\nTo: c@d.test,\r\n e@f.test\r\n\r\nbody\r\n"
        );
    }
}
