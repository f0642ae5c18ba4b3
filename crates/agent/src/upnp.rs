//! UPnP IGD port mapping, the third try after PCP and NAT-PMP: SSDP
//! M-SEARCH for the gateway's Internet Gateway Device, its description
//! (HTTP GET), then SOAP `GetExternalIPAddress`, `AddPortMapping` and, on
//! exit, `DeletePortMapping` on its WANIPConnection (or WANPPPConnection)
//! service.
//!
//! Hand-written rather than `igd-next`: that crate's sync client pulls an
//! HTTP client and the `url`/IDNA stack (about twenty crates the agent
//! does not otherwise build) into a CI run that has no minutes left, for
//! four requests to a device on the LAN. What this needs of HTTP and XML
//! is small: one request per connection (`Connection: close`), a
//! Content-Length or chunked body, and the text of a few elements. Only a
//! device answering from the default gateway's address is used (a LAN host
//! must not be able to pose as the router), and every wait is bounded.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::Stop;

const SSDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// How long SSDP answers are waited for.
const DISCOVER: Duration = Duration::from_secs(2);
/// Bound for one HTTP exchange (connect, write, read): a gateway on the
/// LAN answers in milliseconds, and the agent's teardown (4.5 s) may have
/// to wait for one exchange and the deletion's.
const HTTP: Duration = Duration::from_millis(1500);
/// Largest HTTP answer read (a description is a few KiB).
const MAX_BODY: u64 = 256 * 1024;
/// Lease asked for; renewed at half of it.
const LEASE: u32 = 3600;
/// A device that only grants permanent mappings (error 725) is refreshed
/// this often anyway (a router that rebooted forgets them).
const PERMANENT_REFRESH: Duration = Duration::from_secs(1800);
const DEVICES: [&str; 2] = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
];
const SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];

/// A UPnP mapping held on the gateway.
pub struct Upnp {
    control: Url,
    service: String,
    me: Ipv4Addr,
    port: u16,
    external: SocketAddrV4,
    lease: u32,
    renew_at: Instant,
}

impl Upnp {
    /// Discovers the gateway's IGD and maps UDP `port` of `me` to the same
    /// external port.
    pub fn map(gw: Ipv4Addr, me: Ipv4Addr, port: u16, stop: &Stop) -> Result<Upnp, String> {
        let location = discover(gw, me, stop)?;
        let stopped = || match stop.is_set() {
            true => Err("stopped".to_string()),
            false => Ok(()),
        };
        stopped()?;
        let desc = http(&location, "GET", &[], "")?;
        let (service, control) = control_of(&location, &desc, gw)?;
        stopped()?;
        let ip = soap(&control, &service, "GetExternalIPAddress", "")?;
        let ip = external_ip(&ip).ok_or("no usable external address")?;
        let mut u = Upnp {
            control,
            service,
            me,
            port,
            external: SocketAddrV4::new(ip, port),
            lease: LEASE,
            renew_at: Instant::now(),
        };
        stopped()?;
        u.add()?;
        Ok(u)
    }

    pub fn external(&self) -> SocketAddrV4 {
        self.external
    }

    /// When the next renewal is due.
    pub fn due(&self) -> Instant {
        self.renew_at
    }

    fn add(&mut self) -> Result<(), String> {
        match soap(
            &self.control,
            &self.service,
            "AddPortMapping",
            &self.add_args(),
        ) {
            Err(e) if e.contains("725") && self.lease != 0 => {
                self.lease = 0;
                soap(
                    &self.control,
                    &self.service,
                    "AddPortMapping",
                    &self.add_args(),
                )?
            }
            other => other?,
        };
        let half = Duration::from_secs(u64::from(self.lease / 2));
        self.renew_at = Instant::now()
            + match self.lease {
                0 => PERMANENT_REFRESH,
                _ => half.max(Duration::from_secs(2)),
            };
        Ok(())
    }

    fn add_args(&self) -> String {
        format!(
            "<NewRemoteHost></NewRemoteHost><NewExternalPort>{}</NewExternalPort>\
             <NewProtocol>UDP</NewProtocol><NewInternalPort>{}</NewInternalPort>\
             <NewInternalClient>{}</NewInternalClient><NewEnabled>1</NewEnabled>\
             <NewPortMappingDescription>evio overlay</NewPortMappingDescription>\
             <NewLeaseDuration>{}</NewLeaseDuration>",
            self.external.port(),
            self.port,
            self.me,
            self.lease
        )
    }

