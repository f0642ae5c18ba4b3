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
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(connect_err)?),
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
        let deadline = Instant::now() + timeout;
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
