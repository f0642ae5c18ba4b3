//! NAT-PMP (RFC 6886): the external-address request and the UDP mapping
//! request, and their responses.

use std::net::Ipv4Addr;

const VERSION: u8 = 0;
const OP_ADDRESS: u8 = 0;
const OP_MAP_UDP: u8 = 1;
const RESPONSE: u8 = 128;

pub const SUCCESS: u16 = 0;

/// "What is your external address?"
pub fn address_request() -> [u8; 2] {
    [VERSION, OP_ADDRESS]
}

/// Map UDP `internal_port`, suggesting `suggested_port`, for `lifetime`
/// seconds; lifetime 0 with suggested port 0 deletes it (RFC 6886 3.4).
pub fn map_request(internal_port: u16, suggested_port: u16, lifetime: u32) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[0] = VERSION;
    m[1] = OP_MAP_UDP;
    m[4..6].copy_from_slice(&internal_port.to_be_bytes());
    m[6..8].copy_from_slice(&suggested_port.to_be_bytes());
    m[8..12].copy_from_slice(&lifetime.to_be_bytes());
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Address {
        result: u16,
        epoch: u32,
        ip: Ipv4Addr,
    },
    Map {
        result: u16,
        epoch: u32,
        internal_port: u16,
        external_port: u16,
        lifetime: u32,
    },
}

impl Response {
    pub fn result(&self) -> u16 {
        match self {
            Response::Address { result, .. } | Response::Map { result, .. } => *result,
        }
    }

    pub fn epoch(&self) -> u32 {
        match self {
            Response::Address { epoch, .. } | Response::Map { epoch, .. } => *epoch,
        }
    }
}

/// A response to one of our two requests, or `None`. An error answer may
/// be just the 8-byte header; it then reads as zeros after it.
pub fn parse_response(b: &[u8]) -> Option<Response> {
    if b.len() < 8 || b[0] != VERSION {
        return None;
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    let mut full = [0u8; 16];
    let n = b.len().min(16);
    full[..n].copy_from_slice(&b[..n]);
    let u16_at = |i: usize| u16::from_be_bytes([full[i], full[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([full[i], full[i + 1], full[i + 2], full[i + 3]]);
    let epoch = u32_at(4);
    match b[1] {
        op if op == RESPONSE | OP_ADDRESS => {
            if result == SUCCESS && b.len() < 12 {
                return None;
            }
            Some(Response::Address {
                result,
                epoch,
                ip: Ipv4Addr::new(full[8], full[9], full[10], full[11]),
            })
        }
        op if op == RESPONSE | OP_MAP_UDP => {
            if result == SUCCESS && b.len() < 16 {
                return None;
            }
            Some(Response::Map {
                result,
                epoch,
                internal_port: u16_at(8),
                external_port: u16_at(10),
                lifetime: u32_at(12),
            })
        }
        _ => None,
    }
}

/// A name for a result code, for logs.
pub fn result_name(code: u16) -> &'static str {
    match code {
        0 => "success",
        1 => "unsupported version",
        2 => "not authorized/refused",
        3 => "network failure",
        4 => "out of resources",
        5 => "unsupported opcode",
        _ => "unknown result code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(address_request(), [0, 0]);
        assert_eq!(
            map_request(5800, 5800, 60),
            [0, 1, 0, 0, 0x16, 0xa8, 0x16, 0xa8, 0, 0, 0, 60]
        );
        assert_eq!(map_request(5800, 0, 0)[6..], [0, 0, 0, 0, 0, 0]);
    }

    /// Answers miniupnpd 2.3.1 gave in the lab.
    #[test]
    fn parses_real_answers() {
        let map = [
            0, 0x81, 0, 0, 0, 0, 0xc4, 0x7d, 0x16, 0xa8, 0x16, 0xa8, 0, 0, 0, 60,
        ];
        assert_eq!(
            parse_response(&map),
            Some(Response::Map {
                result: 0,
                epoch: 0xc47d,
                internal_port: 5800,
                external_port: 5800,
                lifetime: 60
            })
        );
        let addr = [0, 0x80, 0, 0, 0, 0, 0xc4, 0x7d, 203, 0, 113, 10];
        assert_eq!(
            parse_response(&addr),
            Some(Response::Address {
                result: 0,
                epoch: 0xc47d,
                ip: Ipv4Addr::new(203, 0, 113, 10)
            })
        );
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(parse_response(&[]), None);
        assert_eq!(parse_response(&[0, 0x81, 0, 0]), None);
        // Success, but cut short.
        assert_eq!(
            parse_response(&[0, 0x81, 0, 0, 0, 0, 0, 1, 0x16, 0xa8]),
            None
        );
        assert_eq!(parse_response(&[0, 0x80, 0, 0, 0, 0, 0, 1, 203]), None);
        // A request, a PCP answer, an unknown opcode.
        assert_eq!(parse_response(&map_request(1, 1, 1)), None);
        assert_eq!(parse_response(&[2, 0x81, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_response(&[0, 0x85, 0, 0, 0, 0, 0, 0]), None);
        // A refusal may be only the header.
        let r = parse_response(&[0, 0x81, 0, 2, 0, 0, 0, 9]).unwrap();
        assert_eq!((r.result(), r.epoch()), (2, 9));
        assert_eq!(result_name(r.result()), "not authorized/refused");
    }
}
