//! What a key left out of `coffer.toml` means. Each value says its unit and why.

use std::time::Duration;

use super::model::OnFailure;

/// The file read when neither `--config` nor `$COFFER_CONFIG` names one, if it exists.
/// A build can move it by setting `COFFER_DEFAULT_CONFIG` at compile time (e.g. for a
/// distribution that keeps configs under `/usr/local/etc`).
pub const CONFIG_PATH: &str = match option_env!("COFFER_DEFAULT_CONFIG") {
    Some(path) => path,
    None => "/etc/coffer/coffer.toml",
};

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "COFFER_CONFIG";

/// `[node] data_dir`: the FHS place for a service's state, and what the packaged unit's
/// `StateDirectory=coffer` creates.
pub const DATA_DIR: &str = "/var/lib/coffer";

/// `[node] name` when there is no host name to fall back on (the embedded default only;
/// a file must then name the node).
pub const FALLBACK_NODE_NAME: &str = "coffer";

/// `[store] max_pending`, bytes (256 MiB): accepted-but-not-yet-committed data held in
/// memory; above it listeners answer 451. Bounds RSS while a slow disk catches up.
pub const MAX_PENDING: u64 = 256 << 20;

/// `[store] min_free_disk`, bytes (1 GiB): below it listeners answer 452 and the milter
/// tempfails, leaving room for the index commit and compaction to finish. 0 disables it.
pub const MIN_FREE_DISK: u64 = 1 << 30;

/// `[store] segment_size`, bytes (64 MiB): a segment is sealed at this size. Small enough
/// that recompressing one is quick, large enough to keep the file count low.
pub const SEGMENT_SIZE: u64 = 64 << 20;

/// `[store] block_size`, bytes (4 MiB): sealed segments are recompressed in blocks of
/// this size; measured 0.17 stored/raw at level 19 against 0.19 for 1 MiB (design §3).
pub const BLOCK_SIZE: u64 = 4 << 20;

/// `[store] block_level`, a zstd level (1–22): mail is written once and read rarely, so
/// sealed blocks get the slow, strong level.
pub const BLOCK_LEVEL: i32 = 19;

/// The highest zstd level `block_level` may name.
pub const MAX_BLOCK_LEVEL: i32 = 22;

/// `[store] dictionary`: a dictionary trained on the archive's own mail takes small
/// messages from 0.41 to 0.28 stored/raw (design §3).
pub const DICTIONARY: bool = true;

/// `[[listener]] protocol` when left out.
pub const PROTOCOL: super::model::Protocol = super::model::Protocol::Smtp;

/// `[[listener]] max_message_size`, bytes (50 MiB): journal reports wrap the original
/// message, so they run larger than the usual 25–35 MB organisation limits.
pub const MAX_MESSAGE_SIZE: u64 = 50 << 20;

/// `[[listener]] max_recipients`, per message: Postfix's `smtpd_recipient_limit`
/// default, so the LMTP listener takes every recipient the milter can hand over.
pub const MAX_RECIPIENTS: usize = 1000;

/// `[[listener]] max_connections`, concurrent sessions per listener: above Postfix's 100
/// smtpd processes plus cleanup, and small enough to bound memory.
pub const MAX_CONNECTIONS: usize = 512;

/// `[[listener]] idle_timeout` (300 s): RFC 5321 §4.5.3.2.7's five-minute server timeout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// `[[listener]] allow` when empty on a TCP listener: loopback only, so a listener never
/// opens to the network by omission. Ignored on `unix:` listeners (file modes guard them).
pub const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// The largest `socket_mode`: permission and special bits only.
pub const MAX_SOCKET_MODE: u32 = 0o7777;

/// `[[connection]] max_retries`: 0 retries forever. The queue is the log, so waiting
/// costs lag, never a second copy.
pub const MAX_RETRIES: u32 = 0;

/// `[[connection]] queue_limit`, arrivals: unsent arrivals above this raise the lag
/// alarm (never a drop).
pub const QUEUE_LIMIT: u64 = 100_000;

/// `[[connection]] sessions`, parallel SMTP sessions to the peer. Each session waits for
/// the peer's durable 250 (one group commit there) before its next message, so shipping
/// runs at about `sessions` messages per commit cycle of the peer. With 4, a pair kept
/// half its ingest rate only while the peer's fsync stayed near 1 ms; 32 holds the lag
/// under a second at half load with 6 ms fsyncs and catches up faster than 20 ingest
/// clients fill the peer (bench/replication.sh). An idle connection keeps one session;
/// the bytes held by shipping tasks are capped (64 MiB) whatever this is.
pub const SESSIONS: usize = 32;

/// `[[connection]] probe_interval` (5 s): how often a down peer is tried; catch-up starts
/// within this after it returns.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// `[milter] on_failure`: fail closed. Postfix keeps the mail and retries, so nothing
/// passes unarchived.
pub const MILTER_ON_FAILURE: OnFailure = OnFailure::Tempfail;

/// `[milter] timeout` (120 s): how long end-of-message waits for cofferd's durable 250,
/// well inside Postfix's `milter_content_timeout` (300 s).
pub const MILTER_TIMEOUT: Duration = Duration::from_secs(120);

/// `[milter] max_connections`: Postfix can run 100 smtpd per service plus cleanup;
/// indymilter's own default of 100 is too low (design §5).
pub const MILTER_MAX_CONNECTIONS: usize = 256;

/// `[milter] add_header`: the delivered copy is left untouched unless asked.
pub const MILTER_ADD_HEADER: bool = false;

/// `[milter] listen` and `target` file names inside `data_dir` when left out.
pub const MILTER_SOCKET: &str = "milter.sock";

/// The LMTP socket the milter hands off to, inside `data_dir`, when no trusted unix:
/// LMTP listener is configured.
pub const LMTP_SOCKET: &str = "lmtp.sock";

/// `[console] bind` when the section is present without it: loopback, so the HTTP API
/// and metrics are not exposed by omission.
pub const CONSOLE_BIND: &str = "127.0.0.1:8093";

/// The listener name `coffer import` records; no configured listener may take it, or
/// imported and received arrivals would share arrival keys.
pub const IMPORT_LISTENER: &str = "import";
