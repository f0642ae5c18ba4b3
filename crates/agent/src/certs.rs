//! The etcd TLS certificates' expiry, for the metrics and the log: the
//! agent's store connection dies with its certificates, and nothing else
//! tells the operator before it does.
//!
//! Each certificate file the agent hands to its etcd client (the CA bundle
//! and the client certificate; the key has no date) is read when the store
//! thread notices the files changed on disk, the same moment it connects
//! again with them. A file may hold several certificates (a CA bundle during
//! a CA rotation, a client certificate with its intermediates): the earliest
//! `notAfter` is the one that matters, so that is the one reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use evio_subnet::EtcdOptions;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_cert::der::Decode;

/// A certificate this close to its end is warned about.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// While that holds, the warning comes again this often (the first one may
/// have scrolled away long before the day it matters).
pub const WARN_EVERY: Duration = Duration::from_secs(86_400);

/// One certificate file of the etcd client and its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFile {
    /// `ca` (the bundle that verifies the server) or `client`.
    pub role: &'static str,
    pub path: PathBuf,
    /// The earliest `notAfter` of the file's certificates, in Unix seconds,
    /// or why the file gave none.
    pub not_after: Result<u64, String>,
}

/// The earliest `notAfter` (Unix seconds) of the PEM certificates in `pem`.
/// Text around the sections and sections of other kinds are skipped, as
/// the TLS client's own loader does.
pub fn earliest_not_after(pem: &[u8]) -> Result<u64, String> {
    let mut earliest: Option<u64> = None;
    for (i, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let n = i + 1;
        let der = der.map_err(|e| format!("certificate {n}: bad PEM: {e}"))?;
        let cert = x509_cert::Certificate::from_der(&der)
            .map_err(|e| format!("certificate {n}: not an X.509 certificate: {e}"))?;
        let end = cert.tbs_certificate.validity.not_after.to_unix_duration();
        earliest = Some(earliest.map_or(end.as_secs(), |e| e.min(end.as_secs())));
    }
    earliest.ok_or_else(|| "no PEM CERTIFICATE section in it".to_string())
}

fn read_file(role: &'static str, path: &Path) -> CertFile {
    let not_after = std::fs::read(path)
        .map_err(|e| format!("cannot read it: {e}"))
        .and_then(|pem| earliest_not_after(&pem));
    CertFile {
        role,
        path: path.to_path_buf(),
        not_after,
    }
}

/// The certificate files the etcd client is configured with, read now.
pub fn read(opts: &EtcdOptions) -> Vec<CertFile> {
    [("ca", &opts.ca_file), ("client", &opts.cert_file)]
        .into_iter()
        .filter_map(|(role, p)| Some(read_file(role, p.as_deref()?)))
        .collect()
}

/// What is wrong with a certificate file, as the log says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Unreadable(String),
    /// Expires at this Unix time, within [`WARN_BEFORE`].
    Soon(u64),
    Expired(u64),
}

/// What to warn about `f` at Unix time `now`; `None` while it is fine.
pub fn verdict(f: &CertFile, now: u64) -> Option<Verdict> {
    match &f.not_after {
        Err(e) => Some(Verdict::Unreadable(e.clone())),
        Ok(t) if *t <= now => Some(Verdict::Expired(*t)),
        Ok(t) if t - now <= WARN_BEFORE.as_secs() => Some(Verdict::Soon(*t)),
        Ok(_) => None,
    }
}

