//! The masquerade rule as nf_tables expressions, and back.
//!
//! What is written is exactly what `nft` writes for
//! `ip saddr NET ip daddr != NET masquerade comment "..."` in an inet table
//! (checked byte for byte against `nft` in the tests), so `nft list` shows
//! the rule as that text and operators see what they would have typed.
//! Reading accepts the same expressions whoever wrote them (an operator's
//! `nft -f` included), for CHECK and doctor.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_netfilter::nftables::{
    Bitwise, Cmp, DataAttribute, ExpressionAttribute, Expressions, Immediate, ListAttribute, Meta,
    MetaKey, Operator, Payload, Register, Verdict, VerdictAttribute,
};

/// NFPROTO_IPV4 and NFPROTO_IPV6 (linux/netfilter.h): what `meta nfproto`
/// loads in an inet chain.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// NFT_PAYLOAD_NETWORK_HEADER: offsets count from the IP header.
const NETWORK_HEADER: u32 = 1;
/// NFTNL_UDATA_RULE_COMMENT: the TLV type nft uses for a rule's comment.
const UDATA_COMMENT: u8 = 0;

pub(super) type Expr = ListAttribute<ExpressionAttribute>;

/// Where source and destination addresses sit in the IP header, per family.
struct Family {
    nfproto: u8,
    saddr: u32,
    daddr: u32,
    len: usize,
}

const V4: Family = Family {
    nfproto: NFPROTO_IPV4,
    saddr: 12,
    daddr: 16,
    len: 4,
};
const V6: Family = Family {
    nfproto: NFPROTO_IPV6,
    saddr: 8,
    daddr: 24,
    len: 16,
};

fn family_of(net: &IpNet) -> &'static Family {
    match net {
        IpNet::V4(_) => &V4,
        IpNet::V6(_) => &V6,
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The expressions of "traffic from `net` to anywhere outside it is
/// masqueraded". A pod address with its prefix (10.244.3.2/16) means its
/// network.
pub(super) fn masquerade(net: IpNet) -> Vec<Expr> {
    let mut exprs = matches(net, &[(true, Operator::Equal), (false, Operator::NotEqual)]);
    exprs.push(
        Expressions::Other {
            expression_type: "masq".to_string(),
            attributes: Vec::new(),
        }
        .into(),
    );
    exprs
}

/// The expressions of "traffic to `net` is left alone" (nft's
/// `ip daddr NET return`), placed before the masquerade rules.
pub(super) fn exempt(net: IpNet) -> Vec<Expr> {
    let mut exprs = matches(net, &[(false, Operator::Equal)]);
    exprs.push(
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                Verdict::Return,
            )])),
        ])
        .into(),
    );
    exprs
}

/// The family match, then one address comparison with `net` per entry of
/// `cmps` (`true`: the source address), as nft writes them.
fn matches(net: IpNet, cmps: &[(bool, Operator)]) -> Vec<Expr> {
    let net = net.trunc();
    let fam = family_of(&net);
    let addr = octets(net.addr());
    let prefix = usize::from(net.prefix_len());
    // nft's shape: a whole-byte prefix loads just those bytes; any other
    // (including /0) loads the whole address and masks it.
    let (len, mask) = if prefix % 8 == 0 && prefix > 0 {
        (prefix / 8, None)
    } else {
        let mask: Vec<u8> = (0..fam.len)
            .map(|i| {
                let ones = prefix.saturating_sub(i * 8).min(8);
                // ones <= 8, so the shift never overflows a u16.
                (0xff00u16 >> ones) as u8
            })
            .collect();
        (fam.len, Some(mask))
    };
    let value = addr.get(..len).unwrap_or(&addr).to_vec();
    let mut exprs = vec![
        Expressions::Meta(vec![
            Meta::Key(MetaKey::Nfproto),
            Meta::DestinationRegister(Register::Reg1),
        ])
        .into(),
        cmp(Operator::Equal, vec![fam.nfproto]),
    ];
    for &(source, op) in cmps {
        let offset = if source { fam.saddr } else { fam.daddr };
        exprs.push(
            Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(NETWORK_HEADER),
                Payload::Offset(offset),
                Payload::Len(len as u32),
            ])
            .into(),
        );
        if let Some(mask) = &mask {
            exprs.push(
                Expressions::Bitwise(vec![
                    Bitwise::SourceRegister(Register::Reg1),
                    Bitwise::DestinationRegister(Register::Reg1),
                    Bitwise::Length(len as u32),
                    Bitwise::Mask(DataAttribute::Value(mask.clone())),
                    Bitwise::Xor(DataAttribute::Value(vec![0; len])),
                ])
                .into(),
            );
        }
        exprs.push(cmp(op, value.clone()));
    }
    exprs
}

