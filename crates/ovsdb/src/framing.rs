//! JSON-RPC framing for OVSDB: the stream is a sequence of JSON texts with
//! no delimiter, and a read may end anywhere inside one (or hold several).
//!
//! [`Framer`] finds message boundaries with a small byte scanner that tracks
//! bracket depth and string/escape state, remembering how far it got, so each
//! byte is scanned once however the message is split across reads; only a
//! complete message is handed to serde_json. Re-parsing the whole buffer after
//! every read (a plain `StreamDeserializer` retry) would be quadratic for the
//! large `select` replies of a busy bridge.

use serde_json::Value;

use crate::error::{Error, Result};

/// Largest message accepted before the peer is declared broken: far above
/// any reply evio asks for, low enough that garbage cannot exhaust memory.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

/// Incremental splitter of a byte stream into JSON values. Feed it bytes
/// with [`Framer::push`], take complete messages with
/// [`Framer::next_message`]. After an error the stream cannot be
/// resynchronised, so the same error is returned on every later call.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned for the current message.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escape: bool,
    max: usize,
    /// Set once the stream is known to be broken.
    poisoned: Option<String>,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new()
    }
}

impl Framer {
    pub fn new() -> Framer {
        Framer::with_limit(DEFAULT_MAX_MESSAGE)
    }

    pub fn with_limit(max: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            scanned: 0,
            depth: 0,
            in_string: false,
            escape: false,
            max,
            poisoned: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether a message has started but not yet completed: an EOF now
    /// means the peer cut a message short.
    pub fn is_partial(&self) -> bool {
        self.depth > 0
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Value>> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Protocol(why.clone()));
        }
        let result = self.scan();
        if let Err(Error::Protocol(why)) = &result {
            self.poisoned = Some(why.clone());
        }
        result
    }

    fn scan(&mut self) -> Result<Option<Value>> {
        let mut i = self.scanned;
        while let Some(&b) = self.buf.get(i) {
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        // Inter-message whitespace is not part of the frame.
                        self.buf.drain(..i);
                        i = 0;
                        self.depth = 1;
                    }
                    _ => {
                        return Err(Error::Protocol(format!(
                            "unexpected byte 0x{b:02x} between JSON-RPC messages"
                        )))
                    }
                }
            } else if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            return self.take_frame(i + 1).map(Some);
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        if self.depth == 0 {
            // Only whitespace was seen since the last message.
            self.buf.clear();
            self.scanned = 0;
        } else {
            self.scanned = i;
            if self.buf.len() > self.max {
                return Err(Error::Protocol(format!(
                    "JSON-RPC message larger than {} bytes",
                    self.max
                )));
            }
        }
        Ok(None)
    }

    fn take_frame(&mut self, end: usize) -> Result<Value> {
        let frame = self.buf.get(..end).unwrap_or(&self.buf[..]);
        let parsed = serde_json::from_slice::<Value>(frame);
        match parsed {
            Ok(v) => {
                self.buf.drain(..end.min(self.buf.len()));
                self.scanned = 0;
                Ok(v)
            }
            Err(e) => Err(Error::Protocol(format!("invalid JSON message: {e}"))),
        }
    }
}
