//! A small blocking OpenFlow 1.3 client for the flows evio keeps on its own
//! bridge: ovs-vswitchd's per-bridge management socket
//! (`<rundir>/<bridge>.mgmt`), flow_mod add and delete by cookie, flow
//! stats by cookie, barriers. Matches and actions are the few evio uses,
//! including the Nicira extensions for connection tracking (`ct`,
//! `ct_state`, `ct_mark`). No crate we found does this without an async
//! runtime, which the CNI plugin must not link.
//!
//! Encodings are OVS's canonical ones (OXM fields in the order OVS dumps
//! them, actions as OVS re-encodes them), so a flow read back compares
//! equal to the flow written: that is how "installed and unchanged" is
//! checked without parsing everything a switch can say.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::client::connect_unix;
use crate::error::{Error, Result};

const VERSION: u8 = 0x04;
const OFPT_HELLO: u8 = 0;
const OFPT_ERROR: u8 = 1;
const OFPT_ECHO_REQUEST: u8 = 2;
const OFPT_ECHO_REPLY: u8 = 3;
const OFPT_FLOW_MOD: u8 = 14;
const OFPT_MULTIPART_REQUEST: u8 = 18;
const OFPT_MULTIPART_REPLY: u8 = 19;
const OFPT_BARRIER_REQUEST: u8 = 20;
const OFPT_BARRIER_REPLY: u8 = 21;
const OFPMP_FLOW: u16 = 1;
const OFPMPF_REPLY_MORE: u16 = 1;
const OFPFC_ADD: u8 = 0;
const OFPFC_DELETE: u8 = 3;
const OFPTT_ALL: u8 = 0xff;
const OFPP_ANY: u32 = 0xffff_ffff;
const OFPG_ANY: u32 = 0xffff_ffff;
const OFP_NO_BUFFER: u32 = 0xffff_ffff;
/// Checked against existing flows: an identical match and priority is an
/// error, not a silent replacement of someone else's flow.
const OFPFF_CHECK_OVERLAP: u16 = 1 << 1;
const HEADER_LEN: usize = 8;
/// Longest message accepted (OpenFlow's length field is 16 bits).
const MAX_MESSAGE: usize = 65535;

/// The switch's own bridge port.
pub const OFPP_LOCAL: u32 = 0xffff_fffe;
/// Ordinary L2 switching (MAC learning, flooding).
pub const OFPP_NORMAL: u32 = 0xffff_fffa;

const OFPXMC_OPENFLOW_BASIC: u16 = 0x8000;
const NXM_1: u16 = 0x0001;
const NX_VENDOR_ID: u32 = 0x0000_2320;
const NXAST_RESUBMIT_TABLE: u16 = 14;
const NXAST_LEARN: u16 = 16;
const NXAST_CT: u16 = 35;
/// `in_port` of a resubmit that keeps the packet's own.
const OFPP_IN_PORT: u16 = 0xfff8;
const NX_CT_F_COMMIT: u16 = 1;
const NX_CT_RECIRC_NONE: u8 = 0xff;
const OFPAT_OUTPUT: u16 = 0;
const OFPAT_SET_FIELD: u16 = 25;
const OFPAT_EXPERIMENTER: u16 = 0xffff;
const OFPIT_GOTO_TABLE: u16 = 1;
const OFPIT_APPLY_ACTIONS: u16 = 4;

/// `ct_state` bits (Nicira).
pub const CT_NEW: u32 = 0x01;
pub const CT_EST: u32 = 0x02;
pub const CT_REL: u32 = 0x04;
pub const CT_RPL: u32 = 0x08;
pub const CT_INV: u32 = 0x10;
pub const CT_TRK: u32 = 0x20;

/// One match field. Listed in the order OVS dumps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `ct_state` value and mask.
    CtState(u32, u32),
    /// `ct_mark` value and mask.
    CtMark(u32, u32),
    /// Nicira register `n` (0..16), exact.
    Reg(u8, u32),
    InPort(u32),
    EthDst([u8; 6]),
    EthType(u16),
}

