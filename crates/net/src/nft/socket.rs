//! A blocking nf_tables netlink socket (NETLINK_NETFILTER): transactions
//! as one batch, single GETs and dumps. Kernel refusals come back as their
//! errno, never as text.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::NfTablesMessage;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::netlink::extack_message;
use crate::{Error, Result};

/// NFNL_SUBSYS_NFTABLES: batch messages name the subsystem they are for.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The kernel sizes dump datagrams from the reader's buffer, capped at 32 KiB.
const RECV_BUF: usize = 32 * 1024;
/// The kernel answers netlink requests synchronously, so a reply that is not
/// there within this long never will be; the wait is bounded all the same.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) may be
/// inconsistent; it is repeated at most this many times.
const DUMP_ATTEMPTS: usize = 5;

/// One message of a transaction and what it does, for error messages.
pub(super) struct Request {
    pub msg: NfTablesMessage,
    /// NLM_F_CREATE, NLM_F_APPEND...; NLM_F_REQUEST is always added.
    pub flags: u16,
    pub what: String,
}

/// Bound to the network namespace of the thread that created it.
pub(super) struct NfSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn nfmsg(
    family: NetfilterProtoFamily,
    res_id: u16,
    inner: NetfilterMessageInner,
) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(family, 0, res_id), inner)
}

fn push(out: &mut Vec<u8>, msg: NetfilterMessage, flags: u16, seq: u32) {
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
    packet.header.flags = NLM_F_REQUEST | flags;
    packet.header.sequence_number = seq;
    packet.finalize();
    let start = out.len();
    // Netlink messages are 4-byte aligned; buffer_len already is.
    out.resize(start + packet.buffer_len(), 0);
    packet.serialize(&mut out[start..]);
}

/// `requests` framed as one nf_tables batch, numbered from `first_seq` (the
/// BATCH_BEGIN). With `ack`, every request asks for an acknowledgement.
pub(super) fn encode_batch(requests: &[Request], first_seq: u32, ack: bool) -> Vec<u8> {
    let control = |m: ControlMessage| {
        nfmsg(
            NetfilterProtoFamily::Unspec,
            NFNL_SUBSYS_NFTABLES,
            NetfilterMessageInner::None(m),
        )
    };
    let mut out = Vec::new();
    let mut seq = first_seq;
    push(&mut out, control(ControlMessage::BatchBegin), 0, seq);
    for r in requests {
        seq = seq.wrapping_add(1);
        let msg = nfmsg(
            NetfilterProtoFamily::Inet,
            0,
            NetfilterMessageInner::NfTables(r.msg.clone()),
        );
        push(
            &mut out,
            msg,
            r.flags | if ack { NLM_F_ACK } else { 0 },
            seq,
        );
    }
    push(
        &mut out,
        control(ControlMessage::BatchEnd),
        0,
        seq.wrapping_add(1),
    );
    out
}

