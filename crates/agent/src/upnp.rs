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
        let (service, path) =
            control_url(&desc).ok_or("no WANIPConnection service in its description")?;
        let control = location.join(&path);
        if control.host != IpAddr::V4(gw) {
            return Err(format!(
                "its control URL points away from the gateway: {path}"
            ));
        }
        stopped()?;
        let ip = soap(&control, &service, "GetExternalIPAddress", "")?;
        let ip = element(&ip, "NewExternalIPAddress")
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .filter(|ip| evio_overlay::portmap::usable(*ip))
            .ok_or("no usable external address")?;
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
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(url) = header(&text, "location").and_then(|l| Url::parse(l.trim())) {
            if url.host == IpAddr::V4(gw) {
                return Ok(url);
            }
        }
    }
    Err("no Internet Gateway Device answered from the gateway".into())
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
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| match read {
        Err(e) => format!("no answer: {e}"),
        Ok(_) => "no HTTP answer".to_string(),
    })?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let body = match header(head, "transfer-encoding") {
        Some(te) if te.eq_ignore_ascii_case("chunked") => dechunk(rest),
        _ => rest.to_string(),
    };
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

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
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
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(dechunk("zz\r\nhello"), "");
        assert_eq!(dechunk("ff\r\nshort"), "");
    }
}