/// `ip` and `ipv6` as `dl_type`.
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;

impl Field {
    fn header(self) -> u32 {
        let (class, field, len, mask) = match self {
            Field::InPort(_) => (OFPXMC_OPENFLOW_BASIC, 0, 4, false),
            Field::EthDst(_) => (OFPXMC_OPENFLOW_BASIC, 3, 6, false),
            Field::EthType(_) => (OFPXMC_OPENFLOW_BASIC, 5, 2, false),
            Field::CtState(_, m) => (NXM_1, 105, 4, m != u32::MAX),
            Field::CtMark(_, m) => (NXM_1, 107, 4, m != u32::MAX),
            Field::Reg(n, _) => (NXM_1, n, 4, false),
        };
        let len = if mask { len * 2 } else { len };
        oxm_header(class, field, mask, len)
    }

    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header().to_be_bytes());
        match self {
            Field::InPort(p) | Field::Reg(_, p) => out.extend_from_slice(&p.to_be_bytes()),
            Field::EthDst(m) => out.extend_from_slice(&m),
            Field::EthType(t) => out.extend_from_slice(&t.to_be_bytes()),
            Field::CtState(v, m) | Field::CtMark(v, m) => {
                out.extend_from_slice(&v.to_be_bytes());
                if m != u32::MAX {
                    out.extend_from_slice(&m.to_be_bytes());
                }
            }
        }
    }
}

fn oxm_header(class: u16, field: u8, hasmask: bool, len: u8) -> u32 {
    (u32::from(class) << 16) | (u32::from(field) << 9) | (u32::from(hasmask) << 8) | u32::from(len)
}

/// A field as a `learn` action names it: by its NXM header (OVS encodes
/// learn specs with NXM headers whatever the OpenFlow version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NxmField {
    EthType,
    Ipv4Src,
    Ipv4Dst,
    Ipv6Src,
    Ipv6Dst,
    /// Nicira register `n`.
    Reg(u8),
}

impl NxmField {
    fn header(self) -> u32 {
        let (class, field, len) = match self {
            NxmField::EthType => (0, 3, 2),
            NxmField::Ipv4Src => (0, 7, 4),
            NxmField::Ipv4Dst => (0, 8, 4),
            NxmField::Ipv6Src => (NXM_1, 19, 16),
            NxmField::Ipv6Dst => (NXM_1, 20, 16),
            NxmField::Reg(n) => (NXM_1, n, 4),
        };
        oxm_header(class, field, false, len)
    }

    fn bits(self) -> u16 {
        match self {
            NxmField::EthType => 16,
            NxmField::Ipv4Src | NxmField::Ipv4Dst | NxmField::Reg(_) => 32,
            NxmField::Ipv6Src | NxmField::Ipv6Dst => 128,
        }
    }
}

/// One spec of a `learn` action: what the learned flow matches or does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LearnSpec {
    /// Match `dst` against this packet's value of `src` (whole fields).
    MatchField { dst: NxmField, src: NxmField },
    /// Match `dst` (whole field) against `value`.
    MatchValue { dst: NxmField, value: u64 },
    /// Load `value` into the whole of `dst`.
    Load { dst: NxmField, value: u64 },
}

