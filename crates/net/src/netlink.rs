//! A blocking rtnetlink socket: request, then read until the ACK, the error,
//! the single reply or the end of the dump.

use std::os::fd::{AsRawFd, BorrowedFd};

use ipnet::IpNet;
use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
    LinkMessage, LinkProtoInfoBridge,
};
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteProtocol};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::link::{
    address_from_msg, address_msg, link_from_msg, route_from_msg, route_from_msg_in, route_msg,
    route_msg_in, validate_ifname,
};
use crate::netns::enter_fd;
use crate::{Address, BridgeNf, Error, Family, Link, NetnsFd, Result, Route, Rule};

/// Large enough for any single dump datagram: the kernel sizes dump
/// datagrams from the reader's buffer, capped at 32 KiB.
const RECV_BUF: usize = 32 * 1024;
/// A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) may be
/// inconsistent; it is repeated at most this many times.
const DUMP_ATTEMPTS: usize = 5;
/// IFLA_BRPORT_MODE: hairpin mode of a bridge port (linux/if_link.h).
const IFLA_BRPORT_MODE: u16 = 4;
/// NLMSGERR_ATTR_MSG: extended-ack text (linux/netlink.h).
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDRLEN: usize = 16;

/// How the answer to a request ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// A change request: NLMSG_ERROR with code 0 (the ACK) or an errno.
    Ack,
    /// A GET for one object: that object, or NLMSG_ERROR.
    One,
    /// A dump: any number of objects, then NLMSG_DONE.
    Dump,
}