    pub fn renew_if_due(&mut self, now: Instant) -> Result<(), String> {
        match now >= self.renew_at {
            true => self.add(),
            false => Ok(()),
        }
    }

    /// Clean exit: the mapping goes (best effort, bounded).
    pub fn delete(self) {
        let args = format!(
            "<NewRemoteHost></NewRemoteHost><NewExternalPort>{}</NewExternalPort><NewProtocol>UDP</NewProtocol>",
            self.external.port()
        );
        if let Err(e) = soap(&self.control, &self.service, "DeletePortMapping", &args) {
            tracing::warn!(error = %e, "could not delete the UPnP port mapping");
        }
    }
}

/// SSDP search, multicast and straight to the gateway; the LOCATION of
/// the first IGD that answers from `gw`.
fn discover(gw: Ipv4Addr, me: Ipv4Addr, stop: &Stop) -> Result<Url, String> {
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(me), 0)).map_err(|e| e.to_string())?;
    let _ = sock.set_multicast_ttl_v4(2);
    for st in DEVICES {
        let req = format!(
            "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: {st}\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n\r\n"
        );
        let _ = sock.send_to(req.as_bytes(), SSDP);
        let _ = sock.send_to(req.as_bytes(), SocketAddrV4::new(gw, 1900));
    }
    let end = Instant::now() + DISCOVER;
    let mut buf = [0u8; 2048];
    while !stop.is_set() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Woken by the stop too: a blocking read here held every agent
        // stop (a restart) for the rest of the discovery window.
        if !crate::wait_readable(sock.as_raw_fd(), stop, Some(left)) {
            continue;
        }
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        if from.ip() != IpAddr::V4(gw) {
            continue;
        }
        if let Some(url) = location_of(&String::from_utf8_lossy(&buf[..n]), gw) {
            return Ok(url);
        }
    }
    Err("no Internet Gateway Device answered from the gateway".into())
}

/// The LOCATION of an SSDP answer, if it is a URL on the gateway.
fn location_of(ssdp: &str, gw: Ipv4Addr) -> Option<Url> {
    let url = header(ssdp, "location").and_then(|l| Url::parse(l.trim()))?;
    (url.host == IpAddr::V4(gw)).then_some(url)
}

/// The WAN connection service of a description and its control URL,
/// which must be on the gateway too.
fn control_of(location: &Url, desc: &str, gw: Ipv4Addr) -> Result<(String, Url), String> {
    let (service, path) =
        control_url(desc).ok_or("no WANIPConnection service in its description")?;
    let control = location.join(&path);
    if control.host != IpAddr::V4(gw) {
        return Err(format!(
            "its control URL points away from the gateway: {path}"
        ));
    }
    Ok((service, control))
}

/// The external address of a GetExternalIPAddress answer, if anyone could
/// reach us there.
fn external_ip(answer: &str) -> Option<Ipv4Addr> {
    element(answer, "NewExternalIPAddress")
        .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| evio_overlay::portmap::usable(*ip))
}

/// What the client makes of a gateway's bytes, for the fuzz target
/// (fuzz/src/lib.rs, `upnp`); the agent does not use it.
#[doc(hidden)]
#[derive(Debug)]
pub struct GatewayRead {
    /// The SSDP answer's LOCATION on the gateway: host, port, path.
    pub location: Option<(IpAddr, u16, String)>,
    /// The HTTP answer's body, or why it was refused.
    pub body: Result<String, String>,
    /// The body read as a description: the service and its control URL
    /// (host, port, path), joined to the location.
    pub control: Option<(String, IpAddr, u16, String)>,
    /// The body read as a GetExternalIPAddress answer.
    pub external: Option<Ipv4Addr>,
}

