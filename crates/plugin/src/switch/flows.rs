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
//! Sending every IP packet through conntrack would do, but in the userspace
//! datapath that costs pod-to-pod traffic about a third of its throughput
//! (a lookup and a recirculation per packet). Only packets between two
//! addresses that a connection from LOCAL has joined can be such replies,
//! so only those go through conntrack:
//!
//! * table 0: IP from LOCAL is committed to conntrack (zone [`CT_ZONE`],
//!   `ct_mark` [`CT_MARK`]), *learns* the reverse address pair into table
//!   [`PAIRS_TABLE`] and is switched normally; any other IP packet looks
//!   itself up in [`PAIRS_TABLE`], then goes on to [`DECIDE_TABLE`];
//! * table [`PAIRS_TABLE`]: learned pairs (cookie [`LEARNED_COOKIE`], idle
//!   timeout [`PAIR_IDLE`]) set register [`PAIR_REG`];
//! * table [`DECIDE_TABLE`]: a packet of a learned pair goes through the
//!   zone and on to table [`CT_TABLE`]; everything else is switched
//!   normally, past conntrack;
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
    Action, Field, Flow, FlowStats, Instruction, Learn, LearnSpec, NxmField, Switch, CT_RPL,
    CT_TRK, ETH_IPV4, ETH_IPV6, OFPP_LOCAL, OFPP_NORMAL,
};

/// "evio" in the high 32 bits; the low 31 bits are the pipeline's version.
pub const COOKIE: u64 = 0x6576_696f_0000_0002;
/// Selects every evio flow, whatever its version, learned ones included.
pub const COOKIE_MASK: u64 = 0xffff_ffff_0000_0000;
/// Selects the pipeline's flows (of any version) but not learned ones.
pub const PIPELINE_MASK: u64 = 0xffff_ffff_8000_0000;
/// The cookie of learned address pairs: evio's, outside the pipeline's.
pub const LEARNED_COOKIE: u64 = 0x6576_696f_8000_0002;
/// Where learned pairs live.
pub const PAIRS_TABLE: u8 = 229;
/// Where a packet is sent through conntrack or not.
pub const DECIDE_TABLE: u8 = 230;
/// The register a learned pair sets (value 1).
pub const PAIR_REG: u8 = 7;
/// Seconds a learned pair lasts without traffic either way: the longest
/// an OpenFlow idle timeout can be (about 18 h; OVS's userspace conntrack
/// forgets an idle TCP connection after 24 h, the host's after 5 days).
/// A pair is learned again by every packet from LOCAL and kept by every
/// packet of the reverse direction.
pub const PAIR_IDLE: u16 = u16::MAX;
/// evio's conntrack zone: its entries never mix with anyone else's.
pub const CT_ZONE: u16 = 0xe710;
/// Marks connections that entered the bridge from LOCAL.
pub const CT_MARK: u32 = 0x1;
/// Where packets continue after the conntrack lookup; evio's tables sit
/// far above the ones other OVS users (Antrea, OVN) number from 0.
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

/// The flows for a bridge whose MAC is `bridge_mac`, in the order they are
/// added: later tables first, because OVS applies each flow_mod on its own
/// and a table-0 flow that resubmits into a table not filled yet would drop
/// what it matches until the rest lands.
pub fn wanted(bridge_mac: [u8; 6]) -> Vec<Flow> {
    let mut out = Vec::new();
    let flow = |table, priority, fields, actions| Flow {
        table,
        priority,
        cookie: COOKIE,
        fields,
        instructions: vec![Instruction::Apply(actions)],
    };
    for (eth, src, dst) in [
        (ETH_IPV4, NxmField::Ipv4Src, NxmField::Ipv4Dst),
        (ETH_IPV6, NxmField::Ipv6Src, NxmField::Ipv6Dst),
    ] {
        // The learned flow matches the reply direction: its source is this
        // packet's destination and the other way round.
        let learn = Learn {
            table: PAIRS_TABLE,
            priority: 100,
            idle_timeout: PAIR_IDLE,
            cookie: LEARNED_COOKIE,
            specs: vec![
                LearnSpec::MatchValue {
                    dst: NxmField::EthType,
                    value: u64::from(eth),
                },
                LearnSpec::MatchField { dst: src, src: dst },
                LearnSpec::MatchField { dst, src },
                LearnSpec::Load {
                    dst: NxmField::Reg(PAIR_REG),
                    value: 1,
                },
            ],
        };
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
                Action::Learn(learn),
                Action::Output(OFPP_NORMAL),
            ],
        ));
        out.push(flow(
            0,
            100,
            vec![Field::EthType(eth)],
            vec![
                Action::Resubmit(PAIRS_TABLE),
                Action::Resubmit(DECIDE_TABLE),
            ],
        ));
        out.push(flow(
            DECIDE_TABLE,
            200,
            vec![Field::Reg(PAIR_REG, 1), Field::EthType(eth)],
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
    for table in [DECIDE_TABLE, CT_TABLE] {
        out.push(flow(
            table,
            0,
            Vec::new(),
            vec![Action::Output(OFPP_NORMAL)],
        ));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.table));
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
    let have = sw.flows(COOKIE, PIPELINE_MASK)?;
    Ok(compare(&have, &wanted(bridge_mac)))
}

