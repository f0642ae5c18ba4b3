//! Section 8: the path every pair of the NAT lab ends on, per pair type,
//! before and after issue 25 (port mapping, hard-NAT traversal), and the
//! share of pairs that go direct.
//!
//! The lab is the main job's ([`OverlayOpts::nat_lab`], whatever sites it
//! has: a site another change adds there shows up here as new pair types),
//! plus a miniupnpd router if it has none, plus [`BARE_SITES`] port-
//! restricted sites whose routers have no input firewall (a bare Linux
//! masquerade gateway, docs/natlab.md). One cluster, two phases, each a
//! cold join of every agent (all leave, every router's conntrack is
//! flushed, all start at once) watched for a fixed window while every pair
//! exchanges pings over the host overlay (sessions may be made on demand):
//!
//! * *before*: every node's `overlay` config gets [`BEFORE`]: no port
//!   mapping, no IPv6 underlay, only the first STUN server (no birthday
//!   probing without a second), and a NAT UDP timeout of 600 s, which puts the
//!   silence-and-alternate schedule's first coordinated attempt ~625 s
//!   after the start, far past the window: what the agents did before
//!   issue 25 (plain retries; the pairs that retries could open are open
//!   within the first 20 s of plain tries, as before);
//! * *after*: the defaults.
//!
//! A pair is direct when both agents report `path` `direct`; its method is
//! `peers --json`'s `method`. Which relayed pairs the NATs truly force onto
//! the relay is [`forbidden`]'s call, printed next to every relayed pair.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use evio_testkit::agent::Agent;
use evio_testkit::cluster::{BridgeType, Cluster, OverlayOpts};
use evio_testkit::natlab::NatType;
use serde_json::{json, Value};

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::node::Tools;
use crate::overlay::{agent_of, loadavg, median, stop_agents, up};
use crate::report::Table;

#[derive(Debug, Clone)]
pub struct Opts {
    /// How long each phase watches the pairs after the agents start.
    pub window: Duration,
    /// Both phases this many times (who sends first to a bare gateway is a
    /// race that changes from one cold join to the next).
    pub rounds: usize,
    /// One-way delay into every router from the lab's internet
    /// (`Lab::set_wan_delay`): the internet has latency, and two bare
    /// gateways can only be punched by datagrams that cross in flight.
    pub delay: Duration,
}

/// Sites added with a bare router (no input firewall): two, so that the
/// bare–bare pair is in the table too.
pub const BARE_SITES: usize = 2;
/// Site kinds added when the main job's lab has none.
const ALSO: [NatType; 1] = [NatType::Upnp];
/// Merged into every node's `overlay` config in the *before* phase. An off
/// switch of a later traversal method goes here.
pub const BEFORE: &str = r#"{"portMapping": false, "natUdpTimeout": 600, "ipv6": false}"#;
/// How often each agent's `peers --json` is read.
const POLL: Duration = Duration::from_millis(100);

/// A node's site as the table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub nat: NatType,
    /// Router without an input firewall (only port-restricted sites here).
    pub bare: bool,
    /// The site also has the lab's IPv6 internet (`ipv6_sites`).
    pub ipv6: bool,
}

impl Kind {
    pub fn label(self) -> String {
        match (self.bare, self.ipv6) {
            (true, _) => "bare masquerade".into(),
            (false, true) => format!("{} + IPv6", self.nat),
            (false, false) => self.nat.to_string(),
        }
    }
}

/// Why the NATs of a pair force it onto the relay; `None`: they allow a
/// direct path. A kind this does not know (a newer site type) allows one.
pub fn forbidden(a: Kind, b: Kind, same_site: bool) -> Option<&'static str> {
    use NatType::*;
    if same_site || (a.ipv6 && b.ipv6) {
        return None;
    }
    if a.nat == UdpBlocked || b.nat == UdpBlocked {
        return Some("UDP blocked at the site: only TURN over TCP gets out");
    }
    if a.nat == Symmetric && b.nat == Symmetric {
        return Some("symmetric NAT on both sides, no port mapping, no IPv6");
    }
    None
}

