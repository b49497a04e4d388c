//! `coffer`: query and retrieve a Coffer archive. See `coffer --help`.

fn main() -> std::process::ExitCode {
    coffer_archiver::cli::main()
}
