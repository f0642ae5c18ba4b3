//! What evio needs from the `Open_vSwitch` database: bridges, and ports
//! with their single interface, identified through `external_ids`.
//!
//! Every check that guards a change (bridge absent, port absent, port still
//! owned by the caller) is a `wait` operation inside the same transaction as
//! the change, so concurrent plugin processes cannot interleave between the
//! check and the write.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{deadline_after, Client};
use crate::datum::{self, named_uuid, rows, set, string_map, uuid, Row};
use crate::error::{Error, Result};
use crate::ops::{self, eq, includes, insert, mutate, mutation, select, wait, Mutator, Until};

/// The database name served by ovsdb-server for ovs-vswitchd.
pub const DB: &str = "Open_vSwitch";

/// The error text ovsdb-server gives a `wait` whose condition did not hold.
const WAIT_FAILED: &str = "timed out";

/// Cap on a server-side `wait` (ovsdb-server wants a signed integer): a
/// longer `wait_ofport` timeout is cut to this.
const MAX_WAIT_MS: u64 = 30 * 86_400 * 1000;

/// What [`Client::bridge`] reads of a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInfo {
    /// `""` means the default, `system`.
    pub datapath_type: String,
    pub other_config: std::collections::BTreeMap<String, String>,
}

/// A port to add: one port with one interface of the same name, both
/// tagged with the same `external_ids`.
#[derive(Debug, Clone, Copy)]
pub struct PortSpec<'a> {
    pub name: &'a str,
    pub external_ids: &'a [(&'a str, &'a str)],
}

/// A port as found in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub port_uuid: String,
    pub interface_uuid: String,
    /// The OpenFlow port number; `None` until vswitchd has looked at the
    /// interface, `Some(-1)` if it failed to.
    pub ofport: Option<i64>,
    /// The port's `external_ids`.
    pub external_ids: BTreeMap<String, String>,
    /// Name of the bridge holding the port.
    pub bridge: String,
    /// The interface's `error` column: why vswitchd could not use it.
    pub error: Option<String>,
}

const PORT_COLUMNS: &[&str] = &["_uuid", "name", "interfaces", "external_ids"];
const IFACE_COLUMNS: &[&str] = &["_uuid", "name", "ofport", "error"];