/// What is known to be missing for a relayed pair that the NATs allow
/// to go direct.
fn gap(a: Kind, b: Kind) -> &'static str {
    let sym = |k: Kind| k.nat == NatType::Symmetric;
    let cone = |k: Kind| {
        !matches!(
            k.nat,
            NatType::Symmetric | NatType::Public | NatType::FullCone
        )
    };
    if (sym(a) && cone(b)) || (sym(b) && cone(a)) {
        "NATs allow it: symmetric – cone, birthday probing found no path within the window"
    } else if a.bare || b.bare {
        "NATs allow it: a bare gateway, silence-and-alternate opened no path within the window"
    } else {
        "NATs allow it: not explained (a finding)"
    }
}

/// The lab: the main job's sites, [`ALSO`], then the bare sites (their
/// indices returned).
pub fn layout() -> (OverlayOpts, BTreeSet<usize>) {
    let mut o = OverlayOpts::nat_lab();
    for k in ALSO {
        if !o.sites.iter().any(|(n, _)| *n == k) {
            o.sites.push((k, 1));
        }
    }
    let first = o.sites.len();
    o.sites.extend(std::iter::repeat_n(
        (NatType::PortRestrictedCone, 1),
        BARE_SITES,
    ));
    let bare = (first..o.sites.len()).collect();
    (o, bare)
}

/// What one agent last saw of one peer, and when things first happened.
#[derive(Debug, Clone, Default)]
struct Seen {
    connected: Option<Instant>,
    direct: Option<Instant>,
    path: Option<String>,
    method: Option<String>,
}

/// One pair at the end of a phase.
#[derive(Debug, Clone)]
pub struct Pair {
    pub round: usize,
    pub a: usize,
    pub b: usize,
    /// Both agents reported the other connected, from the later start.
    pub connected: Option<Duration>,
    /// Both had reported the direct path (same origin).
    pub direct: Option<Duration>,
    /// Both report `direct` at the end.
    pub direct_at_end: bool,
    /// The methods at the end (one, or `a/b` when the views differ).
    pub method: String,
}

struct Node {
    name: String,
    kind: Kind,
    site: usize,
}

/// Both phases' pairs.
struct Run {
    nodes: Vec<Node>,
    sites: Vec<String>,
    before: Vec<Pair>,
    after: Vec<Pair>,
}

pub fn run(tools: &Tools, opts: &Opts) -> (String, Option<BenchError>) {
    if let Err(e) = tools.require(&[&tools.evio, &tools.evio_node]) {
        return (String::new(), Some(e));
    }
    let load0 = loadavg();
    let started = Instant::now();
    let date = crate::machine::first_line("date", &["-u", "+%F %T"]);
    let commit = crate::machine::first_line("git", &["rev-parse", "--short", "HEAD"]);
    let r = measure(tools, opts);
    let mut out = format!(
        "Measured {date} UTC at commit {commit}; load average at the start {load0}, at the end \
         {}; took {:.0} s ({} round(s) of two phases of {:.0} s each, plus set-up).\n\n{}",
        loadavg(),
        started.elapsed().as_secs_f64(),
        opts.rounds,
        opts.window.as_secs_f64(),
        intro(opts.delay)
    );
    match r {
        Ok(run) => {
            out.push_str(&render(&run));
            (out, None)
        }
        Err(e) => (out, Some(e)),
    }
}

