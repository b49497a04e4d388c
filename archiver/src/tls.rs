//! TLS with rustls (the `ring` provider): STARTTLS on listeners, STARTTLS to peers on
//! connections (docs/interfaces.md "TLS").
//!
//! - [`server_config`]: a listener's `tls = { cert, key, required, require_client_cert,
//!   client_ca }` → a rustls server configuration. With `client_ca`, a client certificate
//!   must chain to it (`WebPkiClientVerifier`); without `require_client_cert` a client may
//!   also present none.
//! - [`client_config`]: a connection's `tls = { ca, cert, key }` → a rustls client
//!   configuration that trusts `ca` only and presents `cert` when it is set. The peer's
//!   certificate is checked against the connection's `peer` name (a DNS SAN), never the
//!   target address ([`server_name`]).
//! - [`check_files`]: every TLS file of a configuration loaded once, for
//!   `cofferd check-config` and the daemon's start: each error names the section, the key
//!   and the file.
//! - [`session_info`]: the TLS facts recorded with an arrival (version, cipher, the
//!   client certificate's subject and issuer).
//!
//! Files are PEM: certificates (`CERTIFICATE`, the leaf first, then intermediates), a
//! private key (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`), CA bundles (one or
//! more `CERTIFICATE`s). Loading never holds more than the file's size.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use coffer_proto::TlsInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{BindAddr, Config, ConnectionTls, ListenerTls};

/// Largest TLS file read, in bytes: PEM files are a few KiB; a CA bundle may be larger.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// A TLS file that could not be used, named by its configuration key (`tls.cert`,
/// `tls.key`, `tls.client_ca`, `tls.ca`) and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFileError {
    pub key: &'static str,
    pub path: PathBuf,
    pub why: String,
}

impl fmt::Display for TlsFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}: {}", self.key, self.path.display(), self.why)
    }
}