fn cmp(op: Operator, value: Vec<u8>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(value)),
    ])
    .into()
}

/// A rule comment in nft's userdata encoding, so `nft list` shows it.
pub(super) fn comment_userdata(comment: &str) -> Vec<u8> {
    let mut text = comment.as_bytes().to_vec();
    // The TLV length is one byte and counts the NUL.
    text.truncate(usize::from(u8::MAX) - 1);
    let mut out = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    out.extend_from_slice(&text);
    out.push(0);
    out
}

/// What a register holds, as far as recognising the rule needs.
#[derive(Clone)]
enum Reg {
    Nfproto,
    /// Bytes of the network header, possibly masked.
    Header {
        offset: u32,
        len: usize,
        mask: Option<Vec<u8>>,
    },
}

/// The source network of a masquerade rule: a rule that masquerades and
/// matches `ip saddr == NET` (or ip6) after matching the family; `None` for
/// any other rule. Registers are followed, so loads and compares may be
/// interleaved with other expressions as nft's optimiser likes.
pub(super) fn masqueraded_source(exprs: &[Expr]) -> Option<IpNet> {
    let s = scan(exprs);
    s.source.filter(|_| s.masq && !s.ret)
}

/// The destination of an exemption rule (`ip daddr NET return`, nothing
/// else matched); `None` for any other rule.
pub(super) fn exempt_destination(exprs: &[Expr]) -> Option<IpNet> {
    let s = scan(exprs);
    s.dest.filter(|_| s.ret && !s.masq && s.source.is_none())
}

/// What a rule matches (source and destination prefixes compared for
/// equality) and does.
struct Scan {
    source: Option<IpNet>,
    dest: Option<IpNet>,
    masq: bool,
    ret: bool,
}