fn intro(delay: Duration) -> String {
    let latency = if delay.is_zero() {
        "No latency between the sites (`--nat-delay-ms 0`): two bare gateways cannot be \
         punched then (docs/natlab.md, Case 2)."
            .to_string()
    } else {
        format!(
            "Every router holds what comes in from the lab's internet for {} ms \
             (`Lab::set_wan_delay`, `--nat-delay-ms`): a round trip between two NATed sites \
             takes about {} ms, and datagrams sent less than {} ms apart cross in flight, \
             which two bare gateways need (docs/natlab.md, \"Latency\").",
            delay.as_millis(),
            2 * delay.as_millis(),
            delay.as_millis()
        )
    };
    format!(
        "The main job's NAT lab (`OverlayOpts::nat_lab()`, as `scripts/cluster.sh` runs it; \
         a miniupnpd router (`Upnp`) added if it has none) plus {BARE_SITES} port-restricted \
         sites whose routers have no input firewall (*bare masquerade*: a plain Linux \
         gateway, docs/natlab.md), coturn as STUN/TURN, Linux bridges, no pods. One cluster, \
         two phases, each a cold join: every agent leaves, every router's conntrack is \
         flushed, all agents start at once (*rounds*: both phases again, as who sends first \
         to a bare gateway is a race that each cold join runs anew), every pair pings over the host overlay twice a \
         second, and every agent's `peers --json` is read every 100 ms for the whole window. \
         *before*: `{BEFORE}` merged into every node's `overlay` config: no port mapping, no IPv6 underlay, only the first STUN server (birthday probing needs two), and \
         the silence-and-alternate schedule's first coordinated attempt pushed to ~625 s, \
         past the window (the agents before issue 25 retried plainly; retrying never opens a \
         bare-gateway pair, docs/natlab.md). *after*: the defaults. A pair is direct when \
         both agents report the `direct` path at the end of the window; *method* is \
         `peers --json`'s `method` (local, reflexive, learned, punched, mapped, relay, and \
         any newer one), both views when they differ; *time to direct* is from the later of \
         the two agents' starts until both had reported `direct`. Shares count pair-rounds. *Forced to the relay* is \
         the pair's NATs' verdict (`natpaths::forbidden`): UDP blocked, or symmetric on both \
         sides with no port mapping and no IPv6. {latency}\n\n"
    )
}

fn measure(tools: &Tools, opts: &Opts) -> Result<Run> {
    let (ov, bare) = layout();
    let sites: Vec<String> = ov
        .sites
        .iter()
        .enumerate()
        .map(|(i, (n, c))| {
            let k = Kind {
                nat: *n,
                bare: bare.contains(&i),
                ipv6: ov.ipv6_sites.contains(&i),
            };
            format!("{c}×{}", k.label())
        })
        .collect();
    eprintln!("evio-bench: natpaths: sites {}", sites.join(", "));
    let ipv6_sites = ov.ipv6_sites.clone();
    let mut c = up(tools, BridgeType::Linux, ov, 0)?;
    {
        let lab = c
            .lab()
            .ok_or_else(|| BenchError::failed("NAT lab", "no lab"))?;
        for s in lab.site_ids().filter(|s| bare.contains(&s.0)) {
            lab.set_router_firewall(s, false);
        }
        // After the firewall changes: a ruleset change drops what the
        // delay line holds.
        if !opts.delay.is_zero() {
            for s in lab.site_ids().filter(|s| lab.router(*s).is_some()) {
                lab.set_wan_delay(s, opts.delay);
            }
        }
    }
    let nodes: Vec<Node> = c
        .nodes()
        .iter()
        .map(|n| {
            let (nat, site) = n.lab.map_or((NatType::Public, 0), |l| (l.1, l.2));
            Node {
                name: n.name.clone(),
                kind: Kind {
                    nat,
                    bare: bare.contains(&site),
                    ipv6: ipv6_sites.contains(&site),
                },
                site,
            }
        })
        .collect();
    let hosts = c.host_addrs();
    let confs: Vec<Value> = c
        .nodes()
        .iter()
        .map(|n| read_json(&n.netconf_path))
        .collect::<Result<_>>()?;
    let mut before: Value = serde_json::from_str(BEFORE)
        .map_err(|e| BenchError::failed("the before config", e.to_string()))?;
    // One STUN server: a node cannot tell a symmetric NAT from a cone, so
    // nothing is hunted (birthday probing has no switch of its own).
    if let Some(first) = confs.first().and_then(|c| c["overlay"]["stun"].get(0)) {
        before["stun"] = json!([first]);
    }
    let (mut b, mut a) = (Vec::new(), Vec::new());
    for round in 1..=opts.rounds.max(1) {
        eprintln!(
            "evio-bench: natpaths: round {round}, before ({:?}) ...",
            opts.window
        );
        b.extend(phase(&mut c, &confs, &before, &hosts, opts.window, round)?);
        eprintln!(
            "evio-bench: natpaths: round {round}, after ({:?}) ...",
            opts.window
        );
        a.extend(phase(
            &mut c,
            &confs,
            &json!({}),
            &hosts,
            opts.window,
            round,
        )?);
    }
    drop(c);
    Ok(Run {
        nodes,
        sites,
        before: b,
        after: a,
    })
}