/// Says each certificate problem once when it appears or changes, and a
/// looming or past expiry again every [`WARN_EVERY`]; an unreadable file
/// once per error (the store error says the rest).
#[derive(Default)]
pub struct ExpiryLog {
    told: HashMap<(&'static str, PathBuf), (Instant, Verdict)>,
}

impl ExpiryLog {
    /// Checks `files` at wall time `wall` and monotonic time `now`; returns
    /// the warnings it logged (for tests).
    pub fn check(&mut self, files: &[CertFile], wall: SystemTime, now: Instant) -> Vec<String> {
        let unix = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut said = Vec::new();
        self.told
            .retain(|k, _| files.iter().any(|f| (f.role, &f.path) == (k.0, &k.1)));
        for f in files {
            let key = (f.role, f.path.clone());
            let Some(v) = verdict(f, unix) else {
                self.told.remove(&key);
                continue;
            };
            let again = match self.told.get(&key) {
                None => true,
                Some((_, old)) if *old != v => true,
                Some((_, Verdict::Unreadable(_))) => false,
                Some((at, _)) => now.saturating_duration_since(*at) >= WARN_EVERY,
            };
            if again {
                let line = say(f, &v, unix);
                tracing::warn!("{line}");
                said.push(line);
                self.told.insert(key, (now, v));
            }
        }
        said
    }
}

fn say(f: &CertFile, v: &Verdict, now: u64) -> String {
    let file = f.path.display();
    let role = f.role;
    let date =
        |t: u64| humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(t));
    match v {
        Verdict::Unreadable(e) => format!(
            "etcd {role} certificate {file}: no expiry known ({e}); \
             evio_overlay_cert_not_after_timestamp_seconds is absent for it"
        ),
        Verdict::Expired(t) => format!(
            "etcd {role} certificate {file} expired at {}: the store connection fails \
             until it is replaced (docs/operations.md, \"Rotating keys and certificates\")",
            date(*t)
        ),
        Verdict::Soon(t) => format!(
            "etcd {role} certificate {file} expires at {} (in {} days): replace it before \
             (docs/operations.md, \"Rotating keys and certificates\")",
            date(*t),
            (t - now) / 86_400
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A self-signed certificate made by the `openssl` CLI (as the test
    /// kit's etcd certificates are), valid for `days`; its notAfter as
    /// openssl prints it.
    fn openssl_cert(dir: &Path, name: &str, days: &str) -> (PathBuf, u64) {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args(["-days", days, "-subj", &format!("/CN={name}")])
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        (crt.clone(), openssl_end(&crt))
    }

    /// `openssl x509 -enddate` as Unix seconds (`date` does the parsing).
    fn openssl_end(crt: &Path) -> u64 {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(crt)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let date = text.trim().strip_prefix("notAfter=").unwrap().to_string();
        let out = Command::new("date")
            .args(["-u", "+%s", "-d", &date])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// The parsed date is openssl's own; a bundle reports its earliest
    /// certificate whatever the order, text between sections and a key
    /// section are skipped.
    #[test]
    fn a_bundle_reports_its_earliest_not_after() {
        let d = tempfile::tempdir().unwrap();
        let (long, long_end) = openssl_cert(d.path(), "long", "400");
        let (short, short_end) = openssl_cert(d.path(), "short", "3");
        assert!(short_end < long_end);
        let one = std::fs::read(&long).unwrap();
        assert_eq!(earliest_not_after(&one), Ok(long_end));
        let mut bundle = b"Bag Attributes: from a pkcs12 export\n".to_vec();
        bundle.extend(&one);
        bundle.extend(std::fs::read(d.path().join("long.key")).unwrap());
        bundle.extend(std::fs::read(&short).unwrap());
        assert_eq!(earliest_not_after(&bundle), Ok(short_end));
    }

    /// Garbage, an empty file, a key alone, a broken section and a missing
    /// file each give a reason, never a panic or a date.
    #[test]
    fn unreadable_files_give_a_reason() {
        let d = tempfile::tempdir().unwrap();
        let (crt, _) = openssl_cert(d.path(), "c", "10");
        let good = std::fs::read_to_string(&crt).unwrap();
        let key = std::fs::read(d.path().join("c.key")).unwrap();
        let body: Vec<&str> = good.lines().collect();
        let broken = format!("{}\n!!!!\n{}\n", body[0], body[body.len() - 1]);
        let mut not_x509 = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        not_x509.extend(b"aGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n");
        for (what, bytes) in [
            ("garbage", b"\x00\xffnot pem at all".to_vec()),
            ("empty", Vec::new()),
            ("a key alone", key),
            ("a broken section", broken.into_bytes()),
            ("not X.509 inside", not_x509),
        ] {
            let r = earliest_not_after(&bytes);
            assert!(r.is_err(), "{what}: {r:?}");
        }
        let missing = read_file("ca", &d.path().join("nope.crt"));
        assert!(missing.not_after.unwrap_err().contains("cannot read"));
    }

    /// Only configured files are read, each with its role.
    #[test]
    fn the_ca_and_client_files_of_the_options() {
        let d = tempfile::tempdir().unwrap();
        let (crt, end) = openssl_cert(d.path(), "c", "10");
        let opts = EtcdOptions {
            ca_file: Some(d.path().join("missing.crt")),
            cert_file: Some(crt.clone()),
            key_file: Some(d.path().join("c.key")),
            ..EtcdOptions::default()
        };
        let files = read(&opts);
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!((files[0].role, files[0].not_after.is_err()), ("ca", true));
        assert_eq!(
            files[1],
            CertFile {
                role: "client",
                path: crt,
                not_after: Ok(end),
            }
        );
        assert!(read(&EtcdOptions::default()).is_empty());
    }

    fn file(path: &str, not_after: Result<u64, String>) -> CertFile {
        CertFile {
            role: "client",
            path: PathBuf::from(path),
            not_after,
        }
    }

    /// A warning when 30 days or fewer are left or the date has passed,
    /// again a day later or when it changes, none for a fine certificate;
    /// an unreadable file once.
    #[test]
    fn expiry_warnings_are_said_once_a_day() {
        let day = 86_400;
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 * day);
        let now = 1000 * day;
        let t0 = Instant::now();
        let mut log = ExpiryLog::default();
        let fine = file("/a", Ok(now + 31 * day));
        let soon = file("/b", Ok(now + 30 * day));
        let gone = file("/c", Ok(now - 1));
        let bad = file("/d", Err("no PEM CERTIFICATE section in it".into()));
        let files = [fine.clone(), soon.clone(), gone.clone(), bad.clone()];
        let said = log.check(&files, wall, t0);
        assert_eq!(said.len(), 3, "{said:#?}");
        assert!(said[0].contains("/b expires at") && said[0].contains("in 30 days"));
        assert!(said[1].contains("/c expired at"), "{}", said[1]);
        assert!(
            said[2].contains("/d: no expiry known (no PEM"),
            "{}",
            said[2]
        );
        let hour = t0 + Duration::from_secs(3600);
        assert!(log.check(&files, wall, hour).is_empty());
        let next_day = t0 + WARN_EVERY;
        let said = log.check(&files, wall, next_day);
        assert_eq!(
            said.len(),
            2,
            "soon and expired again, not the bad file: {said:#?}"
        );
        // Replaced: the new date is fine, and nothing more is said of it.
        let renewed = [file("/b", Ok(now + 90 * day))];
        assert!(log.check(&renewed, wall, next_day).is_empty());
        // The bad file fixed, then broken again: said again.
        let again = log.check(&files, wall, next_day);
        assert!(again.iter().any(|l| l.contains("/d:")), "{again:#?}");
        assert_eq!(verdict(&fine, now), None);
        assert_eq!(verdict(&soon, now), Some(Verdict::Soon(now + 30 * day)));
    }
}
