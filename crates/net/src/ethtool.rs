//! TX checksum offload through the SIOCETHTOOL ioctl (the legacy
//! ETHTOOL_GTXCSUM/STXCSUM commands, which the kernel maps onto the
//! checksum feature bits). Acts on the interface in the calling thread's
//! network namespace.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::link::validate_ifname;
use crate::{Error, Result};

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value` (linux/ethtool.h).
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union; padded to the
/// kernel's size (the union is 24 bytes on 64-bit).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    _pad: [u8; 24 - std::mem::size_of::<*mut c_void>()],
}

fn ethtool(ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    validate_ifname(ifname)?;
    let what = || {
        if cmd == ETHTOOL_GTXCSUM {
            format!("read tx checksum offload of {ifname}")
        } else {
            format!("set tx checksum offload of {ifname}")
        }
    };
    // Any socket works for SIOCETHTOOL; it selects the namespace.
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::nix(what(), e))?;
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 24 - std::mem::size_of::<*mut c_void>()],
    };
    // validate_ifname guarantees len < IFNAMSIZ, leaving the NUL.
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: req is a valid ifreq whose data pointer refers to `value`,
    // which outlives the call; the kernel reads/writes only these two.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(Error::io(what(), std::io::Error::last_os_error()));
    }
    Ok(value.data)
}

/// Turns TX checksum offload on or off (`ethtool -K IF tx on|off`).
pub fn set_tx_checksum(ifname: &str, on: bool) -> Result<()> {
    ethtool(ifname, ETHTOOL_STXCSUM, u32::from(on)).map(drop)
}

/// Whether TX checksum offload is on (`ethtool -k IF`, "tx-checksumming").
pub fn tx_checksum(ifname: &str) -> Result<bool> {
    ethtool(ifname, ETHTOOL_GTXCSUM, 0).map(|v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<EthtoolValue>(), 8);
    }

    #[test]
    fn bad_name_rejected_before_ioctl() {
        assert!(matches!(tx_checksum("a/b"), Err(Error::Invalid { .. })));
    }
}
