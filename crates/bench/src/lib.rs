//! The evio benchmark suite: evio against the reference CNI plugins on the
//! same machine in the same run, printed as markdown tables. See
//! docs/benchmarks.md for the latest figures and what they mean.
//!
//! Nothing here asserts a timing: a run fails only when something it
//! measures fails (a plugin error, a leak, a dead daemon).
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod alloc;
pub mod cleanup;
pub mod datapath;
pub mod error;
pub mod exec;
pub mod footprint;
pub mod iperf;
pub mod latency;
pub mod machine;
pub mod natpaths;
pub mod node;
pub mod overlay;
pub mod peermem;
pub mod report;
pub mod scale;
pub mod services;
pub mod stats;

use std::str::FromStr;

pub use error::{BenchError, Result};
use node::Tools;
use report::Section;

/// The parts of the benchmark, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Latency,
    Alloc,
    Datapath,
    Footprint,
    Overlay,
    Services,
    /// Not in [`Part::ALL`]: its 128- and 256-node runs take the machine
    /// for many minutes; `--only scale` asks for it.
    Scale,
    /// Not in [`Part::ALL`]: two windows of minutes each (hard-NAT
    /// traversal takes that long); `--only natpaths` asks for it.
    Natpaths,
    /// Not in [`Part::ALL`]: one agent's memory and idle cost against
    /// synthetic peers (issue 22); `--only peermem` asks for it.
    Peermem,
}

impl Part {
    pub const ALL: [Part; 6] = [
        Part::Latency,
        Part::Alloc,
        Part::Datapath,
        Part::Footprint,
        Part::Overlay,
        Part::Services,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Latency => "latency",
            Part::Alloc => "alloc",
            Part::Datapath => "datapath",
            Part::Footprint => "footprint",
            Part::Overlay => "overlay",
            Part::Services => "services",
            Part::Scale => "scale",
            Part::Natpaths => "natpaths",
            Part::Peermem => "peermem",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Part::Latency => "1. Pod ADD/DEL latency",
            Part::Alloc => "2. Node subnet allocation (config-gen)",
            Part::Datapath => "3. Datapath: pod-to-pod TCP throughput",
            Part::Footprint => "4. Footprint",
            Part::Overlay => "5. Overlay: evio-node agent vs boringtun, VXLAN and a plain link",
            Part::Services => {
                "6. Services: pod to pod vs pod to ClusterIP, and the cost of evio's Services path"
            }
            Part::Scale => "7. Overlay at scale: routed lab, etcd store, 32 to 256 nodes",
            Part::Natpaths => "8. NAT lab: the path of every pair type, before and after issue 25",
            Part::Peermem => "9. One agent's memory and idle cost per known peer (synthetic peers)",
        }
    }
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Part, String> {
        Part::ALL
            .into_iter()
            .chain([Part::Scale, Part::Natpaths, Part::Peermem])
            .find(|p| p.name() == s || (s == "allocation" && *p == Part::Alloc))
            .ok_or_else(|| {
                format!(
                    "unknown section {s:?}; one of: {}",
                    Part::ALL.map(Part::name).join(", ") + ", scale, natpaths, peermem"
                )
            })
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub tools: Tools,
    pub parts: Vec<Part>,
    pub latency: latency::Opts,
    pub alloc: alloc::Opts,
    pub datapath: datapath::Opts,
    pub footprint_samples: usize,
    pub overlay: overlay::Opts,
    pub services: services::Opts,
    pub scale: scale::Opts,
    pub natpaths: natpaths::Opts,
    pub peermem: peermem::Opts,
}

fn whole(r: Result<String>) -> (String, Option<BenchError>) {
    match r {
        Ok(body) => (body, None),
        Err(e) => (String::new(), Some(e)),
    }
}

/// Runs the selected parts; `each` sees every section as it completes.
pub fn run(cfg: &Config, mut each: impl FnMut(&Section)) -> Vec<Section> {
    let mut out = Vec::new();
    for part in &cfg.parts {
        let started = std::time::Instant::now();
        eprintln!("evio-bench: {} ...", part.name());
        // (text, error): a section may have a report and have failed too.
        let (body, err) = match cleanup::check() {
            Err(e) => (String::new(), Some(e)),
            Ok(()) => match part {
                Part::Latency => whole(latency::run(&cfg.tools, &cfg.latency)),
                Part::Alloc => whole(alloc::run(&cfg.tools, &cfg.alloc)),
                Part::Datapath => whole(datapath::run(&cfg.tools, &cfg.datapath)),
                Part::Footprint => whole(footprint::run(&cfg.tools, cfg.footprint_samples)),
                Part::Overlay => overlay::run(&cfg.tools, &cfg.overlay),
                Part::Services => whole(services::run(&cfg.tools, &cfg.services)),
                Part::Scale => scale::run(&cfg.tools, &cfg.scale),
                Part::Natpaths => natpaths::run(&cfg.tools, &cfg.natpaths),
                Part::Peermem => peermem::run(&cfg.tools, &cfg.peermem),
            },
        };
        eprintln!(
            "evio-bench: {} {} in {:.1} s",
            part.name(),
            if err.is_none() { "done" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        let s = Section {
            title: part.title().into(),
            body,
            error: err.map(|e| e.to_string()),
        };
        each(&s);
        out.push(s);
    }
    out
}
