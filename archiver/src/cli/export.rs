//! `coffer export --format eml`: `OUT/ID.eml` (the archived bytes) and `OUT/ID.json`
//! (the message record with all its arrivals) for every match.
//!
//! Restartable: each file is written under a temporary name (`.ID.eml.tmp`) and renamed
//! into place, and a rerun skips files already complete (the `.eml` by size and SHA-256,
//! the `.json` by content). An interrupted run leaves at most a temporary file, which the
//! next run overwrites.
//!
//! `coffer export --format mbox`: one mboxrd file (see [`super::mbox`]), oldest arrival
//! first, written under a temporary name beside it, synced and renamed into place: a
//! rerun rewrites the whole file, and readers never see half of one.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::CliError;
use crate::ids::MessageId;
use crate::store::{MessageRecord, Query, StoreError, StoreReader};

/// What export needs from a store (a trait so it can be tested without one).
pub trait ExportSource {
    fn search(&self, query: &Query) -> Result<Vec<MessageRecord>, StoreError>;
    fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError>;
}

impl ExportSource for StoreReader {
    fn search(&self, query: &Query) -> Result<Vec<MessageRecord>, StoreError> {
        StoreReader::search(self, query)
    }
    fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError> {
        StoreReader::read_message(self, id)
    }
}

/// Counts for the summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub matched: u64,
    /// Files written in this run (`.eml` and `.json` counted separately).
    pub files_written: u64,
    /// Messages whose two files were both already complete.
    pub already_complete: u64,
    /// Messages whose archived bytes did not hash to their id: not exported.
    pub damaged: Vec<String>,
}

impl ExportSummary {
    pub fn line(&self, out: &Path) -> String {
        let mut s = format!(
            "exported {} message(s) to {}: {} file(s) written, {} message(s) already complete",
            self.matched - self.damaged.len() as u64,
            out.display(),
            self.files_written,
            self.already_complete
        );
        if !self.damaged.is_empty() {
            s.push_str(&format!(
                "; {} damaged message(s) skipped (run coffer verify)",
                self.damaged.len()
            ));
        }
        s
    }

    /// The summary of an mbox export.
    pub fn mbox_line(&self, out: &Path) -> String {
        let mut s = format!(
            "exported {} message(s) to {}",
            self.matched - self.damaged.len() as u64,
            out.display()
        );
        if !self.damaged.is_empty() {
            s.push_str(&format!(
                "; {} damaged message(s) skipped (run coffer verify)",
                self.damaged.len()
            ));
        }
        s
    }
}

/// Exports every message matching `query` into `out` (created if missing).
/// `progress(done, total)` is called after each message.
///
/// # Errors
/// The store failed, or a file could not be written. A rerun resumes.
pub fn export_eml(
    src: &dyn ExportSource,
    query: &Query,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary, CliError> {
    let file_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CliError::File { path, source }
    };
    fs::create_dir_all(out).map_err(file_err(out))?;
    let records = src.search(query)?;
    let total = records.len() as u64;
    let mut summary = ExportSummary {
        matched: total,
        ..ExportSummary::default()
    };
    progress(0, total);
    for (n, rec) in records.iter().enumerate() {
        let id: MessageId = rec.id.parse().map_err(|_| {
            StoreError::Corrupt(format!(
                "search returned a malformed message id {:?}",
                rec.id
            ))
        })?;
        // File names come from the parsed id only: nothing from the store reaches a path.
        let hex = id.to_hex();
        let eml = out.join(format!("{hex}.eml"));
        let json = out.join(format!("{hex}.json"));
        let mut json_bytes = serde_json::to_vec_pretty(rec)
            .map_err(io::Error::from)
            .map_err(file_err(&json))?;
        json_bytes.push(b'\n');

        let eml_done = eml_complete(&eml, rec.size, &id).map_err(file_err(&eml))?;
        let json_done = file_equals(&json, &json_bytes).map_err(file_err(&json))?;
        if eml_done && json_done {
            summary.already_complete += 1;
        }
        if !eml_done {
            let bytes = src.read_message(&id)?;
            if MessageId::of(&bytes) != id {
                summary.damaged.push(hex);
                progress(n as u64 + 1, total);
                continue;
            }
            write_atomic(&eml, &bytes)?;
            summary.files_written += 1;
        }
        if !json_done {
            write_atomic(&json, &json_bytes)?;
            summary.files_written += 1;
        }
        progress(n as u64 + 1, total);
    }
    sync_dir(out).map_err(file_err(out))?;
    Ok(summary)
}

