//! IP masquerade for pod traffic leaving the pod network, with nftables.
//!
//! This is the one place a program is executed: the `nft` binary, given a
//! script on stdin (`nft -f -`, never a shell). Only typed [`IpNet`] values
//! and a validated network name end up in the script. Everything lives in
//! table `inet evio`, one chain per network, so networks never touch each
//! other's rules. `nft` runs in the network namespace of the calling thread.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use ipnet::IpNet;

use crate::{Error, Result};

const TABLE: &str = "evio";
/// nftables limits names to 255 bytes (NFT_NAME_MAXLEN - 1).
const MAX_CHAIN: usize = 255;
/// nftables limits rule comments to 128 bytes.
const MAX_COMMENT: usize = 128;

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

/// The whole `ensure` transaction; pure so it can be checked without nft.
fn ensure_script(network: &str, pod_cidrs: &[IpNet]) -> Result<String> {
    let chain = chain_name(network)?;
    let comment = comment(network);
    let mut s = format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {TABLE} {chain}\n"
    );
    for cidr in pod_cidrs {
        // A pod address with the pod prefix (10.244.3.2/16) means its network.
        let net = cidr.trunc();
        let proto = match net {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        s += &format!(
            "add rule inet {TABLE} {chain} {proto} saddr {net} {proto} daddr != {net} masquerade comment \"{comment}\"\n"
        );
    }
    Ok(s)
}

fn remove_script(network: &str) -> Result<String> {
    let chain = chain_name(network)?;
    // Adding first makes deleting an absent chain a no-op, in the same
    // atomic transaction; deleting a chain also deletes its rules.
    Ok(format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} {chain}\n\
         delete chain inet {TABLE} {chain}\n"
    ))
}

/// Installs (or replaces) the masquerade rules of `network`: traffic from
/// each pod CIDR to anywhere outside it is masqueraded. One atomic `nft -f`
/// transaction that creates what is missing and flushes the chain before
/// adding the rules, so repeated or concurrent calls (from several plugin
/// processes) always leave exactly one rule per CIDR.
pub fn ensure_masquerade(network: &str, pod_cidrs: &[IpNet]) -> Result<()> {
    let script = ensure_script(network, pod_cidrs)?;
    run_script(&script, &format!("ensure masquerade for {network}"))
}

/// Removes the masquerade rules of `network`; `Ok` if there were none.
pub fn remove_masquerade(network: &str) -> Result<()> {
    let script = remove_script(network)?;
    run_script(&script, &format!("remove masquerade for {network}"))
}

/// The pod CIDRs currently masqueraded for `network` (for CHECK and tests),
/// `None` if its chain does not exist.
pub fn masquerade_cidrs(network: &str) -> Result<Option<Vec<IpNet>>> {
    let chain = chain_name(network)?;
    let what = format!("list masquerade for {network}");
    let out = Command::new(nft_path()?)
        .args(["-j", "list", "chain", "inet", TABLE, &chain])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("{what}: run nft"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // nft's wording for ENOENT, for a missing table as for a missing chain.
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(Error::Nft {
            what,
            detail: failure(&out.status, &stderr),
        });
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| Error::Nft {
        what: what.clone(),
        detail: format!("unreadable JSON output: {e}"),
    })?;
    Ok(Some(parse_cidrs(&json, &chain)))
}

/// Source prefixes of the masquerade rules of `chain` in `nft -j` output.
fn parse_cidrs(json: &serde_json::Value, chain: &str) -> Vec<IpNet> {
    let items = json
        .get("nftables")
        .and_then(|v| v.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|item| item.get("rule"))
        .filter(|rule| rule.get("chain").and_then(|c| c.as_str()) == Some(chain))
        .filter_map(|rule| {
            let exprs = rule.get("expr")?.as_array()?;
            if !exprs.iter().any(|e| e.get("masquerade").is_some()) {
                return None;
            }
            exprs.iter().find_map(saddr_match)
        })
        .collect()
}

