//! Identities (docs/interfaces.md "Identities").
//!
//! * [`MessageId`]: SHA-256 of the archived bytes. One blob per distinct content.
//! * [`ArrivalId`]: `NODE/EPOCH/SEQ`, where the message first arrived. Unique forever.
//! * [`ArrivalKey`]: message id + envelope hash + listener: what makes a client's retry
//!   after a lost 250 a *repeat* instead of a new arrival.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::envelope::Envelope;

/// SHA-256 of a message's archived bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub [u8; 32]);

impl MessageId {
    /// Hashes `bytes`: the identity of exactly these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

impl FromStr for MessageId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(IdError::BadMessageId(s.to_owned()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| IdError::BadMessageId(s.to_owned()))?;
        Ok(Self(out))
    }
}

/// `NODE/EPOCH/SEQ`: the node where a message first arrived, the first 8 hex digits of
/// that node's store epoch, and that store's arrival sequence number.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ArrivalId {
    pub node: String,
    /// First 8 hex digits of the origin store's epoch.
    pub epoch: String,
    pub seq: u64,
}

impl fmt::Display for ArrivalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.node, self.epoch, self.seq)
    }
}

impl FromStr for ArrivalId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadArrivalId(s.to_owned());
        let mut parts = s.rsplitn(3, '/');
        let seq = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let epoch = parts.next().ok_or_else(bad)?;
        let node = parts.next().ok_or_else(bad)?;
        if node.is_empty() || epoch.len() != 8 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self {
            node: node.to_owned(),
            epoch: epoch.to_owned(),
            seq,
        })
    }
}

impl serde::Serialize for ArrivalId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ArrivalId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Idempotence key of an arrival where it first lands: SHA-256 over the message id, the
/// envelope hash (MAIL FROM and the *set* of RCPT TO) and the listener name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ArrivalKey(pub [u8; 32]);

impl ArrivalKey {
    pub fn new(message: &MessageId, envelope: &Envelope, listener: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"coffer-arrival-key-v1\0");
        h.update(message.0);
        h.update(envelope.hash());
        h.update((listener.len() as u64).to_le_bytes());
        h.update(listener.as_bytes());
        Self(h.finalize().into())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("not a message id (64 hex digits): {0:?}")]
    BadMessageId(String),
    #[error("not an arrival id (NODE/EPOCH/SEQ): {0:?}")]
    BadArrivalId(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_sha256_hex() {
        let id = MessageId::of(b"abc");
        assert_eq!(
            id.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(id.to_hex().parse::<MessageId>().unwrap(), id);
    }

    #[test]
    fn arrival_id_round_trips_and_rejects_garbage() {
        let a: ArrivalId = "archive-a/0badf00d/42".parse().unwrap();
        assert_eq!(a.node, "archive-a");
        assert_eq!(a.seq, 42);
        assert_eq!(a.to_string(), "archive-a/0badf00d/42");
        for bad in ["", "a/b", "a/0badf00d/x", "/0badf00d/1", "a/0bad/1"] {
            assert!(bad.parse::<ArrivalId>().is_err(), "{bad}");
        }
    }
}
