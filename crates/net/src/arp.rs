//! Gratuitous ARP: tells the L2 neighbours which MAC now owns an address.
//!
//! `arp_notify` makes the kernel send one when a link comes up, but a pod's
//! veth comes up before the bridge port on the other end forwards (the
//! bridge learns the peer's carrier through the asynchronous linkwatch), so
//! that announcement is often lost and a neighbour that cached the previous
//! owner of a re-used address keeps sending to the old MAC until its entry
//! expires. Sending it explicitly once the port is attached avoids that.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::{Error, Result};

const ETH_P_ARP: u16 = 0x0806;

/// The 42-byte Ethernet frame of a gratuitous ARP request for `ip`
/// (sender and target protocol address both `ip`, RFC 5227 §3).
pub fn frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Broadcasts a gratuitous ARP for `ip` from interface `index` of the
/// calling thread's network namespace.
pub fn announce(index: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<()> {
    let what = || format!("gratuitous ARP for {ip} on interface index {index}");
    let sock: OwnedFd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::nix(what(), e))?;
    let f = frame(mac, ip);
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ARP.to_be();
    sa.sll_ifindex = i32::try_from(index).map_err(|_| Error::Invalid {
        what: "interface index",
        value: index.to_string(),
    })?;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the frame and the address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            f.as_ptr().cast(),
            f.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(Error::Io {
            context: what(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_a_gratuitous_request() {
        let f = frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 244, 3, 2]);
        assert_eq!(&f[28..32], &f[38..42]);
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
