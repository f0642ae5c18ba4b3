//! The OpenFlow pipeline evio keeps on its Open vSwitch bridge so that
//! kube-proxy's NAT works: Antrea's way, in a conntrack zone of evio's own.
//!
//! Pods of every node share one L2 segment. A pod's packet to a ClusterIP
//! goes to the gateway (the bridge's LOCAL port), the host's kube-proxy
//! rules DNAT it to an endpoint pod and the host sends it back into the
//! bridge. The endpoint's reply is addressed to the client pod's own MAC
//! and IP, so plain L2 switching would deliver it straight to the client,
//! past the host's conntrack, and the client would drop a reply from an
//! address it never talked to. So:
//!
//! * table 0: IP from LOCAL is committed to conntrack (zone [`CT_ZONE`],
//!   `ct_mark` [`CT_MARK`]) and switched normally; any other IP packet
//!   goes through the same zone and on to table [`CT_TABLE`];
//! * table [`CT_TABLE`]: a reply of a connection that came from LOCAL goes
//!   back to LOCAL, its destination MAC rewritten to the bridge's, so the
//!   host's conntrack reverses the NAT; everything else is switched
//!   normally.
//!
//! Every flow carries [`COOKIE`]; evio finds, replaces and removes its own
//! flows by it and never touches any other flow of the bridge.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evio_cni::config::NetConf;
use evio_ovsdb::openflow::{
    Action, Field, Flow, FlowStats, Instruction, Switch, CT_RPL, CT_TRK, ETH_IPV4, ETH_IPV6,
    OFPP_LOCAL, OFPP_NORMAL,
};

/// "evio" in the high 32 bits; the low 32 bits are the pipeline's version.
pub const COOKIE: u64 = 0x6576_696f_0000_0001;
/// Selects every evio flow, whatever its version.
pub const COOKIE_MASK: u64 = 0xffff_ffff_0000_0000;
/// evio's conntrack zone: its entries never mix with anyone else's.
pub const CT_ZONE: u16 = 0xe710;
/// Marks connections that entered the bridge from LOCAL.
pub const CT_MARK: u32 = 0x1;
/// Where packets continue after the conntrack lookup; far above the tables
/// other OVS users (Antrea, OVN) number from 0.
pub const CT_TABLE: u8 = 231;

const DEFAULT_RUN_DIR: &str = "/var/run/openvswitch";
/// Bound on connecting to vswitchd and on each request.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// ovs-vswitchd's run directory for this config: `ovsRunDir`, else the
/// directory of a `unix:` OVSDB socket (where vswitchd also puts its
/// sockets when both use the same run dir, as packaged), else the default.
pub fn run_dir(conf: &NetConf) -> PathBuf {
    run_dir_of(conf.ovs_run_dir.as_deref(), &conf.ovsdb)
}

/// [`run_dir`] from the two keys themselves.
pub fn run_dir_of(ovs_run_dir: Option<&Path>, ovsdb: &str) -> PathBuf {
    if let Some(d) = ovs_run_dir {
        return d.to_path_buf();
    }
    ovsdb
        .strip_prefix("unix:")
        .and_then(|p| Path::new(p).parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// The bridge's OpenFlow management socket.
pub fn mgmt_socket(conf: &NetConf, bridge: &str) -> PathBuf {
    run_dir(conf).join(format!("{bridge}.mgmt"))
}

/// The flows for a bridge whose MAC is `bridge_mac`.
pub fn wanted(bridge_mac: [u8; 6]) -> Vec<Flow> {
    let mut out = Vec::new();
    let flow = |table, priority, fields, actions| Flow {
        table,
        priority,
        cookie: COOKIE,
        fields,
        instructions: vec![Instruction::Apply(actions)],
    };
    for eth in [ETH_IPV4, ETH_IPV6] {
        out.push(flow(
            0,
            200,
            vec![Field::InPort(OFPP_LOCAL), Field::EthType(eth)],
            vec![
                Action::Ct {
                    commit: true,
                    zone: CT_ZONE,
                    table: None,
                    mark: Some(CT_MARK),
                },
                Action::Output(OFPP_NORMAL),
            ],
        ));
        out.push(flow(
            0,
            100,
            vec![Field::EthType(eth)],
            vec![Action::Ct {
                commit: false,
                zone: CT_ZONE,
                table: Some(CT_TABLE),
                mark: None,
            }],
        ));
        out.push(flow(
            CT_TABLE,
            200,
            vec![
                Field::CtState(CT_TRK | CT_RPL, CT_TRK | CT_RPL),
                Field::CtMark(CT_MARK, CT_MARK),
                Field::EthType(eth),
            ],
            vec![Action::SetEthDst(bridge_mac), Action::Output(OFPP_LOCAL)],
        ));
    }
    out.push(flow(
        CT_TABLE,
        0,
        Vec::new(),
        vec![Action::Output(OFPP_NORMAL)],
    ));
    out
}

/// How evio's flows on a bridge compare with the wanted ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowCheck {
    /// Wanted flows that are missing or differ.
    pub missing: usize,
    /// evio-cookie flows that are not wanted (an older pipeline, edits).
    pub extra: usize,
}

impl FlowCheck {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.extra == 0
    }
}