/// Every parser a gateway's bytes reach: `ssdp` as an SSDP answer,
/// `answer` as an HTTP answer whose body is a description and a SOAP
/// answer.
#[doc(hidden)]
pub fn read_gateway_bytes(gw: Ipv4Addr, ssdp: &str, answer: &[u8]) -> GatewayRead {
    let location = location_of(ssdp, gw);
    let body = http_answer(answer, Ok(()));
    let text = body.as_deref().unwrap_or_default();
    let base = location.clone().unwrap_or(Url {
        host: IpAddr::V4(gw),
        port: 80,
        path: "/".into(),
    });
    GatewayRead {
        location: location.map(|u| (u.host, u.port, u.path)),
        control: control_of(&base, text, gw)
            .ok()
            .map(|(s, u)| (s, u.host, u.port, u.path)),
        external: external_ip(text),
        body,
    }
}

/// `http://host:port/path`, IP literals only (a gateway's URLs are).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    host: IpAddr,
    port: u16,
    path: String,
}

impl Url {
    fn parse(s: &str) -> Option<Url> {
        let rest = s.strip_prefix("http://")?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (hostport, 80),
        };
        Some(Url {
            host: host.parse().ok()?,
            port,
            path: path.to_string(),
        })
    }

    /// A URL from a description: absolute, or a path on this one's host.
    fn join(&self, s: &str) -> Url {
        if let Some(u) = Url::parse(s) {
            return u;
        }
        let path = match s.starts_with('/') {
            true => s.to_string(),
            false => format!("/{s}"),
        };
        Url {
            path,
            ..self.clone()
        }
    }
}

/// The value of header `name` (case-insensitive) in an HTTP-style head.
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// The text of the first `<name>` element (any namespace prefix).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<') {
        let start = from + i + 1;
        let end = start + xml[start..].find('>')?;
        let tag = xml[start..end].split_whitespace().next().unwrap_or("");
        let local = tag.rsplit(':').next().unwrap_or(tag);
        if local == name {
            let body = &xml[end + 1..];
            let close = body.find("</")?;
            return Some(&body[..close]);
        }
        from = end;
    }
    None
}

/// The first WAN connection service of a description: its type and
/// control URL.
fn control_url(desc: &str) -> Option<(String, String)> {
    for service in desc.split("<service>").skip(1) {
        let service = service.split("</service>").next()?;
        let Some(kind) = element(service, "serviceType").map(str::trim) else {
            continue;
        };
        if SERVICES.contains(&kind) {
            let url = element(service, "controlURL")?.trim();
            return Some((kind.to_string(), url.to_string()));
        }
    }
    None
}

fn soap(url: &Url, service: &str, action: &str, args: &str) -> Result<String, String> {
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">{args}</u:{action}></s:Body></s:Envelope>\r\n"
    );
    let headers = [
        ("Content-Type", "text/xml; charset=\"utf-8\"".to_string()),
        ("SOAPAction", format!("\"{service}#{action}\"")),
    ];
    http(url, "POST", &headers, &body).map_err(|e| format!("{action}: {e}"))
}

