//! A one-way delay on a router's WAN link: the lab's latency.
//!
//! This kernel has no `sch_netem` (nor `fq`), so the delay is made in
//! netfilter: an `iptables-legacy` rule in the router's raw PREROUTING chain
//! (`-i wan -j NFQUEUE`) hands every IPv4 packet arriving from the internet
//! to a queue, and a thread of the test process holds each one for the
//! delay before giving the accept verdict. nft's own `queue` expression is
//! not built into this kernel, the xtables target is. Raw PREROUTING runs
//! before conntrack (priority -300 against -200), so a held datagram is
//! invisible to the router's NAT until it is released: a node's own
//! outbound flow is confirmed at once while the peer's datagram to it is
//! still on the wire, which is what lets two hole-punching datagrams cross
//! (docs/natlab.md, "Latency").
//!
//! A thread rather than a daemon: the queue's netlink socket is created
//! inside the router namespace (on a dedicated thread, like every socket
//! the lab makes) and keeps it, so nothing has to be spawned, found on
//! disk or reaped, and it ends with the test process (whose namespaces go
//! with it). The kernel queue is fail-open: a full queue passes packets
//! rather than losing them. The `nfq` crate opens the socket without
//! `SOCK_CLOEXEC`, so processes the test spawns later hold a copy: the
//! queue then stays bound when this thread ends, and `--queue-bypass`
//! (which only helps once nobody holds the socket) does not apply. So the
//! thread, if it fails, deletes its rule, and a normal stop deletes the
//! rule before the thread ends.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nfq::{Queue, Verdict};

use crate::netns::Netns;
use crate::plugin::run_bounded;

use super::{CMD_TIMEOUT, WAN_IF};

/// The queue number (per network namespace, so every router can use it).
const QUEUE_NUM: u16 = 25;
/// Packets the kernel holds for us at most; beyond that they pass undelayed
/// (fail-open). Lab traffic is a few hundred packets per second at most.
const QUEUE_MAX: u32 = 4096;
/// How often the thread looks for new packets while none is due: the
/// delay's granularity. The queue's socket is not exposed by the `nfq`
/// crate, so it is read non-blocking rather than polled.
const TICK: Duration = Duration::from_millis(1);

