//! A CRI v1 client, the calls the kubelet makes to bring pods up and down:
//! the generated `k8s-cri` RuntimeService client over the runtime's unix
//! socket. Synchronous (each call bounded), because the tests around it are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandbox, PodSandboxMetadata,
    PodSandboxStatusRequest, PodSandboxStatusResponse, PortMapping, Protocol,
    RemovePodSandboxRequest, RunPodSandboxRequest, StatusRequest, StopPodSandboxRequest,
    VersionRequest, VersionResponse,
};
use serde_json::Value;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The sandbox config callers build or adjust.
pub use k8s_cri::v1::PodSandboxConfig;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connect to {path}: {detail}")]
    Connect { path: PathBuf, detail: String },
    #[error("{call}: {status}")]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{call}: no answer within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    #[error("{call}: {detail}")]
    Answer { call: &'static str, detail: String },
}

/// One connection to a CRI runtime service.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    timeout: Duration,
}

impl Cri {
    /// Connects to the CRI socket at `path`; every call is bounded by
    /// `timeout` (RunPodSandbox runs the whole CNI ADD inside it).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Cri, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let socket = path.to_path_buf();
        let connect_err = |detail: String| CriError::Connect {
            path: path.to_path_buf(),
            detail,
        };
        // The URI is a placeholder: the connector ignores it and dials the
        // socket, which is how tonic speaks gRPC over a unix socket.
        let endpoint = Endpoint::try_from("http://[::1]:50051")
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = rt
            .block_on(async {
                tokio::time::timeout(
                    timeout,
                    endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                UnixStream::connect(socket).await?,
                            ))
                        }
                    })),
                )
                .await
            })
            .map_err(|_| connect_err(format!("no connection within {timeout:?}")))?
            .map_err(|e| connect_err(format!("{e:?}")))?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
            timeout,
        })
    }

    fn call<T, F>(&mut self, call: &'static str, f: F) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = self.timeout;
        // The timer must be made inside the runtime: it needs its clock.
        match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, f).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(CriError::Rpc {
                call,
                status: Box::new(status),
            }),
            Err(_) => Err(CriError::Timeout { call, timeout }),
        }
    }

    pub fn version(&mut self) -> Result<VersionResponse, CriError> {
        let mut c = self.client.clone();
        self.call("Version", async move {
            c.version(VersionRequest {
                version: "v1".into(),
            })
            .await
        })
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`): status
    /// and message by type.
    pub fn status(&mut self) -> Result<BTreeMap<String, (bool, String)>, CriError> {
        let mut c = self.client.clone();
        let r = self.call("Status", async move {
            c.status(StatusRequest { verbose: false }).await
        })?;
        Ok(r.status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .map(|c| (c.r#type.clone(), (c.status, c.message.clone())))
            .collect())
    }

    pub fn run_pod_sandbox(&mut self, config: PodSandboxConfig) -> Result<String, CriError> {
        let mut c = self.client.clone();
        let r = self.call("RunPodSandbox", async move {
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })?;
        Ok(r.pod_sandbox_id)
    }

    /// RunPodSandbox for all `configs` at once (concurrent requests on one
    /// connection, as the kubelet's pod workers make them); results in order.
    pub fn run_pod_sandboxes(
        &mut self,
        configs: Vec<PodSandboxConfig>,
    ) -> Vec<Result<String, CriError>> {
        let timeout = self.timeout;
        let client = self.client.clone();
        self.rt.block_on(async move {
            let tasks: Vec<_> = configs
                .into_iter()
                .map(|config| {
                    let mut c = client.clone();
                    tokio::spawn(async move {
                        let req = RunPodSandboxRequest {
                            config: Some(config),
                            runtime_handler: String::new(),
                        };
                        tokio::time::timeout(timeout, c.run_pod_sandbox(req)).await
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(match t.await {
                    Ok(Ok(Ok(r))) => Ok(r.into_inner().pod_sandbox_id),
                    Ok(Ok(Err(status))) => Err(CriError::Rpc {
                        call: "RunPodSandbox",
                        status: Box::new(status),
                    }),
                    Ok(Err(_)) => Err(CriError::Timeout {
                        call: "RunPodSandbox",
                        timeout,
                    }),
                    Err(e) => Err(CriError::Answer {
                        call: "RunPodSandbox",
                        detail: format!("task: {e}"),
                    }),
                });
            }
            out
        })
    }

    pub fn pod_sandbox_status(&mut self, id: &str) -> Result<SandboxStatus, CriError> {
        let mut c = self.client.clone();
        let id = id.to_string();
        let r = self.call("PodSandboxStatus", async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })?;
        SandboxStatus::from_response(r)
    }

    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let mut c = self.client.clone();
        let id = id.to_string();
        self.call("StopPodSandbox", async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(|_| ())
    }

    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let mut c = self.client.clone();
        let id = id.to_string();
        self.call("RemovePodSandbox", async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(|_| ())
    }

    pub fn list_pod_sandboxes(&mut self) -> Result<Vec<PodSandbox>, CriError> {
        let mut c = self.client.clone();
        let r = self.call("ListPodSandbox", async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
        })?;
        Ok(r.items)
    }
}

/// What a test needs from PodSandboxStatus.
#[derive(Debug, Clone)]
pub struct SandboxStatus {
    pub id: String,
    /// The pod's name and UID from the sandbox metadata.
    pub name: String,
    pub uid: String,
    pub ready: bool,
    /// The pod IP as reported (empty when the runtime has none).
    pub ip: String,
    /// The sandbox's network namespace, from the verbose info's runtime
    /// spec (containerd's `info` key).
    pub netns: Option<PathBuf>,
    /// The pause process, from the verbose info.
    pub pid: Option<u32>,
    /// The verbose `info` JSON, for failure messages.
    pub info: Value,
}

impl SandboxStatus {
    fn from_response(r: PodSandboxStatusResponse) -> Result<SandboxStatus, CriError> {
        let s = r.status.ok_or(CriError::Answer {
            call: "PodSandboxStatus",
            detail: "no status".into(),
        })?;
        let info: Value = r
            .info
            .get("info")
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(Value::Null);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let pid = info["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
        let (name, uid) = s.metadata.map(|m| (m.name, m.uid)).unwrap_or_default();
        Ok(SandboxStatus {
            id: s.id,
            name,
            uid,
            // SANDBOX_READY is 0 in the protocol.
            ready: s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32,
            ip: s.network.map(|n| n.ip).unwrap_or_default(),
            netns,
            pid,
            info,
        })
    }
}

/// A sandbox config as the kubelet sends it for pod `namespace/name`:
/// metadata with a UID, a cgroup parent and any host port mappings (TCP).
pub fn sandbox_config(
    name: &str,
    namespace: &str,
    uid: &str,
    cgroup_parent: &str,
    ports: &[(i32, i32)],
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        port_mappings: ports
            .iter()
            .map(|(container_port, host_port)| PortMapping {
                protocol: Protocol::Tcp as i32,
                container_port: *container_port,
                host_port: *host_port,
                host_ip: String::new(),
            })
            .collect(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