impl LearnSpec {
    fn put(self, out: &mut Vec<u8>) {
        // flow_mod_spec header: src type (bit 13), dst type (bits 11-12),
        // n_bits.
        const SRC_IMMEDIATE: u16 = 1 << 13;
        const DST_LOAD: u16 = 1 << 11;
        let imm = |out: &mut Vec<u8>, bits: u16, value: u64| {
            let n = usize::from(bits.div_ceil(16) * 2);
            let v = value.to_be_bytes();
            let start = out.len();
            out.resize(start + n, 0);
            let take = n.min(8);
            out[start + n - take..].copy_from_slice(&v[8 - take..]);
        };
        let field = |out: &mut Vec<u8>, f: NxmField| {
            out.extend_from_slice(&f.header().to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes()); // offset
        };
        match self {
            LearnSpec::MatchField { dst, src } => {
                out.extend_from_slice(&dst.bits().to_be_bytes());
                field(out, src);
                field(out, dst);
            }
            LearnSpec::MatchValue { dst, value } => {
                out.extend_from_slice(&(SRC_IMMEDIATE | dst.bits()).to_be_bytes());
                imm(out, dst.bits(), value);
                field(out, dst);
            }
            LearnSpec::Load { dst, value } => {
                out.extend_from_slice(&(SRC_IMMEDIATE | DST_LOAD | dst.bits()).to_be_bytes());
                imm(out, dst.bits(), value);
                field(out, dst);
            }
        }
    }
}

/// Nicira `learn`: add (or refresh) a flow built from this packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learn {
    pub table: u8,
    pub priority: u16,
    /// Seconds without a hit before the learned flow goes; 0: never.
    pub idle_timeout: u16,
    pub cookie: u64,
    pub specs: Vec<LearnSpec>,
}

/// An action of an apply-actions instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Output(u32),
    SetEthDst([u8; 6]),
    /// Nicira `resubmit(,table)`: look the packet up in `table`, run what
    /// matches, then go on with the next action.
    Resubmit(u8),
    Learn(Learn),
    /// Nicira `ct`: send through conntrack in `zone`; `commit` the
    /// connection (setting `ct_mark` to `mark` if given); then continue in
    /// `table` after recirculation, or with the next action when `None`.
    Ct {
        commit: bool,
        zone: u16,
        table: Option<u8>,
        mark: Option<u32>,
    },
}