fn scan(exprs: &[Expr]) -> Scan {
    let mut regs: Vec<(Register, Reg)> = Vec::new();
    let mut nfproto: Option<u8> = None;
    let mut source = None;
    let mut dest = None;
    let mut masq = false;
    let mut ret = false;
    for (name, data) in exprs.iter().filter_map(parts) {
        match (name, data) {
            (_, Some(Expressions::Meta(attrs))) => {
                let key = attrs.iter().find_map(|a| match a {
                    Meta::Key(k) => Some(*k),
                    _ => None,
                });
                let dreg = attrs.iter().find_map(|a| match a {
                    Meta::DestinationRegister(r) => Some(*r),
                    _ => None,
                });
                if let Some(dreg) = dreg {
                    set(
                        &mut regs,
                        dreg,
                        (key == Some(MetaKey::Nfproto)).then_some(Reg::Nfproto),
                    );
                }
            }
            (_, Some(Expressions::Payload(attrs))) => {
                let mut dreg = None;
                let (mut base, mut offset, mut len) = (None, None, None);
                for a in attrs {
                    match a {
                        Payload::DestinationRegister(r) => dreg = Some(*r),
                        Payload::Base(b) => base = Some(*b),
                        Payload::Offset(o) => offset = Some(*o),
                        Payload::Len(l) => len = Some(*l as usize),
                        _ => {}
                    }
                }
                if let Some(dreg) = dreg {
                    let loaded = match (base, offset, len) {
                        (Some(NETWORK_HEADER), Some(offset), Some(len)) => Some(Reg::Header {
                            offset,
                            len,
                            mask: None,
                        }),
                        _ => None,
                    };
                    set(&mut regs, dreg, loaded);
                }
            }
            (_, Some(Expressions::Bitwise(attrs))) => {
                let (mut sreg, mut dreg, mut mask, mut xor) = (None, None, None, None);
                for a in attrs {
                    match a {
                        Bitwise::SourceRegister(r) => sreg = Some(*r),
                        Bitwise::DestinationRegister(r) => dreg = Some(*r),
                        Bitwise::Mask(DataAttribute::Value(v)) => mask = Some(v.clone()),
                        Bitwise::Xor(DataAttribute::Value(v)) => xor = Some(v.clone()),
                        _ => {}
                    }
                }
                let Some(dreg) = dreg else { continue };
                let masked = match (sreg.and_then(|r| get(&regs, r)), mask, xor) {
                    (
                        Some(Reg::Header {
                            offset,
                            len,
                            mask: None,
                        }),
                        Some(mask),
                        Some(xor),
                    ) if mask.len() == len && xor.iter().all(|b| *b == 0) => Some(Reg::Header {
                        offset,
                        len,
                        mask: Some(mask),
                    }),
                    _ => None,
                };
                set(&mut regs, dreg, masked);
            }
            (_, Some(Expressions::Cmp(attrs))) => {
                let (mut sreg, mut op, mut value) = (None, None, None);
                for a in attrs {
                    match a {
                        Cmp::SourceRegister(r) => sreg = Some(*r),
                        Cmp::Op(o) => op = Some(*o),
                        Cmp::Data(DataAttribute::Value(v)) => value = Some(v.as_slice()),
                        _ => {}
                    }
                }
                let (Some(reg), Some(Operator::Equal), Some(value)) =
                    (sreg.and_then(|r| get(&regs, r)), op, value)
                else {
                    continue;
                };
                match reg {
                    Reg::Nfproto => nfproto = value.first().copied().filter(|_| value.len() == 1),
                    Reg::Header { offset, len, mask } => {
                        let fam = match nfproto {
                            Some(NFPROTO_IPV4) => &V4,
                            Some(NFPROTO_IPV6) => &V6,
                            _ => continue,
                        };
                        if offset == fam.saddr && source.is_none() {
                            source = prefix(fam, len, mask.as_deref(), value);
                        } else if offset == fam.daddr && dest.is_none() {
                            dest = prefix(fam, len, mask.as_deref(), value);
                        }
                    }
                }
            }
            (Some("masq"), _) => masq = true,
            (_, Some(Expressions::Immediate(attrs))) if is_return(attrs) => ret = true,
            // Anything else that writes a register (immediate, lookup, ct,
            // ...) makes what was known about registers unreliable.
            _ => regs.clear(),
        }
    }
    Scan {
        source,
        dest,
        masq,
        ret,
    }
}

fn is_return(attrs: &[Immediate]) -> bool {
    attrs.iter().any(|a| {
        matches!(a, Immediate::Data(DataAttribute::Verdict(v))
            if v.contains(&VerdictAttribute::Code(Verdict::Return)))
    })
}

fn parts(e: &Expr) -> Option<(Option<&str>, Option<&Expressions>)> {
    let ListAttribute::Element(attrs) = e else {
        return None;
    };
    let name = attrs.iter().find_map(|a| match a {
        ExpressionAttribute::Name(n) => Some(n.as_str()),
        _ => None,
    });
    let data = attrs.iter().find_map(|a| match a {
        ExpressionAttribute::Data(d) => Some(d),
        _ => None,
    });
    Some((name, data))
}

fn get(regs: &[(Register, Reg)], r: Register) -> Option<Reg> {
    regs.iter().find(|(k, _)| *k == r).map(|(_, v)| v.clone())
}

fn set(regs: &mut Vec<(Register, Reg)>, r: Register, v: Option<Reg>) {
    regs.retain(|(k, _)| *k != r);
    if let Some(v) = v {
        regs.push((r, v));
    }
}

