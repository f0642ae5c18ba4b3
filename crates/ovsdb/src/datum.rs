//! OVSDB values (RFC 7047 §5.1): atoms, sets and maps, their JSON encoding,
//! and decoding of what a server sends back. Decoding takes arbitrary JSON
//! from the wire and reports anything unexpected as [`Error::Protocol`].

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A single OVSDB value.
#[derive(Debug, Clone, PartialEq)]
pub enum Atom {
    Integer(i64),
    Real(f64),
    Boolean(bool),
    String(String),
    /// A row reference: `["uuid", "…"]`.
    Uuid(String),
    /// A reference to a row inserted earlier in the same transaction:
    /// `["named-uuid", "…"]`.
    NamedUuid(String),
}

impl Atom {
    pub fn to_json(&self) -> Value {
        match self {
            Atom::Integer(i) => Value::from(*i),
            Atom::Real(r) => Value::from(*r),
            Atom::Boolean(b) => Value::Bool(*b),
            Atom::String(s) => Value::String(s.clone()),
            Atom::Uuid(u) => uuid(u),
            Atom::NamedUuid(n) => named_uuid(n),
        }
    }

    pub fn from_json(v: &Value) -> Result<Atom> {
        match v {
            Value::Bool(b) => Ok(Atom::Boolean(*b)),
            Value::String(s) => Ok(Atom::String(s.clone())),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(Atom::Integer(i))
                } else if n.is_u64() {
                    Err(proto(format!("integer {n} out of range")))
                } else {
                    n.as_f64()
                        .map(Atom::Real)
                        .ok_or_else(|| proto(format!("bad number {n}")))
                }
            }
            Value::Array(a) => match a.as_slice() {
                [Value::String(tag), Value::String(id)] if tag == "uuid" => {
                    if is_uuid(id) {
                        Ok(Atom::Uuid(id.clone()))
                    } else {
                        Err(proto(format!("malformed uuid {id:?}")))
                    }
                }
                [Value::String(tag), Value::String(id)] if tag == "named-uuid" => {
                    if is_id(id) {
                        Ok(Atom::NamedUuid(id.clone()))
                    } else {
                        Err(proto(format!("malformed named-uuid {id:?}")))
                    }
                }
                _ => Err(proto(format!("expected an atom, got {}", brief(v)))),
            },
            Value::Null | Value::Object(_) => {
                Err(proto(format!("expected an atom, got {}", brief(v))))
            }
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Atom::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_uuid(&self) -> Option<&str> {
        match self {
            Atom::Uuid(u) => Some(u),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Atom::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

/// A column value. A bare atom on the wire is a one-element set, so it
/// decodes to `Set` with one element; optional columns (min 0, max 1) are
/// sets of zero or one atom.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Set(Vec<Atom>),
    Map(Vec<(Atom, Atom)>),
}

impl Datum {
    /// Encodes with the shortest form OVSDB accepts: a one-element set as
    /// the bare atom, anything else tagged.
    pub fn to_json(&self) -> Value {
        match self {
            Datum::Set(atoms) => match atoms.as_slice() {
                [one] => one.to_json(),
                _ => tagged("set", atoms.iter().map(Atom::to_json).collect()),
            },
            Datum::Map(pairs) => tagged(
                "map",
                pairs
                    .iter()
                    .map(|(k, v)| Value::Array(vec![k.to_json(), v.to_json()]))
                    .collect(),
            ),
        }
    }

    pub fn from_json(v: &Value) -> Result<Datum> {
        if let Value::Array(a) = v {
            if let [Value::String(tag), Value::Array(items)] = a.as_slice() {
                match tag.as_str() {
                    "set" => {
                        return items
                            .iter()
                            .map(Atom::from_json)
                            .collect::<Result<Vec<_>>>()
                            .map(Datum::Set)
                    }
                    "map" => {
                        return items
                            .iter()
                            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                                Some([k, v]) => Ok((Atom::from_json(k)?, Atom::from_json(v)?)),
                                _ => Err(proto(format!(
                                    "map entry must be [key, value], got {}",
                                    brief(pair)
                                ))),
                            })
                            .collect::<Result<Vec<_>>>()
                            .map(Datum::Map)
                    }
                    _ => {}
                }
            }
        }
        Atom::from_json(v).map(|a| Datum::Set(vec![a]))
    }

    /// A scalar string column.
    pub fn string(&self) -> Result<String> {
        match self.single()? {
            Some(Atom::String(s)) => Ok(s.clone()),
            other => Err(proto(format!("expected a string, got {other:?}"))),
        }
    }

    /// A scalar uuid column (e.g. `_uuid`).
    pub fn uuid(&self) -> Result<String> {
        match self.single()? {
            Some(Atom::Uuid(u)) => Ok(u.clone()),
            other => Err(proto(format!("expected a uuid, got {other:?}"))),
        }
    }