/// Exports every message matching `query` into the mbox file `out` (its folder is
/// created if missing), oldest first. `progress(done, total)` is called after each
/// message.
///
/// # Errors
/// The store failed, or the file could not be written (the old file, if any, stays).
pub fn export_mbox(
    src: &dyn ExportSource,
    query: &Query,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary, CliError> {
    let file_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CliError::File { path, source }
    };
    let name = out
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("--out {}: not a file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let mut records = src.search(query)?;
    // Search gives the newest first; a mailbox reads oldest first.
    records.reverse();
    let total = records.len() as u64;
    let mut summary = ExportSummary {
        matched: total,
        ..ExportSummary::default()
    };
    progress(0, total);
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = File::create(&tmp).map_err(file_err(&tmp))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, file);
    for (n, rec) in records.iter().enumerate() {
        let id: MessageId = rec.id.parse().map_err(|_| {
            StoreError::Corrupt(format!(
                "search returned a malformed message id {:?}",
                rec.id
            ))
        })?;
        let bytes = src.read_message(&id)?;
        if MessageId::of(&bytes) != id {
            summary.damaged.push(id.to_hex());
        } else {
            // Arrivals come oldest first: the first is where the message first landed.
            let (sender, time) = rec
                .arrivals
                .first()
                .map_or(("", ""), |a| (a.mail_from.as_str(), a.time.as_str()));
            super::mbox::write_message(&mut w, sender, time, &bytes).map_err(file_err(&tmp))?;
        }
        progress(n as u64 + 1, total);
    }
    let file = w.into_inner().map_err(|e| CliError::File {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(file_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, out).map_err(file_err(out))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(&dir))?;
    summary.files_written = 1;
    Ok(summary)
}

/// Whether `path` holds exactly the message `id` of `size` bytes.
fn eml_complete(path: &Path, size: u64, id: &MessageId) -> io::Result<bool> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() != size {
        return Ok(false);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(MessageId(h.finalize().into()) == *id)
}

/// Whether `path` holds exactly `want`.
fn file_equals(path: &Path, want: &[u8]) -> io::Result<bool> {
    match fs::metadata(path) {
        Ok(m) if m.len() != want.len() as u64 => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    Ok(fs::read(path)? == want)
}

/// Writes `bytes` to `.NAME.tmp` beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp"));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.flush()
    })();
    res.map_err(|source| CliError::File {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, path).map_err(|source| CliError::File {
        path: path.to_owned(),
        source,
    })
}