/// Makes evio's flows exactly the wanted ones; returns whether anything had
/// to change. Present and identical flows are left as they are (one flow
/// dump per call). Otherwise the wanted set is added first, later tables
/// before table 0: OFPFC_ADD
/// replaces a flow of the same table, match and priority in place, which is
/// every flow of an older pipeline version or an edited one, so open
/// connections never meet a bridge without the pipeline. Stray evio flows
/// left after that go by their (older) cookie; only strays of the current
/// cookie make it remove and re-add the set. Learned pairs and other flows
/// are never touched.
pub fn ensure(socket: &Path, bridge_mac: [u8; 6]) -> evio_ovsdb::Result<bool> {
    let mut sw = Switch::connect(socket, TIMEOUT)?;
    let want = wanted(bridge_mac);
    let have = sw.flows(COOKIE, PIPELINE_MASK)?;
    if compare(&have, &want).ok() {
        return Ok(false);
    }
    sw.add_flows(&want)?;
    let have = sw.flows(COOKIE, PIPELINE_MASK)?;
    let strays: Vec<&FlowStats> = have
        .iter()
        .filter(|h| !want.iter().any(|w| w.same_as(h)))
        .collect();
    let mut old: Vec<u64> = strays
        .iter()
        .map(|h| h.cookie)
        .filter(|&c| c != COOKIE)
        .collect();
    old.sort_unstable();
    old.dedup();
    for cookie in old {
        sw.delete_flows(cookie, u64::MAX)?;
    }
    if strays.iter().any(|h| h.cookie == COOKIE) {
        sw.delete_flows(COOKIE, u64::MAX)?;
        sw.add_flows(&want)?;
    }
    Ok(true)
}

/// Removes every evio flow, learned pairs too, from the bridge behind
/// `socket` (uninstall).
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
        assert_eq!(f.len(), 10);
        assert!(
            f.windows(2).all(|w| w[0].table >= w[1].table),
            "later tables are added first"
        );
        assert!(f.iter().all(|f| f.cookie == COOKIE));
        assert_eq!(COOKIE & COOKIE_MASK, 0x6576_696f << 32);
        for eth in [ETH_IPV4, ETH_IPV6] {
            assert_eq!(
                f.iter()
                    .filter(|f| f.fields.contains(&Field::EthType(eth)))
                    .count(),
                4
            );
        }
    }

    #[test]
    fn learned_pairs_are_evio_flows_but_not_the_pipeline() {
        // uninstall (COOKIE_MASK) takes them; check/ensure (PIPELINE_MASK)
        // neither count nor delete them; the previous pipeline (version 1)
        // is still recognised as evio's pipeline, to be replaced.
        assert_eq!(LEARNED_COOKIE & COOKIE_MASK, COOKIE & COOKIE_MASK);
        assert_ne!(LEARNED_COOKIE & PIPELINE_MASK, COOKIE & PIPELINE_MASK);
        assert_eq!(
            0x6576_696f_0000_0001 & PIPELINE_MASK,
            COOKIE & PIPELINE_MASK
        );
        let learns: Vec<_> = wanted([2, 0, 0, 0, 0, 1])
            .into_iter()
            .flat_map(|f| f.instructions)
            .flat_map(|i| match i {
                Instruction::Apply(a) => a,
                Instruction::GotoTable(_) => Vec::new(),
            })
            .filter_map(|a| match a {
                Action::Learn(l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(learns.len(), 2);
        for l in learns {
            assert_eq!((l.table, l.cookie), (PAIRS_TABLE, LEARNED_COOKIE));
            // The eth type comes first: the address matches need it.
            assert!(matches!(
                l.specs[0],
                LearnSpec::MatchValue {
                    dst: NxmField::EthType,
                    ..
                }
            ));
        }
    }
}
