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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn drain(f: &mut Framer) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = f.next_message().unwrap() {
            out.push(v);
        }
        out
    }

    #[test]
    fn concatenated_messages_in_one_read() {
        let mut f = Framer::new();
        f.push(br#"{"id":1,"result":[]}{"id":2,"result":{"a":[1,2]}}  [3]"#);
        assert_eq!(
            drain(&mut f),
            vec![
                json!({"id":1,"result":[]}),
                json!({"id":2,"result":{"a":[1,2]}}),
                json!([3])
            ]
        );
        assert!(!f.is_partial());
    }

    #[test]
    fn message_split_byte_by_byte() {
        let text = br#" {"method":"echo","params":["x"],"id":"echo"}
{"id":7,"error":null,"result":"ok"}"#;
        let mut f = Framer::new();
        let mut out = Vec::new();
        for b in text {
            f.push(&[*b]);
            out.extend(drain(&mut f));
        }
        assert_eq!(
            out,
            vec![
                json!({"method":"echo","params":["x"],"id":"echo"}),
                json!({"id":7,"error":null,"result":"ok"})
            ]
        );
    }

    #[test]
    fn brackets_and_quotes_inside_strings() {
        let msg = json!({"s": "a}]\"{[\\", "t": "\\\"", "u": "é🦀"});
        let mut text = serde_json::to_vec(&msg).unwrap();
        text.extend_from_slice(b"{}");
        let mut f = Framer::new();
        // Stop right after an escaped quote, which must not end the string.
        let cut = text.windows(2).position(|w| w == b"\\\"").unwrap() + 2;
        f.push(&text[..cut]);
        assert!(drain(&mut f).is_empty());
        assert!(f.is_partial());
        f.push(&text[cut..]);
        assert_eq!(drain(&mut f), vec![msg, json!({})]);
    }

    #[test]
    fn partial_message_waits_for_more() {
        let mut f = Framer::new();
        f.push(br#"{"id":1,"res"#);
        assert_eq!(f.next_message().unwrap(), None);
        assert!(f.is_partial());
        f.push(br#"ult":null}"#);
        assert_eq!(
            f.next_message().unwrap(),
            Some(json!({"id":1,"result":null}))
        );
        assert_eq!(f.next_message().unwrap(), None);
    }

    #[test]
    fn garbage_between_messages_poisons_the_stream() {
        let mut f = Framer::new();
        f.push(br#"{"a":1} 42 {"b":2}"#);
        assert_eq!(f.next_message().unwrap(), Some(json!({"a":1})));
        let e = f.next_message().unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e:?}");
        // Stays broken: a later valid message is not resynchronised onto.
        assert!(f.next_message().is_err());
    }

    #[test]
    fn invalid_json_inside_a_frame_is_an_error() {
        for bad in [
            &b"{]"[..],
            b"{\"a\":}",
            b"[1,,2]",
            b"{\"a\":tru}",
            b"{\"\xff\":1}",
        ] {
            let mut f = Framer::new();
            f.push(bad);
            assert!(
                matches!(f.next_message(), Err(Error::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut f = Framer::with_limit(16);
        f.push(br#"{"a":"0123456789abcdef"#);
        assert!(matches!(f.next_message(), Err(Error::Protocol(_))));
    }

    #[test]
    fn whitespace_only_is_consumed() {
        let mut f = Framer::new();
        f.push(b"  \n\t ");
        assert_eq!(f.next_message().unwrap(), None);
        assert!(!f.is_partial());
        f.push(b"{}");
        assert_eq!(f.next_message().unwrap(), Some(json!({})));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_split_of_any_messages_round_trips(
            msgs in prop::collection::vec(
                prop::collection::btree_map(".{0,6}", json_value(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                1..5,
            ),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut text = Vec::new();
            for m in &msgs {
                text.extend(serde_json::to_vec(m).unwrap());
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
            points.push(0);
            points.push(text.len());
            points.sort_unstable();
            let mut f = Framer::new();
            let mut out = Vec::new();
            for w in points.windows(2) {
                f.push(&text[w[0]..w[1]]);
                out.extend(drain(&mut f));
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(!f.is_partial());
        }

        #[test]
        fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut f = Framer::with_limit(256);
            for c in chunks {
                f.push(&c);
                while let Ok(Some(_)) = f.next_message() {}
            }
        }
    }
}
