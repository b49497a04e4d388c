//! The `coffer` command-line client (docs/interfaces.md "Commands").
//!
//! `bin/coffer.rs` only calls [`main`]. Each subcommand is a function over an open
//! [`StoreReader`] that writes to a `&mut dyn Write`; every error becomes an exit status
//! in one place, [`error::exit_code`].

pub mod compact;
pub mod dates;
pub mod error;
pub mod export;
pub mod import;
pub mod mbox;
pub mod output;
pub mod queue;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::{self, Config};
use crate::store::{LookupError, Query, Store, StoreError, StoreReader};
use error::{exit_code, CliError, EXIT_FINDING, EXIT_OK, EXIT_STATUS_HELP, EXIT_USAGE};
use output::{StatusOutput, VerifyOutput};

/// Query and retrieve a Coffer e-mail archive.
#[derive(Parser, Debug)]
#[command(name = "coffer", version, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Configuration file [default: $COFFER_CONFIG, else /etc/coffer/coffer.toml if it
    /// exists, else the built-in default with the archive in ./coffer-data]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the archive's totals and replication state.
    Status(StatusArgs),
    /// List archived messages matching filters, newest arrival first.
    Search(SearchArgs),
    /// Write one message's archived bytes, exactly, to stdout.
    #[command(
        after_help = "Exits 1 when no message matches, 2 when the prefix is ambiguous \
                            or not hex."
    )]
    Get(GetArgs),
    /// Write matching messages to files.
    Export(ExportArgs),
    /// Re-hash every message and report damage (exits 1 when problems are found).
    Verify(VerifyArgs),
    /// Rebuild the index from the log (the daemon must be stopped).
    Reindex,
    /// Archive mail from an mbox file, a maildir or a folder of .eml files.
    Import(ImportArgs),
    /// Copy the archive, live, into a new folder that cofferd can open.
    Backup(BackupArgs),
    /// Show replication queues; retry or skip a parked arrival (needs the daemon).
    Queue(queue::QueueArgs),
    /// Ship every arrival to a connection's peer again, from the first (needs the daemon).
    Resync(queue::ResyncArgs),
    /// Seal the open segment and recompress sealed segments in blocks now.
    Compact(compact::CompactArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Filters shared by `search` and `export`. All given filters must match.
#[derive(Args, Debug, Default, Clone)]
pub struct Filters {
    /// Sender (header From), case-insensitive: an exact address or @domain.
    #[arg(long, value_name = "ADDR")]
    pub from: Option<String>,
    /// Recipient (To, Cc or envelope), case-insensitive: an exact address or @domain.
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Case-insensitive substring of the decoded Subject.
    #[arg(long, value_name = "TEXT")]
    pub subject: Option<String>,
    /// The Message-ID header, with or without angle brackets.
    #[arg(long = "message-id", value_name = "ID")]
    pub message_id: Option<String>,
    /// Arrived at or after DATE: RFC 3339 (2026-01-02T15:04:05+01:00) or YYYY-MM-DD,
    /// which means 00:00 UTC that day.
    #[arg(long, value_name = "DATE", value_parser = dates::parse_since)]
    pub since: Option<i64>,
    /// Arrived before DATE: RFC 3339 (exclusive), or YYYY-MM-DD, which includes that
    /// whole day (UTC).
    #[arg(long, value_name = "DATE", value_parser = dates::parse_until)]
    pub until: Option<i64>,
}

impl Filters {
    /// The store query for these filters.
    ///
    /// # Errors
    /// `--since` is not before `--until`.
    pub fn query(&self, limit: usize) -> Result<Query, CliError> {
        if let (Some(s), Some(u)) = (self.since, self.until) {
            if s >= u {
                return Err(CliError::Usage(format!(
                    "--since ({}) must be before --until ({})",
                    dates::format_us(s),
                    dates::format_us(u)
                )));
            }
        }
        Ok(Query {
            from: self.from.clone(),
            to: self.to.clone(),
            subject: self.subject.clone(),
            message_id: self.message_id.clone(),
            since_us: self.since,
            until_us: self.until,
            limit,
        })
    }
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// Show at most N messages; 0 shows all.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// One JSON array of message records (with their arrivals) on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Message id: 64 hex digits, or a unique prefix of at least 8.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the message's arrivals (envelopes) as JSON instead of its bytes.
    #[arg(long)]
    pub envelope: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// PATH/ID.eml (exact bytes) and PATH/ID.json (the record with its arrivals).
    Eml,
    /// One mboxrd file, PATH, oldest first.
    Mbox,
}

#[derive(Args, Debug)]
#[command(
    after_help = "eml: a rerun into the same PATH skips files already complete, so an \
                  interrupted export can simply be started again. mbox: the file is \
                  written under a temporary name and renamed into place; a rerun \
                  rewrites it whole."
)]
pub struct ExportArgs {
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: ExportFormat,
    /// Output folder for eml (created if missing); output file for mbox.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    #[command(flatten)]
    pub filters: Filters,
    /// Export at most N messages; 0 (the default) exports all.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub limit: usize,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Also check the index against the log.
    #[arg(long)]
    pub deep: bool,
    /// One JSON document on stdout: the report plus "ok".
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    /// One mbox file (mboxrd; mboxo reads the same).
    Mbox,
    /// A maildir: the files of its cur/ and new/ folders.
    Maildir,
    /// A folder of *.eml files (or one .eml file).
    Eml,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Arrivals land on a listener named \"import\", with the mbox \
                  sender (if any) as MAIL FROM, no recipients, and the source position \
                  (mbox:FILE#OFFSET, maildir:FILE, eml:FILE) as queue id. Importing the \
                  same mail again adds nothing: each message is a repeat. The daemon must \
                  be stopped (exit 4 otherwise)."
)]
pub struct ImportArgs {
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: ImportFormat,
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Copies the log (never index.redb) and rebuilds the index in the \
                  copy. Works beside a running daemon; everything acknowledged before the \
                  backup started is in it. Restore: point cofferd's data_dir at DEST (or \
                  copy DEST into place) while the original is stopped."
)]
pub struct BackupArgs {
    /// A new folder (or an empty one) for the copy.
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,
}

