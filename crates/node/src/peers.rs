//! `evio-node peers [--json]`: what the agent knows about its peers, over
//! its control socket.

use std::path::PathBuf;
use std::time::Duration;

use crate::agent::DEFAULT_CONTROL_SOCKET;
use crate::error::NodeError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON instead of a table (the fields: docs/design.md, "The overlay's keys").
    #[arg(long)]
    pub json: bool,

    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let text = evio_agent::control::request(&args.control_socket, "peers", Duration::from_secs(5))
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
    } else {
        print!("{}", evio_agent::metrics::peers_table(&v));
    }
    Ok(())
}
