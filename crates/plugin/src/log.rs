//! A tiny logger: errors to stderr (the runtime records it), everything to
//! the config's `logFile` when one is set. No logging framework: the plugin
//! runs once per pod and its start-up time matters.

use std::fmt::Arguments;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Log {
    file: Option<File>,
}

impl Log {
    /// Opens (appends to) the log file; a log file that cannot be opened
    /// must not fail the pod, so it is reported once and ignored. Only a
    /// regular file is used: a symlink would send the plugin's (root's)
    /// writes elsewhere, and a FIFO nobody reads would block every command.
    pub fn open(path: Option<&Path>) -> Log {
        let file = path.and_then(|p| {
            evio_cni::files::open_append_regular(p, 0o640)
                .map_err(|e| eprintln!("evio: cannot use logFile {}: {e}", p.display()))
                .ok()
        });
        Log { file }
    }

    pub fn debug(&self, msg: Arguments) {
        self.write("debug", msg);
    }

    pub fn info(&self, msg: Arguments) {
        self.write("info", msg);
    }

    pub fn warn(&self, msg: Arguments) {
        eprintln!("evio: warning: {msg}");
        self.write("warn", msg);
    }

    pub fn error(&self, msg: Arguments) {
        self.write("error", msg);
    }

    fn write(&self, level: &str, msg: Arguments) {
        if let Some(mut f) = self.file.as_ref() {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            // One write per line so concurrent plugin processes appending
            // to the same file do not interleave within a line.
            let line = format!(
                "{}.{:03} pid={} {level} {msg}\n",
                t.as_secs(),
                t.subsec_millis(),
                std::process::id()
            );
            let _ = f.write_all(line.as_bytes());
        }
    }
}