    /// An optional integer column (e.g. `Interface.ofport`).
    pub fn optional_integer(&self) -> Result<Option<i64>> {
        match self.single()? {
            None => Ok(None),
            Some(Atom::Integer(i)) => Ok(Some(*i)),
            Some(other) => Err(proto(format!("expected an integer, got {other:?}"))),
        }
    }

    /// An optional string column (e.g. `Interface.error`).
    pub fn optional_string(&self) -> Result<Option<String>> {
        match self.single()? {
            None => Ok(None),
            Some(Atom::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(proto(format!("expected a string, got {other:?}"))),
        }
    }

    /// A set of row references (e.g. `Bridge.ports`).
    pub fn uuids(&self) -> Result<Vec<String>> {
        match self {
            Datum::Set(atoms) => atoms
                .iter()
                .map(|a| {
                    a.as_uuid()
                        .map(str::to_owned)
                        .ok_or_else(|| proto(format!("expected a uuid, got {a:?}")))
                })
                .collect(),
            Datum::Map(_) => Err(proto("expected a set of uuids, got a map".into())),
        }
    }

    /// A string→string map (e.g. `external_ids`). An empty set is accepted
    /// as an empty map since both encode "nothing".
    pub fn string_map(&self) -> Result<BTreeMap<String, String>> {
        match self {
            Datum::Map(pairs) => pairs
                .iter()
                .map(|(k, v)| match (k, v) {
                    (Atom::String(k), Atom::String(v)) => Ok((k.clone(), v.clone())),
                    _ => Err(proto(format!(
                        "expected string map entry, got {k:?} => {v:?}"
                    ))),
                })
                .collect(),
            Datum::Set(atoms) if atoms.is_empty() => Ok(BTreeMap::new()),
            Datum::Set(_) => Err(proto("expected a map, got a set".into())),
        }
    }

    /// Zero or one atom; more is a protocol error for the scalar accessors.
    fn single(&self) -> Result<Option<&Atom>> {
        match self {
            Datum::Set(atoms) => match atoms.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(one)),
                _ => Err(proto(format!(
                    "expected at most one value, got {}",
                    atoms.len()
                ))),
            },
            Datum::Map(_) => Err(proto("expected a scalar, got a map".into())),
        }
    }
}

/// One row of a `select` result, with typed column access.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a>(&'a Map<String, Value>);

impl<'a> Row<'a> {
    pub fn raw(&self, column: &str) -> Result<&'a Value> {
        self.0
            .get(column)
            .ok_or_else(|| proto(format!("row has no column {column:?}")))
    }

    pub fn datum(&self, column: &str) -> Result<Datum> {
        Datum::from_json(self.raw(column)?).map_err(|e| in_column(column, e))
    }

    pub fn string(&self, column: &str) -> Result<String> {
        self.datum(column)?
            .string()
            .map_err(|e| in_column(column, e))
    }

    pub fn uuid(&self, column: &str) -> Result<String> {
        self.datum(column)?.uuid().map_err(|e| in_column(column, e))
    }

    pub fn optional_integer(&self, column: &str) -> Result<Option<i64>> {
        self.datum(column)?
            .optional_integer()
            .map_err(|e| in_column(column, e))
    }

    pub fn optional_string(&self, column: &str) -> Result<Option<String>> {
        self.datum(column)?
            .optional_string()
            .map_err(|e| in_column(column, e))
    }

    pub fn uuids(&self, column: &str) -> Result<Vec<String>> {
        self.datum(column)?
            .uuids()
            .map_err(|e| in_column(column, e))
    }

    pub fn string_map(&self, column: &str) -> Result<BTreeMap<String, String>> {
        self.datum(column)?
            .string_map()
            .map_err(|e| in_column(column, e))
    }
}

/// The rows of a `select` operation's result `{"rows": [...]}`.
pub fn rows(result: &Value) -> Result<Vec<Row<'_>>> {
    let rows = result
        .get("rows")
        .and_then(Value::as_array)
        .ok_or_else(|| proto(format!("select result without rows: {}", brief(result))))?;
    rows.iter()
        .map(|r| {
            r.as_object()
                .map(Row)
                .ok_or_else(|| proto(format!("row is not an object: {}", brief(r))))
        })
        .collect()
}

/// The `count` of an `update`, `mutate` or `delete` result.
pub fn count(result: &Value) -> Result<u64> {
    result
        .get("count")
        .and_then(Value::as_u64)
        .ok_or_else(|| proto(format!("result without count: {}", brief(result))))
}

/// The uuid of the row an `insert` created.
pub fn inserted_uuid(result: &Value) -> Result<String> {
    let uuid = result
        .get("uuid")
        .ok_or_else(|| proto(format!("insert result without uuid: {}", brief(result))))?;
    Datum::from_json(uuid)?.uuid()
}

