//! The synchronous JSON-RPC connection: one request in flight at a time,
//! which is all a short-lived CNI plugin process needs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::datum::brief;
use crate::error::{Error, Result};
use crate::framing::Framer;

/// Where the server listens, parsed from OVS's own endpoint syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Endpoint {
    /// `unix:PATH`, `tcp:HOST:PORT` or `tcp:[IPV6]:PORT`.
    pub fn parse(s: &str) -> Result<Endpoint> {
        let bad = || Error::Endpoint(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Endpoint::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }
}

/// The smallest socket timeout used: a zero timeout means "none" to the OS.
/// Connects to a unix socket within `timeout`. `UnixStream::connect` has no
/// limit: when ovsdb-server is wedged and its listen backlog is full, the
/// kernel parks the connecting process until there is room, forever. The
/// kernel bounds that wait by the socket's SO_SNDTIMEO (unix_stream_connect),
/// so it is set before connecting and fails with EAGAIN when it runs out.
pub(crate) fn connect_unix(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    use nix::sys::time::TimeVal;
    use std::os::fd::AsRawFd;

    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A zero SO_SNDTIMEO means "no limit" to the kernel: at least 1 µs.
    let secs = libc_time(timeout.as_secs());
    let micros = i64::from(timeout.subsec_micros()).max(i64::from(secs == 0));
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(secs, micros as _))?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(nix::Error::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the server accepted no connection within {timeout:?} (its backlog is full)"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Seconds as the kernel's time_t, saturating (Duration::MAX is allowed).
fn libc_time(secs: u64) -> nix::libc::time_t {
    nix::libc::time_t::try_from(secs).unwrap_or(nix::libc::time_t::MAX)
}

const MIN_IO_TIMEOUT: Duration = Duration::from_millis(1);

/// A connection to one OVSDB server. Every call is bounded by the timeout
/// given to [`Client::connect`] (or [`Client::set_timeout`]).
pub struct Client {
    stream: Stream,
    framer: Framer,
    next_id: u64,
    timeout: Duration,
    endpoint: String,
}

impl Client {
    /// Connects to `unix:PATH` or `tcp:HOST:PORT`. A missing socket or a
    /// refused connection fails at once; `timeout` bounds a TCP connect and
    /// every later request.
    pub fn connect(endpoint: &str, timeout: Duration) -> Result<Client> {
        let timeout = timeout.max(MIN_IO_TIMEOUT);
        let connect_err = |source| Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        };
        let stream = match Endpoint::parse(endpoint)? {
            Endpoint::Unix(path) => {
                Stream::Unix(connect_unix(&path, timeout).map_err(connect_err)?)
            }
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(connect_err)?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
                let mut stream = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = stream.ok_or_else(|| connect_err(last))?;
                // Requests are small and strictly request/response.
                s.set_nodelay(true).map_err(connect_err)?;
                Stream::Tcp(s)
            }
        };
        Ok(Client::from_stream(stream, timeout, endpoint))
    }

    /// A client over an already connected unix socket (tests, socketpairs).
    pub fn from_unix_stream(stream: UnixStream, timeout: Duration, label: &str) -> Client {
        Client::from_stream(Stream::Unix(stream), timeout.max(MIN_IO_TIMEOUT), label)
    }

    fn from_stream(stream: Stream, timeout: Duration, endpoint: &str) -> Client {
        Client {
            stream,
            framer: Framer::new(),
            next_id: 1,
            timeout,
            endpoint: endpoint.to_string(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(MIN_IO_TIMEOUT);
    }

    /// The databases the server holds (`list_dbs`).
    pub fn list_dbs(&mut self) -> Result<Vec<String>> {
        let result = self.request("list_dbs", json!([]))?;
        result
            .as_array()
            .and_then(|dbs| {
                dbs.iter()
                    .map(|d| d.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "list_dbs result is not a list of names: {}",
                    brief(&result)
                ))
            })
    }

    /// A liveness round trip (`echo`).
    pub fn echo(&mut self) -> Result<()> {
        let result = self.request("echo", json!(["evio"]))?;
        if result == json!(["evio"]) {
            Ok(())
        } else {
            Err(Error::Protocol(format!("echo returned {}", brief(&result))))
        }
    }

    /// Runs `ops` atomically on `db` and returns one result per operation.
    /// The first failed operation becomes [`Error::Transaction`] with its
    /// index (`ops.len()` for a failed commit).
    pub fn transact(&mut self, db: &str, ops: Vec<Value>) -> Result<Vec<Value>> {
        let t = self.timeout;
        self.transact_within(db, ops, t)
    }

    /// [`Client::transact`] with a reply deadline other than the default,
    /// for transactions that contain a `wait` with a longer timeout.
    pub fn transact_within(
        &mut self,
        db: &str,
        ops: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let n = ops.len();
        let mut params = Vec::with_capacity(n + 1);
        params.push(Value::String(db.to_string()));
        params.extend(ops);
        let result = self.request_within("transact", Value::Array(params), timeout)?;
        let Value::Array(mut results) = result else {
            return Err(Error::Protocol(format!(
                "transact result is not an array: {}",
                brief(&result)
            )));
        };
        for (op, r) in results.iter().enumerate() {
            if let Some(error) = r.get("error").filter(|e| !e.is_null()) {
                return Err(Error::Transaction {
                    op,
                    error: error
                        .as_str()
                        .map_or_else(|| error.to_string(), str::to_owned),
                    details: r.get("details").and_then(Value::as_str).map(str::to_owned),
                });
            }
        }
        if results.len() < n {
            return Err(Error::Protocol(format!(
                "transact returned {} results for {n} operations",
                results.len()
            )));
        }
        results.truncate(n);
        Ok(results)
    }

    /// Sends one JSON-RPC request and returns its `result`.
    pub fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let t = self.timeout;
        self.request_within(method, params, t)
    }

    fn request_within(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value> {
        let timeout = timeout.max(MIN_IO_TIMEOUT);
        let deadline = deadline_after(timeout);
        let id = self.next_id;
        self.next_id += 1;
        self.send(
            &json!({"method": method, "params": params, "id": id}),
            timeout,
        )?;
        let want = Value::from(id);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(msg) = self.framer.next_message()? {
                if let Some(reply) = self.dispatch(msg, &want, timeout)? {
                    return match reply {
                        Ok(result) => Ok(result),
                        Err(error) => Err(Error::Rpc {
                            method: method.to_string(),
                            error,
                        }),
                    };
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(timeout_err(timeout, method));
            }
            self.stream
                .set_read_timeout(remaining.max(MIN_IO_TIMEOUT))
                .map_err(Error::Io)?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(if self.framer.is_partial() {
                        Error::Protocol("connection closed in the middle of a message".into())
                    } else {
                        Error::Closed
                    })
                }
                Ok(n) => self.framer.push(buf.get(..n).unwrap_or(&buf)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timeout_err(timeout, method)),
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Handles one incoming message. Returns the reply to request `want`
    /// (`Ok(result)` or `Err(error text)`) when that is what arrived.
    fn dispatch(
        &mut self,
        msg: Value,
        want: &Value,
        timeout: Duration,
    ) -> Result<Option<std::result::Result<Value, String>>> {
        let Value::Object(mut obj) = msg else {
            return Err(Error::Protocol(format!(
                "JSON-RPC message is not an object: {}",
                brief(&msg)
            )));
        };
        let id = obj.remove("id").unwrap_or(Value::Null);
        if let Some(method) = obj.get("method") {
            if id.is_null() {
                // Notifications ("update", "locked", …) are for monitors and
                // locks, which this client does not use.
                return Ok(None);
            }
            let reply = if method == "echo" {
                json!({"id": id, "result": obj.remove("params").unwrap_or(json!([])), "error": null})
            } else {
                json!({"id": id, "result": null, "error": "unknown method"})
            };
            self.send(&reply, timeout)?;
            return Ok(None);
        }
        if !obj.contains_key("result") && !obj.contains_key("error") {
            return Err(Error::Protocol(format!(
                "JSON-RPC message is neither request nor reply: {}",
                brief(&Value::Object(obj))
            )));
        }
        if &id != want {
            // A late reply to a request that timed out earlier.
            return Ok(None);
        }
        match obj.remove("error") {
            Some(e) if !e.is_null() => Ok(Some(Err(rpc_error_text(&e)))),
            _ => Ok(Some(Ok(obj.remove("result").unwrap_or(Value::Null)))),
        }
    }

    fn send(&mut self, msg: &Value, timeout: Duration) -> Result<()> {
        let bytes = serde_json::to_vec(msg)
            .map_err(|e| Error::Protocol(format!("cannot encode request: {e}")))?;
        self.stream
            .set_write_timeout(timeout.max(MIN_IO_TIMEOUT))
            .map_err(Error::Io)?;
        self.stream.write_all(&bytes).map_err(|e| {
            if is_timeout(&e) {
                timeout_err(timeout, "sending a request")
            } else {
                io_err(e)
            }
        })
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `now + d`, saturating: a caller may pass `Duration::MAX` for "no limit
/// worth mentioning" and must not get a panic.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_err(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io(e),
    }
}

fn timeout_err(after: Duration, what: &str) -> Error {
    Error::Timeout {
        after,
        what: format!("the OVSDB server to answer {what}"),
    }
}

/// RFC 7047 errors are an object with "error" and optional "details", or a
/// bare string from some servers.
fn rpc_error_text(e: &Value) -> String {
    let main = e
        .get("error")
        .and_then(Value::as_str)
        .or_else(|| e.as_str())
        .map_or_else(|| brief(e), str::to_owned);
    match e.get("details").and_then(Value::as_str) {
        Some(d) if !d.is_empty() => format!("{main} ({d})"),
        _ => main,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    /// The far end of a socketpair, speaking raw bytes, standing in for a
    /// server that misbehaves in ways a real ovsdb-server will not on demand.
    struct Peer {
        sock: UnixStream,
        framer: Framer,
    }

    impl Peer {
        fn recv(&mut self) -> Value {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(v) = self.framer.next_message().unwrap() {
                    return v;
                }
                let n = self.sock.read(&mut buf).unwrap();
                assert!(n > 0, "client closed");
                self.framer.push(&buf[..n]);
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.sock.write_all(bytes).unwrap();
        }

        fn send_json(&mut self, v: Value) {
            self.send(&serde_json::to_vec(&v).unwrap());
        }
    }

    fn pair(
        timeout: Duration,
        script: impl FnOnce(Peer) + Send + 'static,
    ) -> (Client, JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let h = std::thread::spawn(move || {
            script(Peer {
                sock: b,
                framer: Framer::new(),
            })
        });
        (Client::from_unix_stream(a, timeout, "test"), h)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn answers_echo_and_skips_notifications_and_stale_replies() {
        let (mut c, h) = pair(T, |mut p| {
            let req = p.recv();
            assert_eq!(req["method"], "list_dbs");
            let id = req["id"].clone();
            // An echo split across writes, glued to a notification.
            p.send(br#"{"method":"echo","par"#);
            std::thread::sleep(Duration::from_millis(20));
            p.send(
                br#"ams":["ping",1],"id":"e1"}{"method":"update","params":[null,{}],"id":null}"#,
            );
            let reply = p.recv();
            assert_eq!(reply, json!({"id":"e1","result":["ping",1],"error":null}));
            // A reply to some earlier request, then the real one.
            p.send_json(json!({"id": 999, "result": ["stale"], "error": null}));
            p.send_json(json!({"id": id, "result": ["Open_vSwitch"], "error": null}));
            // Unknown requests get an error reply rather than silence.
            let req = p.recv();
            p.send_json(json!({"method":"lock","params":["x"],"id":5}));
            let reply = p.recv();
            assert_eq!(reply["id"], 5);
            assert!(!reply["error"].is_null());
            p.send_json(json!({"id": req["id"], "result": ["evio"], "error": null}));
        });
        assert_eq!(c.list_dbs().unwrap(), ["Open_vSwitch"]);
        c.echo().unwrap();
        h.join().unwrap();
    }

    #[test]
    fn request_error_becomes_rpc_error() {
        let (mut c, h) = pair(T, |mut p| {
            let req = p.recv();
            p.send_json(json!({"id": req["id"], "result": null,
                "error": {"error": "unknown database", "details": "no db X"}}));
        });
        match c.transact("X", vec![]) {
            Err(Error::Rpc { method, error }) => {
                assert_eq!(method, "transact");
                assert_eq!(error, "unknown database (no db X)");
            }
            other => panic!("{other:?}"),
        }
        h.join().unwrap();
    }

    #[test]
    fn transaction_results_are_checked() {
        let (mut c, h) = pair(T, |mut p| {
            let req = p.recv();
            assert_eq!(
                req["params"],
                json!(["db", {"op": "comment", "comment": "a"}, {"op": "comment", "comment": "b"}])
            );
            p.send_json(json!({"id": req["id"], "error": null, "result": [{}, {"error": "constraint violation", "details": "dup"}]}));
            let req = p.recv();
            // Both operations fine, the commit itself failed.
            p.send_json(json!({"id": req["id"], "error": null, "result": [{}, {}, {"error": "referential integrity violation"}]}));
            let req = p.recv();
            p.send_json(json!({"id": req["id"], "error": null, "result": [{}]}));
            let req = p.recv();
            p.send_json(json!({"id": req["id"], "error": null, "result": {"rows": []}}));
            let req = p.recv();
            p.send_json(
                json!({"id": req["id"], "error": null, "result": [{"rows": []}, {"count": 1}]}),
            );
        });
        let ops = || vec![crate::ops::comment("a"), crate::ops::comment("b")];
        match c.transact("db", ops()) {
            Err(Error::Transaction {
                op: 1,
                error,
                details,
            }) => {
                assert_eq!(error, "constraint violation");
                assert_eq!(details.as_deref(), Some("dup"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.transact("db", ops()),
            Err(Error::Transaction { op: 2, .. })
        ));
        assert!(matches!(c.transact("db", ops()), Err(Error::Protocol(_))));
        assert!(matches!(c.transact("db", ops()), Err(Error::Protocol(_))));
        assert_eq!(
            c.transact("db", ops()).unwrap(),
            vec![json!({"rows": []}), json!({"count": 1})]
        );
        h.join().unwrap();
    }

    /// A listener that never accepts and whose backlog is full: before
    /// the fix `connect` parked the caller for ever. The test's own wait is
    /// bounded (a hang fails it instead of hanging the suite) and asserts
    /// no duration: only that connect gives up, with a Connect error.
    #[test]
    fn unix_connect_to_a_full_backlog_times_out() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sock");
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        // Backlog 0: the kernel queues one connection, the next one waits.
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        // Fill the backlog (one or two connections, depending on the kernel).
        for _ in 0..4 {
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match nix::sys::socket::connect(s.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
                Ok(()) => queued.push(s),
                Err(nix::Error::EAGAIN) => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
        }
        let endpoint = format!("unix:{}", path.display());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Client::connect(&endpoint, Duration::from_millis(200)).err());
        });
        let err = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("connect to a full backlog must give up, not hang")
            .expect("connect cannot succeed: nobody accepts");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("backlog"), "{err}");
        drop(queued);
    }

    #[test]
    fn silent_server_times_out_and_late_reply_is_ignored() {
        let (mut c, h) = pair(Duration::from_millis(200), |mut p| {
            let late = p.recv();
            let next = p.recv();
            p.send_json(json!({"id": late["id"], "result": ["late"], "error": null}));
            p.send_json(json!({"id": next["id"], "result": ["evio"], "error": null}));
        });
        let t0 = Instant::now();
        assert!(matches!(c.list_dbs(), Err(Error::Timeout { .. })));
        // Only the lower bound: it waited for the reply. An upper bound is a
        // benchmark's business; under load any bound flakes.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
        c.echo().unwrap();
        h.join().unwrap();
    }

    #[test]
    fn huge_timeout_is_not_an_overflow() {
        let (mut c, h) = pair(Duration::MAX, |mut p| {
            let req = p.recv();
            p.send_json(json!({"id": req["id"], "result": ["evio"], "error": null}));
        });
        c.echo().unwrap();
        h.join().unwrap();
    }

    #[test]
    fn closed_connection() {
        let (mut c, h) = pair(T, |mut p| {
            p.recv();
        });
        let e = c.list_dbs().unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
        assert!(e.is_unavailable());
        h.join().unwrap();
        // Writing to the dead peer fails cleanly too (no SIGPIPE death).
        let e = c.list_dbs().unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
    }

    #[test]
    fn connection_cut_mid_message() {
        let (mut c, h) = pair(T, |mut p| {
            p.recv();
            p.send(br#"{"id":1,"result":["Open_v"#);
        });
        assert!(matches!(c.list_dbs(), Err(Error::Protocol(_))));
        h.join().unwrap();
    }

    #[test]
    fn malformed_replies_are_protocol_errors() {
        for bad in [
            &br#"[1,2]"#[..],
            br#"{"id":1}"#,
            br#"{"id":1,"result":[1]}"#,
            br#"{"id":1,"result":{"x":1}}"#,
            br#"17"#,
            b"{\"id\":1,\"result\":[\"a\xff\"]}",
        ] {
            let (mut c, h) = pair(T, move |mut p| {
                p.recv();
                p.send(bad);
            });
            let e = c.list_dbs().unwrap_err();
            assert!(
                matches!(e, Error::Protocol(_)),
                "{}: {e:?}",
                String::from_utf8_lossy(bad)
            );
            h.join().unwrap();
        }
    }

    #[test]
    fn tcp_endpoint_on_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut f = Framer::new();
            let mut buf = [0u8; 1024];
            let req = loop {
                if let Some(v) = f.next_message().unwrap() {
                    break v;
                }
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                f.push(&buf[..n]);
            };
            let reply =
                json!({"id": req["id"], "result": ["Open_vSwitch", "_Server"], "error": null});
            s.write_all(reply.to_string().as_bytes()).unwrap();
        });
        let mut c = Client::connect(&format!("tcp:127.0.0.1:{port}"), T).unwrap();
        assert_eq!(c.list_dbs().unwrap(), ["Open_vSwitch", "_Server"]);
        h.join().unwrap();
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/run/openvswitch/db.sock").unwrap(),
            Endpoint::Unix("/run/openvswitch/db.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:10.0.0.1:6640").unwrap(),
            Endpoint::Tcp {
                host: "10.0.0.1".into(),
                port: 6640
            }
        );
        assert_eq!(
            Endpoint::parse("tcp:[::1]:6640").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 6640
            }
        );
        assert_eq!(
            Endpoint::parse("tcp:ovs.local:1").unwrap(),
            Endpoint::Tcp {
                host: "ovs.local".into(),
                port: 1
            }
        );
        for bad in [
            "",
            "unix:",
            "/run/db.sock",
            "tcp:",
            "tcp:1.2.3.4",
            "tcp:1.2.3.4:0",
            "tcp:1.2.3.4:70000",
            "tcp::6640",
            "tcp:::1:6640",
            "tcp:[::1:6640",
            "ssl:1.2.3.4:6640",
            "punix:/x",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(Error::Endpoint(_))),
                "{bad}"
            );
        }
    }
}
