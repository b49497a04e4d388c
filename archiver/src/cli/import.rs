//! `coffer import --format mbox|maildir|eml PATH`: archive mail from files, as arrivals
//! on a listener named `import`.
//!
//! Each message becomes an [`Incoming`] with
//!
//! * the envelope: MAIL FROM = the sender of the mbox `From ` line (empty for
//!   `MAILER-DAEMON`, and for maildir and eml, which carry no envelope), no recipients;
//! * the session: listener `import`, protocol `import`, no client address or HELO, and
//!   the **source position** as the queue id: `mbox:/abs/path#OFFSET` (offset of the
//!   `From ` line), `maildir:/abs/path/cur/NAME`, `eml:/abs/path/NAME.eml`.
//!
//! Idempotence comes from the store's arrival key (message id + envelope + listener):
//! importing the same message again, from the same file or from any other copy of it
//! (a moved or renamed file, a maildir file whose flags changed, an overlapping export)
//! adds no arrival and is counted as a repeat. The source position is provenance, not
//! identity: it records where the arrival was read from, and a byte-identical second
//! copy with the same envelope sender is a repeat of the first, whose position the
//! arrival keeps. A different envelope sender (mbox) makes a new arrival of the same
//! message, as it would over SMTP.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use super::error::CliError;
use super::mbox::MboxReader;
use super::ImportFormat;
use crate::envelope::{Envelope, SessionInfo};
use crate::store::record::MAX_PAYLOAD;
use crate::store::{Incoming, IngestError, Receipt, StoreHandle};

/// The listener (and protocol) name imported arrivals carry.
pub const IMPORT_LISTENER: &str = "import";
/// Most messages handed to the store and not yet answered.
const WINDOW: usize = 256;

/// One message read from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Where it was read from (the arrival's queue id).
    pub position: String,
    /// Envelope sender, empty when the source has none.
    pub sender: String,
    pub bytes: Vec<u8>,
}

impl Item {
    /// The arrival this item is handed to the store as.
    pub fn incoming(self) -> Incoming {
        Incoming {
            bytes: self.bytes,
            envelope: Envelope {
                mail_from: self.sender,
                mail_params: Vec::new(),
                rcpt_to: Vec::new(),
            },
            session: SessionInfo {
                listener: IMPORT_LISTENER.into(),
                protocol: IMPORT_LISTENER.into(),
                client_addr: None,
                helo: None,
                queue_id: Some(self.position),
                xcoffer: None,
                tls: None,
            },
        }
    }
}

enum Kind {
    Mbox {
        reader: MboxReader<BufReader<File>>,
        path: PathBuf,
    },
    Files {
        scheme: &'static str,
        files: VecDeque<(PathBuf, u64)>,
    },
}

/// The messages of an mbox file, a maildir, or a folder of `.eml` files, in order.
pub struct Source {
    kind: Kind,
    total_bytes: u64,
    done_bytes: u64,
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> CliError + '_ {
    move |source| CliError::File {
        path: path.to_owned(),
        source,
    }
}