/// `["uuid", id]`
pub fn uuid(id: &str) -> Value {
    Value::Array(vec!["uuid".into(), id.into()])
}

/// `["named-uuid", name]`
pub fn named_uuid(name: &str) -> Value {
    Value::Array(vec!["named-uuid".into(), name.into()])
}

/// `["set", [atoms…]]` (always tagged; fine for any set column).
pub fn set(atoms: Vec<Value>) -> Value {
    tagged("set", atoms)
}

/// `["map", [[k, v]…]]` of strings.
pub fn string_map<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Value {
    tagged(
        "map",
        pairs
            .iter()
            .map(|(k, v)| Value::Array(vec![k.as_ref().into(), v.as_ref().into()]))
            .collect(),
    )
}

fn tagged(tag: &str, items: Vec<Value>) -> Value {
    Value::Array(vec![tag.into(), Value::Array(items)])
}

/// RFC 4122 textual form, which is all ovsdb-server emits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, the RFC's <id>.
fn is_id(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn proto(msg: String) -> Error {
    Error::Protocol(msg)
}

fn in_column(column: &str, e: Error) -> Error {
    match e {
        Error::Protocol(m) if !m.starts_with("column ") => {
            Error::Protocol(format!("column {column:?}: {m}"))
        }
        other => other,
    }
}

/// A short rendering of unexpected JSON for error messages, so a huge reply
/// does not end up verbatim in a CNI error.
pub(crate) fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 120 {
        return s;
    }
    let mut end = 120;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const U: &str = "36bb8e7c-8a63-4a5e-a6a2-6fde1c1fe5b7";

    #[test]
    fn atoms_decode_and_encode() {
        let cases = [
            (json!(5), Atom::Integer(5)),
            (json!(-1), Atom::Integer(-1)),
            (json!(1.5), Atom::Real(1.5)),
            (json!(true), Atom::Boolean(true)),
            (json!("x"), Atom::String("x".into())),
            (json!(["uuid", U]), Atom::Uuid(U.into())),
            (
                json!(["named-uuid", "row_1"]),
                Atom::NamedUuid("row_1".into()),
            ),
        ];
        for (j, a) in cases {
            assert_eq!(Atom::from_json(&j).unwrap(), a, "{j}");
            assert_eq!(a.to_json(), j);
        }
    }

    #[test]
    fn malformed_atoms_are_protocol_errors() {
        for j in [
            json!(null),
            json!({}),
            json!(u64::MAX),
            json!(["uuid", "not-a-uuid"]),
            json!(["uuid", "36bb8e7c-8a63-4a5e-a6a2-6fde1c1fe5bZ"]),
            json!(["uuid", 5]),
            json!(["uuid"]),
            json!(["named-uuid", "1abc"]),
            json!(["named-uuid", ""]),
            json!(["foo", "bar"]),
            json!([]),
            json!(["set", []]),
        ] {
            assert!(
                matches!(Atom::from_json(&j), Err(Error::Protocol(_))),
                "{j}"
            );
        }
    }

    #[test]
    fn sets_and_maps() {
        let empty = json!(["set", []]);
        assert_eq!(Datum::from_json(&empty).unwrap(), Datum::Set(vec![]));
        assert_eq!(Datum::Set(vec![]).to_json(), empty);
        // A one-element set is written as the bare atom, and read back.
        let one = Datum::Set(vec![Atom::Integer(3)]);
        assert_eq!(one.to_json(), json!(3));
        assert_eq!(Datum::from_json(&json!(["set", [3]])).unwrap(), one);
        let two = json!(["set", [["uuid", U], ["uuid", U]]]);
        assert_eq!(Datum::from_json(&two).unwrap().to_json(), two);

        let m = json!(["map", [["a", "1"], ["b", "2"]]]);
        let d = Datum::from_json(&m).unwrap();
        assert_eq!(d.to_json(), m);
        assert_eq!(
            d.string_map().unwrap(),
            BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())])
        );
        assert_eq!(string_map(&[("a", "1"), ("b", "2")]), m);
        assert_eq!(string_map::<&str, &str>(&[]), json!(["map", []]));
        assert!(Datum::from_json(&json!(["map", []]))
            .unwrap()
            .string_map()
            .unwrap()
            .is_empty());
        assert_eq!(set(vec![uuid(U)]), json!(["set", [["uuid", U]]]));
        assert_eq!(named_uuid("p"), json!(["named-uuid", "p"]));
    }

    #[test]
    fn malformed_sets_and_maps() {
        for j in [
            json!(["set", [["set", []]]]),
            json!(["set", [null]]),
            json!(["set", "x"]),
            json!(["map", [["a"]]]),
            json!(["map", [["a", "b", "c"]]]),
            json!(["map", ["a"]]),
            json!(["map", [[["map", []], "b"]]]),
            json!(["map", {}]),
        ] {
            assert!(
                matches!(Datum::from_json(&j), Err(Error::Protocol(_))),
                "{j}"
            );
        }
    }

    #[test]
    fn typed_accessors() {
        let d = |j: Value| Datum::from_json(&j).unwrap();
        assert_eq!(d(json!(["set", []])).optional_integer().unwrap(), None);
        assert_eq!(d(json!(7)).optional_integer().unwrap(), Some(7));
        assert!(d(json!(["set", [1, 2]])).optional_integer().is_err());
        assert!(d(json!("7")).optional_integer().is_err());
        assert_eq!(d(json!(["set", []])).optional_string().unwrap(), None);
        assert_eq!(
            d(json!("e")).optional_string().unwrap().as_deref(),
            Some("e")
        );
        assert_eq!(d(json!("s")).string().unwrap(), "s");
        assert!(d(json!(["set", []])).string().is_err());
        assert_eq!(d(json!(["uuid", U])).uuid().unwrap(), U);
        assert_eq!(d(json!(["set", [["uuid", U]]])).uuids().unwrap(), [U]);
        assert!(d(json!(["set", ["x"]])).uuids().is_err());
        assert!(d(json!(["map", [["a", 1]]])).string_map().is_err());
        assert!(d(json!(["set", ["a"]])).string_map().is_err());
        assert!(d(json!(["map", []])).string().is_err());
    }

    #[test]
    fn rows_and_results() {
        let r = json!({"rows": [{"name": "br0", "ofport": ["set", []], "_uuid": ["uuid", U]}]});
        let rows = rows(&r).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].string("name").unwrap(), "br0");
        assert_eq!(rows[0].uuid("_uuid").unwrap(), U);
        assert_eq!(rows[0].optional_integer("ofport").unwrap(), None);
        match rows[0].string("missing") {
            Err(Error::Protocol(m)) => assert!(m.contains("missing"), "{m}"),
            other => panic!("{other:?}"),
        }
        match rows[0].string("ofport") {
            Err(Error::Protocol(m)) => assert!(m.contains("ofport"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(super::rows(&json!({})).is_err());
        assert!(super::rows(&json!({"rows": [1]})).is_err());
        assert!(super::rows(&json!({"rows": {}})).is_err());
        assert_eq!(count(&json!({"count": 2})).unwrap(), 2);
        assert!(count(&json!({"count": -1})).is_err());
        assert_eq!(inserted_uuid(&json!({"uuid": ["uuid", U]})).unwrap(), U);
        assert!(inserted_uuid(&json!({"uuid": "x"})).is_err());
    }

    #[test]
    fn brief_cuts_long_text_on_a_char_boundary() {
        let long = Value::String("é".repeat(200));
        let b = brief(&long);
        assert!(b.ends_with('…'));
        assert!(b.len() < 130);
    }

    fn atom() -> impl Strategy<Value = Atom> {
        prop_oneof![
            any::<i64>().prop_map(Atom::Integer),
            any::<bool>().prop_map(Atom::Boolean),
            ".*".prop_map(Atom::String),
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".prop_map(Atom::Uuid),
            "[a-z_][a-z0-9_]{0,8}".prop_map(Atom::NamedUuid),
        ]
    }

    proptest! {
        #[test]
        fn datum_round_trips(
            s in prop::collection::vec(atom(), 0..5),
            m in prop::collection::vec((atom(), atom()), 0..5),
        ) {
            let set = Datum::Set(s);
            prop_assert_eq!(Datum::from_json(&set.to_json()).unwrap(), set);
            let map = Datum::Map(m);
            prop_assert_eq!(Datum::from_json(&map.to_json()).unwrap(), map);
        }

        #[test]
        fn decoding_arbitrary_json_never_panics(text in ".{0,64}") {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if let Ok(d) = Datum::from_json(&v) {
                    let _ = (d.string(), d.uuids(), d.string_map(), d.optional_integer());
                }
                let _ = rows(&v);
            }
        }

        #[test]
        fn decoding_arbitrary_tagged_arrays_never_panics(
            tag in prop_oneof![
                Just("set".to_string()), Just("map".to_string()), Just("uuid".to_string()),
                Just("named-uuid".to_string()), ".{0,4}"
            ],
            body in prop_oneof![
                Just(json!([])), Just(json!([[1]])), Just(json!([[1, 2, 3]])),
                Just(json!("x")), Just(json!(null)), Just(json!([["uuid", "x"], 1]))
            ],
        ) {
            let _ = Datum::from_json(&json!([tag, body]));
        }
    }
}
