//! Opening files named by a config or found in a shared directory without
//! trusting them to be what their name claims.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::{fstat, Mode, SFlag};

/// `Ok` for a regular file, else what it is instead.
pub fn regular(fd: &OwnedFd) -> std::result::Result<(), String> {
    let st = fstat(fd).map_err(|e| format!("unreadable: {e}"))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFREG {
        return Ok(());
    }
    Err(match kind {
        SFlag::S_IFIFO => "a FIFO".into(),
        SFlag::S_IFDIR => "a directory".into(),
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device".into(),
        SFlag::S_IFSOCK => "a socket".into(),
        _ => "not a regular file".into(),
    })
}

/// Opens `path` for appending, refusing anything but a regular file: no
/// symlink is followed (O_NOFOLLOW) and a FIFO neither blocks the open nor,
/// being refused, later writes (O_NONBLOCK, then fstat). For `logFile`.
pub fn open_append_regular(path: &Path, mode: u32) -> std::result::Result<File, String> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_WRONLY
            | OFlag::O_APPEND
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| match e {
        nix::Error::ELOOP => "it is a symlink".to_string(),
        e => e.to_string(),
    })?;
    regular(&fd).map_err(|why| format!("it is {why}"))?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn log_file_must_be_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        open_append_regular(&log, 0o640).unwrap();
        std::os::unix::fs::symlink(&log, d.path().join("link")).unwrap();
        assert!(open_append_regular(&d.path().join("link"), 0o640)
            .unwrap_err()
            .contains("symlink"));
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        // A FIFO with no reader: O_NONBLOCK makes open fail (ENXIO) at once
        // instead of blocking; with a reader it opens and fstat refuses it.
        assert!(open_append_regular(&fifo, 0o640).is_err());
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert!(open_append_regular(&fifo, 0o640)
            .unwrap_err()
            .contains("FIFO"));
    }
}
