//! Section 3: pod-to-pod TCP throughput (iperf3) through what evio built,
//! next to the same topology built by hand and a bare veth pair.

use evio_testkit::netns::Netns;
use evio_testkit::ovs::Ovs;

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::iperf;
use crate::node::{add_result_ip, sh, veth, Attach, Mode, Node, Tools, BRIDGE};
use crate::report::Table;

#[derive(Debug, Clone)]
pub struct Opts {
    pub seconds: u32,
    pub repeats: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Linux,
    Ovs,
}

/// A running topology: a server pod with its address and a client pod.
/// Field order is drop order: OVS daemons before the namespaces they run in.
struct Bed {
    _ovs: Vec<Ovs>,
    _nodes: Vec<Node>,
    _node_ns: Vec<Netns>,
    server: Netns,
    client: Netns,
    server_ip: String,
}

fn ovs_ok(ovs: &Ovs, args: &[&str]) -> Result<()> {
    let o = ovs.try_vsctl(args);
    if o.status.success() {
        Ok(())
    } else {
        Err(BenchError::failed(
            format!("ovs-vsctl {}", args.join(" ")),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    }
}

/// Joins the bridges of two nodes with a veth pair (the "uplink" that the
/// overlay provides between real nodes).
pub(crate) fn uplink(a: &Netns, b: &Netns, kind: Kind, ovs: [Option<&Ovs>; 2]) -> Result<()> {
    veth(a, "evup", b, "evup")?;
    for (ns, o) in [(a, ovs[0]), (b, ovs[1])] {
        plug(ns, kind, o, "evup")?;
    }
    Ok(())
}

/// Puts a host-side link into the node's bridge and brings it up, as evio
/// does for a pod's host veth (TX checksum off on the userspace datapath).
fn plug(node: &Netns, kind: Kind, ovs: Option<&Ovs>, link: &str) -> Result<()> {
    match (kind, ovs) {
        (Kind::Linux, _) => {
            sh(node, &["ip", "link", "set", link, "master", BRIDGE])?;
        }
        (Kind::Ovs, Some(o)) => {
            ovs_ok(o, &["add-port", BRIDGE, link])?;
            sh(node, &["ethtool", "-K", link, "tx", "off"])?;
        }
        (Kind::Ovs, None) => return Err(BenchError::failed("plug", "no OVS for an OVS node")),
    }
    sh(node, &["ip", "link", "set", link, "up"])?;
    Ok(())
}

/// A node with a bridge made by hand: what a perfect plugin would leave.
fn hand_node(kind: Kind, octet: u8) -> Result<(Netns, Option<Ovs>)> {
    let ns = cleanup::netns("ebh");
    let ovs = match kind {
        Kind::Linux => {
            sh(&ns, &["ip", "link", "add", BRIDGE, "type", "bridge"])?;
            None
        }
        Kind::Ovs => {
            let o = Ovs::start(&ns);
            // Without --no-wait, vsctl returns once vswitchd created the device.
            ovs_ok(
                &o,
                &[
                    "add-br",
                    BRIDGE,
                    "--",
                    "set",
                    "bridge",
                    BRIDGE,
                    "datapath_type=netdev",
                ],
            )?;
            Some(o)
        }
    };
    let gw = format!("10.244.{octet}.1/16");
    sh(&ns, &["ip", "addr", "add", &gw, "dev", BRIDGE])?;
    sh(&ns, &["ip", "link", "set", BRIDGE, "up"])?;
    Ok((ns, ovs))
}

fn hand_pod(node: &Netns, kind: Kind, ovs: Option<&Ovs>, ip: &str, host: &str) -> Result<Netns> {
    let pod = cleanup::netns("ebp");
    veth(node, host, &pod, "eth0")?;
    if kind == Kind::Ovs {
        sh(&pod, &["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    plug(node, kind, ovs, host)?;
    sh(
        &pod,
        &["ip", "addr", "add", &format!("{ip}/16"), "dev", "eth0"],
    )?;
    sh(&pod, &["ip", "link", "set", "eth0", "up"])?;
    Ok(pod)
}

fn hand_bed(kind: Kind, cross: bool) -> Result<Bed> {
    let (n1, o1) = hand_node(kind, 3)?;
    let server = hand_pod(&n1, kind, o1.as_ref(), "10.244.3.10", "vh0")?;
    let mut node_ns = Vec::new();
    let mut ovs = Vec::new();
    let client = if cross {
        let (n2, o2) = hand_node(kind, 4)?;
        let c = hand_pod(&n2, kind, o2.as_ref(), "10.244.4.10", "vh1")?;
        uplink(&n1, &n2, kind, [o1.as_ref(), o2.as_ref()])?;
        node_ns.push(n2);
        ovs.extend(o2);
        c
    } else {
        hand_pod(&n1, kind, o1.as_ref(), "10.244.3.11", "vh1")?
    };
    node_ns.push(n1);
    ovs.extend(o1);
    Ok(Bed {
        _ovs: ovs,
        _nodes: Vec::new(),
        _node_ns: node_ns,
        server,
        client,
        server_ip: "10.244.3.10".into(),
    })
}

fn evio_bed(tools: &Tools, kind: Kind, cross: bool) -> Result<Bed> {
    let mode = match kind {
        Kind::Linux => Mode::EvioLinux,
        Kind::Ovs => Mode::EvioOvs,
    };
    let n1 = Node::new(mode, tools, 3)?;
    let server = cleanup::netns("ebp");
    let client = cleanup::netns("ebp");
    let out = n1.add(&Attach::new(&server))?;
    let server_ip = add_result_ip(&out.stdout)
        .ok_or_else(|| BenchError::output("evio ADD", out.stdout.clone()))?;
    let mut nodes = Vec::new();
    if cross {
        let n2 = Node::new(mode, tools, 4)?;
        n2.add(&Attach::new(&client))?;
        // The bridges exist now (created by the ADDs): join them.
        uplink(&n1.ns, &n2.ns, kind, [n1.ovs.as_ref(), n2.ovs.as_ref()])?;
        nodes.push(n2);
    } else {
        n1.add(&Attach::new(&client))?;
    }
    nodes.push(n1);
    Ok(Bed {
        _ovs: Vec::new(),
        _nodes: nodes,
        _node_ns: Vec::new(),
        server,
        client,
        server_ip,
    })
}

fn veth_bed() -> Result<Bed> {
    let server = cleanup::netns("ebp");
    let client = cleanup::netns("ebp");
    veth(&server, "eth0", &client, "eth0")?;
    for (ns, ip) in [(&server, "10.244.3.10/16"), (&client, "10.244.3.11/16")] {
        sh(ns, &["ip", "addr", "add", ip, "dev", "eth0"])?;
        sh(ns, &["ip", "link", "set", "eth0", "up"])?;
    }
    Ok(Bed {
        _ovs: Vec::new(),
        _nodes: Vec::new(),
        _node_ns: Vec::new(),
        server,
        client,
        server_ip: "10.244.3.10".into(),
    })
}

/// One bounded iperf3 run from the client pod to the server pod, Gbit/s.
fn iperf(bed: &Bed, seconds: u32) -> Result<f64> {
    iperf::run(&bed.server, &bed.server_ip, &bed.client, seconds, 1).map(|t| t.gbits)
}

/// Verdict for a higher-is-better ratio.
pub fn at_least(r: f64, target: f64) -> String {
    if !r.is_finite() {
        "n/a".into()
    } else if r >= target {
        "met".into()
    } else {
        format!(
            "MISSED by {:.0}% ({r:.2}× vs ≥ {target}×)",
            (target - r) / target * 100.0
        )
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

fn fmt_runs(v: &[f64]) -> String {
    let each: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
    if v.len() > 1 {
        format!("{:.2} ({})", mean(v), each.join(", "))
    } else {
        format!("{:.2}", mean(v))
    }
}

pub fn run(tools: &Tools, opts: &Opts) -> Result<String> {
    tools.require(&[&tools.evio, &tools.host_local()])?;
    let repeats = opts.repeats.max(1);
    let mut t = Table::new([
        "topology",
        "evio Gbit/s",
        "hand-built Gbit/s",
        "evio / hand-built",
        "target ≥ 0.9×",
    ]);
    for (label, kind, cross) in [
        ("same node, Linux bridge", Kind::Linux, false),
        ("same node, OVS netdev", Kind::Ovs, false),
        ("two nodes, Linux bridges + veth uplink", Kind::Linux, true),
        ("two nodes, OVS netdev + veth uplink", Kind::Ovs, true),
    ] {
        cleanup::check()?;
        let evio = evio_bed(tools, kind, cross)?;
        let hand = hand_bed(kind, cross)?;
        let (mut e, mut h) = (Vec::new(), Vec::new());
        // Alternating, so a drift in machine load hits both alike.
        for _ in 0..repeats {
            cleanup::check()?;
            e.push(iperf(&evio, opts.seconds)?);
            h.push(iperf(&hand, opts.seconds)?);
        }
        let r = mean(&e) / mean(&h);
        let v = at_least(r, 0.9);
        t.row([
            label.to_string(),
            fmt_runs(&e),
            fmt_runs(&h),
            format!("{r:.2}×"),
            v,
        ]);
    }
    let veth = veth_bed()?;
    let mut v = Vec::new();
    for _ in 0..repeats {
        cleanup::check()?;
        v.push(iperf(&veth, opts.seconds)?);
    }
    t.row([
        "bare veth pair between two pods (the limit)".to_string(),
        String::new(),
        fmt_runs(&v),
        String::new(),
        String::new(),
    ]);
    Ok(format!(
        "iperf3, one TCP stream, {} s per run, {} run(s) per topology alternating evio and \
         hand-built (mean, then each run). Hand-built: `ip link add … type bridge` or \
         `ovs-vsctl add-br … datapath_type=netdev` + `add-port`, veth pairs, `ethtool -K … tx \
         off` on OVS veths, the same addresses. Two nodes: each its own netns with its own \
         bridge (and OVS instance), joined by a veth pair plugged into both bridges.\n\n{}",
        opts.seconds,
        repeats,
        t.render()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_is_better_verdict() {
        assert_eq!(at_least(0.95, 0.9), "met");
        assert_eq!(at_least(0.45, 0.9), "MISSED by 50% (0.45× vs ≥ 0.9×)");
    }

    #[test]
    fn runs_are_shown_with_their_mean() {
        assert_eq!(fmt_runs(&[1.0, 2.0]), "1.50 (1.00, 2.00)");
        assert_eq!(fmt_runs(&[1.234]), "1.23");
    }
}