fn read_json(p: &std::path::Path) -> Result<Value> {
    let t = std::fs::read_to_string(p).map_err(BenchError::io(format!("read {}", p.display())))?;
    serde_json::from_str(&t)
        .map_err(|e| BenchError::output(format!("{}", p.display()), e.to_string()))
}

/// Every node's config with `overlay` merged into its `overlay` object.
fn write_confs(c: &Cluster, confs: &[Value], overlay: &Value) -> Result<()> {
    for (n, conf) in c.nodes().iter().zip(confs) {
        let mut v = conf.clone();
        for (k, x) in overlay.as_object().into_iter().flatten() {
            v["overlay"][k] = x.clone();
        }
        std::fs::write(&n.netconf_path, v.to_string()).map_err(BenchError::io(format!(
            "write {}",
            n.netconf_path.display()
        )))?;
    }
    Ok(())
}

/// A cold join with `overlay` in every node's config, watched for `window`.
fn phase(
    c: &mut Cluster,
    confs: &[Value],
    overlay: &Value,
    hosts: &[Option<IpAddr>],
    window: Duration,
    round: usize,
) -> Result<Vec<Pair>> {
    stop_agents(c)?;
    write_confs(c, confs, overlay)?;
    {
        let lab = c
            .lab()
            .ok_or_else(|| BenchError::failed("NAT lab", "gone"))?;
        let routed: Vec<_> = lab
            .site_ids()
            .filter(|s| lab.router(*s).is_some())
            .collect();
        for s in routed {
            lab.flush_conntrack(s);
        }
    }
    for i in 0..c.nodes().len() {
        c.start_agent(i)
            .map_err(|e| BenchError::failed("start agent", e.to_string()))?;
    }
    let agents: Vec<&Agent> = c.nodes().iter().map(agent_of).collect::<Result<_>>()?;
    let starts: Vec<Instant> = agents.iter().map(|a| a.started).collect();
    let names: BTreeMap<String, usize> = c
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let n = agents.len();
    let end = Instant::now() + window;
    let mut pings = Pingers::new(c, hosts);
    let seen: Vec<Vec<Seen>> = std::thread::scope(|s| {
        let hs: Vec<_> = agents
            .iter()
            .map(|a| {
                let names = &names;
                s.spawn(move || watch(a, names, n, end))
            })
            .collect();
        while Instant::now() < end && cleanup::check().is_ok() {
            pings.keep_going(c, hosts);
            std::thread::sleep(Duration::from_millis(500));
        }
        hs.into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    drop(pings);
    cleanup::check()?;
    Ok(pairs(&seen, &starts, round))
}

/// Reads one agent's view of its peers until `end`.
fn watch(a: &Agent, names: &BTreeMap<String, usize>, n: usize, end: Instant) -> Vec<Seen> {
    let mut v = vec![Seen::default(); n];
    while Instant::now() < end && cleanup::check().is_ok() {
        let tick = Instant::now();
        if let Ok(p) = a.peers() {
            let now = Instant::now();
            for e in p["peers"].as_array().into_iter().flatten() {
                let Some(&j) = e["node"].as_str().and_then(|x| names.get(x)) else {
                    continue;
                };
                let w = &mut v[j];
                let up = e["state"] == "connected";
                w.path = e["path"].as_str().filter(|_| up).map(str::to_string);
                w.method = e["method"].as_str().filter(|_| up).map(str::to_string);
                if up {
                    w.connected.get_or_insert(now);
                    if w.path.as_deref() == Some("direct") {
                        w.direct.get_or_insert(now);
                    }
                }
            }
        }
        std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
    }
    v
}

fn pairs(seen: &[Vec<Seen>], starts: &[Instant], round: usize) -> Vec<Pair> {
    let n = seen.len();
    let mut out = Vec::new();
    for a in 0..n {
        for b in a + 1..n {
            let (x, y) = (&seen[a][b], &seen[b][a]);
            let origin = starts[a].max(starts[b]);
            let both = |p: Option<Instant>, q: Option<Instant>| {
                Some(p?.max(q?).saturating_duration_since(origin))
            };
            let m = |s: &Seen| s.method.clone().unwrap_or_else(|| "down".into());
            out.push(Pair {
                round,
                a,
                b,
                connected: both(x.connected, y.connected),
                direct: both(x.direct, y.direct),
                direct_at_end: x.path.as_deref() == Some("direct")
                    && y.path.as_deref() == Some("direct"),
                method: if m(x) == m(y) {
                    m(x)
                } else {
                    format!("{}/{}", m(x), m(y))
                },
            });
        }
    }
    out
}

/// One `ping -i 0.5` per pair over the host overlay (from the lower
/// node), restarted when it exits (ping gives up when its first packet has
/// no route, before the agent made one); all killed on drop.
struct Pingers {
    running: BTreeMap<(usize, usize), Child>,
}

impl Pingers {
    fn new(c: &Cluster, hosts: &[Option<IpAddr>]) -> Pingers {
        let mut p = Pingers {
            running: BTreeMap::new(),
        };
        p.keep_going(c, hosts);
        p
    }

    fn keep_going(&mut self, c: &Cluster, hosts: &[Option<IpAddr>]) {
        let n = c.nodes().len();
        for a in 0..n {
            for b in a + 1..n {
                let alive = self
                    .running
                    .get_mut(&(a, b))
                    .is_some_and(|ch| matches!(ch.try_wait(), Ok(None)));
                let Some(to) = hosts.get(b).copied().flatten() else {
                    continue;
                };
                if alive {
                    continue;
                }
                let to = to.to_string();
                let mut cmd = c.nodes()[a]
                    .ns
                    .command(&["ping", "-n", "-q", "-i", "0.5", "-W", "1", &to]);
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if let Ok(ch) = cmd.spawn() {
                    if let Some(mut old) = self.running.insert((a, b), ch) {
                        let _ = old.kill();
                        let _ = old.wait();
                    }
                }
            }
        }
    }
}

impl Drop for Pingers {
    fn drop(&mut self) {
        for ch in self.running.values_mut() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Report

/// "reflexive 2, relay 1": how often each method ends the pairs.
pub fn tally<'a>(methods: impl IntoIterator<Item = &'a str>) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for x in methods {
        *m.entry(x).or_default() += 1;
    }
    m.into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn share(k: usize, n: usize) -> String {
    if n == 0 {
        return "-".into();
    }
    format!("{k}/{n} ({:.0}%)", 100.0 * k as f64 / n as f64)
}

/// Median (max) of the times to direct of the pairs direct at the end.
fn times(ps: &[&Pair]) -> String {
    let v: Vec<f64> = ps
        .iter()
        .filter(|p| p.direct_at_end)
        .filter_map(|p| p.direct.map(|d| d.as_secs_f64()))
        .collect();
    if v.is_empty() {
        return "-".into();
    }
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.2} ({max:.2})", median(&v))
}

impl Run {
    fn type_of(&self, p: &Pair) -> String {
        let (a, b) = (&self.nodes[p.a], &self.nodes[p.b]);
        if a.site == b.site {
            return format!("same site: {}", a.kind.label());
        }
        let mut l = [a.kind.label(), b.kind.label()];
        l.sort();
        format!("{} – {}", l[0], l[1])
    }

    fn forced(&self, p: &Pair) -> Option<&'static str> {
        let (a, b) = (&self.nodes[p.a], &self.nodes[p.b]);
        forbidden(a.kind, b.kind, a.site == b.site)
    }
}

fn render(r: &Run) -> String {
    let mut s = format!("Sites: {}.\n\n", r.sites.join(", "));
    let mut types: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, p) in r.after.iter().enumerate() {
        types.entry(r.type_of(p)).or_default().push(i);
    }
    let mut t = Table::new([
        "pair type",
        "pairs × rounds",
        "before: method at the end",
        "before: direct",
        "after: method at the end",
        "after: direct",
        "after: time to direct s, median (max)",
        "forced to the relay",
    ]);
    let pick =
        |v: &[Pair], ix: &[usize]| -> Vec<Pair> { ix.iter().map(|&i| v[i].clone()).collect() };
    for (ty, ix) in &types {
        let (b, a) = (pick(&r.before, ix), pick(&r.after, ix));
        let direct = |v: &[Pair]| v.iter().filter(|p| p.direct_at_end).count();
        t.row([
            ty.clone(),
            ix.len().to_string(),
            tally(b.iter().map(|p| p.method.as_str())),
            share(direct(&b), b.len()),
            tally(a.iter().map(|p| p.method.as_str())),
            share(direct(&a), a.len()),
            times(&a.iter().collect::<Vec<_>>()),
            r.forced(&a[0]).map_or("no".into(), |w| format!("yes: {w}")),
        ]);
    }
    s.push_str(&t.render());
    s.push_str(&totals(r));
    s.push_str(&relayed(r));
    s
}

