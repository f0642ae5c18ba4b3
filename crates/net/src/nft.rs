//! IP masquerade for pod traffic leaving the pod network, with nftables.
//!
//! Spoken to the kernel over netlink (nf_tables messages, no `nft` program
//! and no text): each change is one batch, which the kernel applies
//! atomically, and refusals are errnos. Everything lives in table
//! `inet evio`, one chain per network, so networks never touch each other's
//! rules. The socket is opened in the network namespace of the calling
//! thread, per call.

mod rule;
mod socket;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Hook, InetHookNumber, NfTablesMessage, RuleAttribute,
    RuleMessage, TableAttribute, TableFlags, TableMessage,
};

use crate::{Error, Result};
use socket::{NfSocket, Request};

const TABLE: &str = "evio";
/// nftables limits names to 255 bytes (NFT_NAME_MAXLEN - 1).
const MAX_CHAIN: usize = 255;
/// nftables limits rule comments to 128 bytes.
const MAX_COMMENT: usize = 128;
/// NF_ACCEPT: the base chain's policy; it only rewrites, never drops.
const POLICY_ACCEPT: u32 = 1;
/// NF_IP_PRI_NAT_SRC, nft's `srcnat` priority.
const PRIORITY_SRCNAT: u32 = 100;

/// A CNI network name as the spec allows it: `[A-Za-z0-9_.-]+`. Those
/// characters are also all valid inside an unquoted nft identifier.
fn validate_network(network: &str) -> Result<()> {
    let ok = !network.is_empty()
        && network
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("network name", network))
    }
}

// Keeps long chain names unique (the same hash as the host veth names).
use crate::hash::fnv1a;

/// The chain holding `network`'s rules: `masq-<network>`, or for names too
/// long for nftables a truncated name plus a hash of the full one.
pub fn chain_name(network: &str) -> Result<String> {
    validate_network(network)?;
    let full = format!("masq-{network}");
    if full.len() <= MAX_CHAIN {
        return Ok(full);
    }
    let hash = format!("-{:016x}", fnv1a(network));
    // ASCII only (validated), so byte truncation is on a char boundary.
    Ok(format!("{}{hash}", &full[..MAX_CHAIN - hash.len()]))
}

fn comment(network: &str) -> String {
    let mut c = format!("evio:{network}");
    c.truncate(MAX_COMMENT);
    c
}

fn chain_attrs(chain: &str) -> Vec<ChainAttribute> {
    vec![
        ChainAttribute::Table(TABLE.to_string()),
        ChainAttribute::Name(chain.to_string()),
    ]
}

/// Creating the table is a no-op when it exists (no NLM_F_EXCL); nft sends
/// it without NLM_F_CREATE, and so do we, to stay byte-identical.
fn add_table() -> Request {
    Request {
        msg: NfTablesMessage::NewTable(TableMessage {
            attributes: vec![
                TableAttribute::Name(TABLE.to_string()),
                TableAttribute::Flags(TableFlags::empty()),
            ],
        }),
        flags: 0,
        what: format!("add table inet {TABLE}"),
    }
}

/// The whole `ensure` transaction, as nft would send it for
/// add table / add chain (postrouting nat) / flush chain / add rule... .
#[cfg(test)]
fn ensure_requests(network: &str, pod_cidrs: &[IpNet]) -> Result<Vec<Request>> {
    ensure_requests_except(network, pod_cidrs, &[])
}

fn ensure_requests_except(
    network: &str,
    pod_cidrs: &[IpNet],
    exempt: &[IpNet],
) -> Result<Vec<Request>> {
    let chain = chain_name(network)?;
    let mut chain_msg = chain_attrs(&chain);
    chain_msg.extend([
        ChainAttribute::Type("nat".to_string()),
        ChainAttribute::Policy(POLICY_ACCEPT),
        ChainAttribute::Hook(vec![
            Hook::Number(InetHookNumber::PostRouting.into()),
            Hook::Priority(PRIORITY_SRCNAT),
        ]),
    ]);
    let rule_target = || {
        vec![
            RuleAttribute::Table(TABLE.to_string()),
            RuleAttribute::Chain(chain.clone()),
        ]
    };
    let mut requests = vec![
        add_table(),
        Request {
            msg: NfTablesMessage::NewChain(ChainMessage {
                attributes: chain_msg,
            }),
            flags: NLM_F_CREATE,
            what: format!("add chain {chain}"),
        },
        // A DELRULE naming only the chain flushes it.
        Request {
            msg: NfTablesMessage::DeleteRule(RuleMessage {
                attributes: rule_target(),
            }),
            flags: 0,
            what: format!("flush chain {chain}"),
        },
    ];
    let userdata = rule::comment_userdata(&comment(network));
    for cidr in exempt {
        let mut attributes = rule_target();
        attributes.push(RuleAttribute::Expressions(rule::exempt(*cidr)));
        attributes.push(RuleAttribute::UserData(userdata.clone()));
        requests.push(Request {
            msg: NfTablesMessage::NewRule(RuleMessage { attributes }),
            flags: NLM_F_CREATE | NLM_F_APPEND,
            what: format!("add exemption for {}", cidr.trunc()),
        });
    }
    for cidr in pod_cidrs {
        let mut attributes = rule_target();
        attributes.push(RuleAttribute::Expressions(rule::masquerade(*cidr)));
        attributes.push(RuleAttribute::UserData(userdata.clone()));
        requests.push(Request {
            msg: NfTablesMessage::NewRule(RuleMessage { attributes }),
            flags: NLM_F_CREATE | NLM_F_APPEND,
            what: format!("add masquerade rule for {}", cidr.trunc()),
        });
    }
    Ok(requests)
}