/// Entry point of the `coffer` binary.
pub fn main() -> ExitCode {
    ExitCode::from(run_args(std::env::args_os()))
}

/// Parses `args` (program name first), runs the subcommand, returns the exit status.
pub fn run_args<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; the rest are usage errors.
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    init_logging();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(&cli, &mut out) {
        Ok(code) => code,
        Err(e) if e.is_broken_pipe() => exit_code(&e),
        Err(e) => {
            eprintln!("coffer: {e}");
            exit_code(&e)
        }
    }
}

/// Warnings (such as "no configuration file, using the built-in default") on stderr.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Runs a parsed command line; `Ok` carries the exit status (0, or 1 for a finding).
///
/// # Errors
/// Whatever stopped the command; [`exit_code`] maps it.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<u8, CliError> {
    // Usage errors first: they need neither configuration nor store.
    if let Command::Get(a) = &cli.command {
        id_prefix(&a.id)?;
    }
    if let Command::Backup(a) = &cli.command {
        crate::store::backup::check_dest(&a.dest).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let cfg = config::load(cli.config.as_deref())?;
    // These open the store themselves (for writing, or not at all), or talk to the
    // daemon over its control socket.
    match &cli.command {
        Command::Reindex => return cmd_reindex(&cfg, out),
        Command::Import(a) => return cmd_import(&cfg, a),
        Command::Backup(a) => return cmd_backup(&cfg, a),
        Command::Queue(a) => return queue::cmd_queue(&cfg.node.data_dir, a, out),
        Command::Resync(a) => return queue::cmd_resync(&cfg.node.data_dir, a, out),
        Command::Compact(a) => return compact::cmd_compact(&cfg, a, out),
        _ => {}
    }
    let store = open_store(&cfg.node.data_dir)?;
    match &cli.command {
        Command::Queue(_) | Command::Resync(_) | Command::Compact(_) => {
            unreachable!("handled above")
        }
        Command::Status(a) => cmd_status(&store, &cfg.node.data_dir, a, out),
        Command::Search(a) => cmd_search(&store, a, out),
        Command::Get(a) => cmd_get(&store, a, out),
        Command::Export(a) => cmd_export(&store, a),
        Command::Verify(a) => cmd_verify(&store, a, out),
        Command::Reindex | Command::Import(_) | Command::Backup(_) => {
            unreachable!("handled above")
        }
    }
}