/// Regular files in `dir` (not hidden) whose name passes `keep`, sorted by name.
fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<(PathBuf, u64)>, CliError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(file_err(dir))? {
        let entry = entry.map_err(file_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !keep(&name) {
            continue;
        }
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(file_err(&path))?;
        if meta.is_file() {
            out.push((path, meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

impl Source {
    /// Opens `path` as `format`.
    ///
    /// # Errors
    /// The path is missing or not what the format needs (a usage error), or unreadable.
    pub fn open(format: ImportFormat, path: &Path) -> Result<Source, CliError> {
        let abs = fs::canonicalize(path).map_err(file_err(path))?;
        let meta = fs::metadata(&abs).map_err(file_err(&abs))?;
        let kind = match format {
            ImportFormat::Mbox => {
                if !meta.is_file() {
                    return Err(CliError::Usage(format!(
                        "{}: an mbox import needs a file",
                        path.display()
                    )));
                }
                let f = File::open(&abs).map_err(file_err(&abs))?;
                Kind::Mbox {
                    reader: MboxReader::new(BufReader::with_capacity(1 << 20, f)),
                    path: abs,
                }
            }
            ImportFormat::Maildir => {
                let (cur, new) = (abs.join("cur"), abs.join("new"));
                if !meta.is_dir() || !(cur.is_dir() || new.is_dir()) {
                    return Err(CliError::Usage(format!(
                        "{}: not a maildir (no cur/ or new/ folder)",
                        path.display()
                    )));
                }
                let mut files = Vec::new();
                for d in [cur, new] {
                    if d.is_dir() {
                        files.extend(files_in(&d, |_| true)?);
                    }
                }
                Kind::Files {
                    scheme: "maildir",
                    files: files.into(),
                }
            }
            ImportFormat::Eml => {
                let files = if meta.is_file() {
                    vec![(abs, meta.len())]
                } else {
                    files_in(&abs, |n| {
                        Path::new(n)
                            .extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("eml"))
                    })?
                };
                Kind::Files {
                    scheme: "eml",
                    files: files.into(),
                }
            }
        };
        let total_bytes = match &kind {
            Kind::Mbox { .. } => meta.len(),
            Kind::Files { files, .. } => files.iter().map(|(_, n)| n).sum(),
        };
        Ok(Source {
            kind,
            total_bytes,
            done_bytes: 0,
        })
    }

    /// Bytes of the source in all (for progress).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes of the source read so far.
    pub fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    /// The next message, or `None` at the end.
    ///
    /// # Errors
    /// A file could not be read, or the mbox is not one.
    pub fn next_item(&mut self) -> Result<Option<Item>, CliError> {
        match &mut self.kind {
            Kind::Mbox { reader, path } => {
                let m = reader.next_message().map_err(file_err(path))?;
                self.done_bytes = reader.position();
                Ok(m.map(|m| Item {
                    position: format!("mbox:{}#{}", path.display(), m.offset),
                    sender: m.sender,
                    bytes: m.bytes,
                }))
            }
            Kind::Files { scheme, files } => {
                let Some((path, len)) = files.pop_front() else {
                    return Ok(None);
                };
                let bytes = fs::read(&path).map_err(file_err(&path))?;
                self.done_bytes += len;
                Ok(Some(Item {
                    position: format!("{scheme}:{}", path.display()),
                    sender: String::new(),
                    bytes,
                }))
            }
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Messages read from the source.
    pub read: u64,
    /// New arrivals stored.
    pub new: u64,
    /// Messages already archived with this envelope on `import` (an earlier import).
    pub repeats: u64,
    /// Positions of messages too big for the store (over 1 GiB), not imported.
    pub too_big: Vec<String>,
}

impl ImportSummary {
    pub fn line(&self, path: &Path) -> String {
        let mut s = format!(
            "read {} message(s) from {}: {} new arrival(s), {} already archived",
            self.read,
            path.display(),
            self.new,
            self.repeats
        );
        if !self.too_big.is_empty() {
            s.push_str(&format!(
                "; {} skipped as larger than 1 GiB: {}",
                self.too_big.len(),
                self.too_big.join(", ")
            ));
        }
        s
    }
}

/// Hands every message of `source` to the store, at most `budget` bytes (and 256
/// messages) waiting at a time so the writer group-commits them, in source order.
/// `progress(done_bytes, total_bytes)` is called as it goes.
///
/// # Errors
/// The source could not be read, or the store refused a message (it keeps everything
/// acknowledged before; a rerun carries on, as repeats are free).
pub fn import(
    store: &StoreHandle,
    source: &mut Source,
    budget: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportSummary, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the import runtime: {e}")))?;
    let budget = budget.max(1);
    rt.block_on(async {
        type Pending = (
            tokio::task::JoinHandle<Result<Receipt, IngestError>>,
            u64,
            String,
        );
        let mut summary = ImportSummary::default();
        let mut inflight: VecDeque<Pending> = VecDeque::new();
        let mut inflight_bytes = 0u64;
        let total = source.total_bytes();
        progress(0, total);
        loop {
            let item = source.next_item()?;
            let Some(item) = item else { break };
            summary.read += 1;
            if item.bytes.len() as u64 > u64::from(MAX_PAYLOAD) {
                summary.too_big.push(item.position);
                continue;
            }
            let len = item.bytes.len() as u64;
            while !inflight.is_empty()
                && (inflight.len() >= WINDOW || inflight_bytes + len > budget)
            {
                let (task, n, position) = inflight.pop_front().expect("not empty");
                inflight_bytes -= n;
                settle(task, &position, &mut summary).await?;
                progress(source.done_bytes(), total);
            }
            let position = item.position.clone();
            let h = store.clone();
            let task = tokio::spawn(async move { h.ingest(item.incoming()).await });
            inflight.push_back((task, len, position));
            inflight_bytes += len;
        }
        while let Some((task, _, position)) = inflight.pop_front() {
            settle(task, &position, &mut summary).await?;
        }
        progress(source.done_bytes(), total);
        Ok(summary)
    })
}

async fn settle(
    task: tokio::task::JoinHandle<Result<Receipt, IngestError>>,
    position: &str,
    summary: &mut ImportSummary,
) -> Result<(), CliError> {
    match task.await {
        Ok(Ok(r)) if r.repeat => summary.repeats += 1,
        Ok(Ok(_)) => summary.new += 1,
        Ok(Err(e)) => {
            return Err(CliError::Failed(format!(
                "the store refused {position}: {e}; what was imported before is kept, \
                 and running the import again continues where it stopped"
            )))
        }
        Err(e) => return Err(CliError::Failed(format!("importing {position}: {e}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::export::{export_eml, export_mbox};
    use crate::store::{Query, Store, StoreOptions, StoreReader};
    use std::collections::BTreeSet;

    fn opts(dir: &Path) -> StoreOptions {
        StoreOptions {
            data_dir: dir.to_owned(),
            node: "node-a".into(),
            segment_size: 64 << 20,
            max_pending: 256 << 20,
            min_free_disk: 0,
            ..StoreOptions::default()
        }
    }

    const BODIES: [&[u8]; 5] = [
        b"From: a@x\r\nSubject: one\r\n\r\nFrom the start\r\n>From quoted\r\n",
        b"From: b@x\r\nSubject: two\r\n\r\nno final newline\r\n.\r\n",
        b"Subject: three\n\nbare LF\n\n",
        b"Subject: four\r\n\r\n\xff\x00 binary\r\n",
        b"Subject: five\r\n\r\nFrom \r\n",
    ];

    /// A store with the test messages; the second arrives twice (two senders).
    fn source_store(dir: &Path) {
        let store = Store::open(opts(dir)).unwrap();
        let h = store.handle();
        for (i, b) in BODIES.iter().enumerate() {
            let mut item = Item {
                position: format!("test:{i}"),
                sender: if i == 2 {
                    String::new()
                } else {
                    format!("s{i}@x")
                },
                bytes: b.to_vec(),
            }
            .incoming();
            item.session.listener = "journal".into();
            item.envelope.rcpt_to = vec!["r@y".into()];
            h.ingest_blocking(item).unwrap();
        }
        let mut again = Item {
            position: "test:again".into(),
            sender: "other@x".into(),
            bytes: BODIES[1].to_vec(),
        }
        .incoming();
        again.session.listener = "journal".into();
        h.ingest_blocking(again).unwrap();
        drop(h);
        store.close();
    }

    fn ids(dir: &Path) -> BTreeSet<String> {
        StoreReader::open(dir)
            .unwrap()
            .search(&Query::default())
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    }

    fn run_import(dir: &Path, format: ImportFormat, path: &Path) -> ImportSummary {
        let store = Store::open(opts(dir)).unwrap();
        let mut source = Source::open(format, path).unwrap();
        let mut last = (0, 0);
        let s = import(&store.handle(), &mut source, 1 << 20, &mut |d, t| {
            last = (d, t)
        })
        .unwrap();
        assert_eq!(last.0, last.1, "progress reaches the end");
        store.close();
        s
    }

    #[test]
    fn mbox_export_then_import_gives_the_same_messages() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        source_store(&a);
        let mbox = tmp.path().join("out/all.mbox");
        {
            let reader = StoreReader::open(&a).unwrap();
            let s = export_mbox(&reader, &Query::default(), &mbox, &mut |_, _| {}).unwrap();
            assert_eq!((s.matched, s.damaged.len()), (5, 0));
        }
        assert_eq!(fs::read_dir(tmp.path().join("out")).unwrap().count(), 1);
        let s = run_import(&b, ImportFormat::Mbox, &mbox);
        assert_eq!((s.read, s.new, s.repeats), (5, 5, 0));
        assert_eq!(ids(&a), ids(&b));

        // The arrivals say where they came from; the sender of the first arrival is kept.
        let reader = StoreReader::open(&b).unwrap();
        let abs = fs::canonicalize(&mbox).unwrap();
        for r in reader.search(&Query::default()).unwrap() {
            assert_eq!(r.arrivals.len(), 1);
            let arr = &r.arrivals[0];
            assert_eq!(
                (arr.listener.as_str(), arr.protocol.as_str()),
                ("import", "import")
            );
            assert!(arr.rcpt_to.is_empty() && arr.client_addr.is_none());
            let q = arr.queue_id.as_deref().unwrap();
            let off: usize = q
                .strip_prefix(&format!("mbox:{}#", abs.display()))
                .unwrap()
                .parse()
                .unwrap();
            let file = fs::read(&abs).unwrap();
            let line = file[off..].split(|&b| b == b'\n').next().unwrap();
            let line = String::from_utf8_lossy(line);
            let sender = if arr.mail_from.is_empty() {
                "MAILER-DAEMON"
            } else {
                &arr.mail_from
            };
            assert!(line.starts_with(&format!("From {sender} ")), "{line}");
        }
        drop(reader);

        // Again: nothing new.
        let s = run_import(&b, ImportFormat::Mbox, &mbox);
        assert_eq!((s.read, s.new, s.repeats), (5, 0, 5));
        let st = StoreReader::open(&b).unwrap().status().unwrap();
        assert_eq!((st.messages, st.arrivals, st.repeats), (5, 5, 5));
    }

    #[test]
    fn eml_export_then_import_gives_the_same_messages() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        source_store(&a);
        let out = tmp.path().join("eml");
        {
            let reader = StoreReader::open(&a).unwrap();
            export_eml(&reader, &Query::default(), &out, &mut |_, _| {}).unwrap();
        }
        let s = run_import(&b, ImportFormat::Eml, &out);
        assert_eq!((s.read, s.new, s.repeats), (5, 5, 0));
        assert_eq!(ids(&a), ids(&b));
        let s = run_import(&b, ImportFormat::Eml, &out);
        assert_eq!((s.read, s.new, s.repeats), (5, 0, 5));
        for id in ids(&a) {
            let id = id.parse().unwrap();
            assert_eq!(
                StoreReader::open(&b).unwrap().read_message(&id).unwrap(),
                fs::read(out.join(format!("{id}.eml"))).unwrap()
            );
        }
    }

    #[test]
    fn maildir_reads_cur_and_new_and_ignores_tmp() {
        let tmp = tempfile::tempdir().unwrap();
        let md = tmp.path().join("Maildir");
        for d in ["cur", "new", "tmp"] {
            fs::create_dir_all(md.join(d)).unwrap();
        }
        fs::write(md.join("cur/1.host:2,S"), BODIES[0]).unwrap();
        fs::write(md.join("new/2.host"), BODIES[2]).unwrap();
        fs::write(md.join("tmp/3.host"), BODIES[3]).unwrap();
        fs::write(md.join("cur/.hidden"), BODIES[4]).unwrap();
        let mut src = Source::open(ImportFormat::Maildir, &md).unwrap();
        let abs = fs::canonicalize(&md).unwrap();
        let a = src.next_item().unwrap().unwrap();
        assert_eq!(
            a.position,
            format!("maildir:{}/cur/1.host:2,S", abs.display())
        );
        assert_eq!(a.bytes, BODIES[0]);
        assert_eq!(a.sender, "");
        let b = src.next_item().unwrap().unwrap();
        assert_eq!(b.position, format!("maildir:{}/new/2.host", abs.display()));
        assert!(src.next_item().unwrap().is_none());
        assert_eq!(src.done_bytes(), src.total_bytes());

        // A file that moved from new/ to cur/ (read by a mail client) is a repeat.
        let store = tmp.path().join("store");
        assert_eq!(run_import(&store, ImportFormat::Maildir, &md).new, 2);
        fs::rename(md.join("new/2.host"), md.join("cur/2.host:2,S")).unwrap();
        let s = run_import(&store, ImportFormat::Maildir, &md);
        assert_eq!((s.new, s.repeats), (0, 2));

        let err = Source::open(ImportFormat::Maildir, tmp.path())
            .err()
            .unwrap();
        assert!(matches!(err, CliError::Usage(_)), "{err}");
        let err = Source::open(ImportFormat::Mbox, &md).err().unwrap();
        assert!(matches!(err, CliError::Usage(_)), "{err}");
    }
}
