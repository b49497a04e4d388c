//! The envelope and session facts of one arrival: the evidence (design.md §2.3).
//!
//! Everything here is recorded as it was seen on the wire; nothing is normalised.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// MAIL FROM and every RCPT TO, with their parameters, exactly as the client sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The reverse path without the angle brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// MAIL FROM parameters as sent (`SIZE=1234`, `BODY=8BITMIME`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mail_params: Vec<String>,
    /// Forward paths without angle brackets, in the order they were accepted.
    pub rcpt_to: Vec<String>,
}

impl Envelope {
    /// Hash of MAIL FROM and the *set* of RCPT TO (order and duplicates do not matter):
    /// the envelope part of an arrival key.
    pub fn hash(&self) -> [u8; 32] {
        let mut rcpts: Vec<&str> = self.rcpt_to.iter().map(String::as_str).collect();
        rcpts.sort_unstable();
        rcpts.dedup();
        let mut h = Sha256::new();
        h.update((self.mail_from.len() as u64).to_le_bytes());
        h.update(self.mail_from.as_bytes());
        for r in rcpts {
            h.update((r.len() as u64).to_le_bytes());
            h.update(r.as_bytes());
        }
        h.finalize().into()
    }
}

/// What the SMTP/LMTP session showed about the client, recorded with each arrival.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Name of the listener that took the message (`journal`, `milter`, `ha`, ...).
    pub listener: String,
    /// `SMTP`, `ESMTP` or `LMTP`, as the session negotiated it.
    pub protocol: String,
    /// The client's address (`IP:PORT`), or `unix` for a Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The raw HELO/EHLO/LHLO argument.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    /// The MTA's queue id, where a client told us (the milter does, through XCOFFER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// What a trusted Coffer client sent in `XCOFFER=` (docs/interfaces.md "Wire
    /// extensions"): the origin's facts. `client_addr` and `helo` above stay what this
    /// session saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xcoffer: Option<coffer_proto::Xcoffer>,
    /// The session's TLS (STARTTLS on this listener): version, cipher, the client
    /// certificate's subject and issuer. `None` in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<coffer_proto::TlsInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_hash_ignores_recipient_order_and_duplicates() {
        let a = Envelope {
            mail_from: "a@x".into(),
            mail_params: vec![],
            rcpt_to: vec!["b@y".into(), "c@z".into()],
        };
        let mut b = a.clone();
        b.rcpt_to = vec!["c@z".into(), "b@y".into(), "b@y".into()];
        assert_eq!(a.hash(), b.hash());
        b.rcpt_to.push("d@w".into());
        assert_ne!(a.hash(), b.hash());
        let mut c = a.clone();
        c.mail_from = "A@x".into();
        assert_ne!(a.hash(), c.hash());
    }
}
