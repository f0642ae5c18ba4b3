//! PCP (RFC 6887) MAP requests and responses, IPv4 only: just the opcode
//! a port mapping needs, no options.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const VERSION: u8 = 2;
const OP_MAP: u8 = 1;
const OP_ANNOUNCE: u8 = 0;
/// The R bit: set in responses.
const RESPONSE: u8 = 0x80;
pub const REQUEST_LEN: usize = 60;
/// Responses are at least this long (header + MAP payload); options may
/// follow and are ignored.
const RESPONSE_LEN: usize = 60;
const UDP: u8 = 17;

/// Result codes (RFC 6887 7.4) that change what the client does.
pub const SUCCESS: u8 = 0;
pub const UNSUPP_VERSION: u8 = 1;

fn mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

/// A MAP request for UDP `internal_port` of `client`, suggesting the same
/// external port; `lifetime` 0 deletes the mapping (same `nonce`).
pub fn map_request(
    client: Ipv4Addr,
    nonce: &[u8; 12],
    internal_port: u16,
    suggested_port: u16,
    lifetime: u32,
) -> [u8; REQUEST_LEN] {
    let mut m = [0u8; REQUEST_LEN];
    m[0] = VERSION;
    m[1] = OP_MAP;
    m[4..8].copy_from_slice(&lifetime.to_be_bytes());
    m[8..24].copy_from_slice(&mapped(client));
    m[24..36].copy_from_slice(nonce);
    m[36] = UDP;
    m[40..42].copy_from_slice(&internal_port.to_be_bytes());
    m[42..44].copy_from_slice(&suggested_port.to_be_bytes());
    // No suggested external address: the IPv4-mapped unspecified one.
    m[44..60].copy_from_slice(&mapped(Ipv4Addr::UNSPECIFIED));
    m
}

/// What a PCP server answered to a MAP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapResponse {
    pub result: u8,
    pub lifetime: u32,
    pub epoch: u32,
    pub nonce: [u8; 12],
    pub internal_port: u16,
    pub external_port: u16,
    /// `None` when the server sent an IPv6 address (we asked for IPv4).
    pub external_ip: Option<Ipv4Addr>,
}