impl Client {
    /// Creates bridge `name` if missing, with its internal port and
    /// interface of the same name (as `ovs-vsctl add-br`) and the given
    /// `datapath_type` (`"netdev"`, `"system"`). Returns whether it was
    /// created by this call; an existing bridge is left alone whatever its
    /// datapath type (see [`Client::bridge_datapath_type`]).
    ///
    /// Safe to race: the transaction asserts that the bridge is absent, so
    /// of several concurrent callers exactly one creates it and the others
    /// get `Ok(false)`.
    ///
    /// `other_config` is set by the creating transaction itself (e.g. the
    /// pinned `hwaddr`): a caller killed right after creation must not leave
    /// a bridge without it, since later callers see the bridge existing and
    /// never set it.
    pub fn ensure_bridge(
        &mut self,
        name: &str,
        datapath_type: &str,
        other_config: &[(&str, &str)],
    ) -> Result<bool> {
        let mut last = None;
        // A second attempt covers a commit that lost a race in a way the
        // leading `wait` cannot see (e.g. the internal port's name index).
        for _ in 0..2 {
            let ops = vec![
                absent("Bridge", name),
                insert(
                    "Interface",
                    json!({"name": name, "type": "internal"}),
                    Some("iface"),
                ),
                insert(
                    "Port",
                    json!({"name": name, "interfaces": named_uuid("iface")}),
                    Some("port"),
                ),
                insert(
                    "Bridge",
                    json!({
                        "name": name,
                        "ports": named_uuid("port"),
                        "datapath_type": datapath_type,
                        "other_config": string_map(other_config),
                    }),
                    Some("bridge"),
                ),
                mutate(
                    "Open_vSwitch",
                    vec![],
                    vec![mutation(
                        "bridges",
                        Mutator::Insert,
                        set(vec![named_uuid("bridge")]),
                    )],
                ),
            ];
            match self.transact(DB, ops) {
                Ok(results) => {
                    // Without the root row nothing references the new bridge
                    // and the server silently garbage-collects it.
                    return match results.get(4).map(datum::count).transpose()? {
                        Some(0) | None => Err(Error::NotFound(
                            "Open_vSwitch root row (database not initialised)".into(),
                        )),
                        Some(_) => Ok(true),
                    };
                }
                Err(Error::Transaction { op: 0, error, .. }) if error == WAIT_FAILED => {
                    return Ok(false)
                }
                Err(e @ Error::Transaction { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::NotFound(format!("bridge {name}"))))
    }

    /// The bridge's `datapath_type` (`""` means the default, `system`), or
    /// `None` if there is no such bridge.
    pub fn bridge_datapath_type(&mut self, name: &str) -> Result<Option<String>> {
        Ok(self.bridge(name)?.map(|b| b.datapath_type))
    }

    /// The bridge's `datapath_type` and `other_config`, or `None` if there
    /// is no such bridge.
    pub fn bridge(&mut self, name: &str) -> Result<Option<BridgeInfo>> {
        let results = self.transact(
            DB,
            vec![select(
                "Bridge",
                vec![eq("name", name)],
                Some(&["datapath_type", "other_config"]),
            )],
        )?;
        match first_rows(&results, 0)?.first() {
            Some(row) => Ok(Some(BridgeInfo {
                datapath_type: row.string("datapath_type")?,
                other_config: row.string_map("other_config")?,
            })),
            None => Ok(None),
        }
    }

    /// Adds a port with one interface of type `""` (an existing network
    /// device, e.g. the host end of a pod's veth) to `bridge`, both with
    /// `port.external_ids`, in one transaction. Fails with
    /// [`Error::PortExists`] if a port or interface of that name exists
    /// anywhere, [`Error::NotFound`] if the bridge does not exist. Does not
    /// wait for vswitchd: see [`Client::wait_ofport`].
    pub fn add_port(&mut self, bridge: &str, port: &PortSpec) -> Result<()> {
        let ids = string_map(port.external_ids);
        let ops = vec![
            wait(
                "Bridge",
                vec![eq("name", bridge)],
                &["name"],
                Until::Ne,
                vec![],
                0,
            ),
            absent("Port", port.name),
            absent("Interface", port.name),
            insert(
                "Interface",
                json!({"name": port.name, "type": "", "external_ids": ids}),
                Some("iface"),
            ),
            insert(
                "Port",
                json!({"name": port.name, "interfaces": named_uuid("iface"), "external_ids": ids}),
                Some("port"),
            ),
            mutate(
                "Bridge",
                vec![eq("name", bridge)],
                vec![mutation(
                    "ports",
                    Mutator::Insert,
                    set(vec![named_uuid("port")]),
                )],
            ),
        ];
        match self.transact(DB, ops) {
            Ok(_) => Ok(()),
            Err(Error::Transaction { op: 0, error, .. }) if error == WAIT_FAILED => {
                Err(Error::NotFound(format!("bridge {bridge}")))
            }
            Err(Error::Transaction {
                op: 1 | 2, error, ..
            }) if error == WAIT_FAILED => Err(Error::PortExists(port.name.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Waits until ovs-vswitchd has attached interface `iface`: returns its
    /// OpenFlow port number, [`Error::Interface`] with vswitchd's reason if
    /// it failed (e.g. no such device), [`Error::NotFound`] if the
    /// interface disappears, [`Error::Timeout`] after `timeout`.
    ///
    /// Efficient: each round trip is a server-side `wait` for the row's
    /// `ofport`/`error` to differ from what was last seen, so the client
    /// sleeps in the server until vswitchd writes something.
    pub fn wait_ofport(&mut self, iface: &str, timeout: Duration) -> Result<i64> {
        let deadline = deadline_after(timeout);
        let cols: &[&str] = &["ofport", "error"];
        let query = select("Interface", vec![eq("name", iface)], Some(cols));
        let mut results = self.transact(DB, vec![query.clone()])?;
        let mut idx = 0;
        loop {
            let rows = first_rows(&results, idx)?;
            let row = rows
                .first()
                .ok_or_else(|| Error::NotFound(format!("interface {iface}")))?;
            let ofport = row.optional_integer("ofport")?;
            if let Some(p) = ofport.filter(|p| *p > 0) {
                return Ok(p);
            }
            if let Some(error) = row.optional_string("error")? {
                return Err(Error::Interface {
                    iface: iface.to_string(),
                    error,
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            // ovsdb-server takes a signed integer; a month is plenty.
            let remaining_ms = u64::try_from(remaining.as_millis())
                .unwrap_or(u64::MAX)
                .min(MAX_WAIT_MS);
            if remaining_ms == 0 {
                return Err(ofport_timeout(iface, timeout));
            }
            let seen = json!({"ofport": row.raw("ofport")?, "error": row.raw("error")?});
            let ops = vec![
                wait(
                    "Interface",
                    vec![eq("name", iface)],
                    cols,
                    Until::Ne,
                    vec![seen],
                    remaining_ms,
                ),
                query.clone(),
            ];
            // The reply comes only when the server-side wait ends: give
            // the socket the wait's time plus the usual reply allowance.
            let io_timeout = Duration::from_millis(remaining_ms).saturating_add(self.timeout());
            match self.transact_within(DB, ops, io_timeout) {
                Ok(r) => {
                    results = r;
                    idx = 1;
                }
                Err(Error::Transaction { op: 0, error, .. }) if error == WAIT_FAILED => {
                    return Err(ofport_timeout(iface, timeout))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until ovs-vswitchd has applied every change committed so far,
    /// as `ovs-vsctl` does unless `--no-wait`: bumps `next_cfg` and waits
    /// (server-side) for vswitchd to copy it to `cur_cfg`. A database change
    /// followed at once by its reverse can otherwise be folded by vswitchd
    /// into "nothing changed" (a port deleted and re-added under the same
    /// name keeps its stale device handle).
    pub fn wait_reconfigured(&mut self, timeout: Duration) -> Result<()> {
        let results = self.transact(
            DB,
            vec![
                mutate(
                    "Open_vSwitch",
                    vec![],
                    vec![mutation("next_cfg", Mutator::Add, json!(1))],
                ),
                select("Open_vSwitch", vec![], Some(&["next_cfg"])),
            ],
        )?;
        let rows = first_rows(&results, 1)?;
        let next = rows
            .first()
            .and_then(|r| r.optional_integer("next_cfg").ok().flatten())
            .ok_or_else(|| Error::NotFound("Open_vSwitch next_cfg".into()))?;
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .min(MAX_WAIT_MS);
        let ops = vec![wait(
            "Open_vSwitch",
            vec![],
            &["cur_cfg"],
            Until::Eq,
            vec![json!({"cur_cfg": next})],
            ms,
        )];
        let io_timeout = Duration::from_millis(ms).saturating_add(self.timeout());
        match self.transact_within(DB, ops, io_timeout) {
            Ok(_) => Ok(()),
            Err(Error::Transaction { op: 0, error, .. }) if error == WAIT_FAILED => {
                Err(Error::Timeout {
                    what: "ovs-vswitchd to apply the configuration".into(),
                    after: timeout,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The port named `name` on whichever bridge holds it.
    pub fn port(&mut self, name: &str) -> Result<Option<PortInfo>> {
        let results = self.transact(
            DB,
            vec![
                select("Port", vec![eq("name", name)], Some(PORT_COLUMNS)),
                select("Interface", vec![eq("name", name)], Some(IFACE_COLUMNS)),
                select("Bridge", vec![], Some(&["name", "ports"])),
            ],
        )?;
        let ports = first_rows(&results, 0)?;
        let Some(port) = ports.first() else {
            return Ok(None);
        };
        let bridges = bridge_of_ports(&first_rows(&results, 2)?)?;
        let mut ifaces = index_by_uuid(&first_rows(&results, 1)?)?;
        let iface_uuids = port.uuids("interfaces")?;
        // A port's interface normally has the port's name; look it up by
        // uuid only when it does not (e.g. a bond).
        let by_uuid;
        if !iface_uuids.iter().any(|u| ifaces.contains_key(u)) {
            if let Some(u) = iface_uuids.first() {
                by_uuid = self.transact(
                    DB,
                    vec![select(
                        "Interface",
                        vec![eq("_uuid", uuid(u))],
                        Some(IFACE_COLUMNS),
                    )],
                )?;
                ifaces = index_by_uuid(&first_rows(&by_uuid, 0)?)?;
            }
        }
        port_info(port, &ifaces, &bridges).map(Some)
    }

    /// All ports of `bridge` except the bridge's own internal port, sorted
    /// by name. [`Error::NotFound`] if there is no such bridge.
    pub fn ports(&mut self, bridge: &str) -> Result<Vec<PortInfo>> {
        let results = self.transact(
            DB,
            vec![
                select("Bridge", vec![eq("name", bridge)], Some(&["name", "ports"])),
                select("Port", vec![], Some(PORT_COLUMNS)),
                select("Interface", vec![], Some(IFACE_COLUMNS)),
            ],
        )?;
        let bridge_rows = first_rows(&results, 0)?;
        if bridge_rows.is_empty() {
            return Err(Error::NotFound(format!("bridge {bridge}")));
        }
        let bridges = bridge_of_ports(&bridge_rows)?;
        let ifaces = index_by_uuid(&first_rows(&results, 2)?)?;
        let mut out = Vec::new();
        for port in first_rows(&results, 1)? {
            if !bridges.contains_key(&port.uuid("_uuid")?) || port.string("name")? == bridge {
                continue;
            }
            out.push(port_info(&port, &ifaces, &bridges)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes bridge `name` (with its internal port and any ports still on
    /// it, which OVSDB garbage-collects with it, as `ovs-vsctl del-br`), but
    /// only if it holds no port other than its own internal one: a port
    /// someone else plugged in since is never taken away with it. The
    /// emptiness check is a `wait` pinned to the ports column in the deleting
    /// transaction. Returns `Ok(false)` if there is no such bridge;
    /// [`Error::NotEmpty`] if other ports are on it.
    pub fn del_bridge_if_empty(&mut self, name: &str) -> Result<bool> {
        let results = self.transact(
            DB,
            vec![
                select("Bridge", vec![eq("name", name)], Some(&["_uuid", "ports"])),
                select("Port", vec![eq("name", name)], Some(&["_uuid"])),
            ],
        )?;
        let bridges = first_rows(&results, 0)?;
        let Some(bridge) = bridges.first() else {
            return Ok(false);
        };
        let bridge_uuid = bridge.uuid("_uuid")?;
        let own: Vec<String> = first_rows(&results, 1)?
            .iter()
            .map(|r| r.uuid("_uuid"))
            .collect::<Result<_>>()?;
        let ports = bridge.uuids("ports")?;
        let others = ports.iter().filter(|p| !own.contains(p)).count();
        if others > 0 {
            return Err(Error::NotEmpty(format!(
                "bridge {name} still has {others} port(s) besides its own"
            )));
        }
        let ops = vec![
            wait(
                "Bridge",
                vec![eq("_uuid", uuid(&bridge_uuid))],
                &["ports"],
                Until::Eq,
                vec![json!({"ports": set(ports.iter().map(|p| uuid(p)).collect())})],
                0,
            ),
            mutate(
                "Open_vSwitch",
                vec![],
                vec![mutation(
                    "bridges",
                    Mutator::Delete,
                    set(vec![uuid(&bridge_uuid)]),
                )],
            ),
        ];
        match self.transact(DB, ops) {
            Ok(_) => Ok(true),
            Err(Error::Transaction { op: 0, error, .. }) if error == WAIT_FAILED => Err(
                Error::NotEmpty(format!("bridge {name} changed while being deleted")),
            ),
            Err(e) => Err(e),
        }
    }

    /// Removes port `name` (and with it its interface) from the bridge that
    /// holds it, but only if its `external_ids` contain every pair of
    /// `must_match`. The identity check is a `wait` in the deleting
    /// transaction, pinned to the port's uuid, so a port re-created under
    /// the same name in the meantime is never removed by mistake. Returns
    /// `Ok(false)` if there is no such port or it is not the caller's.
    pub fn del_port_if(&mut self, name: &str, must_match: &[(&str, &str)]) -> Result<bool> {
        let mut last = None;
        // Each retry follows a concurrent change to this very port; more
        // than a few in a row would be a pathological fight over one name.
        for _ in 0..3 {
            let results = self.transact(
                DB,
                vec![
                    select(
                        "Port",
                        vec![eq("name", name)],
                        Some(&["_uuid", "external_ids"]),
                    ),
                    select("Bridge", vec![], Some(&["_uuid", "name", "ports"])),
                ],
            )?;
            let ports = first_rows(&results, 0)?;
            let Some(port) = ports.first() else {
                return Ok(false);
            };
            let ids = port.string_map("external_ids")?;
            if !must_match
                .iter()
                .all(|(k, v)| ids.get(*k).map(String::as_str) == Some(*v))
            {
                return Ok(false);
            }
            let port_uuid = port.uuid("_uuid")?;
            let mut holder = None;
            for b in first_rows(&results, 1)? {
                if b.uuids("ports")?.contains(&port_uuid) {
                    holder = Some(b.uuid("_uuid")?);
                    break;
                }
            }
            let Some(bridge_uuid) = holder else {
                return Ok(false);
            };
            let port_ref = set(vec![uuid(&port_uuid)]);
            let ops = vec![
                wait(
                    "Port",
                    vec![
                        eq("_uuid", uuid(&port_uuid)),
                        includes("external_ids", string_map(must_match)),
                    ],
                    &["name"],
                    Until::Ne,
                    vec![],
                    0,
                ),
                wait(
                    "Bridge",
                    vec![
                        eq("_uuid", uuid(&bridge_uuid)),
                        includes("ports", port_ref.clone()),
                    ],
                    &["name"],
                    Until::Ne,
                    vec![],
                    0,
                ),
                mutate(
                    "Bridge",
                    vec![eq("_uuid", uuid(&bridge_uuid))],
                    vec![mutation("ports", Mutator::Delete, port_ref)],
                ),
            ];
            match self.transact(DB, ops) {
                Ok(r) => return Ok(r.get(2).map(datum::count).transpose()? == Some(1)),
                Err(Error::Transaction {
                    op: op @ (0 | 1),
                    error,
                    details,
                }) if error == WAIT_FAILED => {
                    last = Some(Error::Transaction { op, error, details })
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::NotFound(format!("port {name}"))))
    }
}

/// A `wait` asserting that no row of `table` is named `name`.
fn absent(table: &str, name: &str) -> Value {
    ops::wait(
        table,
        vec![eq("name", name)],
        &["name"],
        Until::Eq,
        vec![],
        0,
    )
}

fn first_rows(results: &[Value], idx: usize) -> Result<Vec<Row<'_>>> {
    let r = results
        .get(idx)
        .ok_or_else(|| Error::Protocol(format!("missing result {idx}")))?;
    rows(r)
}

/// port uuid → bridge name.
fn bridge_of_ports(bridges: &[Row<'_>]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for b in bridges {
        let name = b.string("name")?;
        for p in b.uuids("ports")? {
            map.insert(p, name.clone());
        }
    }
    Ok(map)
}

fn index_by_uuid<'a>(rows: &[Row<'a>]) -> Result<BTreeMap<String, Row<'a>>> {
    rows.iter().map(|r| Ok((r.uuid("_uuid")?, *r))).collect()
}

fn port_info(
    port: &Row<'_>,
    ifaces: &BTreeMap<String, Row<'_>>,
    bridges: &BTreeMap<String, String>,
) -> Result<PortInfo> {
    let port_uuid = port.uuid("_uuid")?;
    let iface_uuids = port.uuids("interfaces")?;
    let iface_uuid = iface_uuids
        .iter()
        .find(|u| ifaces.contains_key(*u))
        .or(iface_uuids.first())
        .cloned()
        .ok_or_else(|| Error::Protocol(format!("port {port_uuid} has no interface")))?;
    let (ofport, error) = match ifaces.get(&iface_uuid) {
        Some(i) => (i.optional_integer("ofport")?, i.optional_string("error")?),
        None => (None, None),
    };
    Ok(PortInfo {
        name: port.string("name")?,
        bridge: bridges.get(&port_uuid).cloned().unwrap_or_default(),
        external_ids: port.string_map("external_ids")?,
        port_uuid,
        interface_uuid: iface_uuid,
        ofport,
        error,
    })
}

fn ofport_timeout(iface: &str, after: Duration) -> Error {
    Error::Timeout {
        after,
        what: format!("ovs-vswitchd to attach interface {iface}"),
    }
}