/// The rule, as arguments after `iptables-legacy -w 5 -t raw` and the
/// action (`-A`/`-D`).
fn rule() -> Vec<String> {
    [
        "PREROUTING",
        "-i",
        WAN_IF,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &QUEUE_NUM.to_string(),
        "--queue-bypass",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(router: &Netns, action: &str) -> Result<(), String> {
    let mut argv = vec!["iptables-legacy", "-w", "5", "-t", "raw", action];
    let rule = rule();
    argv.extend(rule.iter().map(String::as_str));
    let out = run_bounded(router.command(&argv), b"", CMD_TIMEOUT);
    if out.code == 0 && !out.timed_out {
        Ok(())
    } else {
        Err(format!(
            "in netns {}: {argv:?} failed (code {}, timed out {}): {}{}",
            router.name(),
            out.code,
            out.timed_out,
            out.stdout,
            out.stderr
        ))
    }
}

/// A running delay on one router's WAN ingress. Removed (rule deleted,
/// held packets released, thread joined) on drop.
pub(crate) struct DelayLine {
    router: Netns,
    delay: Duration,
    stop: Arc<AtomicBool>,
    delayed: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl DelayLine {
    /// Binds the queue inside `router`, starts the holder and then adds
    /// the rule (in this order, so that no packet meets an unbound queue).
    pub(crate) fn start(router: &Netns, delay: Duration) -> Result<DelayLine, String> {
        let queue = router
            .run(|| -> io::Result<Queue> {
                let mut q = Queue::open()?;
                q.bind(QUEUE_NUM)?;
                // Only the metadata: the verdict needs the packet id alone.
                q.set_copy_range(QUEUE_NUM, 0)?;
                q.set_fail_open(QUEUE_NUM, true)?;
                q.set_queue_max_len(QUEUE_NUM, QUEUE_MAX)?;
                q.set_nonblocking(true);
                Ok(q)
            })
            .map_err(|e| format!("NFQUEUE {QUEUE_NUM} in {}: {e}", router.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let delayed = Arc::new(AtomicU64::new(0));
        let (stop2, delayed2) = (stop.clone(), delayed.clone());
        let router2 = Netns::borrowed(router.name());
        let thread = std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread's name: "d" and a lab
            // router's name ("nlr", 5 digits of pid, "x", the counter) fit,
            // so each delay line's thread is told apart by name.
            .name(format!("d{}", router.name()))
            .spawn(move || {
                let r = hold(queue, delay, &stop2, &delayed2);
                if let Err(e) = &r {
                    // Children of the test process inherit the queue's
                    // socket (the crate opens it without SOCK_CLOEXEC), so
                    // the queue can stay bound after this thread ends and
                    // would then hold every packet: take the rule out so
                    // that the link passes undelayed, and say so where the
                    // test's output shows it.
                    let removed = iptables(&router2, "-D");
                    eprintln!(
                        "natlab: the WAN delay line in {} stopped: {e} (rule removed: {removed:?})",
                        router2.name()
                    );
                }
                r
            })
            .map_err(|e| format!("delay thread: {e}"))?;
        let mut line = DelayLine {
            router: Netns::borrowed(router.name()),
            delay,
            stop,
            delayed,
            thread: Some(thread),
        };
        if let Err(e) = iptables(router, "-A") {
            line.shut();
            return Err(e);
        }
        Ok(line)
    }

    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// Packets held and released so far.
    pub(crate) fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    /// Stops the holder (which accepts what it still holds) and returns
    /// its error, if it failed.
    fn shut(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Some(format!("delay line in {}: {e}", self.router.name())),
            Some(Err(_)) => Some(format!("delay line in {} panicked", self.router.name())),
            _ => None,
        }
    }

    /// Deletes the rule, then stops the holder; its error, if any.
    pub(crate) fn remove(mut self) -> Result<(), String> {
        let rule = iptables(&self.router, "-D");
        let held = self.shut();
        rule?;
        held.map_or(Ok(()), Err)
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // The namespace may already be gone (then so is the rule).
            let _ = iptables(&self.router, "-D");
            let _ = self.shut();
        }
    }
}

/// The holder: queue order is arrival order and the delay is fixed, so a
/// FIFO of (due, packet) suffices. Ends when `stop` is set, after
/// accepting everything it holds.
///
/// ENOENT is not an error: when a netfilter hook is unregistered in the
/// namespace (any nft table replaced: `set_router_firewall`,
/// `block_udp_between`, ...) the kernel drops every packet queued there,
/// and our verdict for one of them then fails (the kernel reports it on the
/// socket, so it comes back from a later `recv`). Those packets are lost,
/// as on a link that blips.
fn hold(mut q: Queue, delay: Duration, stop: &AtomicBool, delayed: &AtomicU64) -> io::Result<()> {
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let gone = |e: &io::Error| e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        loop {
            match q.recv() {
                Ok(msg) => held.push_back((Instant::now() + delay, msg)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || gone(&e) => continue,
                Err(e) => {
                    release_all(&mut q, &mut held);
                    return Err(e);
                }
            }
        }
        if stopping {
            release_all(&mut q, &mut held);
            return Ok(());
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, mut msg)) = held.pop_front() {
                msg.set_verdict(Verdict::Accept);
                match q.verdict(msg) {
                    Ok(()) => {
                        delayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        release_all(&mut q, &mut held);
                        return Err(e);
                    }
                }
            }
        }
        let wait = held.front().map_or(TICK, |(due, _)| {
            due.saturating_duration_since(now).min(TICK)
        });
        std::thread::sleep(wait);
    }
}

/// Accepts what is held and unbinds the queue: the socket is not
/// close-on-exec (the crate opens it so and does not expose it), so
/// children spawned meanwhile hold copies and closing ours would leave the
/// queue bound to them; the unbind goes by the socket's port id and
/// releases the queue whatever copies exist.
fn release_all(q: &mut Queue, held: &mut VecDeque<(Instant, nfq::Message)>) {
    for (_, mut msg) in held.drain(..) {
        msg.set_verdict(Verdict::Accept);
        let _ = q.verdict(msg);
    }
    let _ = q.unbind(QUEUE_NUM);
}