impl NfSocket {
    pub fn new() -> Result<NfSocket> {
        let sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| Error::io("open nftables netlink socket", e))?;
        // Best effort, as for rtnetlink: readable errors, small acks.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        let timeout = TimeVal::microseconds(REPLY_TIMEOUT.as_micros() as i64);
        setsockopt(&sock, ReceiveTimeout, &timeout)
            .map_err(|e| Error::nix("set nftables netlink socket timeout", e))?;
        Ok(NfSocket {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn send(&self, bytes: &[u8], op: &str) -> Result<()> {
        self.sock
            .send_to(bytes, &SocketAddr::new(0, 0), 0)
            .map_err(|e| Error::io(format!("{op}: send"), e))?;
        Ok(())
    }

    /// Applies `requests` as one transaction: the kernel commits all of them
    /// or none, and concurrent transactions (other processes) are ordered,
    /// never interleaved.
    pub fn transaction(&mut self, requests: &[Request], op: &str) -> Result<()> {
        let first = self.seq.wrapping_add(1);
        self.seq = first.wrapping_add(requests.len() as u32 + 1);
        let bytes = encode_batch(requests, first, true);
        self.send(&bytes, op)?;
        // Each request is acknowledged after the commit; a refusal comes
        // with the sequence number of the request refused, or of the
        // BATCH_BEGIN when the commit itself failed.
        let mut acked = 0;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while acked < requests.len() {
            let n = self.recv(deadline, op)?;
            for (seq, msg) in messages(&self.buf[..n], op)? {
                let offset = seq.wrapping_sub(first) as usize;
                if offset > requests.len() {
                    continue;
                }
                let (flags, msg) = msg.map_err(|detail| Error::Protocol {
                    op: op.to_string(),
                    detail,
                })?;
                if let NetlinkPayload::Error(e) = msg.payload {
                    match e.code {
                        None => acked += 1,
                        Some(code) => {
                            let what = match offset.checked_sub(1).and_then(|i| requests.get(i)) {
                                Some(r) => format!("{op}: {}", r.what),
                                // The batch as a whole: refused (EPERM) or
                                // its commit failed.
                                None => op.to_string(),
                            };
                            return Err(Error::Netlink {
                                op: what,
                                errno: -code.get(),
                                message: extack_message(flags, &e.header, true),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The one object `msg` asks for; a missing one is the kernel's errno
    /// (ENOENT), as [`Error::is_not_found`] tells.
    pub fn get(&mut self, msg: NfTablesMessage, op: &str) -> Result<NfTablesMessage> {
        let seq = self.next_request(msg, 0, op)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let n = self.recv(deadline, op)?;
            for (s, msg) in messages(&self.buf[..n], op)? {
                if s != seq {
                    continue;
                }
                let (flags, msg) = msg.map_err(|detail| Error::Protocol {
                    op: op.to_string(),
                    detail,
                })?;
                return match msg.payload {
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::NfTables(m),
                        ..
                    }) => Ok(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => Err(Error::Netlink {
                        op: op.to_string(),
                        errno: -e.raw_code(),
                        message: extack_message(flags, &e.header, true),
                    }),
                    other => Err(Error::Protocol {
                        op: op.to_string(),
                        detail: format!("unexpected reply {other:?}"),
                    }),
                };
            }
        }
    }

    /// Every object `msg` matches, read to the end of the dump.
    pub fn dump(&mut self, msg: NfTablesMessage, op: &str) -> Result<Vec<NfTablesMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_request(msg.clone(), NLM_F_DUMP, op)?;
            let deadline = Instant::now() + REPLY_TIMEOUT;
            let mut out = Vec::new();
            let mut interrupted = false;
            // Read to the end even after a bad message, so the socket is
            // clean for the next request.
            let mut failure: Option<Error> = None;
            'dump: loop {
                let n = self.recv(deadline, op)?;
                for (s, msg) in messages(&self.buf[..n], op)? {
                    if s != seq {
                        continue;
                    }
                    let (flags, msg) = match msg {
                        Ok(m) => m,
                        Err(detail) => {
                            failure.get_or_insert(Error::Protocol {
                                op: op.to_string(),
                                detail,
                            });
                            continue;
                        }
                    };
                    interrupted |= flags & NLM_F_DUMP_INTR != 0;
                    match msg.payload {
                        NetlinkPayload::InnerMessage(NetfilterMessage {
                            inner: NetfilterMessageInner::NfTables(m),
                            ..
                        }) => out.push(m),
                        NetlinkPayload::Done(d) if d.code != 0 => {
                            return Err(Error::Netlink {
                                op: op.to_string(),
                                errno: -d.code,
                                message: extack_message(flags, &d.extended_ack, false),
                            });
                        }
                        NetlinkPayload::Done(_) => break 'dump,
                        NetlinkPayload::Error(e) if e.code.is_some() => {
                            return Err(Error::Netlink {
                                op: op.to_string(),
                                errno: -e.raw_code(),
                                message: extack_message(flags, &e.header, true),
                            });
                        }
                        _ => {}
                    }
                }
            }
            if let Some(e) = failure {
                return Err(e);
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(Error::Protocol {
            op: op.to_string(),
            detail: format!("dump interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        })
    }

    fn next_request(&mut self, msg: NfTablesMessage, flags: u16, op: &str) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut bytes = Vec::new();
        let msg = nfmsg(
            NetfilterProtoFamily::Inet,
            0,
            NetfilterMessageInner::NfTables(msg),
        );
        push(&mut bytes, msg, flags, self.seq);
        self.send(&bytes, op)?;
        Ok(self.seq)
    }

    /// One datagram into `self.buf`, waiting at most until `deadline`.
    fn recv(&mut self, deadline: Instant, op: &str) -> Result<usize> {
        loop {
            match self.sock.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
                Ok(n) if n > self.buf.len() => {
                    return Err(Error::Protocol {
                        op: op.to_string(),
                        detail: format!("reply of {n} bytes truncated"),
                    })
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted && Instant::now() < deadline => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    return Err(Error::Timeout {
                        what: format!("the kernel's answer to {op}"),
                        after: REPLY_TIMEOUT,
                    })
                }
                Err(e) => return Err(Error::io(format!("{op}: receive"), e)),
            }
        }
    }
}

type Parsed = std::result::Result<(u16, NetlinkMessage<NetfilterMessage>), String>;

/// The messages of one datagram, each with its sequence number and flags.
/// A message that does not parse is returned as such; a datagram whose
/// framing is broken is an error as a whole.
fn messages(data: &[u8], op: &str) -> Result<Vec<(u32, Parsed)>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let rest = &data[off..];
        let header = NetlinkBuffer::new_checked(rest).map_err(|e| Error::Protocol {
            op: op.to_string(),
            detail: e.to_string(),
        })?;
        let len = header.length() as usize;
        let seq = header.sequence_number();
        let flags = header.flags();
        // new_checked guarantees 16 <= len <= rest.len().
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&rest[..len])
            .map(|m| (flags, m))
            .map_err(|e| e.to_string());
        out.push((seq, parsed));
        off += (len + 3) & !3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_a_datagram_and_survive_garbage() {
        let reqs = [];
        let bytes = encode_batch(&reqs, 7, false);
        let got: Vec<u32> = messages(&bytes, "t")
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(got, [7, 8]);
        // Broken framing fails the whole datagram.
        let mut bad = bytes.clone();
        bad.extend_from_slice(&[0xff; 7]);
        assert!(matches!(messages(&bad, "t"), Err(Error::Protocol { .. })));
    }
}