/// The network matched by comparing `len` leading address bytes, masked by
/// `mask` if any, with `value`; `None` unless that is a prefix match.
fn prefix(fam: &Family, len: usize, mask: Option<&[u8]>, value: &[u8]) -> Option<IpNet> {
    if len == 0 || len > fam.len || value.len() != len {
        return None;
    }
    let bits = match mask {
        None => len * 8,
        Some(mask) => {
            let ones: u32 = mask.iter().map(|b| b.count_ones()).sum();
            let contiguous = mask
                .iter()
                .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
                .skip(ones as usize)
                .all(|bit| bit == 0);
            if !contiguous {
                return None;
            }
            ones as usize
        }
    };
    let mut addr = value.to_vec();
    addr.resize(fam.len, 0);
    let ip = match fam.len {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(addr).ok()?)),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(addr).ok()?)),
    };
    // The prefix length fits in a u8: at most 128.
    IpNet::new(ip, bits as u8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn reads_back_what_it_writes() {
        for n in [
            "10.244.0.0/16",
            "10.240.16.0/20",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "10.0.0.0/9",
            "fd00:10::/64",
            "fd00:10::/60",
            "fd00:10::1/128",
            "::/0",
            "2001:db8::/33",
        ] {
            assert_eq!(masqueraded_source(&masquerade(net(n))), Some(net(n)), "{n}");
        }
        // A host address with its prefix stands for its network.
        assert_eq!(
            masqueraded_source(&masquerade(net("10.244.3.2/16"))),
            Some(net("10.244.0.0/16"))
        );
    }

    /// A dual-stack host overlay's two prefixes are both exempt (issue 25):
    /// the exemption is read back for either family, and is no masquerade.
    #[test]
    fn exemptions_read_back_for_both_families() {
        for n in [
            "10.10.0.0/16",
            "fd00:10::/64",
            "fd00:10::/60",
            "2001:db8::/33",
        ] {
            let rule = exempt(net(n));
            assert_eq!(exempt_destination(&rule), Some(net(n)), "{n}");
            assert_eq!(masqueraded_source(&rule), None, "{n}");
        }
    }

    #[test]
    fn masks_are_nfts() {
        let exprs = masquerade(net("10.240.16.0/20"));
        let masks: Vec<&Vec<u8>> = exprs
            .iter()
            .filter_map(|e| match parts(e) {
                Some((_, Some(Expressions::Bitwise(a)))) => a.iter().find_map(|a| match a {
                    Bitwise::Mask(DataAttribute::Value(v)) => Some(v),
                    _ => None,
                }),
                _ => None,
            })
            .collect();
        assert_eq!(
            masks,
            [&vec![0xff, 0xff, 0xf0, 0], &vec![0xff, 0xff, 0xf0, 0]]
        );
    }

    #[test]
    fn other_rules_are_not_masquerade_rules() {
        let mut no_masq = masquerade(net("10.244.0.0/16"));
        no_masq.pop();
        assert_eq!(masqueraded_source(&no_masq), None);

        // Without the family match the offset means nothing.
        let no_family = masquerade(net("10.244.0.0/16")).split_off(2);
        assert_eq!(masqueraded_source(&no_family), None);

        // A destination-only match is not a source.
        let mut dst_only = masquerade(net("10.244.0.0/16"));
        dst_only.drain(2..4);
        assert_eq!(masqueraded_source(&dst_only), None);

        // A register overwritten between load and compare.
        let mut clobbered = masquerade(net("10.244.0.0/16"));
        clobbered.insert(3, Expressions::Immediate(vec![]).into());
        assert_eq!(masqueraded_source(&clobbered), None);

        // A mask that is not a prefix.
        let mut v4 = masquerade(net("10.240.16.0/20"));
        if let ListAttribute::Element(attrs) = &mut v4[3] {
            attrs[1] = ExpressionAttribute::Data(Expressions::Bitwise(vec![
                Bitwise::SourceRegister(Register::Reg1),
                Bitwise::DestinationRegister(Register::Reg1),
                Bitwise::Length(4),
                Bitwise::Mask(DataAttribute::Value(vec![0xff, 0, 0xff, 0])),
                Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
            ]));
        }
        assert_eq!(masqueraded_source(&v4), None);
        assert_eq!(masqueraded_source(&[]), None);
    }

    #[test]
    fn comment_encoding() {
        assert_eq!(comment_userdata("evio:n"), b"\x00\x07evio:n\x00");
        let long = comment_userdata(&"x".repeat(400));
        assert_eq!(long.len(), 2 + 255);
        assert_eq!(long[1], 255);
    }
}
