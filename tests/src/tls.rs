//! Throwaway certificates for TLS tests (rcgen), and a blocking STARTTLS client.
//!
//! [`Ca::new`] makes a CA and writes its certificate as `<name>-ca.pem`; [`Ca::issue`]
//! writes a leaf certificate and key for one DNS name (SAN and CN), usable by servers and
//! clients alike, the way docs/replication.md "TLS" makes them with openssl.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority whose certificate is in a PEM file.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM).
    pub path: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    ///
    /// # Panics
    /// Key generation or writing failed.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, issuer.pem()).expect("write the CA certificate");
        Ca { issuer, path }
    }

    /// Writes `dir/<stem>.crt` and `dir/<stem>.key`, a certificate for `dns` signed by this
    /// CA (replacing files already there); returns their paths.
    ///
    /// # Panics
    /// Key generation, signing or writing failed.
    pub fn issue(&self, dir: &Path, stem: &str, dns: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, dns);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (crt, key_path) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&crt, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        (crt, key_path)
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A blocking SMTP session that went to TLS with STARTTLS.
pub struct TlsSmtp {
    stream: BufReader<Tls>,
}

/// Reads one reply from `r` a byte at a time (nothing past it is consumed).
fn raw_reply(r: &mut impl Read) -> anyhow::Result<String> {
    let mut all = Vec::new();
    let mut line_start = 0;
    loop {
        let mut b = [0u8; 1];
        if r.read(&mut b)? == 0 {
            bail!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&all)
            );
        }
        all.push(b[0]);
        if b[0] == b'\n' {
            if all.get(line_start + 3) != Some(&b'-') {
                return Ok(String::from_utf8_lossy(&all).into_owned());
            }
            line_start = all.len();
        }
        if all.len() > 64 * 1024 {
            bail!("reply too long");
        }
    }
}

impl TlsSmtp {
    /// Connects to `addr`, sends EHLO, then `STARTTLS` followed in the same write by
    /// `smuggled` (bytes an attacker appended in the clear), expects `220`, and completes
    /// the handshake trusting `ca` for `name`, presenting `client` (cert, key) if given.
    ///
    /// # Errors
    /// Any step failed; a refused client certificate may only show on the first
    /// [`TlsSmtp::command`].
    pub fn connect(
        addr: SocketAddr,
        ca: &Path,
        name: &str,
        client: Option<(&Path, &Path)>,
        smuggled: &[u8],
    ) -> anyhow::Result<TlsSmtp> {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        let greeting = raw_reply(&mut tcp)?;
        if !greeting.starts_with("220 ") {
            bail!("greeting: {greeting}");
        }
        tcp.write_all(b"EHLO e2e.test\r\n")?;
        let ehlo = raw_reply(&mut tcp)?;
        if !ehlo.contains("STARTTLS") {
            bail!("STARTTLS not offered: {ehlo}");
        }
        let mut line = b"STARTTLS\r\n".to_vec();
        line.extend_from_slice(smuggled);
        tcp.write_all(&line)?;
        let r = raw_reply(&mut tcp)?;
        if !r.starts_with("220 ") {
            bail!("STARTTLS: {r}");
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).context("CA file")? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder.with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?,
                PrivateKeyDer::from_pem_file(key)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(name.to_owned())?,
        )?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .context("TLS handshake")?;
        }
        Ok(TlsSmtp {
            stream: BufReader::new(tls),
        })
    }

    /// Sends one command line and returns the whole reply.
    ///
    /// # Errors
    /// I/O, TLS, or the connection closed.
    pub fn command(&mut self, line: &str) -> anyhow::Result<String> {
        let s = self.stream.get_mut();
        s.write_all(format!("{line}\r\n").as_bytes())?;
        s.flush()?;
        let mut all = String::new();
        loop {
            let mut l = String::new();
            if self.stream.read_line(&mut l)? == 0 {
                bail!("connection closed after {all:?}");
            }
            all.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
        }
    }
}
