//! Running a process with a deadline and capturing what it prints.

use std::fmt;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{lossy, wait_until};

/// What a finished process left behind.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    /// stdout parsed as one JSON document.
    ///
    /// # Panics
    /// stdout is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }

    pub fn stdout_str(&self) -> String {
        lossy(&self.stdout)
    }

    pub fn stderr_str(&self) -> String {
        lossy(&self.stderr)
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 4000;
        let cut = |b: &[u8]| {
            let s = lossy(b);
            if s.len() > MAX {
                let end = (0..=MAX)
                    .rev()
                    .find(|&i| s.is_char_boundary(i))
                    .unwrap_or(0);
                format!("{}… ({} bytes)", &s[..end], b.len())
            } else {
                s
            }
        };
        write!(
            f,
            "exit code: {:?}\n-- stdout --\n{}\n-- stderr --\n{}",
            self.code,
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// Runs `cmd` (stdin closed) and collects stdout and stderr; kills it when it runs past
/// `deadline`.
///
/// # Errors
/// The process could not be spawned, or ran past the deadline.
pub fn run(mut cmd: Command, deadline: Duration) -> anyhow::Result<CmdOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("spawn {cmd:?}: {e}"))?;
    // Drain both pipes on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let waited = wait_until(&format!("{cmd:?} to exit"), deadline, || {
        child.try_wait().ok().flatten()
    });
    let status = match waited {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = (t_out.join(), t_err.join());
            return Err(e);
        }
    };
    Ok(CmdOutput {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}
