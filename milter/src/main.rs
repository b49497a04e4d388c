//! coffer-milter: taps Postfix/Sendmail and hands every message to cofferd.
//!
//! A skeleton until the milter is built: it answers `--help` and `--version`.

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") => println!("coffer-milter {}", env!("CARGO_PKG_VERSION")),
        _ => {
            println!(
                "coffer-milter {}: not built yet; see the project issues",
                env!("CARGO_PKG_VERSION")
            );
        }
    }
}