/// Compares the bridge's evio flows with `want`.
pub fn compare(have: &[FlowStats], want: &[Flow]) -> FlowCheck {
    let missing = want
        .iter()
        .filter(|w| !have.iter().any(|h| w.same_as(h)))
        .count();
    let extra = have
        .iter()
        .filter(|h| !want.iter().any(|w| w.same_as(h)))
        .count();
    FlowCheck { missing, extra }
}

/// Reads evio's flows on the bridge behind `socket` and compares them.
pub fn check(socket: &Path, bridge_mac: [u8; 6]) -> evio_ovsdb::Result<FlowCheck> {
    let mut sw = Switch::connect(socket, TIMEOUT)?;
    let have = sw.flows(COOKIE, COOKIE_MASK)?;
    Ok(compare(&have, &wanted(bridge_mac)))
}

/// Makes evio's flows exactly the wanted ones; returns whether anything had
/// to change. Present and identical flows are left as they are (one flow
/// dump per call); missing ones are added in place (OFPFC_ADD replaces a
/// flow of the same match and priority without a gap); stray evio flows
/// are removed and the set re-added. Other flows are never touched.
pub fn ensure(socket: &Path, bridge_mac: [u8; 6]) -> evio_ovsdb::Result<bool> {
    let mut sw = Switch::connect(socket, TIMEOUT)?;
    let want = wanted(bridge_mac);
    let have = sw.flows(COOKIE, COOKIE_MASK)?;
    let c = compare(&have, &want);
    if c.ok() {
        return Ok(false);
    }
    if c.extra > 0 {
        sw.delete_flows(COOKIE, COOKIE_MASK)?;
    }
    sw.add_flows(&want)?;
    Ok(true)
}

/// Removes every evio flow from the bridge behind `socket` (uninstall).
pub fn remove(socket: &Path) -> evio_ovsdb::Result<()> {
    Switch::connect(socket, TIMEOUT)?.delete_flows(COOKIE, COOKIE_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        let raw = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"evio","ipam":{{"type":"host-local"}}{extra}}}"#
        );
        NetConf::parse(raw.as_bytes()).unwrap()
    }

    #[test]
    fn management_socket_follows_the_ovsdb_socket_unless_told() {
        assert_eq!(
            mgmt_socket(&conf(""), "evio0"),
            Path::new("/var/run/openvswitch/evio0.mgmt")
        );
        assert_eq!(
            mgmt_socket(&conf(r#","ovsdb":"unix:/tmp/x/db.sock""#), "br"),
            Path::new("/tmp/x/br.mgmt")
        );
        assert_eq!(
            run_dir(&conf(r#","ovsdb":"tcp:127.0.0.1:6640""#)),
            Path::new(DEFAULT_RUN_DIR)
        );
        assert_eq!(
            run_dir(&conf(
                r#","ovsdb":"unix:/tmp/x/db.sock","ovsRunDir":"/run/ovs""#
            )),
            Path::new("/run/ovs")
        );
        assert!(NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"evio","ovsRunDir":"rel","ipam":{"type":"host-local"}}"#
        )
        .is_err());
    }

    #[test]
    fn pipeline_has_one_cookie_and_both_families() {
        let f = wanted([2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), 7);
        assert!(f.iter().all(|f| f.cookie == COOKIE));
        assert_eq!(COOKIE & COOKIE_MASK, 0x6576_696f << 32);
        for eth in [ETH_IPV4, ETH_IPV6] {
            assert_eq!(
                f.iter()
                    .filter(|f| f.fields.contains(&Field::EthType(eth)))
                    .count(),
                3
            );
        }
    }
}
