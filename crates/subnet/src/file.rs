use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipnet::IpNet;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::store::existing;
use crate::{
    parse_subnet_key, subnet_key, validate_name, Allocation, Lease, OwnerRecord, PodNetwork,
    SubnetError, SubnetStore, UsedSet,
};

/// The embedded store: one JSON file mirroring the etcd layout, guarded by
/// an exclusive `flock` on a sibling `.lock` file (the data file itself is
/// replaced by rename on every write, so it cannot carry the lock).
pub struct FileStore {
    path: PathBuf,
    lock_path: PathBuf,
    timeout: Duration,
    trips: AtomicU64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct FileData {
    #[serde(default)]
    pub(crate) networks: BTreeMap<String, NetData>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct NetData {
    /// node name -> subnet (CIDR text), as `/evio/<net>/nodes/<node>`.
    #[serde(default)]
    pub(crate) nodes: BTreeMap<String, String>,
    /// `<addr>-<prefix>` -> owner, as `/evio/<net>/subnets/<key>`.
    #[serde(default)]
    pub(crate) subnets: BTreeMap<String, OwnerRecord>,
    /// node name -> overlay record, as `/evio/<net>/peers/<node>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) peers: BTreeMap<String, crate::PeerRecord>,
    /// host address -> owner, as `/evio/<net>/hostaddrs/<ip>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) hostaddrs: BTreeMap<String, OwnerRecord>,
    /// node name -> host address, as `/evio/<net>/hostnodes/<node>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) hostnodes: BTreeMap<String, String>,
    /// node name -> its IPv6 host address beside an IPv4 one (dual-stack
    /// `hostCIDR`), as `/evio/<net>/hostnodes6/<node>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) hostnodes6: BTreeMap<String, String>,
    /// node name -> what its agent last said, as `/evio/<net>/alive/<node>`
    /// (live while the heartbeat is fresh: the file store has no leases).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) alive: BTreeMap<String, crate::Alive>,
    /// node name -> why its allocations were freed, as
    /// `/evio/<net>/released/<node>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) released: BTreeMap<String, crate::Released>,
    /// Keys a newer version wrote, kept through this one's rewrites.
    #[serde(flatten)]
    pub(crate) extra: serde_json::Map<String, serde_json::Value>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SubnetError + '_ {
    move |source| SubnetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `bytes` so that readers see either the old or the
/// new content, never a mix, and a crash or full disk leaves the old file:
/// write a temp file in the same directory, fsync it, rename over, fsync the
/// directory so the rename itself is durable.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SubnetError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{}{}.{:08x}",
        temp_prefix(&name),
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask must not decide what the kubelet (or another node) can read.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp.")
}

/// Whether `file` is exactly a temp name [`write_file_atomic`] gives
/// `name`: `.NAME.tmp.PID.XXXXXXXX` (PID in decimal, 8 hex digits).
fn is_temp_of(file: &std::ffi::OsStr, name: &str) -> bool {
    let Some(rest) = file
        .to_str()
        .and_then(|f| f.strip_prefix(temp_prefix(name).as_str()))
    else {
        return false;
    };
    let Some((pid, random)) = rest.split_once('.') else {
        return false;
    };
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 8
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A writer that is still running renames its temp file within
/// milliseconds; anything older was left by a crash.
const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// Removes the temp files a crashed [`write_file_atomic`] of `dir/name`
/// left behind. Only regular files (never through a symlink) named
/// exactly as that function names them and older than a live writer's
/// are removed; the paths removed are returned. Failures are not errors:
/// a leftover costs disk space, not correctness.
pub fn remove_leftover_temps(dir: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if !is_temp_of(&entry.file_name(), name) {
            continue;
        }
        // DirEntry::metadata does not follow symlinks.
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= LEFTOVER_AGE);
        if meta.file_type().is_file() && old && fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

impl FileStore {
    /// `timeout` bounds waiting for the lock.
    pub fn new(path: PathBuf, timeout: Duration) -> FileStore {
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        FileStore {
            path,
            lock_path: PathBuf::from(lock),
            timeout,
            trips: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn lock(&self) -> Result<Flock<File>, SubnetError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&self.lock_path)
            .map_err(io_err(&self.lock_path))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(100);
        // Non-blocking attempts: a blocking flock could not be abandoned when
        // the timeout expires. The pause stays at most 1 ms: the critical
        // section is about that long, and a longer backoff let waiters sleep
        // through free periods, which pushed the p99 of 32 concurrent
        // allocations to 0.4-0.8 s (docs/benchmarks.md).
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(guard) => return Ok(guard),
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                    if start.elapsed() >= self.timeout {
                        return Err(SubnetError::LockTimeout {
                            path: self.lock_path.clone(),
                            after: self.timeout,
                        });
                    }
                    file = f;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
                Err((_, e)) => {
                    return Err(SubnetError::Io {
                        path: self.lock_path.clone(),
                        source: e.into(),
                    })
                }
            }
        }
    }

    pub(crate) fn read(&self) -> Result<FileData, SubnetError> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SubnetError::Corrupt {
                location: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileData::default()),
            Err(e) => Err(io_err(&self.path)(e)),
        }
    }

    pub(crate) fn write(&self, data: &FileData) -> Result<(), SubnetError> {
        let mut bytes = serde_json::to_vec_pretty(data).map_err(|e| SubnetError::Corrupt {
            location: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_file_atomic(&self.path, &bytes, 0o644)
    }

    fn parse_node_value(&self, network: &str, node: &str, v: &str) -> Result<IpNet, SubnetError> {
        v.parse().map_err(|_| SubnetError::Corrupt {
            location: format!("{} networks.{network}.nodes.{node}", self.path.display()),
            reason: format!("{v:?} is not a CIDR"),
        })
    }
}

#[async_trait]
impl SubnetStore for FileStore {
    async fn allocate(
        &self,
        network: &str,
        node: &str,
        pod: &PodNetwork,
    ) -> Result<Allocation, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let net = data.networks.entry(network.to_string()).or_default();
        if let Some(v) = net.nodes.get(node) {
            let subnet = self.parse_node_value(network, node, v)?;
            let ns = existing(pod, node, subnet)?;
            let key = subnet_key(&subnet);
            // Without its subnet entry the slot would look free to others:
            // put it back (hand edits, partial restores).
            match net.subnets.get(&key) {
                Some(r) if r.node == node => {}
                Some(r) => {
                    return Err(SubnetError::Corrupt {
                        location: format!(
                            "{} networks.{network}.subnets.{key}",
                            self.path.display()
                        ),
                        reason: format!(
                            "node {node:?} records {subnet} but the subnet is owned by {:?}",
                            r.node
                        ),
                    })
                }
                None => {
                    net.subnets.insert(key, OwnerRecord::now(node, &subnet));
                    self.write(&data)?;
                }
            }
            return Ok(Allocation {
                subnet: ns,
                existing: true,
            });
        }
        let used =
            UsedSet::from_subnets(*pod, net.subnets.keys().filter_map(|k| parse_subnet_key(k)));
        let index = used.first_free().ok_or_else(|| SubnetError::Exhausted {
            network: network.to_string(),
            cidr: pod.cidr(),
            capacity: pod.capacity(),
        })?;
        let ns = pod.node(index)?;
        net.nodes.insert(node.to_string(), ns.subnet.to_string());
        net.subnets
            .insert(subnet_key(&ns.subnet), OwnerRecord::now(node, &ns.subnet));
        self.write(&data)?;
        Ok(Allocation {
            subnet: ns,
            existing: false,
        })
    }

    async fn lookup(&self, network: &str, node: &str) -> Result<Option<IpNet>, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        // Unlocked: writers replace the file by rename, so any read sees a
        // complete version.
        let data = self.read()?;
        match data.networks.get(network).and_then(|n| n.nodes.get(node)) {
            Some(v) => Ok(Some(self.parse_node_value(network, node, v)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, network: &str) -> Result<Vec<Lease>, SubnetError> {
        validate_name("network name", network)?;
        let data = self.read()?;
        let mut out: Vec<Lease> = data
            .networks
            .get(network)
            .map(|n| {
                n.subnets
                    .iter()
                    .filter_map(|(k, r)| {
                        parse_subnet_key(k).map(|subnet| Lease {
                            subnet,
                            record: r.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|l| (l.subnet.network(), l.subnet.prefix_len()));
        Ok(out)
    }

    async fn release(&self, network: &str, node: &str) -> Result<IpNet, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let not_found = || SubnetError::NotFound {
            network: network.to_string(),
            node: node.to_string(),
        };
        let net = data.networks.get_mut(network).ok_or_else(not_found)?;
        let Some(v) = net.nodes.remove(node) else {
            // No node entry, but maybe subnet entries still naming the node
            // (a partial edit): free those so their slots come back.
            let orphans: Vec<String> = net
                .subnets
                .iter()
                .filter(|(_, r)| r.node == node)
                .map(|(k, _)| k.clone())
                .collect();
            let first = orphans
                .first()
                .and_then(|k| parse_subnet_key(k))
                .ok_or_else(not_found)?;
            for k in &orphans {
                net.subnets.remove(k);
            }
            self.write(&data)?;
            return Ok(first);
        };
        let subnet = self.parse_node_value(network, node, &v)?;
        let key = subnet_key(&subnet);
        // Only free the subnet key if it is really this node's: never take a
        // subnet away from another node because of an inconsistent record.
        if net.subnets.get(&key).is_some_and(|r| r.node == node) {
            net.subnets.remove(&key);
        }
        self.write(&data)?;
        Ok(subnet)
    }

    fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;

    /// Backdates `path` itself (not a symlink's target) past LEFTOVER_AGE.
    fn age(path: &Path) {
        let old = TimeSpec::new(1_000_000_000, 0);
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &old,
            &old,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    #[test]
    fn only_old_regular_temps_of_the_exact_pattern_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        fs::write(&target, b"keep").unwrap();
        let p = |n: &str| d.path().join(n);

        let leftover = p(".evio.tmp.4242.0a1b2c3d");
        fs::write(&leftover, b"x").unwrap();
        age(&leftover);
        let live = p(".evio.tmp.4243.0a1b2c3d");
        fs::write(&live, b"x").unwrap();
        let link = p(".evio.tmp.4244.0a1b2c3d");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        age(&link);
        let dir = p(".evio.tmp.4245.0a1b2c3d");
        fs::create_dir(&dir).unwrap();
        age(&dir);
        let mut near_misses = Vec::new();
        for n in [
            ".evio.tmp.x.0a1b2c3d",
            ".evio.tmp.1.0a1b2c3g",
            ".evio.tmp.1.0a1b2c3",
            ".evio.tmp..0a1b2c3d",
            ".evio.tmp.1.0a1b2c3d.more",
            ".other.tmp.1.0a1b2c3d",
            "evio.tmp.1.0a1b2c3d",
            "evio",
        ] {
            fs::write(p(n), b"x").unwrap();
            age(&p(n));
            near_misses.push(p(n));
        }

        assert_eq!(
            remove_leftover_temps(d.path(), "evio"),
            vec![leftover.clone()]
        );
        assert!(!leftover.exists());
        assert!(live.exists(), "a live writer's temp file");
        assert!(link.symlink_metadata().is_ok(), "symlinks are not removed");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert!(dir.is_dir());
        for n in near_misses {
            assert!(n.exists(), "{}", n.display());
        }
        assert!(remove_leftover_temps(&d.path().join("missing"), "evio").is_empty());
    }

    #[test]
    fn the_writer_names_temps_as_the_cleaner_expects() {
        let name = format!("{}{}.{:08x}", temp_prefix("evio"), std::process::id(), 7u32);
        assert!(is_temp_of(std::ffi::OsStr::new(&name), "evio"));
    }
}