/// A MAP response, or `None` for anything else. An error response may be
/// cut short after the header (RFC 6887 8.3): its payload then reads as
/// zeros.
pub fn parse_map_response(b: &[u8]) -> Option<MapResponse> {
    if b.len() < 24 || b[0] != VERSION || b[1] != (RESPONSE | OP_MAP) {
        return None;
    }
    let result = b[3];
    if result == SUCCESS && (b.len() < RESPONSE_LEN || !b.len().is_multiple_of(4)) {
        return None;
    }
    let mut full = [0u8; RESPONSE_LEN];
    let n = b.len().min(RESPONSE_LEN);
    full[..n].copy_from_slice(&b[..n]);
    let u16_at = |i: usize| u16::from_be_bytes([full[i], full[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([full[i], full[i + 1], full[i + 2], full[i + 3]]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&full[24..36]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&full[44..60]);
    Some(MapResponse {
        result,
        lifetime: u32_at(4),
        epoch: u32_at(8),
        nonce,
        internal_port: u16_at(40),
        external_port: u16_at(42),
        external_ip: Ipv6Addr::from(ip).to_ipv4_mapped(),
    })
}

/// The Epoch Time of an ANNOUNCE response (RFC 6887 14.1): what a server
/// multicasts when it starts or lost its state, or `None` for anything
/// else. Options may follow the header and are ignored.
pub fn parse_announce(b: &[u8]) -> Option<u32> {
    let ok = b.len() >= 24
        && b.len().is_multiple_of(4)
        && b[0] == VERSION
        && b[1] == (RESPONSE | OP_ANNOUNCE)
        && b[3] == SUCCESS;
    ok.then(|| u32::from_be_bytes([b[8], b[9], b[10], b[11]]))
}

/// Whether `b` is a NAT-PMP server's "unsupported version" answer to our
/// PCP request (RFC 6887 Appendix A): the gateway speaks NAT-PMP only.
pub fn is_natpmp_version_error(b: &[u8]) -> bool {
    b.len() >= 4 && b[0] == 0 && b[1] & RESPONSE != 0 && u16::from_be_bytes([b[2], b[3]]) == 1
}

/// A name for a result code, for logs.
pub fn result_name(code: u8) -> &'static str {
    match code {
        0 => "SUCCESS",
        1 => "UNSUPP_VERSION",
        2 => "NOT_AUTHORIZED",
        3 => "MALFORMED_REQUEST",
        4 => "UNSUPP_OPCODE",
        5 => "UNSUPP_OPTION",
        6 => "MALFORMED_OPTION",
        7 => "NETWORK_FAILURE",
        8 => "NO_RESOURCES",
        9 => "UNSUPP_PROTOCOL",
        10 => "USER_EX_QUOTA",
        11 => "CANNOT_PROVIDE_EXTERNAL",
        12 => "ADDRESS_MISMATCH",
        13 => "EXCESSIVE_REMOTE_PEERS",
        _ => "unknown result code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What miniupnpd 2.3.1 answered to our request in the lab (mapping
    /// 192.168.1.2:5801 to 203.0.113.10:5801 for 60 s), byte for byte.
    const MINIUPNPD: &str = "028100000000003c0000c47d00000000000000000000000008170848e0b843a10513cf831100000016a916a900000000000000000000ffffcb00710a";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn request_layout() {
        let nonce = [7u8; 12];
        let m = map_request(Ipv4Addr::new(192, 168, 1, 2), &nonce, 5800, 5800, 7200);
        assert_eq!(&m[..4], &[2, 1, 0, 0]);
        assert_eq!(&m[4..8], &7200u32.to_be_bytes());
        assert_eq!(&m[8..24], &unhex("00000000000000000000ffffc0a80102")[..]);
        assert_eq!(&m[24..36], &nonce);
        assert_eq!(&m[36..40], &[17, 0, 0, 0]);
        assert_eq!(&m[40..44], &[0x16, 0xa8, 0x16, 0xa8]);
        assert_eq!(&m[44..60], &unhex("00000000000000000000ffff00000000")[..]);
    }

    #[test]
    fn parses_a_real_answer() {
        let r = parse_map_response(&unhex(MINIUPNPD)).unwrap();
        assert_eq!(r.result, SUCCESS);
        assert_eq!(r.lifetime, 60);
        assert_eq!(r.epoch, 0xc47d);
        assert_eq!(r.nonce, unhex("08170848e0b843a10513cf83")[..]);
        assert_eq!((r.internal_port, r.external_port), (5801, 5801));
        assert_eq!(r.external_ip, Some(Ipv4Addr::new(203, 0, 113, 10)));
    }

    #[test]
    fn refuses_what_is_not_a_map_response() {
        let good = unhex(MINIUPNPD);
        assert!(parse_map_response(&[]).is_none());
        assert!(parse_map_response(&good[..23]).is_none());
        // A successful answer must carry the whole MAP payload.
        assert!(parse_map_response(&good[..40]).is_none());
        let mut req = good.clone();
        req[1] = 1; // a request, not a response
        assert!(parse_map_response(&req).is_none());
        let mut v1 = good.clone();
        v1[0] = 1;
        assert!(parse_map_response(&v1).is_none());
        let mut peer = good.clone();
        peer[1] = 0x82; // PEER opcode
        assert!(parse_map_response(&peer).is_none());
        // An error may be cut after the header.
        let mut err = good[..24].to_vec();
        err[3] = 2;
        let r = parse_map_response(&err).unwrap();
        assert_eq!((r.result, r.external_port, r.external_ip), (2, 0, None));
        assert_eq!(result_name(r.result), "NOT_AUTHORIZED");
    }

    #[test]
    fn parses_an_announce_and_nothing_else() {
        // As miniupnpd's PCPSendUnsolicitedAnnounce builds it: the header
        // alone, lifetime 0, epoch 7.
        let mut a = [0u8; 24];
        a[..4].copy_from_slice(&[2, 0x80, 0, 0]);
        a[8..12].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(parse_announce(&a), Some(7));
        assert_eq!(parse_announce(&[a.to_vec(), vec![0; 4]].concat()), Some(7));
        assert_eq!(parse_announce(&a[..23]), None);
        assert_eq!(parse_announce(&[a.to_vec(), vec![0; 2]].concat()), None);
        let mut req = a;
        req[1] = 0; // a request, not a response
        assert_eq!(parse_announce(&req), None);
        let mut err = a;
        err[3] = 7;
        assert_eq!(parse_announce(&err), None);
        assert_eq!(parse_announce(&unhex(MINIUPNPD)), None);
        assert_eq!(parse_announce(&[]), None);
    }

    #[test]
    fn recognises_a_natpmp_only_gateway() {
        assert!(is_natpmp_version_error(&[0, 0x81, 0, 1, 0, 0, 0, 9]));
        assert!(!is_natpmp_version_error(&[0, 0x81, 0, 0]));
        assert!(!is_natpmp_version_error(&unhex(MINIUPNPD)));
    }
}
