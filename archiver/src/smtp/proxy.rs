//! Sans-IO parser for the PROXY protocol header, versions 1 (text) and 2 (binary), as
//! load balancers send it in front of a listener with `proxy_protocol = true`
//! (docs/interfaces.md "PROXY protocol"; nginx sends v1, haproxy v2 with `send-proxy-v2`).
//!
//! [`parse`] takes every byte received so far and answers [`Parsed::NeedMore`],
//! [`Parsed::Done`] with the number of header bytes, or a [`ProxyError`]. It never
//! looks past the header: whatever follows belongs to SMTP. Each check depends only on
//! bytes before the one it looks at, so a prefix of an input either needs more or gives
//! the same answer as the whole input; an error is reported as soon as it is certain.
//!
//! Bounds: a v1 line is at most [`V1_MAX`] bytes (CRLF included); a v2 header at most
//! [`V2_MAX`] (16 fixed bytes plus at most [`V2_MAX_LEN`] of addresses and TLVs). TLVs are
//! skipped, never interpreted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, `PROXY` to CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;

/// The v2 signature: the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Largest v2 address-and-TLV block accepted. The addresses take at most 216 bytes (Unix);
/// the rest leaves room for TLVs (ALPN, authority, SSL details) that we skip.
pub const V2_MAX_LEN: usize = 2048;

/// Longest v2 header accepted.
pub const V2_MAX: usize = 16 + V2_MAX_LEN;

/// Enough buffer for any header [`parse`] accepts.
pub const MAX_HEADER: usize = V2_MAX;

const V1_PREFIX: &[u8] = b"PROXY ";

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A relayed connection: `source` is the real client, `destination` the address it
    /// connected to (on the load balancer).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address to use: v1 `UNKNOWN`, v2 `LOCAL` (the proxy's own connection,
    /// such as a health check), or v2 `PROXY` for an unspecified or Unix-socket family.
    /// The connection's own peer is the client.
    Local,
}

impl ProxyHeader {
    /// The real client, when the header names one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            ProxyHeader::Proxied { source, .. } => Some(*source),
            ProxyHeader::Local => None,
        }
    }
}

/// The answer of [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far are a valid beginning of a header: read more.
    NeedMore,
    /// A complete header, the first `consumed` bytes of the input. Bytes after them are
    /// not part of it.
    Done {
        header: ProxyHeader,
        consumed: usize,
    },
}

/// Why the bytes are not a PROXY header we accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    #[error("unsupported PROXY v2 version {0} (byte {0:#04x})")]
    V2Version(u8),
    #[error("unsupported PROXY v2 command {0:#04x}")]
    V2Command(u8),
    #[error("unsupported PROXY v2 address family/transport {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2 address block of {0} bytes exceeds the limit of {V2_MAX_LEN}")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {len} bytes is too short for family {family:#04x}")]
    V2TooShort { family: u8, len: usize },
}

/// Parses the PROXY header at the start of `input` (every byte received so far).
///
/// # Errors
/// The input cannot be the start of a valid header; see [`ProxyError`]. Call again with
/// more bytes appended only after [`Parsed::NeedMore`].
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyError> {
    match input.first() {
        None => Ok(Parsed::NeedMore),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Whether `input` and `expected` agree on their common length.
fn agrees(input: &[u8], expected: &[u8]) -> bool {
    let n = input.len().min(expected.len());
    input[..n] == expected[..n]
}

fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyError> {
    if !agrees(input, V1_PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = &input[..input.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    if lf == 0 || input[lf - 1] != b'\r' {
        return Err(ProxyError::V1Malformed("line does not end with CRLF"));
    }
    let line = &input[V1_PREFIX.len()..lf - 1];
    let header = v1_fields(line)?;
    Ok(Parsed::Done {
        header,
        consumed: lf + 1,
    })
}

/// The fields after `PROXY `, without the CRLF.
fn v1_fields(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The specification: anything after UNKNOWN, up to the CRLF, is ignored.
        return Ok(ProxyHeader::Local);
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let mut next = |what| fields.next().ok_or(ProxyError::V1Malformed(what));
    let (src, dst) = (
        next("missing source address")?,
        next("missing destination address")?,
    );
    let (sport, dport) = (
        next("missing source port")?,
        next("missing destination port")?,
    );
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed("too many fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        if v6 {
            s.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyError::V1Malformed("bad TCP6 address"))
        } else {
            s.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyError::V1Malformed("bad TCP4 address"))
        }
    };
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(ip(src)?, v1_port(sport)?),
        destination: SocketAddr::new(ip(dst)?, v1_port(dport)?),
    })
}