fn totals(r: &Run) -> String {
    let n = r.after.len();
    let allowed: Vec<usize> = (0..n)
        .filter(|&i| r.forced(&r.after[i]).is_none())
        .collect();
    let direct = |v: &[Pair], ix: &mut dyn Iterator<Item = usize>| {
        ix.filter(|&i| v[i].direct_at_end).count()
    };
    let mut t = Table::new(["share of pairs direct", "before", "after"]);
    t.row([
        "all pairs".to_string(),
        share(direct(&r.before, &mut (0..n)), n),
        share(direct(&r.after, &mut (0..n)), n),
    ]);
    t.row([
        "pairs whose NATs allow a direct path".to_string(),
        share(
            direct(&r.before, &mut allowed.iter().copied()),
            allowed.len(),
        ),
        share(
            direct(&r.after, &mut allowed.iter().copied()),
            allowed.len(),
        ),
    ]);
    format!("\n{}", t.render())
}

fn relayed(r: &Run) -> String {
    let mut t = Table::new([
        "pair (after)",
        "round",
        "type",
        "method at the end",
        "connected s",
        "why not direct",
    ]);
    for p in r.after.iter().filter(|p| !p.direct_at_end) {
        let (a, b) = (&r.nodes[p.a], &r.nodes[p.b]);
        let why = match r.forced(p) {
            Some(w) => format!("forced: {w}"),
            None => format!("**{}**", gap(a.kind, b.kind)),
        };
        t.row([
            format!("{} – {}", a.name, b.name),
            p.round.to_string(),
            r.type_of(p),
            p.method.clone(),
            p.connected
                .map_or("never".into(), |d| format!("{:.2}", d.as_secs_f64())),
            why,
        ]);
    }
    if t.is_empty() {
        return "\nEvery pair ended direct.\n".into();
    }
    format!(
        "\nPairs not direct at the end of the *after* window:\n\n{}",
        t.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(nat: NatType) -> Kind {
        Kind {
            nat,
            bare: false,
            ipv6: false,
        }
    }

    #[test]
    fn only_udp_blocked_and_symmetric_pairs_are_forced_to_the_relay() {
        use NatType::*;
        assert!(forbidden(k(Symmetric), k(Symmetric), false).is_some());
        assert!(forbidden(k(Public), k(UdpBlocked), false).is_some());
        // Same LAN: the local address works whatever the router does.
        assert!(forbidden(k(Symmetric), k(Symmetric), true).is_none());
        for other in [PortRestrictedCone, FullCone, DoubleNat, Upnp, Public] {
            assert!(
                forbidden(k(Symmetric), k(other), false).is_none(),
                "{other}"
            );
        }
        let bare = Kind {
            nat: PortRestrictedCone,
            bare: true,
            ipv6: false,
        };
        assert!(forbidden(bare, bare, false).is_none());
        assert_eq!(bare.label(), "bare masquerade");
        // IPv6 on both sides: the v6 firewalls are endpoint-independent
        // filters that a simultaneous open passes.
        let v6 = Kind {
            ipv6: true,
            ..k(Symmetric)
        };
        assert!(forbidden(v6, v6, false).is_none());
        assert!(forbidden(v6, k(Symmetric), false).is_some());
        assert_eq!(v6.label(), "Symmetric + IPv6");
    }

    #[test]
    fn the_lab_is_the_main_jobs_plus_a_mapping_router_and_bare_sites() {
        let (o, bare) = layout();
        assert!(o.sites.iter().any(|(n, _)| *n == NatType::Upnp));
        assert_eq!(bare.len(), BARE_SITES);
        assert!(bare
            .iter()
            .all(|&i| o.sites[i].0 == NatType::PortRestrictedCone));
        let v: Value = serde_json::from_str(BEFORE).unwrap();
        assert_eq!(v["portMapping"], false);
        assert_eq!(v["ipv6"], false);
    }

    #[test]
    fn methods_are_tallied() {
        assert_eq!(
            tally(["relay", "reflexive", "relay"]),
            "reflexive 1, relay 2"
        );
    }
}
