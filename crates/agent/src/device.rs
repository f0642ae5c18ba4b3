//! The agent's TAP (its port on the node bridge) and TUN (the host-overlay
//! interface), opened on /dev/net/tun with ioctls: the TUN/TAP crates we
//! looked at either lack TAP offloads or parse every frame as IP.
//!
//! Both are opened with `IFF_VNET_HDR`, so every read and write carries a
//! virtio-net header. With offloads on (`TUNSETOFFLOAD` CSUM|TSO4|TSO6) the
//! kernel hands us TCP super-frames of up to 64 KiB with a partial checksum
//! and takes coalesced ones back: one syscall per 64 KiB instead of per
//! frame. Offloads are off where the reader cannot take GSO frames (Open
//! vSwitch's userspace datapath reads our TAP with an AF_PACKET socket sized
//! for one MTU); the header then stays all zero.
//!
//! Once the agent is up, the devices are made persistent: they outlive the
//! agent (a restart, an upgrade, a crash), so the host address, its routes
//! and the bridge port stay and the next agent attaches to the same
//! devices. Leaving (`evio-node agent --stop-and-leave`) makes them
//! non-persistent again, and they go when the agent's descriptors close;
//! `evio-node uninstall` deletes them by name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use evio_overlay::offload::VNET_HDR_LEN;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Ethernet frames (the pod overlay's bridge port).
    Tap,
    /// IP packets (the host overlay interface).
    Tun,
}

pub struct Device {
    file: File,
    name: String,
    kind: Kind,
    offload: bool,
}

impl Device {
    /// Creates `name`, or attaches to the device of that name a previous
    /// agent left (persistent, nobody attached). `offload` enables
    /// TSO/checksum offload.
    pub fn open(name: &str, kind: Kind, offload: bool) -> io::Result<Device> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} must be 1-15 bytes"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: match kind {
                Kind::Tap => IFF_TAP,
                Kind::Tun => IFF_TUN,
            } | IFF_NO_PI
                | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if offload {
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        } else {
            0
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Device {
            file,
            name: name.to_string(),
            kind,
            offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device outlives this descriptor (see the module docs).
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(on),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether the device takes GSO frames and partial checksums.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Reads one frame with its virtio-net header into `buf`; `Ok(None)`
    /// when nothing is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes `hdr_and_frame` (virtio-net header, then the frame).
    pub fn write(&self, hdr_and_frame: &[u8]) -> io::Result<()> {
        debug_assert!(hdr_and_frame.len() > VNET_HDR_LEN);
        // SAFETY: writes exactly the slice.
        let n = unsafe {
            libc::write(
                self.file.as_raw_fd(),
                hdr_and_frame.as_ptr().cast(),
                hdr_and_frame.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Two buffers written as one frame: the header and the frame need not
    /// be contiguous.
    pub fn write2(&self, hdr: &[u8], frame: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live slices of the stated lengths.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