/// Blocking rtnetlink socket, bound to the network namespace that was
/// current (for the calling thread) when it was created; it keeps working
/// on that namespace whatever the thread does afterwards.
pub struct Handle {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Handle {
    pub fn new() -> Result<Handle> {
        let sock = Socket::new(NETLINK_ROUTE).map_err(|e| Error::io("open rtnetlink socket", e))?;
        // All best effort (older kernels lack them): extended-ack text makes
        // errors readable, capped acks keep them small, and strict checking
        // lets the kernel filter address/route dumps by interface/table
        // (results are filtered here again anyway).
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_netlink_get_strict_chk(true);
        Ok(Handle {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// A handle for `ns`, created by briefly entering it on the calling
    /// thread (see [`NetnsFd::enter`] for when that is allowed).
    pub fn new_in(ns: &NetnsFd) -> Result<Handle> {
        let guard = ns.enter()?;
        let handle = Handle::new();
        guard.restore()?;
        handle
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        validate_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, || format!("get link {name}"))
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg, || format!("get link with index {index}"))
    }

    fn get_link(&mut self, mut msg: LinkMessage, op: impl Fn() -> String) -> Result<Option<Link>> {
        // Statistics are most of a link message and never used here.
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        match self.request(RouteNetlinkMessage::GetLink(msg), Reply::One, &op) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from_msg(l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let replies = self.request(RouteNetlinkMessage::GetLink(msg), Reply::Dump, &|| {
            "list links".to_string()
        })?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from_msg(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a Linux bridge; an existing link of that name is an error
    /// for which [`Error::is_exists`] holds. `mtu` 0 keeps the default.
    ///
    /// `mac` goes in the creating message: the kernel then marks the address
    /// as set by the user (NET_ADDR_SET) and the bridge keeps it whatever
    /// ports come and go. Set in a second message, a crash in between would
    /// leave a bridge whose MAC follows its lowest port's.
    pub fn create_bridge(&mut self, name: &str, mtu: u32, mac: Option<[u8; 6]>) -> Result<()> {
        self.create_bridge_with(name, mtu, mac, None)
    }

    /// [`Handle::create_bridge`] with the bridge's netfilter options set
    /// in the same message (`nf`), so no bridge ever exists without them.
    pub fn create_bridge_with(
        &mut self,
        name: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
        nf: Option<BridgeNf>,
    ) -> Result<()> {
        validate_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        if mtu != 0 {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        let mut info = vec![LinkInfo::Kind(InfoKind::Bridge)];
        if let Some(nf) = nf {
            info.push(bridge_nf_data(nf));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(info));
        self.create(msg, &|| format!("create bridge {name}"))
    }

    /// Sets a Linux bridge's `nf_call_iptables` and `nf_call_ip6tables`
    /// (`ip link set BR type bridge nf_call_iptables 1 ...`): per bridge,
    /// so the machine's global `bridge-nf-call-*` sysctls need not change.
    pub fn set_bridge_nf(&mut self, index: u32, nf: BridgeNf) -> Result<()> {
        let msg = Self::link_msg(
            index,
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge), bridge_nf_data(nf)]),
        );
        // RTM_SETLINK ignores IFLA_LINKINFO: a kind's options change through
        // RTM_NEWLINK on the existing index (changelink), as `ip link` does.
        self.request(RouteNetlinkMessage::NewLink(msg), Reply::Ack, &|| {
            format!(
                "set nf_call_iptables {} nf_call_ip6tables {} on bridge index {index}",
                u8::from(nf.iptables),
                u8::from(nf.ip6tables)
            )
        })
        .map(drop)
    }

    /// Creates a veth pair: `name` in this handle's namespace and
    /// `peer_name` directly in `peer_ns` (no rename or move afterwards, so
    /// names never clash with the creating namespace), both with `mtu` (0:
    /// default). The kernel ignores an alias given at creation, so
    /// `peer_alias` is set afterwards through a short-lived socket opened in
    /// `peer_ns` on the calling thread; if that fails the pair is deleted.
    pub fn create_veth(
        &mut self,
        name: &str,
        peer_name: &str,
        peer_ns: BorrowedFd,
        mtu: u32,
        peer_alias: Option<&str>,
    ) -> Result<()> {
        validate_ifname(name)?;
        validate_ifname(peer_name)?;
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_string()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        if mtu != 0 {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.create(msg, &|| format!("create veth {name} (peer {peer_name})"))?;

        let Some(alias) = peer_alias else {
            return Ok(());
        };
        let tagged = enter_fd(peer_ns).and_then(|guard| {
            let r = Handle::new().and_then(|mut h| h.set_alias_by_name(peer_name, alias));
            guard.restore()?;
            r
        });
        if let Err(e) = tagged {
            // Best effort: the error being reported is the alias failure.
            let _ = self.delete_link_by_name(name);
            return Err(e);
        }
        Ok(())
    }

    fn create(&mut self, msg: LinkMessage, op: &dyn Fn() -> String) -> Result<()> {
        self.request_flags(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            Reply::Ack,
            op,
        )
        .map(drop)
    }

    fn set_link(&mut self, msg: LinkMessage, op: &dyn Fn() -> String) -> Result<()> {
        self.request(RouteNetlinkMessage::SetLink(msg), Reply::Ack, op)
            .map(drop)
    }

    fn link_msg(index: u32, attr: LinkAttribute) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(attr);
        msg
    }

    /// Sets the interface alias (`ip link set ... alias`); "" clears it.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<()> {
        let msg = Self::link_msg(index, LinkAttribute::IfAlias(alias.to_string()));
        self.set_link(msg, &|| format!("set alias of interface index {index}"))
    }

    fn set_alias_by_name(&mut self, name: &str, alias: &str) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::IfAlias(alias.to_string()));
        self.set_link(msg, &|| format!("set alias of {name}"))
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.set_link(msg, &|| format!("set interface index {index} up"))
    }