fn remove_requests(network: &str) -> Result<Vec<Request>> {
    let chain = chain_name(network)?;
    // Adding first makes deleting an absent chain a no-op, in the same
    // atomic transaction; deleting a chain also deletes its rules.
    Ok(vec![
        add_table(),
        Request {
            msg: NfTablesMessage::NewChain(ChainMessage {
                attributes: chain_attrs(&chain),
            }),
            flags: NLM_F_CREATE,
            what: format!("add chain {chain}"),
        },
        Request {
            msg: NfTablesMessage::DeleteChain(ChainMessage {
                attributes: chain_attrs(&chain),
            }),
            flags: 0,
            what: format!("delete chain {chain}"),
        },
    ])
}

/// Installs (or replaces) the masquerade rules of `network`: traffic from
/// each pod CIDR to anywhere outside it is masqueraded. One atomic
/// nf_tables transaction that creates what is missing and flushes the chain
/// before adding the rules, so repeated or concurrent calls (from several
/// plugin processes) always leave exactly one rule per CIDR.
pub fn ensure_masquerade(network: &str, pod_cidrs: &[IpNet]) -> Result<()> {
    ensure_masquerade_except(network, pod_cidrs, &[])
}

/// [`ensure_masquerade`], with traffic to each of `exempt` never
/// masqueraded (`ip daddr NET return` ahead of the masquerade rules): the
/// host overlay, whose nodes must see pods' own addresses.
pub fn ensure_masquerade_except(
    network: &str,
    pod_cidrs: &[IpNet],
    exempt: &[IpNet],
) -> Result<()> {
    let requests = ensure_requests_except(network, pod_cidrs, exempt)?;
    NfSocket::new()?.transaction(&requests, &format!("ensure masquerade for {network}"))
}

/// Removes the masquerade rules of `network`; `Ok` if there were none.
pub fn remove_masquerade(network: &str) -> Result<()> {
    let requests = remove_requests(network)?;
    NfSocket::new()?.transaction(&requests, &format!("remove masquerade for {network}"))
}

/// Removes the whole `inet evio` table, every network's chain with it (for
/// `evio-node uninstall`); returns whether it existed. The delete is
/// preceded by an add in the same transaction, so a table removed
/// concurrently makes this a no-op rather than an error.
pub fn remove_table() -> Result<bool> {
    let mut sock = NfSocket::new()?;
    let what = format!("delete table inet {TABLE}");
    let get = NfTablesMessage::GetTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.to_string())],
    });
    match sock.get(get, &what) {
        Ok(_) => {}
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    }
    sock.transaction(&remove_table_requests(), &what)?;
    Ok(true)
}

fn remove_table_requests() -> Vec<Request> {
    vec![
        add_table(),
        Request {
            msg: NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(TABLE.to_string())],
            }),
            flags: 0,
            what: format!("delete table inet {TABLE}"),
        },
    ]
}

/// The pod CIDRs currently masqueraded for `network` (for CHECK and tests),
/// `None` if its chain does not exist.
pub fn masquerade_cidrs(network: &str) -> Result<Option<Vec<IpNet>>> {
    Ok(masquerade_rules(network)?.map(|r| r.masqueraded))
}

/// What `network`'s chain holds, read back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasqueradeRules {
    /// Sources masqueraded (to anywhere outside themselves).
    pub masqueraded: Vec<IpNet>,
    /// Destinations exempted.
    pub exempt: Vec<IpNet>,
}

/// The rules of `network`'s chain, `None` if it does not exist.
pub fn masquerade_rules(network: &str) -> Result<Option<MasqueradeRules>> {
    let chain = chain_name(network)?;
    let what = format!("list masquerade for {network}");
    let mut sock = NfSocket::new()?;
    // A rule dump filtered on a missing chain is merely empty; the chain
    // itself answers ENOENT, for a missing table as for a missing chain.
    let get = NfTablesMessage::GetChain(ChainMessage {
        attributes: chain_attrs(&chain),
    });
    match sock.get(get, &what) {
        Ok(_) => {}
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    let dump = NfTablesMessage::GetRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.to_string()),
            RuleAttribute::Chain(chain.clone()),
        ],
    });
    // A chain deleted in between dumps as empty, Some([]): ADD then
    // rewrites it and doctor reports it, as for a missing chain.
    let rules = sock.dump(dump, &what)?;
    let mut out = MasqueradeRules::default();
    let exprs = rules
        .iter()
        .filter_map(|m| match m {
            NfTablesMessage::NewRule(r) => Some(r),
            _ => None,
        })
        .filter(|r| in_chain(r, &chain))
        .filter_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Expressions(e) => Some(e),
                _ => None,
            })
        });
    for e in exprs {
        if let Some(n) = rule::masqueraded_source(e) {
            out.masqueraded.push(n);
        } else if let Some(n) = rule::exempt_destination(e) {
            out.exempt.push(n);
        }
    }
    Ok(Some(out))
}

