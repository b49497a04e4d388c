//! `coffer.toml` text to a validated configuration: an error naming what is wrong, or a
//! configuration that passes `check`, never a panic.
#![no_main]

use coffer_archiver::config::{check, from_toml, ConfigSource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match from_toml(text, ConfigSource::Embedded) {
        Ok(config) => {
            let _ = check(&config);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
