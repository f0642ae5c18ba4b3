//! `evio-node install-cni`: the DaemonSet's first init container copies the
//! plugin onto the host. The image is `FROM scratch` (no shell, no `cp`), and
//! the kubelet may run the plugin at any moment, so every file is written to
//! a temporary name in the destination and renamed over the old one: the
//! host never sees a half-written binary.

use std::path::PathBuf;

use evio_subnet::{remove_leftover_temps, write_file_atomic};

use crate::error::NodeError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory whose files are installed (not recursive).
    #[arg(long, value_name = "DIR", default_value = "/opt/evio/cni-bin")]
    pub src: PathBuf,

    /// The host's CNI binary directory, as mounted into the container.
    #[arg(long, value_name = "DIR", default_value = "/host/opt/cni/bin")]
    pub dest: PathBuf,
}

pub fn run(args: Args) -> Result<(), NodeError> {
    std::fs::create_dir_all(&args.dest).map_err(NodeError::io(&args.dest))?;
    let entries = std::fs::read_dir(&args.src).map_err(NodeError::io(&args.src))?;
    let mut installed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(NodeError::io(&args.src))?;
        let path = entry.path();
        // Only regular files (following symlinks, as the image may link).
        if !std::fs::metadata(&path)
            .map_err(NodeError::io(&path))?
            .is_file()
        {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(NodeError::io(&path))?;
        // A crash between writing the temp file and the rename left it on
        // the host, where nothing else would ever remove it.
        remove_leftover_temps(&args.dest, &entry.file_name().to_string_lossy());
        let dest = args.dest.join(entry.file_name());
        write_file_atomic(&dest, &bytes, 0o755)?;
        installed.push(dest.display().to_string());
    }
    if installed.is_empty() {
        return Err(NodeError::Invalid(format!(
            "{} holds no files to install",
            args.src.display()
        )));
    }
    println!("installed {}", installed.join(" "));
    Ok(())
}