impl Action {
    fn put(&self, out: &mut Vec<u8>) {
        match *self {
            Action::Output(port) => {
                out.extend_from_slice(&OFPAT_OUTPUT.to_be_bytes());
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
                // max_len: only meaningful towards the controller.
                out.extend_from_slice(&0u16.to_be_bytes());
                out.extend_from_slice(&[0; 6]);
            }
            Action::SetEthDst(mac) => set_field(out, Field::EthDst(mac)),
            Action::Resubmit(table) => {
                let start = out.len();
                experimenter(out, NXAST_RESUBMIT_TABLE);
                out.extend_from_slice(&OFPP_IN_PORT.to_be_bytes());
                out.push(table);
                out.extend_from_slice(&[0; 3]);
                fix_len(out, start);
            }
            Action::Learn(ref l) => {
                let start = out.len();
                experimenter(out, NXAST_LEARN);
                out.extend_from_slice(&l.idle_timeout.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // hard timeout
                out.extend_from_slice(&l.priority.to_be_bytes());
                out.extend_from_slice(&l.cookie.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // flags
                out.push(l.table);
                out.push(0);
                out.extend_from_slice(&[0; 4]); // fin timeouts
                for s in &l.specs {
                    s.put(out);
                }
                // The zero padding also ends the spec list.
                pad8(out, start);
                fix_len(out, start);
            }
            Action::Ct {
                commit,
                zone,
                table,
                mark,
            } => {
                let start = out.len();
                experimenter(out, NXAST_CT);
                let flags = if commit { NX_CT_F_COMMIT } else { 0 };
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes()); // zone_src: immediate
                out.extend_from_slice(&zone.to_be_bytes());
                out.push(table.unwrap_or(NX_CT_RECIRC_NONE));
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(&0u16.to_be_bytes()); // alg
                if let Some(m) = mark {
                    set_field(out, Field::CtMark(m, u32::MAX));
                }
                fix_len(out, start);
            }
        }
    }
}

/// The head of a Nicira action; its length is set by [`fix_len`].
fn experimenter(out: &mut Vec<u8>, subtype: u16) {
    out.extend_from_slice(&OFPAT_EXPERIMENTER.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&NX_VENDOR_ID.to_be_bytes());
    out.extend_from_slice(&subtype.to_be_bytes());
}

/// Writes the length of the action that starts at `start`.
fn fix_len(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// OFPAT_SET_FIELD with one OXM, padded to 8 bytes.
fn set_field(out: &mut Vec<u8>, f: Field) {
    let start = out.len();
    out.extend_from_slice(&OFPAT_SET_FIELD.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    f.put(out);
    pad8(out, start);
    fix_len(out, start);
}

fn pad8(out: &mut Vec<u8>, start: usize) {
    while !(out.len() - start).is_multiple_of(8) {
        out.push(0);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Apply(Vec<Action>),
    GotoTable(u8),
}

/// A flow as evio writes it (no timeouts, no buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub table: u8,
    pub priority: u16,
    pub cookie: u64,
    pub fields: Vec<Field>,
    pub instructions: Vec<Instruction>,
}

impl Flow {
    /// `ofp_match` (OXM), padded to 8 bytes.
    pub fn match_bytes(&self) -> Vec<u8> {
        encode_match(&self.fields)
    }

    pub fn instruction_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for i in &self.instructions {
            let start = out.len();
            match i {
                Instruction::GotoTable(t) => {
                    out.extend_from_slice(&OFPIT_GOTO_TABLE.to_be_bytes());
                    out.extend_from_slice(&8u16.to_be_bytes());
                    out.push(*t);
                    out.extend_from_slice(&[0; 3]);
                }
                Instruction::Apply(actions) => {
                    out.extend_from_slice(&OFPIT_APPLY_ACTIONS.to_be_bytes());
                    out.extend_from_slice(&0u16.to_be_bytes());
                    out.extend_from_slice(&[0; 4]);
                    for a in actions {
                        a.put(&mut out);
                    }
                    let len = (out.len() - start) as u16;
                    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
                }
            }
        }
        out
    }

    /// Whether a flow the switch reported is this one: same table,
    /// priority, cookie, match (field order aside) and instructions.
    pub fn same_as(&self, s: &FlowStats) -> bool {
        self.table == s.table
            && self.priority == s.priority
            && self.cookie == s.cookie
            && sorted_oxms(&self.match_bytes()) == sorted_oxms(&s.match_bytes)
            && self.instruction_bytes() == s.instructions
    }
}

fn encode_match(fields: &[Field]) -> Vec<u8> {
    let mut out = vec![0, 1, 0, 0]; // OFPMT_OXM, length below
    for f in fields {
        f.put(&mut out);
    }
    let len = out.len() as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
    pad8(&mut out, 0);
    out
}

/// The OXM TLVs of an `ofp_match`, sorted (None if malformed).
fn sorted_oxms(m: &[u8]) -> Option<Vec<Vec<u8>>> {
    let len = usize::from(u16::from_be_bytes([*m.get(2)?, *m.get(3)?]));
    let mut body = m.get(4..len)?;
    let mut out = Vec::new();
    while !body.is_empty() {
        let n = usize::from(*body.get(3)?) + 4;
        out.push(body.get(..n)?.to_vec());
        body = &body[n..];
    }
    out.sort();
    Some(out)
}

/// A flow as the switch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStats {
    pub table: u8,
    pub priority: u16,
    pub cookie: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The `ofp_match`, padded.
    pub match_bytes: Vec<u8>,
    pub instructions: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The `ofp_flow_stats` entries of one multipart reply body.
fn parse_flow_stats(mut body: &[u8]) -> Option<Vec<FlowStats>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let len = usize::from(be16(body, 0)?);
        let entry = body.get(..len)?;
        let match_len = usize::from(be16(entry, 50)?);
        let match_padded = match_len.div_ceil(8) * 8;
        out.push(FlowStats {
            table: *entry.get(2)?,
            priority: be16(entry, 12)?,
            cookie: be64(entry, 24)?,
            packets: be64(entry, 32)?,
            bytes: be64(entry, 40)?,
            match_bytes: entry.get(48..48 + match_padded)?.to_vec(),
            instructions: entry.get(48 + match_padded..)?.to_vec(),
        });
        body = &body[len..];
    }
    Some(out)
}