/// The kernel filters the dump already; this guards against one that
/// does not.
fn in_chain(rule: &RuleMessage, chain: &str) -> bool {
    let has = |want: &RuleAttribute| rule.attributes.iter().any(|a| a == want);
    has(&RuleAttribute::Table(TABLE.to_string())) && has(&RuleAttribute::Chain(chain.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names() {
        assert_eq!(chain_name("evio").unwrap(), "masq-evio");
        assert_eq!(chain_name("k8s-pod.net_1").unwrap(), "masq-k8s-pod.net_1");
        for bad in ["", "a b", "a;b", "a\"b", "a\nb", "a}b", "ä"] {
            assert!(chain_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_names_stay_unique_and_within_limits() {
        let a = "a".repeat(300);
        let b = format!("{}b", "a".repeat(299));
        let (ca, cb) = (chain_name(&a).unwrap(), chain_name(&b).unwrap());
        assert_eq!(ca.len(), MAX_CHAIN);
        assert_eq!(cb.len(), MAX_CHAIN);
        assert_ne!(ca, cb);
        assert_eq!(ca, chain_name(&a).unwrap());
        assert!(comment(&a).len() <= MAX_COMMENT);
    }

    /// The bytes of a `testdata/*.hex` capture: hex pairs, `#` comments.
    fn hex(text: &str) -> Vec<u8> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// The capture's CIDRs: whole-byte and masked prefixes of both families.
    fn fixture_cidrs() -> Vec<IpNet> {
        [
            "10.244.0.0/16",
            "fd00:10::/60",
            "10.240.16.0/20",
            "10.1.2.3/32",
            "fd00:10::/64",
        ]
        .iter()
        .map(|s| net(s))
        .collect()
    }

    #[test]
    fn ensure_batch_is_byte_identical_to_nfts() {
        let requests = ensure_requests("net1", &fixture_cidrs()).unwrap();
        let ours = socket::encode_batch(&requests, 0, false);
        assert_eq!(ours, hex(include_str!("nft/testdata/ensure.hex")));
        // A pod address with its prefix means its network.
        let host = ensure_requests("net1", &[net("10.244.3.2/16")]).unwrap();
        let first = ensure_requests("net1", &fixture_cidrs()[..1]).unwrap();
        assert_eq!(
            socket::encode_batch(&host, 0, false),
            socket::encode_batch(&first, 0, false)
        );
        assert!(ensure_requests("bad name", &[]).is_err());
    }

    #[test]
    fn remove_batch_is_byte_identical_to_nfts() {
        let ours = socket::encode_batch(&remove_requests("net1").unwrap(), 0, false);
        assert_eq!(ours, hex(include_str!("nft/testdata/remove.hex")));
    }

    #[test]
    fn acks_are_asked_of_every_request_and_nothing_else() {
        let requests = remove_requests("net1").unwrap();
        let plain = socket::encode_batch(&requests, 0, false);
        let acked = socket::encode_batch(&requests, 0, true);
        let diff: Vec<usize> = (0..plain.len()).filter(|&i| plain[i] != acked[i]).collect();
        // The flags byte of the 2nd, 3rd and 4th message (20, 40, 48, 48 long).
        assert_eq!(diff, [20 + 6, 60 + 6, 108 + 6]);
        assert!(diff.iter().all(|&i| acked[i] == plain[i] | 0x04));
    }

    /// The rules as the kernel dumps them (with attributes it adds, such as
    /// the rule handle and bitwise op) read back as the CIDRs written.
    #[test]
    fn reads_the_kernels_rule_dump() {
        let bytes = hex(include_str!("nft/testdata/dump.hex"));
        let mut got = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let msg = netlink_packet_core::NetlinkMessage::<
                netlink_packet_netfilter::NetfilterMessage,
            >::deserialize(&bytes[off..off + len])
            .unwrap();
            let netlink_packet_core::NetlinkPayload::InnerMessage(m) = msg.payload else {
                panic!("not a rule: {msg:?}")
            };
            let netlink_packet_netfilter::NetfilterMessageInner::NfTables(
                NfTablesMessage::NewRule(rule),
            ) = m.inner
            else {
                panic!("not a rule: {m:?}")
            };
            assert!(in_chain(&rule, "masq-net1"));
            assert!(!in_chain(&rule, "masq-net2"));
            let exprs = rule.attributes.iter().find_map(|a| match a {
                RuleAttribute::Expressions(e) => Some(e),
                _ => None,
            });
            got.push(rule::masqueraded_source(exprs.unwrap()).unwrap());
            off += (len + 3) & !3;
        }
        assert_eq!(got, fixture_cidrs());
    }
}
