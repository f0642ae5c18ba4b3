//! `evio-node peers [--json]`: what the agent knows about its peers, over
//! its control socket; `evio-node peers NODE --explain`: one peer in depth,
//! with a verdict of why the pair is where it is.

use std::path::PathBuf;
use std::time::Duration;

use crate::agent::DEFAULT_CONTROL_SOCKET;
use crate::error::NodeError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One peer (with --explain).
    #[arg(value_name = "NODE", requires = "explain")]
    pub node: Option<String>,

    /// Explain one peer: the candidates of both sides, each path's state,
    /// RTT, lost probes, last packet received, and a one-line verdict.
    #[arg(long, requires = "node")]
    pub explain: bool,

    /// JSON instead of a table (the fields: docs/design.md, "The overlay's keys").
    #[arg(long)]
    pub json: bool,

    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let what = match &args.node {
        Some(n) => format!("explain {n}"),
        None => "peers".to_string(),
    };
    let text = evio_agent::control::request(&args.control_socket, &what, Duration::from_secs(5))
        .map_err(|e| {
            NodeError::Invalid(format!(
                "cannot reach the agent at {}: {e} (is `evio-node agent` running?)",
                args.control_socket.display()
            ))
        })?;
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        NodeError::Invalid(format!("the agent answered something else than JSON: {e}"))
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(NodeError::Invalid(format!("the agent: {e}")));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if args.explain {
        print!("{}", evio_agent::explain::explain_text(&v));
    } else {
        print!("{}", evio_agent::metrics::peers_table(&v));
    }
    Ok(())
}