/// Makes what was written durable once, at the end, instead of one fsync per file; a
/// file lost to a crash before this is found incomplete and rewritten by a rerun.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        nix::unistd::syncfs(d.as_raw_fd()).map_err(io::Error::from)?;
    }
    d.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::tests::record;
    use std::cell::Cell;
    use std::collections::HashMap;

    struct Fake {
        messages: HashMap<MessageId, Vec<u8>>,
        records: Vec<MessageRecord>,
        reads: Cell<usize>,
    }

    impl Fake {
        fn new(bodies: &[&[u8]]) -> Self {
            let mut messages = HashMap::new();
            let mut records = Vec::new();
            for b in bodies {
                let id = MessageId::of(b);
                let mut rec = record(&id.to_hex(), Some("s"));
                rec.size = b.len() as u64;
                messages.insert(id, b.to_vec());
                records.push(rec);
            }
            Self {
                messages,
                records,
                reads: Cell::new(0),
            }
        }
    }

    impl ExportSource for Fake {
        fn search(&self, _q: &Query) -> Result<Vec<MessageRecord>, StoreError> {
            Ok(self.records.clone())
        }
        fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError> {
            self.reads.set(self.reads.get() + 1);
            Ok(self.messages[id].clone())
        }
    }

    fn run(src: &Fake, out: &Path) -> ExportSummary {
        let mut calls = Vec::new();
        let s = export_eml(src, &Query::default(), out, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(
            calls.last(),
            Some(&(src.records.len() as u64, src.records.len() as u64))
        );
        s
    }

    #[test]
    fn writes_exact_bytes_and_records_then_resumes_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let bodies: [&[u8]; 2] = [
            b"Subject: a\r\n\r\nbare\nlf\0nul\r\n",
            b"Subject: b\r\n\r\nx\r\n",
        ];
        let src = Fake::new(&bodies);
        let s = run(&src, &out);
        assert_eq!(s.files_written, 4);
        assert_eq!(s.already_complete, 0);
        for b in bodies {
            let id = MessageId::of(b);
            assert_eq!(fs::read(out.join(format!("{id}.eml"))).unwrap(), b);
            let rec: MessageRecord =
                serde_json::from_slice(&fs::read(out.join(format!("{id}.json"))).unwrap()).unwrap();
            assert_eq!(rec.id, id.to_hex());
            assert_eq!(rec.arrivals.len(), 2);
        }
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            4,
            "no temporary files left"
        );

        // A rerun reads nothing and writes nothing.
        src.reads.set(0);
        let s = run(&src, &out);
        assert_eq!(
            (s.files_written, s.already_complete, src.reads.get()),
            (0, 2, 0)
        );

        // A truncated .eml (interrupted run, lost page cache) and a stale temp file are
        // repaired; a changed record is rewritten.
        let id0 = MessageId::of(bodies[0]);
        fs::write(out.join(format!("{id0}.eml")), b"Subject: a\r\n").unwrap();
        fs::write(out.join(format!(".{id0}.eml.tmp")), b"junk").unwrap();
        let id1 = MessageId::of(bodies[1]);
        let mut src = src;
        src.records[1].arrivals.pop();
        let s = run(&src, &out);
        assert_eq!((s.files_written, s.already_complete), (2, 0));
        assert_eq!(fs::read(out.join(format!("{id0}.eml"))).unwrap(), bodies[0]);
        let rec: MessageRecord =
            serde_json::from_slice(&fs::read(out.join(format!("{id1}.json"))).unwrap()).unwrap();
        assert_eq!(rec.arrivals.len(), 1);
        assert_eq!(fs::read_dir(&out).unwrap().count(), 4);
    }

    #[test]
    fn same_size_wrong_content_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let body: &[u8] = b"hello\r\n";
        let src = Fake::new(&[body]);
        run(&src, dir.path());
        let id = MessageId::of(body);
        fs::write(dir.path().join(format!("{id}.eml")), b"HELLO\r\n").unwrap();
        let s = run(&src, dir.path());
        assert_eq!(s.files_written, 1);
        assert_eq!(
            fs::read(dir.path().join(format!("{id}.eml"))).unwrap(),
            body
        );
    }

    #[test]
    fn damaged_messages_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let body: &[u8] = b"hello\r\n";
        let mut src = Fake::new(&[body]);
        let id = MessageId::of(body);
        src.messages.insert(id, b"HELLO\r\n".to_vec());
        let s = run(&src, dir.path());
        assert_eq!(s.damaged, vec![id.to_hex()]);
        assert!(!dir.path().join(format!("{id}.eml")).exists());
        assert!(s.line(dir.path()).contains("1 damaged message(s) skipped"));
    }

    #[test]
    fn mbox_is_oldest_first_skips_damage_and_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/mail.mbox");
        let bodies: [&[u8]; 3] = [
            b"Subject: new\r\n\r\nFrom x\r\n",
            b"Subject: old\n\nx",
            b"bad",
        ];
        let mut src = Fake::new(&bodies);
        src.messages.insert(MessageId::of(b"bad"), b"BAD".to_vec());
        let s = export_mbox(&src, &Query::default(), &out, &mut |_, _| {}).unwrap();
        assert_eq!(s.damaged, vec![MessageId::of(b"bad").to_hex()]);
        assert!(s.mbox_line(&out).contains("1 damaged message(s) skipped"));
        let text = fs::read(&out).unwrap();
        let first = "From bounce@example.org Fri Jan  2 14:04:06 2026\n";
        let want = [
            first.as_bytes(),
            b"Subject: old\n\nx\n\n",
            first.as_bytes(),
            b"Subject: new\r\n\r\n>From x\r\n\n",
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&text),
            String::from_utf8_lossy(&want)
        );
        // A rerun replaces the file; no temporary file stays behind.
        src.records.truncate(1);
        export_mbox(&src, &Query::default(), &out, &mut |_, _| {}).unwrap();
        assert!(fs::read(&out).unwrap().ends_with(b">From x\r\n\n"));
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn malformed_ids_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = Fake::new(&[b"x"]);
        src.records[0].id = "../../etc/passwd".into();
        let err = export_eml(&src, &Query::default(), dir.path(), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(err, CliError::Store(StoreError::Corrupt(_))),
            "{err:?}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