impl std::error::Error for TlsFileError {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let fail = |why: String| TlsFileError {
        key,
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE {
        return Err(fail(format!(
            "{} bytes; a PEM file of at most {MAX_FILE} bytes is expected",
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))
}

/// The certificates of a PEM file, in order.
fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(key, path)?;
    let fail = |why: String| TlsFileError {
        key,
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(fail(
            "no PEM certificate (BEGIN CERTIFICATE) in the file".into(),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file.
fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsFileError {
        key,
        path: path.to_owned(),
        why: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (BEGIN PRIVATE KEY) in the file".into()
            }
            e => format!("not a PEM private key: {e}"),
        },
    })
}

/// A trust store holding the certificates of a PEM CA file.
fn roots(key: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsFileError> {
    let mut store = RootCertStore::empty();
    for cert in certs(key, path)? {
        store.add(cert).map_err(|e| TlsFileError {
            key,
            path: path.to_owned(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

/// A listener's TLS server configuration, read from its files now.
///
/// # Errors
/// A file cannot be read or used, or the key does not belong to the certificate.
pub fn server_config(t: &ListenerTls) -> Result<Arc<ServerConfig>, TlsFileError> {
    let chain = certs("tls.cert", &t.cert)?;
    let key = private_key("tls.key", &t.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError {
            key: "tls",
            path: t.cert.clone(),
            why: e.to_string(),
        })?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let roots = roots("tls.client_ca", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if t.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsFileError {
                key: "tls.client_ca",
                path: ca.clone(),
                why: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsFileError {
            key: "tls.key",
            path: t.key.clone(),
            why: format!("does not go with `tls.cert` {}: {e}", t.cert.display()),
        })?;
    Ok(Arc::new(config))
}

/// A connection's TLS client configuration, read from its files now: trusts `ca` only,
/// presents `cert` when set.
///
/// # Errors
/// A file cannot be read or used, `ca` is missing, or the key does not belong to the
/// certificate.
pub fn client_config(t: &ConnectionTls) -> Result<Arc<ClientConfig>, TlsFileError> {
    let Some(ca) = &t.ca else {
        return Err(TlsFileError {
            key: "tls.ca",
            path: PathBuf::new(),
            why: "not set: the CA that signs the peers' certificates is needed".into(),
        });
    };
    let roots = roots("tls.ca", ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError {
            key: "tls",
            path: ca.clone(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let chain = certs("tls.cert", cert)?;
            let der = private_key("tls.key", key)?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| TlsFileError {
                    key: "tls.key",
                    path: key.clone(),
                    why: format!("does not go with `tls.cert` {}: {e}", cert.display()),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name a peer's certificate must carry (a DNS SAN): the connection's `peer`.
///
/// # Errors
/// `peer` is not a DNS name.
pub fn server_name(peer: &str) -> Result<ServerName<'static>, String> {
    match ServerName::try_from(peer.to_owned()) {
        Ok(name @ ServerName::DnsName(_)) => Ok(name),
        _ => Err(format!(
            "peer `{peer}` is not a DNS name, so no certificate can name it"
        )),
    }
}

/// Loads every TLS file `config` names, as the daemon will: one line per problem, naming
/// the listener or connection, the key and the file. Unix listeners are skipped (TLS is
/// ignored there, with a warning from `check`).
pub fn check_files(config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    for l in &config.listeners {
        if let (Some(t), BindAddr::Tcp(_)) = (&l.tls, &l.bind) {
            if let Err(e) = server_config(t) {
                errors.push(format!("listener `{}`: {e}", l.name));
            }
        }
    }
    for c in &config.connections {
        if let Some(t) = &c.tls {
            if let Err(e) = client_config(t) {
                errors.push(format!("connection `{}`: {e}", c.name));
            }
        }
    }
    errors
}

/// A TLS configuration that a reload can replace while sessions read it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shared<T>(Arc<RwLock<Arc<T>>>);

impl<T> Shared<T> {
    pub fn new(value: Arc<T>) -> Self {
        Shared(Arc::new(RwLock::new(value)))
    }

    pub fn get(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, value: Arc<T>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }
}

/// The TLS facts of an established connection, as recorded with an arrival: protocol
/// version (`TLSv1.3`), cipher suite, its key bits, and the peer certificate's subject and
/// issuer (RFC 4514 strings) when one was presented — verified, since a listener only
/// accepts certificates that chain to its `client_ca`.
pub fn session_info(conn: &rustls::CommonState) -> TlsInfo {
    let version = conn.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        v => format!("{v:?}"),
    });
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()));
    let bits = cipher.as_deref().and_then(cipher_bits);
    let peer = conn.peer_certificates().and_then(|c| c.first());
    let names = peer.and_then(|c| x509_names(c.as_ref()));
    TlsInfo {
        version,
        cipher,
        bits,
        peer_subject: names.as_ref().map(|(s, _)| s.clone()),
        peer_issuer: names.map(|(_, i)| i),
        peer_verified: peer.map(|_| true),
    }
}

/// The symmetric key bits of a cipher suite, from its name.
fn cipher_bits(suite: &str) -> Option<u32> {
    if suite.contains("AES_128") {
        Some(128)
    } else if suite.contains("AES_256") || suite.contains("CHACHA20") {
        Some(256)
    } else {
        None
    }
}

/// One DER element at a time: `(tag, contents)`. Definite lengths of up to 4 bytes only;
/// `None` on anything malformed.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, value))
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

/// The subject and issuer of a DER X.509 certificate, as RFC 4514 strings
/// (`CN=archive-b,O=Example`). `None` when the certificate does not parse that far.
pub fn x509_names(der: &[u8]) -> Option<(String, String)> {
    let (tag, cert) = Der(der).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs) = Der(cert).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut tbs = Der(tbs);
    // [0] version (optional), serial number, signature algorithm, issuer, validity, subject.
    if tbs.next()?.0 == 0xa0 {
        let _serial = tbs.next()?;
    }
    let _signature = tbs.next()?;
    let (tag, issuer) = tbs.next()?;
    if tag != SEQUENCE {
        return None;
    }
    let _validity = tbs.next()?;
    let (tag, subject) = tbs.next()?;
    if tag != SEQUENCE {
        return None;
    }
    Some((rfc4514(subject)?, rfc4514(issuer)?))
}

/// An X.501 Name (the contents of its SEQUENCE) as RFC 4514 text: the last RDN first.
fn rfc4514(name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    let mut name = Der(name);
    while !name.0.is_empty() {
        let (tag, set) = name.next()?;
        if tag != SET {
            return None;
        }
        let mut attrs = Vec::new();
        let mut set = Der(set);
        while !set.0.is_empty() {
            let (tag, atv) = set.next()?;
            if tag != SEQUENCE {
                return None;
            }
            let mut atv = Der(atv);
            let (tag, oid) = atv.next()?;
            if tag != 0x06 {
                return None;
            }
            let (vtag, value) = atv.next()?;
            attrs.push(format!(
                "{}={}",
                attribute_name(oid),
                attribute_value(vtag, value)
            ));
        }
        rdns.push(attrs.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        _ => dotted(oid).unwrap_or_else(|| format!("#{}", hex::encode(oid))),
    }
}

/// An OBJECT IDENTIFIER's contents in dotted form.
fn dotted(oid: &[u8]) -> Option<String> {
    let mut parts: Vec<u64> = Vec::new();
    let mut n: u64 = 0;
    for &b in oid {
        n = n.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (n / 40).min(2);
                parts.push(first);
                parts.push(n - first * 40);
            } else {
                parts.push(n);
            }
            n = 0;
        }
    }
    if parts.is_empty() || oid.last().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    Some(
        parts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// A directory string as RFC 4514 text; anything it cannot decode as `#` and hex of the
/// whole element.
fn attribute_value(tag: u8, value: &[u8]) -> String {
    let text = match tag {
        // UTF8String, PrintableString, IA5String, VisibleString
        0x0c | 0x13 | 0x16 | 0x1a => std::str::from_utf8(value).ok().map(str::to_owned),
        // TeletexString: taken as Latin-1
        0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UTF-16BE
        0x1e if value.len().is_multiple_of(2) => {
            let units = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    };
    match text {
        Some(t) => escape_value(&t),
        None => {
            let mut der = vec![tag];
            // Short form only matters for display; long values are shown by contents.
            if let Ok(len) = u8::try_from(value.len()) {
                if len < 0x80 {
                    der.push(len);
                }
            }
            der.extend_from_slice(value);
            format!("#{}", hex::encode(der))
        }
    }
}

/// RFC 4514 §2.4 escaping, plus control characters as `\XX`.
fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Throwaway certificates for tests: a CA, and leaves it signs.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };

    pub struct TestCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl TestCa {
        pub fn new(name: &str) -> TestCa {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap());
            TestCa {
                issuer: issuer.unwrap(),
            }
        }

        pub fn pem(&self) -> String {
            self.issuer.pem()
        }

        /// A leaf for `dns` (SAN and CN), for servers and clients: (cert PEM, key PEM).
        pub fn leaf(&self, dns: &str) -> (String, String) {
            let mut params = CertificateParams::new(vec![dns.to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, dns);
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Coffer, tests");
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        /// A rustls server configuration for `dns`; with `clients`, client certificates
        /// from that CA are verified (and required when `require`).
        pub fn server(
            &self,
            dns: &str,
            clients: Option<&TestCa>,
            require: bool,
        ) -> std::sync::Arc<rustls::ServerConfig> {
            let dir = tempfile::tempdir().unwrap();
            let (_, cert, key) = self.write(dir.path(), "server", dns);
            let client_ca = clients.map(|ca| {
                let path = dir.path().join("clients.pem");
                std::fs::write(&path, ca.pem()).unwrap();
                path
            });
            super::server_config(&crate::config::ListenerTls {
                cert,
                key,
                required: false,
                require_client_cert: require,
                client_ca,
            })
            .unwrap()
        }

        /// A rustls client configuration trusting this CA; presents a certificate for
        /// `client` signed by `signer` when given.
        pub fn client(
            &self,
            client: Option<(&TestCa, &str)>,
        ) -> std::sync::Arc<rustls::ClientConfig> {
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("trusted.pem");
            std::fs::write(&ca, self.pem()).unwrap();
            let (cert, key) = match client {
                Some((signer, name)) => {
                    let (_, cert, key) = signer.write(dir.path(), "client", name);
                    (Some(cert), Some(key))
                }
                None => (None, None),
            };
            super::client_config(&crate::config::ConnectionTls {
                ca: Some(ca),
                cert,
                key,
            })
            .unwrap()
        }

        /// Writes `ca.pem`, `<name>.crt` and `<name>.key` for `dns` into `dir`; returns
        /// (ca, cert, key) paths.
        pub fn write(&self, dir: &Path, name: &str, dns: &str) -> (PathBuf, PathBuf, PathBuf) {
            let (cert, key) = self.leaf(dns);
            let ca_path = dir.join("ca.pem");
            std::fs::write(&ca_path, self.pem()).unwrap();
            let cert_path = dir.join(format!("{name}.crt"));
            let key_path = dir.join(format!("{name}.key"));
            std::fs::write(&cert_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            (ca_path, cert_path, key_path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestCa;
    use super::*;

    fn listener_tls(dir: &Path, ca: &TestCa) -> ListenerTls {
        let (ca_path, cert, key) = ca.write(dir, "server", "archive-b");
        ListenerTls {
            cert,
            key,
            required: true,
            require_client_cert: true,
            client_ca: Some(ca_path),
        }
    }

    #[test]
    fn loads_good_files_and_names_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Test CA");
        let good = listener_tls(dir.path(), &ca);
        server_config(&good).unwrap();
        client_config(&ConnectionTls {
            ca: good.client_ca.clone(),
            cert: Some(good.cert.clone()),
            key: Some(good.key.clone()),
        })
        .unwrap();

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let other = tempfile::tempdir().unwrap();
        let (_, other_cert, _) = ca.write(other.path(), "o", "o");
        let cases: Vec<(ListenerTls, &str, &str)> = vec![
            (
                ListenerTls {
                    cert: missing.clone(),
                    ..good.clone()
                },
                "`tls.cert`",
                "cannot read",
            ),
            (
                ListenerTls {
                    cert: garbage.clone(),
                    ..good.clone()
                },
                "`tls.cert`",
                "no PEM certificate",
            ),
            (
                ListenerTls {
                    key: garbage.clone(),
                    ..good.clone()
                },
                "`tls.key`",
                "no PEM private key",
            ),
            (
                ListenerTls {
                    key: good.cert.clone(),
                    ..good.clone()
                },
                "`tls.key`",
                "private key",
            ),
            (
                ListenerTls {
                    cert: other_cert,
                    ..good.clone()
                },
                "`tls.key`",
                "does not go with",
            ),
            (
                ListenerTls {
                    client_ca: Some(garbage.clone()),
                    ..good.clone()
                },
                "`tls.client_ca`",
                "no PEM certificate",
            ),
        ];
        for (t, key, why) in cases {
            let e = server_config(&t).unwrap_err().to_string();
            assert!(e.starts_with(key) && e.contains(why), "{e}");
        }
        let e = client_config(&ConnectionTls {
            ca: Some(missing.clone()),
            cert: None,
            key: None,
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("`tls.ca`") && e.contains("missing.pem"),
            "{e}"
        );
    }

    #[test]
    fn peer_names_must_be_dns_names() {
        assert!(server_name("archive-b").is_ok());
        assert!(server_name("b").is_ok());
        assert!(server_name("10.0.0.1").is_err());
        assert!(server_name("a_b!").is_err());
    }

    #[test]
    fn subject_and_issuer_of_a_certificate() {
        let ca = TestCa::new("Test CA");
        let (pem, _) = ca.leaf("archive-b");
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (subject, issuer) = x509_names(der.as_ref()).unwrap();
        assert_eq!(subject, "O=Coffer\\, tests,CN=archive-b");
        assert_eq!(issuer, "CN=Test CA");
        // Truncated or foreign input never panics.
        for n in 0..der.len() {
            let _ = x509_names(&der[..n]);
        }
        assert_eq!(x509_names(b"\x30\x84\xff\xff\xff\xff"), None);
    }

    #[test]
    fn rfc4514_details() {
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]).unwrap(),
            "1.2.840.113549"
        );
        assert_eq!(escape_value(" #a+b "), "\\ #a\\+b\\ ");
        assert_eq!(escape_value("#x"), "\\#x");
        assert_eq!(attribute_value(0x1e, &[0, b'h', 0, b'i']), "hi");
        assert_eq!(attribute_value(0x04, &[1, 2]), "#04020102");
        assert_eq!(cipher_bits("TLS13_AES_256_GCM_SHA384"), Some(256));
        assert_eq!(cipher_bits("TLS13_AES_128_GCM_SHA256"), Some(128));
        assert_eq!(cipher_bits("TLS13_CHACHA20_POLY1305_SHA256"), Some(256));
    }
}