fn oferr(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::OpenFlowIo { what, source }
}

/// A connection to one bridge's OpenFlow management socket. Every call is
/// bounded by the timeout given to [`Switch::connect`].
pub struct Switch {
    stream: UnixStream,
    xid: u32,
    socket: String,
}

impl Switch {
    /// Connects to `path` (e.g. `/var/run/openvswitch/evio0.mgmt`) and
    /// negotiates OpenFlow 1.3.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Switch> {
        let socket = path.display().to_string();
        let timeout = timeout.max(Duration::from_millis(1));
        let stream = connect_unix(path, timeout).map_err(oferr(format!("connect to {socket}")))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(oferr("socket timeouts"))?;
        let mut sw = Switch {
            stream,
            xid: 0,
            socket,
        };
        sw.send(OFPT_HELLO, &[])?;
        let (version, kind, _, body) = sw.recv()?;
        if kind != OFPT_HELLO {
            return Err(sw.protocol(format!("expected HELLO, got message type {kind}")));
        }
        if version < VERSION && !hello_offers_13(&body) {
            return Err(sw.protocol(format!(
                "the switch speaks OpenFlow version {version:#04x} only, 1.3 (0x04) is needed"
            )));
        }
        Ok(sw)
    }

    fn protocol(&self, detail: String) -> Error {
        Error::OpenFlow {
            socket: self.socket.clone(),
            detail,
        }
    }

    fn send(&mut self, kind: u8, body: &[u8]) -> Result<u32> {
        self.xid = self.xid.wrapping_add(1);
        self.send_xid(kind, self.xid, body)
    }

    fn send_xid(&mut self, kind: u8, xid: u32, body: &[u8]) -> Result<u32> {
        let len = HEADER_LEN + body.len();
        if len > MAX_MESSAGE {
            return Err(self.protocol(format!("message of {len} bytes is too long")));
        }
        let mut msg = Vec::with_capacity(len);
        msg.push(VERSION);
        msg.push(kind);
        msg.extend_from_slice(&(len as u16).to_be_bytes());
        msg.extend_from_slice(&xid.to_be_bytes());
        msg.extend_from_slice(body);
        let what = format!("send to {}", self.socket);
        self.stream.write_all(&msg).map_err(oferr(what))?;
        Ok(xid)
    }

    /// The next message other than an echo request (answered here):
    /// version, type, xid, body.
    fn recv(&mut self) -> Result<(u8, u8, u32, Vec<u8>)> {
        loop {
            let mut head = [0u8; HEADER_LEN];
            let what = format!("receive from {}", self.socket);
            self.stream
                .read_exact(&mut head)
                .map_err(oferr(what.clone()))?;
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            if len < HEADER_LEN {
                return Err(self.protocol(format!("message length {len} below the header's")));
            }
            let mut body = vec![0u8; len - HEADER_LEN];
            self.stream.read_exact(&mut body).map_err(oferr(what))?;
            let xid = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if head[1] == OFPT_ECHO_REQUEST {
                self.send_xid(OFPT_ECHO_REPLY, xid, &body)?;
                continue;
            }
            return Ok((head[0], head[1], xid, body));
        }
    }

    /// Waits for the barrier `barrier`; the first error answering any
    /// request sent before it fails the call.
    fn barrier(&mut self, what: &str) -> Result<()> {
        let barrier = self.send(OFPT_BARRIER_REQUEST, &[])?;
        let mut failure = None;
        loop {
            let (_, kind, xid, body) = self.recv()?;
            match kind {
                OFPT_BARRIER_REPLY if xid == barrier => break,
                OFPT_ERROR => {
                    let (t, c) = (be16(&body, 0).unwrap_or(0), be16(&body, 2).unwrap_or(0));
                    failure.get_or_insert(Error::OpenFlowRefused {
                        what: what.to_string(),
                        error_type: t,
                        code: c,
                    });
                }
                _ => {}
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Adds `flows`; one barrier for all of them. An identical flow (same
    /// table, priority and match) is replaced, as OFPFC_ADD does.
    pub fn add_flows(&mut self, flows: &[Flow]) -> Result<()> {
        for f in flows {
            let body = flow_mod(f, OFPFC_ADD, 0, 0);
            self.send(OFPT_FLOW_MOD, &body)?;
        }
        self.barrier("add flows")
    }

    /// Adds `flows` unless one with the same table, priority and match
    /// exists (someone else's flow is never replaced).
    pub fn add_flows_checked(&mut self, flows: &[Flow]) -> Result<()> {
        for f in flows {
            let mut body = flow_mod(f, OFPFC_ADD, 0, 0);
            // flags sit right after out_group (byte 36 of the body).
            body[36..38].copy_from_slice(&OFPFF_CHECK_OVERLAP.to_be_bytes());
            self.send(OFPT_FLOW_MOD, &body)?;
        }
        self.barrier("add flows")
    }

    /// Deletes every flow, in every table, whose cookie matches `cookie`
    /// under `mask`. Nothing else is touched.
    pub fn delete_flows(&mut self, cookie: u64, mask: u64) -> Result<()> {
        let f = Flow {
            table: OFPTT_ALL,
            priority: 0,
            cookie,
            fields: Vec::new(),
            instructions: Vec::new(),
        };
        let body = flow_mod(&f, OFPFC_DELETE, cookie, mask);
        self.send(OFPT_FLOW_MOD, &body)?;
        self.barrier("delete flows")
    }

    /// Every flow whose cookie matches `cookie` under `mask`, in every table.
    pub fn flows(&mut self, cookie: u64, mask: u64) -> Result<Vec<FlowStats>> {
        let mut body = Vec::with_capacity(48);
        body.extend_from_slice(&OFPMP_FLOW.to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&[0; 4]);
        body.push(OFPTT_ALL);
        body.extend_from_slice(&[0; 3]);
        body.extend_from_slice(&OFPP_ANY.to_be_bytes());
        body.extend_from_slice(&OFPG_ANY.to_be_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&cookie.to_be_bytes());
        body.extend_from_slice(&mask.to_be_bytes());
        body.extend_from_slice(&encode_match(&[]));
        let request = self.send(OFPT_MULTIPART_REQUEST, &body)?;
        let mut out = Vec::new();
        loop {
            let (_, kind, xid, reply) = self.recv()?;
            if xid != request {
                continue;
            }
            match kind {
                OFPT_ERROR => {
                    return Err(Error::OpenFlowRefused {
                        what: "list flows".into(),
                        error_type: be16(&reply, 0).unwrap_or(0),
                        code: be16(&reply, 2).unwrap_or(0),
                    })
                }
                OFPT_MULTIPART_REPLY => {
                    let flags = be16(&reply, 2).unwrap_or(0);
                    let stats = reply
                        .get(8..)
                        .and_then(parse_flow_stats)
                        .ok_or_else(|| self.protocol("malformed flow stats reply".into()))?;
                    out.extend(stats);
                    if flags & OFPMPF_REPLY_MORE == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Whether a HELLO's version bitmap element offers OpenFlow 1.3.
fn hello_offers_13(body: &[u8]) -> bool {
    let mut rest = body;
    while let (Some(kind), Some(len)) = (be16(rest, 0), be16(rest, 2)) {
        let len = usize::from(len);
        if len < 4 || len > rest.len() {
            return false;
        }
        if kind == 1 {
            return be32(rest, 4).is_some_and(|bits| bits & (1 << VERSION) != 0);
        }
        rest = &rest[len.div_ceil(8) * 8..];
    }
    false
}

/// The body of an OFPT_FLOW_MOD (everything after the header).
fn flow_mod(f: &Flow, command: u8, cookie_match: u64, cookie_mask: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    let cookie = if command == OFPFC_ADD {
        f.cookie
    } else {
        cookie_match
    };
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&cookie_mask.to_be_bytes());
    b.push(f.table);
    b.push(command);
    b.extend_from_slice(&0u16.to_be_bytes()); // idle timeout
    b.extend_from_slice(&0u16.to_be_bytes()); // hard timeout
    b.extend_from_slice(&f.priority.to_be_bytes());
    b.extend_from_slice(&OFP_NO_BUFFER.to_be_bytes());
    b.extend_from_slice(&OFPP_ANY.to_be_bytes());
    b.extend_from_slice(&OFPG_ANY.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes()); // flags
    b.extend_from_slice(&[0; 2]);
    b.extend_from_slice(&f.match_bytes());
    b.extend_from_slice(&f.instruction_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_is_oxm_and_padded() {
        let m = encode_match(&[Field::InPort(OFPP_LOCAL), Field::EthType(ETH_IPV4)]);
        assert_eq!(
            m,
            [
                0, 1, 0, 18, // OXM, 4 + 8 + 6
                0x80, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe, // in_port=LOCAL
                0x80, 0, 0x0a, 2, 0x08, 0x00, // dl_type=ip
                0, 0, 0, 0, 0, 0 // pad to 24
            ]
        );
        assert_eq!(encode_match(&[]), [0, 1, 0, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn masked_nicira_fields() {
        let mut v = Vec::new();
        Field::CtState(CT_TRK | CT_RPL, CT_TRK | CT_RPL).put(&mut v);
        assert_eq!(
            v,
            [0x00, 0x01, 0xd3, 0x08, 0, 0, 0, 0x28, 0, 0, 0, 0x28],
            "NXM_NX_CT_STATE_W"
        );
        let mut v = Vec::new();
        Field::CtMark(1, u32::MAX).put(&mut v);
        assert_eq!(v, [0x00, 0x01, 0xd6, 0x04, 0, 0, 0, 1], "NXM_NX_CT_MARK");
    }

    #[test]
    fn ct_action_layout() {
        let mut v = Vec::new();
        Action::Ct {
            commit: true,
            zone: 0xe71,
            table: None,
            mark: Some(1),
        }
        .put(&mut v);
        // 24 bytes of nx_action_conntrack + a 16-byte set_field.
        assert_eq!(v.len(), 40);
        assert_eq!(&v[..4], [0xff, 0xff, 0, 40]);
        assert_eq!(&v[4..10], [0, 0, 0x23, 0x20, 0, 35]);
        assert_eq!(&v[10..12], [0, 1], "commit");
        assert_eq!(&v[16..18], [0x0e, 0x71], "zone");
        assert_eq!(v[18], NX_CT_RECIRC_NONE);
        assert_eq!(&v[24..28], [0, 25, 0, 16], "nested set_field");
    }

    #[test]
    fn resubmit_layout() {
        let mut v = Vec::new();
        Action::Resubmit(229).put(&mut v);
        assert_eq!(
            v,
            [0xff, 0xff, 0, 16, 0, 0, 0x23, 0x20, 0, 14, 0xff, 0xf8, 229, 0, 0, 0]
        );
    }

    #[test]
    fn learn_layout_is_nxast_learn_with_nxm_specs() {
        let mut v = Vec::new();
        Action::Learn(Learn {
            table: 229,
            priority: 100,
            idle_timeout: 65535,
            cookie: 0x1122_3344_5566_7788,
            specs: vec![
                LearnSpec::MatchValue {
                    dst: NxmField::EthType,
                    value: 0x0800,
                },
                LearnSpec::MatchField {
                    dst: NxmField::Ipv4Src,
                    src: NxmField::Ipv4Dst,
                },
                LearnSpec::Load {
                    dst: NxmField::Reg(7),
                    value: 1,
                },
            ],
        })
        .put(&mut v);
        // 32-byte head, then 2+2+6 + 2+6+6 + 2+4+6 = 36 bytes of specs,
        // zero-padded to 72.
        assert_eq!(v.len(), 72);
        assert_eq!(&v[..4], [0xff, 0xff, 0, 72]);
        assert_eq!(&v[8..10], [0, 16], "NXAST_LEARN");
        assert_eq!(&v[10..12], [0xff, 0xff], "idle timeout");
        assert_eq!(&v[14..16], [0, 100], "priority");
        assert_eq!(&v[16..24], 0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(v[26], 229, "table");
        // eth_type=0x800: immediate, match, 16 bits, NXM_OF_ETH_TYPE.
        assert_eq!(&v[32..42], [0x20, 0x10, 0x08, 0x00, 0, 0, 0x06, 0x02, 0, 0]);
        // NXM_OF_IP_SRC[]=NXM_OF_IP_DST[]: field, match, 32 bits.
        assert_eq!(
            &v[42..56],
            [0, 32, 0, 0, 0x10, 0x04, 0, 0, 0, 0, 0x0e, 0x04, 0, 0]
        );
        // load:1->NXM_NX_REG7[]: immediate, load, 32 bits.
        assert_eq!(&v[56..68], [0x28, 0x20, 0, 0, 0, 1, 0, 1, 0x0e, 0x04, 0, 0]);
        assert!(v[68..].iter().all(|&b| b == 0), "padding ends the specs");
    }

    #[test]
    fn register_match_is_nxm_1() {
        let mut v = Vec::new();
        Field::Reg(7, 1).put(&mut v);
        assert_eq!(v, [0, 1, 0x0e, 4, 0, 0, 0, 1]);
    }

    #[test]
    fn flow_stats_round_trip_and_malformed_input() {
        let f = Flow {
            table: 3,
            priority: 7,
            cookie: 0xabc,
            fields: vec![Field::EthType(ETH_IPV6)],
            instructions: vec![Instruction::Apply(vec![Action::Output(OFPP_NORMAL)])],
        };
        let m = f.match_bytes();
        let i = f.instruction_bytes();
        let mut e = Vec::new();
        e.extend_from_slice(&((48 + m.len() + i.len()) as u16).to_be_bytes());
        e.push(3);
        e.push(0);
        e.extend_from_slice(&[0; 8]); // durations
        e.extend_from_slice(&7u16.to_be_bytes());
        e.extend_from_slice(&[0; 10]); // timeouts, flags, pad
        e.extend_from_slice(&0xabcu64.to_be_bytes());
        e.extend_from_slice(&5u64.to_be_bytes());
        e.extend_from_slice(&500u64.to_be_bytes());
        e.extend_from_slice(&m);
        e.extend_from_slice(&i);
        let stats = parse_flow_stats(&e).unwrap();
        assert_eq!(stats.len(), 1);
        assert!(f.same_as(&stats[0]));
        assert_eq!((stats[0].packets, stats[0].bytes), (5, 500));
        for cut in [1, 20, 49, e.len() - 1] {
            assert!(parse_flow_stats(&e[..cut]).is_none(), "cut at {cut}");
        }
        let mut other = f.clone();
        other.priority = 8;
        assert!(!other.same_as(&stats[0]));
    }

    #[test]
    fn hello_bitmap() {
        // One version-bitmap element offering 1.0 and 1.3.
        let b = [0, 1, 0, 8, 0, 0, 0, 0b10010];
        assert!(hello_offers_13(&b));
        assert!(!hello_offers_13(&[0, 1, 0, 8, 0, 0, 0, 0b10]));
        assert!(!hello_offers_13(&[0, 1, 0, 2]));
        assert!(!hello_offers_13(&[]));
    }
}
