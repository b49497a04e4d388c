//! `coffer-milter`: process concerns only — arguments, configuration, logging, signals,
//! systemd notification. The milter itself is in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use coffer_milter::config::{self, MilterConfig, OnFailure, Source};
use coffer_milter::latency;
use coffer_milter::server;
use coffer_milter::session::Shared;

/// Exit code: a usage or configuration error (docs/interfaces.md "Commands").
const EXIT_CONFIG: u8 = 2;
/// Exit code: the milter failed after starting.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
coffer-milter: the Postfix/Sendmail milter that hands every message to cofferd

Usage:
  coffer-milter [--config FILE]                          run in the foreground
  coffer-milter check-config [--strict] [--config FILE]  check the [milter] section

Options:
  --config FILE   configuration file [default: $COFFER_CONFIG, else
                  /etc/coffer/coffer.toml if it exists, else the embedded default]
  --strict        check-config: treat warnings as errors
  -h, --help      print this help
  -V, --version   print the version

Signals: SIGTERM/SIGINT finish open commands and exit; SIGHUP re-reads the
[milter] section (on_failure, timeout, add_header, target apply to new messages;
listen, socket_mode, socket_group, max_connections need a restart); SIGUSR1 logs
the end-of-message latency since the last report (also logged at exit).

Exit codes: 0 success, 2 usage or configuration error, 1 failure after start.
Logs go to stderr; RUST_LOG sets the level (default info).
See docs/milter.md.
";

#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    check: bool,
    strict: bool,
}

enum Parsed {
    Run(Args),
    Exit(ExitCode),
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Parsed {
    let mut args = Args::default();
    let usage_error = |msg: String| {
        eprintln!("error: {msg}\n\n{USAGE}");
        Parsed::Exit(ExitCode::from(EXIT_CONFIG))
    };
    while let Some(a) = argv.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            "-V" | "--version" => {
                println!("coffer-milter {}", env!("CARGO_PKG_VERSION"));
                return Parsed::Exit(ExitCode::SUCCESS);
            }
            "--config" => match argv.next() {
                Some(f) => args.config = Some(f.into()),
                None => return usage_error("--config needs a FILE".into()),
            },
            "check-config" if !args.check => args.check = true,
            "--strict" if args.check => args.strict = true,
            other => match other.strip_prefix("--config=") {
                Some(f) if !f.is_empty() => args.config = Some(f.into()),
                _ => return usage_error(format!("unexpected argument {other:?}")),
            },
        }
    }
    Parsed::Run(args)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Parsed::Run(a) => a,
        Parsed::Exit(code) => return code,
    };
    if args.check {
        return check_config(&args);
    }
    init_logging();
    let (config, source) = match config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match &source {
        Source::Embedded => tracing::warn!(
            "no configuration file found; using the embedded default: milter on {}, handing \
             off to {}",
            config.listen,
            config.target
        ),
        Source::File(p) => tracing::info!("configuration: {}", p.display()),
    }
    for w in warnings(&config) {
        tracing::warn!("configuration: {w}");
    }
    match run(config, args.config.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// What is allowed but probably a mistake.
fn warnings(c: &MilterConfig) -> Vec<String> {
    let mut w = Vec::new();
    if c.on_failure == OnFailure::Accept {
        w.push(
            "on_failure = \"accept\": mail that cofferd cannot confirm passes unarchived".into(),
        );
    }
    if c.timeout >= std::time::Duration::from_secs(300) {
        w.push(format!(
            "timeout = {}s is not below Postfix's milter_content_timeout (300s): Postfix \
             may give up before the milter answers 451",
            c.timeout.as_secs()
        ));
    }
    if c.listen == c.target {
        w.push(format!(
            "listen and target are the same address ({})",
            c.listen
        ));
    }
    w
}

/// `coffer-milter check-config`: `<file>: ok` on stdout, warnings and errors on stderr.
fn check_config(args: &Args) -> ExitCode {
    let (config, source) = match config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if source == Source::Embedded {
        eprintln!("note: no configuration file found; checking the embedded default");
    }
    let warnings = warnings(&config);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let name = source.name();
    if args.strict && !warnings.is_empty() {
        eprintln!(
            "error: {name}: {} warning(s), treated as errors (--strict)",
            warnings.len()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("{name}: ok");
    ExitCode::SUCCESS
}

fn run(config: MilterConfig, config_path: Option<&Path>) -> std::io::Result<()> {
    let rt = server::runtime()?;
    let config_path = config_path.map(Path::to_path_buf);
    rt.block_on(async move {
        let bound = server::bind(&config)?;
        tracing::info!(listen = %bound.local, target = %config.target,
            on_failure = ?config.on_failure, timeout_s = config.timeout.as_secs(),
            max_connections = config.max_connections, add_header = config.add_header,
            "coffer-milter listening");
        let shared = Shared::new(config);
        let signals = tokio::spawn(reload_and_report(shared.clone(), config_path));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: finishing open commands, then exiting"),
                        _ = int.recv() => tracing::info!("SIGINT: finishing open commands, then exiting"),
                    }
                }
                _ => {
                    tracing::error!("cannot install signal handlers; SIGTERM will not be graceful");
                    std::future::pending::<()>().await;
                }
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        };
        let result = server::run(shared.clone(), bound, shutdown).await;
        signals.abort();
        latency::log("since the last report", &shared.eom_latency.take());
        tracing::info!("coffer-milter stopped");
        result
    })
}

/// SIGHUP: re-read the configuration and apply what can be applied; SIGUSR1: log the
/// end-of-message latency since the last report. Runs until aborted.
async fn reload_and_report(shared: Arc<Shared>, config_path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut hup, mut usr1) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) {
        (Ok(h), Ok(u)) => (h, u),
        _ => {
            tracing::error!("cannot install the SIGHUP/SIGUSR1 handlers");
            return;
        }
    };
    loop {
        tokio::select! {
            Some(()) = hup.recv() => reload(&shared, config_path.as_deref()),
            Some(()) = usr1.recv() => {
                latency::log("since the last report", &shared.eom_latency.take());
            }
            else => return,
        }
    }
}

/// One SIGHUP: a configuration that does not load is logged and the running one kept.
fn reload(shared: &Shared, config_path: Option<&Path>) {
    let (new, source) = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; keeping the running configuration");
            return;
        }
    };
    for w in warnings(&new) {
        tracing::warn!("configuration: {w}");
    }
    let plan = shared.reload(&new);
    if plan.applied.is_empty() {
        tracing::info!(config = %source.name(), "SIGHUP: configuration re-read; nothing to apply");
    }
    for change in &plan.applied {
        tracing::info!(config = %source.name(), "SIGHUP: applied {change}");
    }
    for key in &plan.need_restart {
        tracing::warn!(config = %source.name(),
            "SIGHUP: `{key}` changed; it takes effect only when coffer-milter restarts");
    }
}

/// Human-readable lines on stderr (colours only on a terminal), `RUST_LOG` filter,
/// `info` by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
