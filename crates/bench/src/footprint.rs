//! Section 4: peak memory of the plugin process during ADD, and binary
//! sizes.

use evio_testkit::netns::Netns;

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::exec;
use crate::node::{Attach, Mode, Node, Tools};
use crate::report::Table;

#[derive(Debug, Clone, Default)]
struct Rss {
    own: Vec<u64>,
    with_children: Vec<u64>,
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn traced_adds(node: &Node, pods: &[Netns], program: Option<&std::path::Path>) -> Result<Rss> {
    let mut rss = Rss::default();
    let atts: Vec<Attach> = pods.iter().map(Attach::new).collect();
    for a in &atts {
        cleanup::check()?;
        let spec = match program {
            Some(p) => node.spec_for(p, "ADD", a, &node.conf),
            None => node.spec("ADD", a),
        };
        let o = exec::run_traced(&spec)?.ok(&format!("{} traced ADD", node.mode.label()))?;
        rss.own.push(o.own_hwm_kib.ok_or_else(|| {
            BenchError::output("traced ADD", "no VmHWM was read at the plugin's exit")
        })?);
        rss.with_children.push(o.maxrss_kib);
    }
    for a in &atts {
        match program {
            Some(p) => {
                exec::run(&node.spec_for(p, "DEL", a, &node.conf))?.ok("host-local DEL")?;
            }
            None => {
                node.del(a)?;
            }
        }
    }
    Ok(rss)
}

pub fn run(tools: &Tools, samples: usize) -> Result<String> {
    tools.require(&[&tools.evio, &tools.bridge(), &tools.host_local()])?;
    let pods: Vec<Netns> = (0..samples.max(1)).map(|_| cleanup::netns("ebp")).collect();
    let mut t = Table::new([
        "process during ADD",
        "own peak RSS (MiB)",
        "incl. IPAM child, wait4 ru_maxrss (MiB)",
        "binary",
        "binary size (MiB)",
    ]);
    let mut rows = Vec::new();
    for mode in [Mode::Reference, Mode::EvioLinux, Mode::EvioOvs] {
        let node = Node::new(mode, tools, 3)?;
        let warm = Attach::new(&pods[0]);
        node.add(&warm)?;
        node.del(&warm)?;
        let rss = traced_adds(&node, &pods, None)?;
        rows.push((mode.label().to_string(), rss, mode.plugin(tools)));
    }
    let node = Node::new(Mode::EvioLinux, tools, 3)?;
    let hl = tools.host_local();
    let rss = traced_adds(&node, &pods, Some(&hl))?;
    rows.push(("host-local alone".to_string(), rss, hl));
    for (label, rss, bin) in &rows {
        t.row([
            label.clone(),
            mib(median(&rss.own)),
            mib(median(&rss.with_children)),
            bin.display().to_string(),
            size(bin),
        ]);
    }
    let mut more = Table::new(["binary", "size (MiB)"]);
    more.row([
        tools.evio_node.display().to_string(),
        size(&tools.evio_node),
    ]);
    Ok(format!(
        "Median of {} ADDs each. *Own peak RSS* is the plugin process's VmHWM read at its \
         exit (ptrace exit stop), without its children; wait4's `ru_maxrss` is the larger of \
         the process's own peak and that of the children it waited for (the delegated \
         host-local), so it mostly shows host-local's.\n\n{}\n{}",
        samples.max(1),
        t.render(),
        more.render()
    ))
}

fn size(p: &std::path::Path) -> String {
    std::fs::metadata(p)
        .map(|m| format!("{:.2}", m.len() as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|_| "missing".into())
}
