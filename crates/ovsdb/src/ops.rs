//! Builders for transaction operations (RFC 7047 §5.2), conditions and
//! mutations. They produce `serde_json::Value`s for [`crate::Client::transact`].

use serde_json::{json, Value};

/// Comparison functions of a `where` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// For sets and maps: every element (key/value pair) of the argument is
    /// in the column.
    Includes,
    Excludes,
}

impl Function {
    pub fn as_str(self) -> &'static str {
        match self {
            Function::Eq => "==",
            Function::Ne => "!=",
            Function::Lt => "<",
            Function::Le => "<=",
            Function::Gt => ">",
            Function::Ge => ">=",
            Function::Includes => "includes",
            Function::Excludes => "excludes",
        }
    }
}

/// Mutators of a `mutate` operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutator {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Insert,
    Delete,
}

impl Mutator {
    pub fn as_str(self) -> &'static str {
        match self {
            Mutator::Add => "+=",
            Mutator::Sub => "-=",
            Mutator::Mul => "*=",
            Mutator::Div => "/=",
            Mutator::Mod => "%=",
            Mutator::Insert => "insert",
            Mutator::Delete => "delete",
        }
    }
}

/// What a `wait` operation waits for: the selected rows becoming equal, or
/// different, to the given rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Eq,
    Ne,
}

/// `[column, function, value]`
pub fn cond(column: &str, function: Function, value: Value) -> Value {
    json!([column, function.as_str(), value])
}

/// `[column, "==", value]`
pub fn eq(column: &str, value: impl Into<Value>) -> Value {
    cond(column, Function::Eq, value.into())
}

/// `[column, "includes", value]`
pub fn includes(column: &str, value: Value) -> Value {
    cond(column, Function::Includes, value)
}

/// `[column, mutator, value]`
pub fn mutation(column: &str, mutator: Mutator, value: Value) -> Value {
    json!([column, mutator.as_str(), value])
}

/// `insert`; `uuid_name` lets later operations of the same transaction refer
/// to the new row as `["named-uuid", uuid_name]`.
pub fn insert(table: &str, row: Value, uuid_name: Option<&str>) -> Value {
    let mut op = json!({"op": "insert", "table": table, "row": row});
    if let (Some(name), Some(obj)) = (uuid_name, op.as_object_mut()) {
        obj.insert("uuid-name".into(), name.into());
    }
    op
}

/// `select`; `columns: None` selects all columns.
pub fn select(table: &str, conditions: Vec<Value>, columns: Option<&[&str]>) -> Value {
    let mut op = json!({"op": "select", "table": table, "where": conditions});
    if let (Some(cols), Some(obj)) = (columns, op.as_object_mut()) {
        obj.insert("columns".into(), json!(cols));
    }
    op
}

pub fn update(table: &str, conditions: Vec<Value>, row: Value) -> Value {
    json!({"op": "update", "table": table, "where": conditions, "row": row})
}

pub fn mutate(table: &str, conditions: Vec<Value>, mutations: Vec<Value>) -> Value {
    json!({"op": "mutate", "table": table, "where": conditions, "mutations": mutations})
}

pub fn delete(table: &str, conditions: Vec<Value>) -> Value {
    json!({"op": "delete", "table": table, "where": conditions})
}

/// `wait`: the transaction only proceeds once the rows matching
/// `conditions`, projected to `columns`, compare to `rows` as `until` says.
/// The server re-evaluates on every change for up to `timeout_ms` and then
/// fails the operation with "timed out"; `0` makes it an assertion. A
/// timeout is always given: an unbounded wait could hang the caller.
pub fn wait(
    table: &str,
    conditions: Vec<Value>,
    columns: &[&str],
    until: Until,
    rows: Vec<Value>,
    timeout_ms: u64,
) -> Value {
    let until = match until {
        Until::Eq => "==",
        Until::Ne => "!=",
    };
    json!({
        "op": "wait",
        "table": table,
        "where": conditions,
        "columns": columns,
        "until": until,
        "rows": rows,
        "timeout": timeout_ms,
    })
}

/// `comment`: shows up in the server's log, handy to tell who did what.
pub fn comment(text: &str) -> Value {
    json!({"op": "comment", "comment": text})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datum::{named_uuid, set, uuid};

    #[test]
    fn operations_encode_as_rfc7047() {
        assert_eq!(
            insert("Port", json!({"name": "p"}), Some("new_port")),
            json!({"op": "insert", "table": "Port", "row": {"name": "p"}, "uuid-name": "new_port"})
        );
        assert_eq!(
            insert("Port", json!({}), None),
            json!({"op": "insert", "table": "Port", "row": {}})
        );
        assert_eq!(
            select("Bridge", vec![eq("name", "br0")], Some(&["_uuid", "ports"])),
            json!({"op": "select", "table": "Bridge", "where": [["name", "==", "br0"]], "columns": ["_uuid", "ports"]})
        );
        assert_eq!(
            select("Bridge", vec![], None),
            json!({"op": "select", "table": "Bridge", "where": []})
        );
        assert_eq!(
            mutate(
                "Bridge",
                vec![eq("_uuid", uuid("u"))],
                vec![mutation(
                    "ports",
                    Mutator::Insert,
                    set(vec![named_uuid("p")])
                )]
            ),
            json!({"op": "mutate", "table": "Bridge", "where": [["_uuid", "==", ["uuid", "u"]]],
                   "mutations": [["ports", "insert", ["set", [["named-uuid", "p"]]]]]})
        );
        assert_eq!(
            wait(
                "Port",
                vec![includes("external_ids", json!(["map", []]))],
                &["name"],
                Until::Ne,
                vec![],
                0
            ),
            json!({"op": "wait", "table": "Port", "where": [["external_ids", "includes", ["map", []]]],
                   "columns": ["name"], "until": "!=", "rows": [], "timeout": 0})
        );
        assert_eq!(
            update("Interface", vec![], json!({"mtu_request": 1400})),
            json!({"op": "update", "table": "Interface", "where": [], "row": {"mtu_request": 1400}})
        );
        assert_eq!(
            delete("Port", vec![cond("name", Function::Ne, json!("x"))]),
            json!({"op": "delete", "table": "Port", "where": [["name", "!=", "x"]]})
        );
        assert_eq!(comment("hi"), json!({"op": "comment", "comment": "hi"}));
    }

    #[test]
    fn function_and_mutator_spellings() {
        let f: Vec<_> = [
            Function::Eq,
            Function::Ne,
            Function::Lt,
            Function::Le,
            Function::Gt,
            Function::Ge,
            Function::Includes,
            Function::Excludes,
        ]
        .iter()
        .map(|f| f.as_str())
        .collect();
        assert_eq!(
            f,
            ["==", "!=", "<", "<=", ">", ">=", "includes", "excludes"]
        );
        let m: Vec<_> = [
            Mutator::Add,
            Mutator::Sub,
            Mutator::Mul,
            Mutator::Div,
            Mutator::Mod,
            Mutator::Insert,
            Mutator::Delete,
        ]
        .iter()
        .map(|m| m.as_str())
        .collect();
        assert_eq!(m, ["+=", "-=", "*=", "/=", "%=", "insert", "delete"]);
    }
}