/// One HTTP/1.1 exchange, bounded by [`HTTP`]: the body of a 200 answer,
/// else an error naming the status (and the UPnP error code, if any).
fn http(url: &Url, method: &str, headers: &[(&str, String)], body: &str) -> Result<String, String> {
    let addr = SocketAddr::new(url.host, url.port);
    let end = Instant::now() + HTTP;
    let mut s = TcpStream::connect_timeout(&addr, HTTP).map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_write_timeout(Some(HTTP));
    let mut req = format!(
        "{method} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.path,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let (raw, read) = read_until(&mut s, end);
    http_answer(&raw, read)
}

/// The body of an HTTP answer with status 200, else an error naming the
/// status (and the UPnP error code, if any); `read` is how reading it
/// ended.
fn http_answer(raw: &[u8], read: std::io::Result<()>) -> Result<String, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(at) = split else {
        return Err(match read {
            Err(e) => format!("no answer: {e}"),
            Ok(_) => "no HTTP answer".to_string(),
        });
    };
    let head = String::from_utf8_lossy(&raw[..at]);
    let rest = &raw[at + 4..];
    let status = head.split_whitespace().nth(1).unwrap_or("");
    // Bytes, not text, until the chunks are joined: a chunk may end inside
    // a multi-byte character (or in bytes that are not UTF-8 at all).
    let body = match header(&head, "transfer-encoding") {
        Some(te) if te.eq_ignore_ascii_case("chunked") => dechunk(rest),
        _ => rest.to_vec(),
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != "200" {
        let code = element(&body, "errorCode").unwrap_or("");
        let desc = element(&body, "errorDescription").unwrap_or("");
        return Err(format!("HTTP {status} {code} {desc}").trim().to_string());
    }
    Ok(body)
}

/// Reads until the peer closes, [`MAX_BODY`] bytes or `end`, whichever
/// comes first (a device that drips bytes is cut off at `end`).
fn read_until(s: &mut TcpStream, end: Instant) -> (Vec<u8>, std::io::Result<()>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || raw.len() as u64 >= MAX_BODY {
            return (raw, Err(std::io::ErrorKind::TimedOut.into()));
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => return (raw, Ok(())),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return (raw, Err(e)),
        }
    }
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let (size, rest) = (&s[..eol], &s[eol + 2..]);
        let Some(n) = std::str::from_utf8(size)
            .ok()
            .and_then(|x| usize::from_str_radix(x.trim(), 16).ok())
        else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = &rest[n..];
        while let Some(r) = s.strip_prefix(b"\r\n") {
            s = r;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of miniupnpd 2.3.1's rootDesc.xml this reads.
    const DESC: &str = r#"<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></root>"#;

    #[test]
    fn finds_the_wan_connection_service() {
        assert_eq!(
            control_url(DESC),
            Some((
                "urn:schemas-upnp-org:service:WANIPConnection:1".into(),
                "/ctl/IPConn".into()
            ))
        );
        assert_eq!(control_url("<root><service></service></root>"), None);
        assert_eq!(control_url("garbage <service><serviceType>"), None);
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://192.168.1.1:42401/rootDesc.xml").unwrap();
        assert_eq!(u.port, 42401);
        assert_eq!(u.join("/ctl/IPConn").path, "/ctl/IPConn");
        assert_eq!(u.join("ctl/IPConn").path, "/ctl/IPConn");
        assert_eq!(
            u.join("http://10.0.0.1/x").host,
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(Url::parse("http://192.168.1.1").unwrap().path, "/");
        assert!(Url::parse("https://192.168.1.1/").is_none());
        assert!(
            Url::parse("http://router.lan/").is_none(),
            "IP literals only"
        );
        assert!(Url::parse("http://192.168.1.1:99999/").is_none());
    }

    #[test]
    fn headers_elements_and_chunks() {
        let ssdp = "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nLocation: http://192.168.1.1:5000/d.xml\r\n\r\n";
        assert_eq!(
            header(ssdp, "LOCATION"),
            Some("http://192.168.1.1:5000/d.xml")
        );
        assert_eq!(header(ssdp, "ST"), None);
        let answer = "<s:Envelope><s:Body><u:GetExternalIPAddressResponse xmlns:u=\"x\">\
            <NewExternalIPAddress>203.0.113.10</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>";
        assert_eq!(
            element(answer, "NewExternalIPAddress"),
            Some("203.0.113.10")
        );
        assert_eq!(element(answer, "Missing"), None);
        assert_eq!(element("<a><b>", "b"), None, "unclosed");
        let fault = "<s:Fault><detail><UPnPError><errorCode>718</errorCode>\
            <errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>";
        assert_eq!(element(fault, "errorCode"), Some("718"));
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            b"hello world"
        );
        assert_eq!(dechunk(b"zz\r\nhello"), b"");
        assert_eq!(dechunk(b"ff\r\nshort"), b"");
    }

    /// Found by the `upnp` fuzz target: a chunk that ends inside a
    /// multi-byte character (or a body that is not UTF-8) panicked the
    /// port-mapping thread.
    #[test]
    fn chunks_are_joined_as_bytes() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\xc3\r\n2\r\n\xa9\xff\r\n0\r\n\r\n";
        assert_eq!(http_answer(answer, Ok(())).as_deref(), Ok("\u{e9}\u{fffd}"));
        let r = read_gateway_bytes(
            Ipv4Addr::new(192, 168, 1, 1),
            "LOCATION: http://192.168.1.1:5000/d.xml\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\xe2\x82\r\n",
        );
        assert_eq!(r.location.map(|l| l.1), Some(5000));
        assert!(r.body.is_ok() && r.control.is_none());
    }
}
