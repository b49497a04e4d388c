//! `cofferd`: the Coffer archive daemon. Parses arguments, loads the configuration,
//! installs logging and hands over to [`coffer_archiver::server::run_blocking`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coffer_archiver::config::{self, Config, ConfigSource};
use coffer_archiver::logging::{init_logging, print_error_chain};

/// Exit code: a usage or configuration error (docs/interfaces.md "Commands").
const EXIT_CONFIG: u8 = 2;
/// Exit code: the daemon failed after starting (store, sockets).
const EXIT_FAILURE: u8 = 1;

/// Coffer archive daemon: receives journal mail over SMTP/LMTP, stores it durably and
/// replicates it to peers.
#[derive(Debug, Parser)]
#[command(name = "cofferd", version, propagate_version = true)]
struct Cli {
    /// Configuration file [default: $COFFER_CONFIG, else /etc/coffer/coffer.toml if it
    /// exists, else the embedded default]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the configuration and exit: 0 valid (warnings printed), 2 errors.
    CheckConfig {
        /// Treat warnings as errors.
        #[arg(long)]
        strict: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { strict }) => check_config(cli.config.as_deref(), strict),
        None => run(cli.config.as_deref()),
    }
}

/// `cofferd check-config`: `<file>: ok` on stdout, warnings and errors on stderr.
fn check_config(explicit: Option<&std::path::Path>, strict: bool) -> ExitCode {
    let config = match config::load(explicit) {
        Ok(c) => c,
        Err(e) => {
            print_error_chain(&e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.source == ConfigSource::Embedded {
        eprintln!("note: no configuration file found; checking the embedded default");
    }
    if !tls_files_ok(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    let warnings = config::check(&config);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let name = config.source_name();
    if strict && !warnings.is_empty() {
        eprintln!(
            "error: {name}: {} warning(s), treated as errors (--strict)",
            warnings.len()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("{name}: ok");
    ExitCode::SUCCESS
}

/// `cofferd`: run in the foreground.
fn run(explicit: Option<&std::path::Path>) -> ExitCode {
    init_logging();
    let config = match config::load(explicit) {
        Ok(c) => c,
        Err(e) => {
            print_error_chain(&e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    log_config(&config);
    if !tls_files_ok(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    match coffer_archiver::server::run_blocking(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error_chain(e.as_ref());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Loads every TLS file the configuration names; prints each problem as an error naming
/// the configuration file, the listener or connection, the key and the TLS file.
fn tls_files_ok(config: &Config) -> bool {
    let errors = coffer_archiver::tls::check_files(config);
    let name = config.source_name();
    for e in &errors {
        eprintln!("error: {name}: {e}");
    }
    errors.is_empty()
}

/// Says which configuration is in use, loudly when it is the embedded default, and logs
/// its warnings.
fn log_config(config: &Config) {
    match &config.source {
        ConfigSource::Embedded => {
            let smtp = config
                .listeners
                .iter()
                .map(|l| l.bind.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                "no configuration file found; using the embedded default: store in ./{}, \
                 SMTP on {smtp}",
                config.node.data_dir.display()
            );
        }
        ConfigSource::File(path) => {
            tracing::info!("configuration: {}", path.display());
        }
    }
    for w in config::check(config) {
        tracing::warn!("configuration: {w}");
    }
}