    /// Sets the link-layer address. On a Linux bridge this also pins it:
    /// without an explicit address the bridge takes the lowest MAC of its
    /// ports and changes it whenever that port leaves.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        let msg = Self::link_msg(index, LinkAttribute::Address(mac.to_vec()));
        self.set_link(msg, &|| {
            format!("set MAC address of interface index {index}")
        })
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        let msg = Self::link_msg(index, LinkAttribute::Mtu(mtu));
        self.set_link(msg, &|| format!("set mtu {mtu} on interface index {index}"))
    }

    /// Makes `index` a port of bridge `master`; 0 detaches it.
    pub fn set_master(&mut self, index: u32, master: u32) -> Result<()> {
        let msg = Self::link_msg(index, LinkAttribute::Controller(master));
        self.set_link(msg, &|| {
            format!("attach interface index {index} to master index {master}")
        })
    }

    /// Hairpin mode of a Linux bridge port, set over netlink (AF_BRIDGE,
    /// IFLA_PROTINFO) like `bridge link set ... hairpin`, because /sys may
    /// belong to another network namespace than this handle.
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let mut msg = Self::link_msg(
            index,
            LinkAttribute::ProtoInfoBridge(vec![LinkProtoInfoBridge::Other(DefaultNla::new(
                IFLA_BRPORT_MODE,
                vec![u8::from(on)],
            ))]),
        );
        msg.header.interface_family = AddressFamily::Bridge;
        self.set_link(msg, &|| {
            format!("set hairpin {on} on bridge port index {index}")
        })
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), Reply::Ack, &|| {
            format!("delete interface index {index}")
        })
        .map(drop)
    }

    /// Deletes a link by name; `Ok(false)` if there was none. Deleting one
    /// end of a veth pair deletes both.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        validate_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(msg), Reply::Ack, &|| {
            format!("delete interface {name}")
        }) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds an address (IPv4 with its broadcast address); an existing one
    /// is an error for which [`Error::is_exists`] holds.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        self.new_address(index, addr, address_msg(index, addr))
    }

    /// [`Handle::add_address`], an IPv6 address without duplicate address
    /// detection (`nodad`: usable at once; for addresses something else
    /// made unique). IPv4 is added as by `add_address`.
    pub fn add_address_nodad(&mut self, index: u32, addr: IpNet) -> Result<()> {
        let mut msg = address_msg(index, addr);
        if addr.addr().is_ipv6() {
            msg.attributes
                .push(netlink_packet_route::address::AddressAttribute::Flags(
                    netlink_packet_route::address::AddressFlags::Nodad,
                ));
        }
        self.new_address(index, addr, msg)
    }

    fn new_address(&mut self, index: u32, addr: IpNet, msg: AddressMessage) -> Result<()> {
        self.request_flags(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            Reply::Ack,
            &|| format!("add address {addr} to interface index {index}"),
        )
        .map(drop)
    }

    /// Removes an address; a missing one gives [`Error::is_not_found`].
    pub fn del_address(&mut self, index: u32, addr: IpNet) -> Result<()> {
        self.request(
            RouteNetlinkMessage::DelAddress(address_msg(index, addr)),
            Reply::Ack,
            &|| format!("delete address {addr} from interface index {index}"),
        )
        .map(drop)
    }

    /// Addresses of one interface, or of all with `None`.
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>> {
        let mut msg = AddressMessage::default();
        msg.header.index = index.unwrap_or(0);
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), Reply::Dump, &|| {
            "list addresses".to_string()
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_from_msg(a),
                _ => None,
            })
            .filter(|a| index.is_none() || index == Some(a.index))
            .collect())
    }

    /// Adds a route to the main table; an identical existing route gives
    /// [`Error::is_exists`].
    pub fn add_route(&mut self, route: &Route) -> Result<()> {
        let msg = route_msg(route, false)?;
        self.request_flags(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            Reply::Ack,
            &|| format!("add route {}", describe(route)),
        )
        .map(drop)
    }

    /// Removes a route from the main table; unset fields of `route` match
    /// anything. A missing route gives [`Error::is_not_found`].
    pub fn del_route(&mut self, route: &Route) -> Result<()> {
        let msg = route_msg(route, true)?;
        self.request(RouteNetlinkMessage::DelRoute(msg), Reply::Ack, &|| {
            format!("delete route {}", describe(route))
        })
        .map(drop)
    }

    /// Unicast routes of the main table.
    pub fn routes(&mut self, family: Family) -> Result<Vec<Route>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.af();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), Reply::Dump, &|| {
            format!("list {family:?} routes")
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_from_msg(r),
                _ => None,
            })
            .collect())
    }

    /// Adds `route` to routing table `table`; an identical route gives
    /// [`Error::is_exists`].
    pub fn add_route_in(&mut self, table: u32, route: &Route) -> Result<()> {
        let msg = route_msg_in(route, false, table)?;
        self.request_flags(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            Reply::Ack,
            &|| format!("add route {} table {table}", describe(route)),
        )
        .map(drop)
    }

    /// Unicast routes of routing table `table`.
    pub fn routes_in(&mut self, family: Family, table: u32) -> Result<Vec<Route>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family.af();
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), Reply::Dump, &|| {
            format!("list {family:?} routes of table {table}")
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_from_msg_in(r, table),
                _ => None,
            })
            .collect())
    }

    /// Adds a policy routing rule (`ip rule add from SRC to DST lookup
    /// TABLE priority PRIO`); an identical rule gives [`Error::is_exists`].
    pub fn add_rule(&mut self, rule: &Rule) -> Result<()> {
        let msg = rule_msg(rule)?;
        self.request_flags(
            RouteNetlinkMessage::NewRule(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            Reply::Ack,
            &|| format!("add rule {rule:?}"),
        )
        .map(drop)
    }

    /// Removes a policy routing rule; a missing one gives
    /// [`Error::is_not_found`].
    pub fn del_rule(&mut self, rule: &Rule) -> Result<()> {
        let msg = rule_msg(rule)?;
        self.request(RouteNetlinkMessage::DelRule(msg), Reply::Ack, &|| {
            format!("delete rule {rule:?}")
        })
        .map(drop)
    }

    /// The policy routing rules of `family` that look up a table.
    pub fn rules(&mut self, family: Family) -> Result<Vec<Rule>> {
        let mut msg = RuleMessage::default();
        msg.header.family = family.af();
        let replies = self.request(RouteNetlinkMessage::GetRule(msg), Reply::Dump, &|| {
            format!("list {family:?} rules")
        })?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => rule_from_msg(r),
                _ => None,
            })
            .collect())
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        reply: Reply,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.request_flags(msg, 0, reply, op)
    }

    fn request_flags(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        reply: Reply,
        op: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let flags = NLM_F_REQUEST
            | flags
            | match reply {
                Reply::Ack => NLM_F_ACK,
                Reply::One => 0,
                Reply::Dump => NLM_F_DUMP,
            };
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = flags;
        for _ in 0..DUMP_ATTEMPTS {
            self.seq = self.seq.wrapping_add(1);
            packet.header.sequence_number = self.seq;
            packet.finalize();
            let len = packet.buffer_len();
            if len > self.buf.len() {
                return Err(Error::invalid("netlink request (too large)", op()));
            }
            packet.serialize(&mut self.buf[..len]);
            self.sock
                .send_to(&self.buf[..len], &SocketAddr::new(0, 0), 0)
                .map_err(|e| Error::io(format!("{}: send", op()), e))?;
            let (replies, interrupted) = self.receive(reply, op)?;
            if !interrupted {
                return Ok(replies);
            }
        }
        Err(Error::Protocol {
            op: op(),
            detail: format!("dump interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        })
    }

    /// Reads the answer to the request numbered `self.seq`. Returns the
    /// objects and whether the kernel flagged the dump as interrupted.
    fn receive(
        &mut self,
        reply: Reply,
        op: &dyn Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool)> {
        let mut out = Vec::new();
        let mut interrupted = false;
        // A dump is always read to its end, even after a bad message, so
        // that the socket is clean for the next request (the kernel refuses
        // a new dump while one is pending on the socket).
        let mut failure: Option<Error> = None;
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], libc::MSG_TRUNC)
                .map_err(|e| Error::io(format!("{}: receive", op()), e))?;
            if n > self.buf.len() {
                return Err(Error::Protocol {
                    op: op(),
                    detail: format!("reply of {n} bytes truncated"),
                });
            }
            let mut off = 0;
            while off < n {
                let data = &self.buf[off..n];
                let header = NetlinkBuffer::new_checked(data).map_err(|e| Error::Protocol {
                    op: op(),
                    detail: e.to_string(),
                })?;
                let len = header.length() as usize;
                // new_checked guarantees NLMSG_HDRLEN <= len <= data.len().
                off += (len + 3) & !3;
                if header.sequence_number() != self.seq {
                    // Left over from an earlier request that ended early.
                    continue;
                }
                if header.flags() & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let flags = header.flags();
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len]);
                let msg = match parsed {
                    Ok(m) => m,
                    Err(e) => {
                        let err = Error::Protocol {
                            op: op(),
                            detail: e.to_string(),
                        };
                        if reply != Reply::Dump {
                            return Err(err);
                        }
                        failure.get_or_insert(err);
                        continue;
                    }
                };
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => failure.map_or(Ok((out, interrupted)), Err),
                            Some(code) => Err(Error::Netlink {
                                op: op(),
                                errno: -code.get(),
                                message: extack_message(flags, &e.header, true),
                            }),
                        };
                    }
                    NetlinkPayload::Done(d) => {
                        if d.code != 0 {
                            return Err(Error::Netlink {
                                op: op(),
                                errno: -d.code,
                                message: extack_message(flags, &d.extended_ack, false),
                            });
                        }
                        return failure.map_or(Ok((out, interrupted)), Err);
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if reply == Reply::One {
                            return Ok((out, interrupted));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn rule_msg(rule: &Rule) -> Result<RuleMessage> {
    let family = rule.family().ok_or_else(|| {
        Error::invalid("rule (neither source nor destination)", format!("{rule:?}"))
    })?;
    let mut msg = RuleMessage::default();
    msg.header.family = family.af();
    msg.header.action = RuleAction::ToTable;
    msg.header.table = u8::try_from(rule.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    for (net, is_src) in [(rule.src, true), (rule.dst, false)] {
        let Some(net) = net else { continue };
        if Family::of(&net.addr()) != family {
            return Err(Error::invalid("rule (mixed families)", format!("{rule:?}")));
        }
        if is_src {
            msg.header.src_len = net.prefix_len();
            msg.attributes.push(RuleAttribute::Source(net.network()));
        } else {
            msg.header.dst_len = net.prefix_len();
            msg.attributes
                .push(RuleAttribute::Destination(net.network()));
        }
    }
    msg.attributes.push(RuleAttribute::Table(rule.table));
    msg.attributes.push(RuleAttribute::Priority(rule.priority));
    msg.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Boot));
    Ok(msg)
}

fn rule_from_msg(msg: &RuleMessage) -> Option<Rule> {
    if msg.header.action != RuleAction::ToTable {
        return None;
    }
    let mut rule = Rule {
        src: None,
        dst: None,
        table: u32::from(msg.header.table),
        priority: 0,
    };
    for a in &msg.attributes {
        match a {
            RuleAttribute::Source(ip) => rule.src = IpNet::new(*ip, msg.header.src_len).ok(),
            RuleAttribute::Destination(ip) => rule.dst = IpNet::new(*ip, msg.header.dst_len).ok(),
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Priority(p) => rule.priority = *p,
            _ => {}
        }
    }
    Some(rule)
}

fn bridge_nf_data(nf: BridgeNf) -> LinkInfo {
    LinkInfo::Data(InfoData::Bridge(vec![
        InfoBridge::NfCallIpTables(nf.iptables),
        InfoBridge::NfCallIp6Tables(nf.ip6tables),
    ]))
}

fn describe(route: &Route) -> String {
    let mut s = route.dst.to_string();
    if let Some(gw) = route.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = route.oif {
        s += &format!(" dev index {oif}");
    }
    if let Some(m) = route.metric {
        s += &format!(" metric {m}");
    }
    s
}

/// The kernel's extended-ack text, if it sent one. For NLMSG_ERROR the
/// attributes follow the echoed request (only its header when the kernel
/// capped it); for NLMSG_DONE they follow the error code directly.
pub(crate) fn extack_message(flags: u16, payload: &[u8], echoes_request: bool) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let skip = if !echoes_request {
        0
    } else if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = payload.get(..4)?;
        (u32::from_ne_bytes(len.try_into().ok()?) as usize + 3) & !3
    };
    for nla in NlasIterator::new(payload.get(skip..)?) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let text = nla.value();
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn extack_from_capped_error() {
        let mut payload = vec![0u8; NLMSG_HDRLEN];
        payload.extend(nla(2, &7u32.to_ne_bytes())); // NLMSGERR_ATTR_OFFS
        payload.extend(nla(NLMSGERR_ATTR_MSG, b"Unknown device type\0"));
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload, true).as_deref(),
            Some("Unknown device type")
        );
        assert_eq!(extack_message(NLM_F_CAPPED, &payload, true), None);
    }

    #[test]
    fn extack_from_uncapped_error_skips_the_echoed_request() {
        // Echoed request of 20 bytes (header + 4 bytes payload): the skip
        // is taken from its length field.
        let mut payload = 20u32.to_ne_bytes().to_vec();
        payload.resize(20, 0);
        payload.extend(nla(NLMSGERR_ATTR_MSG, b"nope\0"));
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS, &payload, true).as_deref(),
            Some("nope")
        );
    }

    #[test]
    fn extack_from_done_and_garbage() {
        let payload = nla(NLMSGERR_ATTR_MSG, b"bad filter\0");
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS, &payload, false).as_deref(),
            Some("bad filter")
        );
        assert_eq!(extack_message(NLM_F_ACK_TLVS, &[1, 2], true), None);
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &[0; 8], true),
            None
        );
    }

    #[test]
    fn describe_route() {
        let r = Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            oif: Some(2),
            metric: Some(5),
            scope_link: false,
        };
        assert_eq!(describe(&r), "0.0.0.0/0 via 10.0.0.1 dev index 2 metric 5");
    }
}
