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