/// A decimal port, 0 to 65535, digits only (no sign, no spaces).
fn v1_port(s: &str) -> Result<u16, ProxyError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::V1Malformed("bad port"));
    }
    s.parse().map_err(|_| ProxyError::V1Malformed("bad port"))
}

const V2_LOCAL: u8 = 0x20;
const V2_PROXY: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNIX_STREAM: u8 = 0x31;

fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyError> {
    if !agrees(input, V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    let Some(&ver_cmd) = input.get(12) else {
        return Ok(Parsed::NeedMore);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    if ver_cmd != V2_LOCAL && ver_cmd != V2_PROXY {
        return Err(ProxyError::V2Command(ver_cmd));
    }
    let Some(&family) = input.get(13) else {
        return Ok(Parsed::NeedMore);
    };
    // For LOCAL the family and addresses are ignored (the specification).
    if ver_cmd == V2_PROXY && ![V2_UNSPEC, V2_TCP4, V2_TCP6, V2_UNIX_STREAM].contains(&family) {
        return Err(ProxyError::V2Family(family));
    }
    let (Some(&hi), Some(&lo)) = (input.get(14), input.get(15)) else {
        return Ok(Parsed::NeedMore);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong(len));
    }
    let need = match (ver_cmd, family) {
        (V2_PROXY, V2_TCP4) => 12,
        (V2_PROXY, V2_TCP6) => 36,
        (V2_PROXY, V2_UNIX_STREAM) => 216,
        _ => 0,
    };
    if len < need {
        return Err(ProxyError::V2TooShort { family, len });
    }
    let Some(block) = input.get(16..16 + len) else {
        return Ok(Parsed::NeedMore);
    };
    let header = match (ver_cmd, family) {
        (V2_PROXY, V2_TCP4) => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::from(read::<4>(block, at)));
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), u16::from_be_bytes(read(block, 8))),
                destination: SocketAddr::new(ip(4), u16::from_be_bytes(read(block, 10))),
            }
        }
        (V2_PROXY, V2_TCP6) => {
            let ip = |at: usize| IpAddr::V6(Ipv6Addr::from(read::<16>(block, at)));
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), u16::from_be_bytes(read(block, 32))),
                destination: SocketAddr::new(ip(16), u16::from_be_bytes(read(block, 34))),
            }
        }
        _ => ProxyHeader::Local,
    };
    Ok(Parsed::Done {
        header,
        consumed: 16 + len,
    })
}

