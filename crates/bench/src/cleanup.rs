//! Cleanup that still happens when the normal drop path does not run.
//!
//! The release profile aborts on panic, so a panic (for example inside a
//! testkit helper that panics on failure by design) would skip every `Drop`
//! and leave namespaces and the daemons inside them behind. Every namespace
//! the benchmark creates is registered here, and a panic hook (which runs
//! before the abort) kills what runs inside them and deletes them. Ctrl-C
//! only sets a flag: the loops check it and return an error, so the
//! ordinary drop path cleans up.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use evio_testkit::netns::Netns;

use crate::error::{BenchError, Result};

static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The same flag for testkit clusters (`ClusterOpts::cancel`), set by the
/// signal handler too.
static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// A namespace (see [`Netns::new`]) that is also removed if the process
/// panics.
pub fn netns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    if let Ok(mut v) = NAMESPACES.lock() {
        v.push(ns.name().to_string());
    }
    ns
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // OnceLock::get is an atomic load: fine in a signal handler.
    if let Some(c) = CANCEL.get() {
        c.store(true, Ordering::SeqCst);
    }
}

/// The flag to hand a testkit cluster: set when Ctrl-C or SIGTERM arrived.
pub fn cancel_flag() -> Arc<AtomicBool> {
    CANCEL
        .get_or_init(|| Arc::new(AtomicBool::new(check().is_err())))
        .clone()
}

/// Installs the panic hook and the SIGINT/SIGTERM flag. Call once, first.
pub fn install() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        // testkit clusters (overlay section) track their own namespaces.
        evio_testkit::cluster::emergency_cleanup();
        remove_all();
    }));
    let _ = cancel_flag();
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe; handlers are reset to default in exec'd children.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Err(Interrupted) once Ctrl-C or SIGTERM arrived.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(BenchError::Interrupted)
    } else {
        Ok(())
    }
}

fn remove_all() {
    let names = match NAMESPACES.lock() {
        Ok(v) => v.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for name in names {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: plain kill(2) of a pid listed as living in our
                    // own namespace.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