/// A message id or prefix as the store wants it: 8 to 64 hex digits, lowercase.
///
/// # Errors
/// Anything else is [`LookupError::BadPrefix`] (a usage error).
pub fn id_prefix(s: &str) -> Result<String, CliError> {
    if (8..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(LookupError::BadPrefix(s.to_owned()).into())
    }
}

/// Opens the store at `data_dir`; a missing folder is "no archive" rather than an I/O
/// error.
fn open_store(data_dir: &Path) -> Result<StoreReader, CliError> {
    if !data_dir.is_dir() {
        return Err(CliError::NoArchive(data_dir.to_owned()));
    }
    match StoreReader::open(data_dir) {
        Ok(s) => Ok(s),
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(CliError::NoArchive(data_dir.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

fn cmd_status(
    store: &StoreReader,
    data_dir: &Path,
    a: &StatusArgs,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    // Replication state lives in the daemon: ask it over the control socket.
    let connections = if store.daemon_running() {
        queue::daemon_connections(data_dir)
    } else {
        Vec::new()
    };
    let status = StatusOutput::new(store.status()?, connections);
    if a.json {
        output::write_json(out, &status)
    } else {
        output::write_status_human(out, &status, store.daemon_running())
    }
    .and_then(|()| out.flush())
    .map_err(CliError::Output)?;
    Ok(EXIT_OK)
}

fn cmd_search(store: &StoreReader, a: &SearchArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let query = a.filters.query(a.limit)?;
    let records = store.search(&query)?;
    if a.json {
        output::write_json(out, &records)
    } else {
        output::write_search_human(out, &records)
    }
    .and_then(|()| out.flush())
    .map_err(CliError::Output)?;
    if !a.json {
        if records.is_empty() {
            eprintln!("no messages match");
        } else if a.limit != 0 && records.len() >= a.limit {
            eprintln!("showing the first {}; --limit 0 shows all", records.len());
        }
    }
    Ok(EXIT_OK)
}

fn cmd_get(store: &StoreReader, a: &GetArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let id = store.resolve(&id_prefix(&a.id)?)?;
    if a.envelope {
        let arrivals = store.arrivals(&id)?;
        output::write_json(out, &arrivals)
    } else {
        let bytes = store.read_message(&id)?;
        out.write_all(&bytes)
    }
    .and_then(|()| out.flush())
    .map_err(CliError::Output)?;
    Ok(EXIT_OK)
}

/// A progress bar on stderr when stderr is a terminal; hidden otherwise.
fn progress_bar(what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} messages ({eta} left)")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(what.to_owned());
    pb
}

fn cmd_export(store: &StoreReader, a: &ExportArgs) -> Result<u8, CliError> {
    let query = a.filters.query(a.limit)?;
    let pb = progress_bar("exporting");
    let export = match a.format {
        ExportFormat::Eml => export::export_eml,
        ExportFormat::Mbox => export::export_mbox,
    };
    let res = export(store, &query, &a.out, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let summary = res?;
    match a.format {
        ExportFormat::Eml => eprintln!("{}", summary.line(&a.out)),
        ExportFormat::Mbox => eprintln!("{}", summary.mbox_line(&a.out)),
    }
    Ok(if summary.damaged.is_empty() {
        EXIT_OK
    } else {
        EXIT_FINDING
    })
}

/// A progress bar counting bytes, on stderr when stderr is a terminal.
fn bytes_bar(what: &str) -> ProgressBar {
    let pb = progress_bar(what);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:40}] {bytes}/{total_bytes} ({eta} left)")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

fn cmd_reindex(cfg: &Config, out: &mut dyn Write) -> Result<u8, CliError> {
    let data_dir = &cfg.node.data_dir;
    if !data_dir.is_dir() {
        return Err(CliError::NoArchive(data_dir.clone()));
    }
    eprintln!(
        "rebuilding the index of {} from the log",
        data_dir.display()
    );
    let pb = progress_bar("verifying the new index");
    let res = crate::store::reindex::reindex(data_dir, &cfg.node.name, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let r = res?;
    let was = |f: fn(&crate::store::StoreStatus) -> u64| {
        r.before
            .as_ref()
            .map_or_else(String::new, |b| format!(" (was {})", f(b)))
    };
    let text = format!(
        "messages:     {}{}\narrivals:     {}{}\nraw bytes:    {}{}\nstored bytes: {}{}\n\
         repeats:      {}{}\n",
        r.after.messages,
        was(|s| s.messages),
        r.after.arrivals,
        was(|s| s.arrivals),
        r.after.raw_bytes,
        was(|s| s.raw_bytes),
        r.after.stored_bytes,
        was(|s| s.stored_bytes),
        r.after.repeats,
        was(|s| s.repeats),
    );
    out.write_all(text.as_bytes())
        .and_then(|()| {
            if r.verify.problems.is_empty() {
                Ok(())
            } else {
                output::write_verify_human(out, &r.verify)
            }
        })
        .and_then(|()| out.flush())
        .map_err(CliError::Output)?;
    match &r.kept_old {
        None => {
            eprintln!("index rebuilt and verified against the log");
            Ok(EXIT_OK)
        }
        Some(old) => {
            eprintln!(
                "the rebuilt index does not match the log; the previous index is kept as {}",
                old.display()
            );
            Ok(EXIT_FINDING)
        }
    }
}

fn cmd_import(cfg: &Config, a: &ImportArgs) -> Result<u8, CliError> {
    let mut source = import::Source::open(a.format, &a.path)?;
    let store = Store::open(crate::server::store_options(cfg))?;
    let handle = store.handle();
    let pb = bytes_bar("importing");
    let res = import::import(
        &handle,
        &mut source,
        cfg.store.max_pending / 2,
        &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        },
    );
    pb.finish_and_clear();
    drop(handle);
    store.close();
    let summary = res?;
    eprintln!("{}", summary.line(&a.path));
    Ok(if summary.too_big.is_empty() {
        EXIT_OK
    } else {
        EXIT_FINDING
    })
}

fn cmd_backup(cfg: &Config, a: &BackupArgs) -> Result<u8, CliError> {
    let data_dir = &cfg.node.data_dir;
    if !data_dir.is_dir() {
        return Err(CliError::NoArchive(data_dir.clone()));
    }
    let pb = bytes_bar("copying the log");
    let res =
        crate::store::backup::backup(data_dir, &cfg.node.name, &a.dest, &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        });
    pb.finish_and_clear();
    let r = res?;
    eprintln!(
        "backed up {} message(s), {} arrival(s) to {}: {} segment(s), {} bytes of log, up to \
         segment {} offset {}; the index was rebuilt in the copy (cofferd can open it: set \
         data_dir = {})",
        r.status.messages,
        r.status.arrivals,
        a.dest.display(),
        r.segments,
        r.bytes,
        r.end.0,
        r.end.1,
        a.dest.display()
    );
    Ok(EXIT_OK)
}

fn cmd_verify(store: &StoreReader, a: &VerifyArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let pb = progress_bar(if a.deep {
        "verifying (deep)"
    } else {
        "verifying"
    });
    if let Ok(n) = store.message_count() {
        pb.set_length(n);
    }
    let res = store.verify(a.deep, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let report = res?;
    let ok = report.problems.is_empty();
    if a.json {
        output::write_json(
            out,
            &VerifyOutput {
                ok,
                report: &report,
            },
        )
    } else {
        output::write_verify_human(out, &report)
    }
    .and_then(|()| out.flush())
    .map_err(CliError::Output)?;
    Ok(if ok { EXIT_OK } else { EXIT_FINDING })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("coffer").chain(args.iter().copied()))
    }

    #[test]
    fn config_is_global_before_or_after_the_subcommand() {
        for args in [
            &["--config", "/etc/c.toml", "status"][..],
            &["status", "--config", "/etc/c.toml"],
            &["status", "--config=/etc/c.toml", "--json"],
        ] {
            let cli = parse(args).unwrap();
            assert_eq!(
                cli.config.as_deref(),
                Some(Path::new("/etc/c.toml")),
                "{args:?}"
            );
        }
        let cli = parse(&["get", "abcdef01", "--config", "c.toml", "--envelope"]).unwrap();
        assert_eq!(cli.config.as_deref(), Some(Path::new("c.toml")));
        assert!(matches!(
            cli.command,
            Command::Get(GetArgs { envelope: true, .. })
        ));
        assert!(parse(&["status"]).unwrap().config.is_none());
    }

    #[test]
    fn search_limits() {
        let Command::Search(a) = parse(&["search"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.limit, 100);
        assert!(!a.json);
        let Command::Search(a) = parse(&["search", "--limit", "0", "--json"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.limit, 0);
        assert!(a.json);
        assert_eq!(a.filters.query(a.limit).unwrap().limit, 0);
        assert!(parse(&["search", "--limit", "-1"]).is_err());
        let Command::Export(a) = parse(&["export", "--format", "eml", "--out", "x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.limit, 0, "export takes everything by default");
    }

    #[test]
    fn search_filters_become_a_query() {
        let cli = parse(&[
            "search",
            "--from",
            "@example.org",
            "--to",
            "bob@example.net",
            "--subject",
            "invoice",
            "--message-id",
            "<m1@x>",
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-01",
        ])
        .unwrap();
        let Command::Search(a) = cli.command else {
            panic!()
        };
        let q = a.filters.query(a.limit).unwrap();
        assert_eq!(q.from.as_deref(), Some("@example.org"));
        assert_eq!(q.to.as_deref(), Some("bob@example.net"));
        assert_eq!(q.subject.as_deref(), Some("invoice"));
        assert_eq!(q.message_id.as_deref(), Some("<m1@x>"));
        // One whole day: since <= t < until.
        assert_eq!(q.until_us.unwrap() - q.since_us.unwrap(), 86_400_000_000);
        assert_eq!(q.limit, 100);
    }

    #[test]
    fn bad_dates_and_empty_ranges_are_usage_errors() {
        let e = parse(&["search", "--since", "last tuesday"]).unwrap_err();
        assert!(e.use_stderr());
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        assert_eq!(run_args(["coffer", "search", "--until", "2026-02-30"]), 2);

        let Command::Search(a) =
            parse(&["search", "--since", "2026-01-02", "--until", "2026-01-01"])
                .unwrap()
                .command
        else {
            panic!()
        };
        let err = a.filters.query(a.limit).unwrap_err();
        assert_eq!(exit_code(&err), 2);
        assert!(err.to_string().contains("--since"), "{err}");
    }

    #[test]
    fn usage_help_and_version_exit_codes() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["get"],
            &["export", "--format", "zip", "--out", "x"],
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.use_stderr(), "{args:?}");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
        assert_eq!(run_args(["coffer", "status", "--bogus"]), 2);
        for args in [
            &["--help"][..],
            &["--version"],
            &["search", "--help"],
            &["-V"],
        ] {
            let e = parse(args).unwrap_err();
            assert!(!e.use_stderr(), "{args:?}");
            assert_eq!(e.exit_code(), 0, "{args:?}");
        }
    }

    #[test]
    fn help_documents_exit_statuses_and_date_semantics() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd.render_long_help().to_string();
        assert!(help.contains("no archive exists"), "{help}");
        assert!(help.contains("4  the daemon is running"), "{help}");
        let search = cmd
            .find_subcommand_mut("search")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(search.contains("includes that whole day"), "{search}");
        Cli::command().debug_assert();
    }

    #[test]
    fn reindex_and_import_refuse_while_the_daemon_runs_backup_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("coffer.toml");
        std::fs::write(
            &conf,
            "[node]\nname = \"node-a\"\ndata_dir = \"data\"\n[store]\nmin_free_disk = \"0B\"\n",
        )
        .unwrap();
        let cfg = config::load_file(&conf).unwrap();
        let mbox = dir.path().join("in.mbox");
        std::fs::write(
            &mbox,
            "From a@x Mon Jan  1 00:00:00 2024\nSubject: 1\n\nhi\n",
        )
        .unwrap();
        let c = conf.to_str().unwrap();
        let m = mbox.to_str().unwrap();
        let import = ["coffer", "--config", c, "import", "--format", "mbox", m];
        assert_eq!(run_args(import), EXIT_OK);
        let daemon = Store::open(crate::server::store_options(&cfg)).unwrap();
        assert_eq!(run_args(import), error::EXIT_DAEMON_RUNNING);
        assert_eq!(
            run_args(["coffer", "--config", c, "reindex"]),
            error::EXIT_DAEMON_RUNNING
        );
        let dest = dir.path().join("backup");
        let d = dest.to_str().unwrap();
        assert_eq!(run_args(["coffer", "--config", c, "backup", d]), EXIT_OK);
        assert_eq!(run_args(["coffer", "--config", c, "backup", d]), EXIT_USAGE);
        daemon.close();
        assert_eq!(run_args(["coffer", "--config", c, "reindex"]), EXIT_OK);
        assert_eq!(
            StoreReader::open(&dest).unwrap().status().unwrap().messages,
            1
        );
        let out = dir.path().join("out.mbox");
        let o = out.to_str().unwrap();
        let export = [
            "coffer", "--config", c, "export", "--format", "mbox", "--out", o,
        ];
        assert_eq!(run_args(export), EXIT_OK);
        assert!(std::fs::read(&out)
            .unwrap()
            .ends_with(b"Subject: 1\n\nhi\n\n"));
    }

    #[test]
    fn compact_without_a_daemon_compacts_the_store_and_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("coffer.toml");
        std::fs::write(
            &conf,
            "[node]\nname = \"node-a\"\ndata_dir = \"data\"\n[store]\nmin_free_disk = \"0B\"\n\
             block_level = 3\ndictionary = false\n",
        )
        .unwrap();
        let mbox = dir.path().join("in.mbox");
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!(
                "From a@x Mon Jan  1 00:00:00 2024\nSubject: {i}\n\n{}\n\n",
                "some words of mail ".repeat(i + 5)
            ));
        }
        std::fs::write(&mbox, text).unwrap();
        let c = conf.to_str().unwrap();
        let m = mbox.to_str().unwrap();
        assert_eq!(
            run_args(["coffer", "--config", c, "import", "--format", "mbox", m]),
            EXIT_OK
        );
        let cli = parse(&["--config", c, "compact", "--wait", "--json"]).unwrap();
        let mut out = Vec::new();
        assert_eq!(run(&cli, &mut out).unwrap(), EXIT_OK);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["daemon"], false);
        assert_eq!(v["segments"], 1, "{v}");
        let data = dir.path().join("data");
        assert!(data.join("log/00000001.blk").exists());
        assert!(!data.join("log/00000001.seg").exists());
        let reader = StoreReader::open(&data).unwrap();
        assert_eq!(reader.status().unwrap().messages, 40);
        assert!(reader
            .verify(true, &mut |_, _| {})
            .unwrap()
            .problems
            .is_empty());
    }

    #[test]
    fn message_id_prefixes() {
        let full = "AB".repeat(32);
        assert_eq!(id_prefix(&full).unwrap(), "ab".repeat(32));
        assert_eq!(id_prefix("0123abcd").unwrap(), "0123abcd");
        for bad in [
            "",
            "0123abc",
            "0123abcg",
            "../../etc",
            &"a".repeat(65),
            "0123 abcd",
        ] {
            let err = id_prefix(bad).unwrap_err();
            assert_eq!(exit_code(&err), 2, "{bad}");
        }
        // Checked before any configuration or store is touched.
        let cli = parse(&["get", "xyz"]).unwrap();
        assert_eq!(exit_code(&run(&cli, &mut Vec::new()).unwrap_err()), 2);
    }

    #[test]
    fn a_missing_data_dir_is_no_archive() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("coffer-data");
        let err = open_store(&missing).err().unwrap();
        assert_eq!(exit_code(&err), 1);
        assert_eq!(
            err.to_string(),
            format!("no archive at {}", missing.display())
        );
    }
}