/// `N` bytes of `block` at `at`; the caller has checked the length.
fn read<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&block[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    fn done(header: ProxyHeader, consumed: usize) -> Result<Parsed, ProxyError> {
        Ok(Parsed::Done { header, consumed })
    }

    /// A v2 header: command byte, family byte, address block.
    fn v2(cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(cmd);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn v2_tcp4() -> Vec<u8> {
        let mut block = vec![203, 0, 113, 7, 192, 0, 2, 1];
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&25u16.to_be_bytes());
        block
    }

    fn v2_tcp6() -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut block = src.octets().to_vec();
        block.extend_from_slice(&dst.octets());
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&25u16.to_be_bytes());
        block
    }

    /// Every input with what `parse` must answer for the whole of it.
    fn cases() -> Vec<(&'static str, Vec<u8>, Result<Parsed, ProxyError>)> {
        use ProxyError as E;
        let v1 = |s: &str| s.as_bytes().to_vec();
        let tcp4 = "PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n";
        let mut with_smtp = v1(tcp4);
        with_smtp.extend_from_slice(b"EHLO x\r\n");
        let max_unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX - 16));
        assert_eq!(max_unknown.len(), V1_MAX);
        let over_unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX - 15));
        let mut tcp4_tlv = v2_tcp4();
        tcp4_tlv.extend_from_slice(&[0x04, 0x00, 0x03, b'a', b'b', b'c']); // a NOOP TLV
        let mut v2_then_smtp = v2(0x21, 0x11, &v2_tcp4());
        v2_then_smtp.extend_from_slice(b"EHLO x\r\n");
        let mut too_long = V2_SIGNATURE.to_vec();
        too_long.extend_from_slice(&[0x21, 0x11, 0x08, 0x01]);
        vec![
            // v1
            (
                "v1 tcp4",
                v1(tcp4),
                done(proxied("203.0.113.7:40000", "192.0.2.1:25"), tcp4.len()),
            ),
            (
                "v1 tcp6",
                v1("PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n"),
                done(proxied("[2001:db8::7]:40000", "[2001:db8::1]:25"), 45),
            ),
            (
                "v1 tcp6 mapped v4",
                v1("PROXY TCP6 ::ffff:203.0.113.7 ::1 1 65535\r\n"),
                done(proxied("[::ffff:203.0.113.7]:1", "[::1]:65535"), 43),
            ),
            (
                "v1 unknown",
                v1("PROXY UNKNOWN\r\n"),
                done(ProxyHeader::Local, 15),
            ),
            (
                "v1 unknown with addresses",
                v1("PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 1 2\r\n"),
                done(ProxyHeader::Local, 43),
            ),
            (
                "v1 unknown at the limit",
                v1(&max_unknown),
                done(ProxyHeader::Local, V1_MAX),
            ),
            (
                "v1 one byte over the limit",
                v1(&over_unknown),
                Err(E::V1TooLong),
            ),
            (
                "v1 no line end",
                v1(&format!("PROXY {}", "x".repeat(200))),
                Err(E::V1TooLong),
            ),
            (
                "v1 followed by smtp",
                with_smtp,
                done(proxied("203.0.113.7:40000", "192.0.2.1:25"), tcp4.len()),
            ),
            (
                "v1 bare lf",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
                Err(E::V1Malformed("line does not end with CRLF")),
            ),
            (
                "v1 lowercase",
                v1("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
                Err(E::NotProxy),
            ),
            ("v1 no space", v1("PROXYTCP4\r\n"), Err(E::NotProxy)),
            ("smtp instead", v1("EHLO x\r\n"), Err(E::NotProxy)),
            (
                "v1 tcp5",
                v1("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
                Err(E::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
            ),
            (
                "v1 empty protocol",
                v1("PROXY \r\n"),
                Err(E::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
            ),
            (
                "v1 v6 in tcp4",
                v1("PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
                Err(E::V1Malformed("bad TCP4 address")),
            ),
            (
                "v1 v4 in tcp6",
                v1("PROXY TCP6 1.2.3.4 ::1 1 2\r\n"),
                Err(E::V1Malformed("bad TCP6 address")),
            ),
            (
                "v1 octal-looking",
                v1("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
                Err(E::V1Malformed("bad TCP4 address")),
            ),
            (
                "v1 port too big",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
                Err(E::V1Malformed("bad port")),
            ),
            (
                "v1 signed port",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
                Err(E::V1Malformed("bad port")),
            ),
            (
                "v1 missing port",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
                Err(E::V1Malformed("missing destination port")),
            ),
            (
                "v1 extra field",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
                Err(E::V1Malformed("too many fields")),
            ),
            (
                "v1 double space",
                v1("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
                Err(E::V1Malformed("too many fields")),
            ),
            (
                "v1 not utf-8",
                b"PROXY TCP4 \xff 5.6.7.8 1 2\r\n".to_vec(),
                Err(E::V1Malformed("not ASCII")),
            ),
            // v2
            (
                "v2 tcp4",
                v2(0x21, 0x11, &v2_tcp4()),
                done(proxied("203.0.113.7:40000", "192.0.2.1:25"), 28),
            ),
            (
                "v2 tcp6",
                v2(0x21, 0x21, &v2_tcp6()),
                done(proxied("[2001:db8::7]:40000", "[2001:db8::1]:25"), 52),
            ),
            (
                "v2 tcp4 with tlvs",
                v2(0x21, 0x11, &tcp4_tlv),
                done(proxied("203.0.113.7:40000", "192.0.2.1:25"), 34),
            ),
            (
                "v2 followed by smtp",
                v2_then_smtp,
                done(proxied("203.0.113.7:40000", "192.0.2.1:25"), 28),
            ),
            (
                "v2 local",
                v2(0x20, 0x00, &[]),
                done(ProxyHeader::Local, 16),
            ),
            (
                "v2 local ignores family and addresses",
                v2(0x20, 0x77, &v2_tcp4()),
                done(ProxyHeader::Local, 28),
            ),
            (
                "v2 proxy unspec",
                v2(0x21, 0x00, &[]),
                done(ProxyHeader::Local, 16),
            ),
            (
                "v2 proxy unix",
                v2(0x21, 0x31, &[0; 216]),
                done(ProxyHeader::Local, 232),
            ),
            (
                "v2 at the length cap",
                v2(0x21, 0x11, &[0; V2_MAX_LEN]),
                done(proxied("0.0.0.0:0", "0.0.0.0:0"), V2_MAX),
            ),
            ("v2 over the length cap", too_long, Err(E::V2TooLong(0x801))),
            (
                "v2 version 1",
                v2(0x11, 0x11, &v2_tcp4()),
                Err(E::V2Version(1)),
            ),
            (
                "v2 command 2",
                v2(0x22, 0x11, &v2_tcp4()),
                Err(E::V2Command(0x22)),
            ),
            ("v2 udp", v2(0x21, 0x12, &v2_tcp4()), Err(E::V2Family(0x12))),
            (
                "v2 family 4",
                v2(0x21, 0x41, &v2_tcp4()),
                Err(E::V2Family(0x41)),
            ),
            (
                "v2 tcp4 short",
                v2(0x21, 0x11, &[0; 11]),
                Err(E::V2TooShort {
                    family: 0x11,
                    len: 11,
                }),
            ),
            (
                "v2 tcp6 short",
                v2(0x21, 0x21, &v2_tcp4()),
                Err(E::V2TooShort {
                    family: 0x21,
                    len: 12,
                }),
            ),
            (
                "v2 bad signature",
                b"\r\n\r\n\0\r\nQUIT\r\x21\x11\0\0".to_vec(),
                Err(E::NotProxy),
            ),
            ("bare crlf", b"\r\nEHLO".to_vec(), Err(E::NotProxy)),
            ("nothing", vec![], Ok(Parsed::NeedMore)),
            (
                "v2 incomplete",
                v2(0x21, 0x11, &v2_tcp4())[..27].to_vec(),
                Ok(Parsed::NeedMore),
            ),
            (
                "v1 incomplete",
                v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
                Ok(Parsed::NeedMore),
            ),
        ]
    }

    #[test]
    fn table() {
        let wrong: Vec<String> = cases()
            .into_iter()
            .filter_map(|(name, input, want)| {
                let got = parse(&input);
                (got != want).then(|| format!("{name}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// Every prefix of every input either needs more or answers as the whole does, and a
    /// header is complete only once all of its bytes are there.
    #[test]
    fn every_split() {
        for (name, input, want) in cases() {
            for k in 0..input.len() {
                let got = parse(&input[..k]);
                match (&got, &want) {
                    (Ok(Parsed::NeedMore), _) => {}
                    (Ok(Parsed::Done { consumed, .. }), Ok(Parsed::Done { .. })) => {
                        assert_eq!(got, want, "{name}: prefix of {k}");
                        assert!(*consumed <= k, "{name}: prefix of {k}");
                    }
                    _ => assert_eq!(got, want, "{name}: prefix of {k}"),
                }
                if let Ok(Parsed::Done { consumed, .. }) = want {
                    if k < consumed {
                        assert_eq!(got, Ok(Parsed::NeedMore), "{name}: prefix of {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds: Vec<Vec<u8>> = cases().into_iter().map(|(_, i, _)| i).collect();
        for round in 0..20_000 {
            let mut input = seeds[round % seeds.len()].clone();
            for _ in 0..rng.gen_range(0..4) {
                if input.is_empty() {
                    break;
                }
                let at = rng.gen_range(0..input.len());
                input[at] = rng.gen();
            }
            input.truncate(rng.gen_range(0..=input.len()));
            match parse(&input) {
                Ok(Parsed::Done { consumed, .. }) => {
                    assert!(consumed <= input.len() && consumed <= MAX_HEADER);
                }
                Ok(Parsed::NeedMore) => assert!(input.len() < MAX_HEADER),
                Err(_) => {}
            }
        }
    }
}
