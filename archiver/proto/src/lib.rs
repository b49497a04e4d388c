//! Wire-level code shared by `cofferd` and `coffer-milter`.
//!
//! This crate must stay small: the milter links it, and the milter must not link the
//! storage engine. It holds what both ends of a Coffer-to-Coffer SMTP/LMTP session agree
//! on, and nothing that does I/O.
//!
//! - [`reply`]: SMTP/LMTP replies as a client reads them, bounded.
//! - [`xcoffer`]: the `XCOFFER=` MAIL parameter (docs/interfaces.md "Wire extensions"):
//!   the metadata standard SMTP cannot carry faithfully, as unpadded base64url JSON.

pub mod reply;
pub mod xcoffer;

pub use xcoffer::{decode, encode, node_name_problem, TlsInfo, Xcoffer, XcofferError};
