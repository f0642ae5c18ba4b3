//! The node's private key file and the cluster's network key file.
//!
//! The private key is created on first start (32 random bytes, base64, as
//! `wg genkey` writes it) with mode 0600 and `O_EXCL`, so two agents
//! starting at once cannot both write one; it is reused after every
//! restart, which keeps the node's public key, and so its identity in the
//! store, stable.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use evio_overlay::crypto::{b64, parse_key, Secret, StaticKeys};
use zeroize::Zeroize;

use crate::AgentError;

fn key_err(path: &Path, reason: impl Into<String>) -> AgentError {
    AgentError::Key {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn key_io(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::KeyIo {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the private key at `path`, creating it if missing. Every copy
/// made on the way (the file's text, the encoded key) is wiped.
pub fn load_or_create(path: &Path) -> Result<Secret, AgentError> {
    match std::fs::read_to_string(path) {
        Ok(mut text) => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            let key = parse_key(&text).map(Secret::new);
            text.zeroize();
            if mode & 0o077 != 0 {
                // WireGuard's tools warn; a readable private key lets any
                // local user impersonate the node, so we refuse.
                return Err(key_err(
                    path,
                    format!("mode {mode:o} lets others read the private key; chmod 600 it"),
                ));
            }
            key.ok_or_else(|| key_err(path, "not a base64-encoded 32-byte key"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(key_io(path))?;
            }
            let keys = StaticKeys::generate();
            let mut f = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => f,
                // Another agent created it first: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_or_create(path)
                }
                Err(e) => return Err(key_io(path)(e)),
            };
            let mut text = format!("{}\n", b64(keys.private()));
            let written = f
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .and_then(|_| f.write_all(text.as_bytes()))
                .and_then(|_| f.sync_all());
            text.zeroize();
            written.map_err(key_io(path))?;
            Ok(Secret::new(*keys.private()))
        }
        Err(e) => Err(key_io(path)(e)),
    }
}

/// Reads the network key file (`overlay.networkKeyFile`): one key, or two
/// during a rotation, one per line (32 bytes in base64 each; blank lines
/// and a trailing newline are fine). The first is sent with, both are
/// accepted.
pub fn network_keys(path: &Path) -> Result<(Secret, Option<Secret>), AgentError> {
    let mut text = std::fs::read_to_string(path).map_err(key_io(path))?;
    let lines: Vec<Option<Secret>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_key(l).map(Secret::new))
        .collect();
    text.zeroize();
    let bad = |why: &str| {
        key_err(
            path,
            format!(
                "{why}: it must hold one or two keys, one per line, each 32 random bytes in \
                 base64 (head -c 32 /dev/urandom | base64)"
            ),
        )
    };
    if let Some(i) = lines.iter().position(Option::is_none) {
        return Err(bad(&format!("line {} is not a key", i + 1)));
    }
    let mut keys = lines.into_iter().flatten();
    match (keys.next(), keys.next(), keys.next()) {
        (Some(first), next, None) => Ok((first, next)),
        (None, _, _) => Err(bad("no key")),
        _ => Err(bad("more than two keys")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_0600_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/agent.key");
        let k1 = load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&p).unwrap().expose(), k1.expose());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
    }

    #[test]
    fn network_key_file_holds_one_or_two_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nk");
        let (k7, k8) = (b64(&[7u8; 32]), b64(&[8u8; 32]));
        std::fs::write(&p, format!("{k7}\n")).unwrap();
        let (first, next) = network_keys(&p).unwrap();
        assert_eq!(first.expose(), &[7u8; 32]);
        assert!(next.is_none());
        std::fs::write(&p, format!("{k8}\n\n{k7}\n")).unwrap();
        let (first, next) = network_keys(&p).unwrap();
        assert_eq!(first.expose(), &[8u8; 32], "the first line sends");
        assert_eq!(next.unwrap().expose(), &[7u8; 32]);
        for bad in [
            "short".to_string(),
            String::new(),
            format!("{k7}\nshort\n"),
            format!("{k7}\n{k8}\n{k7}\n"),
        ] {
            std::fs::write(&p, &bad).unwrap();
            let e = network_keys(&p).unwrap_err().to_string();
            assert!(e.contains("one or two keys"), "{bad:?}: {e}");
        }
        assert!(network_keys(&d.path().join("missing")).is_err());
    }

    /// An I/O failure keeps its io::Error as the source (callers can tell
    /// a missing file from a refused one), and the message names the file.
    #[test]
    fn io_failures_keep_their_source() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        let e = network_keys(&missing).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let src = std::error::Error::source(&e).expect("a source");
        let io = src.downcast_ref::<std::io::Error>().expect("an io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }
}