/// `{"match": {"op": "==", "left": {"payload": {"field": "saddr"}}, "right": R}}`
/// where R is `{"prefix": {"addr", "len"}}` or a bare address (full length).
fn saddr_match(expr: &serde_json::Value) -> Option<IpNet> {
    let m = expr.get("match")?;
    if m.get("op")?.as_str()? != "==" {
        return None;
    }
    let field = m.get("left")?.get("payload")?.get("field")?.as_str()?;
    if field != "saddr" {
        return None;
    }
    let right = m.get("right")?;
    if let Some(p) = right.get("prefix") {
        let addr: std::net::IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return IpNet::new(addr, len).ok();
    }
    let addr: std::net::IpAddr = right.as_str()?.parse().ok()?;
    Some(IpNet::from(addr))
}

fn failure(status: &std::process::ExitStatus, stderr: &str) -> String {
    format!("{status}: {}", stderr.trim())
}

fn run_script(script: &str, what: &str) -> Result<()> {
    let mut child = Command::new(nft_path()?)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("{what}: run nft"), e))?;
    // The script is far smaller than a pipe buffer, so writing it all before
    // reading stderr cannot deadlock.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(script.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("{what}: wait for nft"), e))?;
    if !out.status.success() {
        return Err(Error::Nft {
            what: what.to_string(),
            detail: failure(&out.status, &String::from_utf8_lossy(&out.stderr)),
        });
    }
    if let Some(Err(e)) = written {
        return Err(Error::io(format!("{what}: write script to nft"), e));
    }
    Ok(())
}

/// /usr/sbin/nft (Debian's location), else the first `nft` on PATH; looked
/// up once per process.
fn nft_path() -> Result<&'static Path> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| {
        let default = PathBuf::from("/usr/sbin/nft");
        if default.is_file() {
            return Some(default);
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nft"))
                .find(|p| p.is_file())
        })
    })
    .as_deref()
    .ok_or_else(|| Error::Nft {
        what: "lookup".to_string(),
        detail: "the nft program was found neither at /usr/sbin/nft nor on PATH".to_string(),
    })
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

    #[test]
    fn ensure_script_shape() {
        let s = ensure_script(
            "net1",
            &[
                "10.244.3.2/16".parse().unwrap(),
                "fd00:10::5/64".parse().unwrap(),
            ],
        )
        .unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            [
                "add table inet evio",
                "add chain inet evio masq-net1 { type nat hook postrouting priority srcnat; policy accept; }",
                "flush chain inet evio masq-net1",
                "add rule inet evio masq-net1 ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade comment \"evio:net1\"",
                "add rule inet evio masq-net1 ip6 saddr fd00:10::/64 ip6 daddr != fd00:10::/64 masquerade comment \"evio:net1\"",
            ]
        );
        assert!(ensure_script("bad name", &[]).is_err());
    }

    #[test]
    fn remove_script_shape() {
        assert_eq!(
            remove_script("n").unwrap(),
            "add table inet evio\nadd chain inet evio masq-n\ndelete chain inet evio masq-n\n"
        );
    }

    #[test]
    fn parses_nft_json() {
        // Trimmed from real `nft -j list chain` output (nftables 1.0.6).
        let json: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "inet", "table": "evio", "name": "masq-a", "hook": "postrouting"}},
            {"rule": {"chain": "masq-a", "expr": [
              {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}},
              {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.244.0.0", "len": 16}}}},
              {"masquerade": null}]}},
            {"rule": {"chain": "masq-a", "expr": [
              {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": {"prefix": {"addr": "fd00::", "len": 64}}}},
              {"masquerade": null}]}},
            {"rule": {"chain": "masq-a", "expr": [
              {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.1.2.3"}},
              {"masquerade": null}]}},
            {"rule": {"chain": "masq-a", "expr": [
              {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.9.9.9"}},
              {"accept": null}]}},
            {"rule": {"chain": "other", "expr": [
              {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.7.7.7"}},
              {"masquerade": null}]}}]}"#,
        )
        .unwrap();
        let got = parse_cidrs(&json, "masq-a");
        let want: Vec<IpNet> = ["10.244.0.0/16", "fd00::/64", "10.1.2.3/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert!(parse_cidrs(&serde_json::json!({}), "masq-a").is_empty());
    }
}
