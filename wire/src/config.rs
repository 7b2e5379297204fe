//! The cluster file (TOML): the model, the gateway, prefill pipelines (stage
//! addresses, automatic or explicit layer split), decode groups (address,
//! TP), transport and limits. [`ClusterFile::parse`] reads it;
//! [`ClusterFile::validate`] checks it against the model once, at start, with
//! messages that say what to change.
//!
//! ```toml
//! [cluster]
//! name = "demo"
//!
//! [gateway]
//! http = "127.0.0.1:8000"
//! quic = "127.0.0.1:7000"
//!
//! [[prefill]]
//! name = "p0"
//! chunk = 256
//! stages = [
//!   { name = "p0-s0", addr = "127.0.0.1:7101", layers = [0, 15] },
//!   { name = "p0-s1", addr = "127.0.0.1:7102", layers = [15, 30] },
//! ]
//!
//! [[decode]]
//! name = "d0"
//! addr = "127.0.0.1:7201"
//! tp = 3
//! ```

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_model::cuda::GpuDtype;
use tandem_model::{Device, KvDtype, ModelConfig, SliceSpec};

use crate::addr::NodeAddr;
use crate::error::{Result, WireError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub cluster: ClusterSection,
    pub gateway: GatewaySection,
    #[serde(default)]
    pub prefill: Vec<PipelineSection>,
    #[serde(default)]
    pub decode: Vec<DecodeSection>,
    #[serde(default)]
    pub transport: TransportSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub sampling: SamplingSection,
}

/// What a request that leaves a sampling field out gets. Each key left
/// out here falls back to the model's own default (GGUF
/// `general.sampling.*`, or `generation_config.json`), then to llama.cpp's
/// sampler chain (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingSection {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 turns the cut off.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Tokens generated when a request names no `max_tokens` (fewer when
    /// the context has less room left).
    pub max_tokens: Option<usize>,
    /// Most choices (`n`) one request may ask for.
    pub max_choices: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    /// GGUF file or Hugging Face directory; the embedded default model when absent.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Tokens per KV block.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// KV storage: f32, f16 or bf16.
    #[serde(default = "default_kv_dtype")]
    pub kv_dtype: String,
    /// Directory made by `tandem certs`.
    #[serde(default)]
    pub certs: Option<PathBuf>,
    /// The model name clients give (`model` in requests); by default the
    /// model file's name without its quantization tag.
    #[serde(default)]
    pub served_model_name: Option<String>,
    /// How KV moves from prefill stages to decode groups, unless a pipeline
    /// says otherwise: `auto` (UCX when the library loads, else QUIC with a
    /// warning), `ucx` or `quic`.
    #[serde(default)]
    pub kv_transport: KvTransport,
    /// Weight precision of nodes on GPUs: `bf16` (default) or `f32`.
    #[serde(default = "default_gpu_dtype")]
    pub gpu_dtype: String,
}

fn default_gpu_dtype() -> String {
    "bf16".into()
}

/// How a pipeline's stages send KV to decode groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvTransport {
    /// UCX when the library loads (RDMA, shared memory or TCP, as UCX
    /// picks; `UCX_TLS`/`UCX_NET_DEVICES` apply), else QUIC.
    #[default]
    Auto,
    /// UCX, or the node refuses to start.
    Ucx,
    /// The QUIC link between the nodes.
    Quic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    #[serde(default = "default_gateway_name")]
    pub name: String,
    /// Where clients reach the OpenAI-compatible API.
    pub http: NodeAddr,
    /// Where nodes reach the gateway.
    pub quic: NodeAddr,
    /// Requests in flight (running or queued anywhere) before new ones get 429.
    #[serde(default = "default_gateway_queue")]
    pub max_queue: usize,
    /// How requests pick a decode group and a pipeline.
    #[serde(default)]
    pub routing: Routing,
    /// A file of API keys, one per line (`#` starts a comment); when set,
    /// `/v1/*` requests need `Authorization: Bearer KEY`. Relative to the
    /// cluster file. `TANDEM_API_KEYS` (comma-separated) adds keys too.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// Open HTTP connections; more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A request head must arrive whole within this of its first byte.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// A connection with no request coming (new, or kept alive after one)
    /// is closed after this.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// A request body must arrive whole within this of its head.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_ms: u64,
}

/// The gateway's routing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// A session stays on the nodes holding its KV; a new session goes where
    /// most of its prompt is cached, weighed against load.
    #[default]
    Sessions,
    /// The least loaded nodes, ignoring sessions and caches.
    LeastLoaded,
    /// Nodes in turn, ignoring sessions and caches (a baseline for benchmarks).
    RoundRobin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    pub name: String,
    /// Prompt tokens per chunk flowing through the stages.
    #[serde(default = "default_chunk")]
    pub chunk: usize,
    /// KV blocks in each stage's pool (prompts in flight through the stage).
    #[serde(default = "default_prefill_blocks")]
    pub kv_blocks: usize,
    /// Overrides `[cluster] kv_transport` for this pipeline's links.
    #[serde(default)]
    pub kv_transport: Option<KvTransport>,
    pub stages: Vec<StageSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    pub name: String,
    pub addr: NodeAddr,
    /// `[first, end)`; give it for every stage of a pipeline or for none
    /// (then the layers are split evenly).
    #[serde(default)]
    pub layers: Option<[usize; 2]>,
    /// Where the stage computes: `cpu` (default), `cuda`, `cuda:N`.
    #[serde(default)]
    pub device: Device,
    /// Where the node answers probes (`/health`, `/live`) and serves its
    /// `/metrics`; `TANDEM_HEALTH_ADDR` overrides it. None by default.
    #[serde(default)]
    pub health: Option<NodeAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSection {
    pub name: String,
    pub addr: NodeAddr,
    #[serde(default = "one")]
    pub tp: usize,
    /// Expert parallelism for a mixture-of-experts model: 1 (each rank
    /// holds every expert, cut like the MLP) or `tp` (each rank holds
    /// `experts / tp` whole experts).
    #[serde(default = "one")]
    pub ep: usize,
    /// KV blocks in each rank's pool.
    #[serde(default = "default_kv_blocks")]
    pub kv_blocks: usize,
    /// Sequences in one decode step.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Requests waiting for admission.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// Prompts whose uncached part is at most this many tokens are prefilled
    /// by the decode group itself (conditional disaggregation); 0 sends every
    /// prefill to a pipeline. Default 256.
    #[serde(default = "default_local_prefill")]
    pub local_prefill_max: usize,
    /// A local prefill is fed this many tokens per decode step (chunked
    /// prefill mixed into decode), so running streams keep going.
    #[serde(default = "default_local_chunk")]
    pub local_prefill_chunk: usize,
    /// Where the group's ranks compute: `cpu` (default), `cuda` (rank r on
    /// GPU r), `cuda:N` (every rank on GPU N), `cuda:0,1,2` (one per rank).
    #[serde(default)]
    pub device: Device,
    /// Where the node answers probes (`/health`, `/live`) and serves its
    /// `/metrics`; `TANDEM_HEALTH_ADDR` overrides it. None by default.
    #[serde(default)]
    pub health: Option<NodeAddr>,
}

fn default_local_chunk() -> usize {
    256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Ucx,
    Quic,
    #[default]
    Auto,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    #[serde(default)]
    pub kind: TransportKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Every request's deadline.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// A node silent this long is marked down.
    #[serde(default = "default_down_after")]
    pub down_after_ms: u64,
    /// Largest HTTP request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A decode group whose scheduling loop has not turned for this long
    /// is wedged: it stops its heartbeats, and the gateway, which hears
    /// none for twice `down_after_ms`, drops it as lost (its requests
    /// continue elsewhere).
    #[serde(default = "default_loop_stall")]
    pub loop_stall_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout_ms: default_request_timeout(),
            heartbeat_ms: default_heartbeat(),
            down_after_ms: default_down_after(),
            max_body_bytes: default_max_body(),
            loop_stall_ms: default_loop_stall(),
        }
    }
}

fn default_block_size() -> usize {
    16
}
fn default_kv_dtype() -> String {
    "f32".into()
}
fn default_gateway_name() -> String {
    "gateway".into()
}
fn default_queue() -> usize {
    256
}
fn default_gateway_queue() -> usize {
    1024
}
fn default_chunk() -> usize {
    256
}
/// Chosen by measurement (`tandem bench sessions --local-prefill-max
/// 0,64,256`, README): prefilling a ~150-token new turn on the decode group
/// beat shipping it to a pipeline at every turn, in TTFT and in TPOT.
fn default_local_prefill() -> usize {
    256
}
fn default_prefill_blocks() -> usize {
    1024
}
fn one() -> usize {
    1
}
fn default_kv_blocks() -> usize {
    2048
}
fn default_max_batch() -> usize {
    32
}
fn default_loop_stall() -> u64 {
    10_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    60_000
}
fn default_body_timeout() -> u64 {
    30_000
}
fn default_request_timeout() -> u64 {
    600_000
}
fn default_heartbeat() -> u64 {
    250
}
fn default_down_after() -> u64 {
    1000
}
fn default_max_body() -> usize {
    4 << 20
}

/// A pipeline after validation: every stage with its layer range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub name: String,
    pub chunk: usize,
    pub kv_blocks: usize,
    pub kv_transport: KvTransport,
    pub stages: Vec<(String, NodeAddr, Range<usize>)>,
}

/// The cluster after validation against the model.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub file: ClusterFile,
    pub kv_dtype: KvDtype,
    pub gpu_dtype: GpuDtype,
    pub pipelines: Vec<Pipeline>,
}

impl Cluster {
    /// Where node `name` computes (the gateway computes nothing: CPU).
    pub fn device_of(&self, name: &str) -> Device {
        let f = &self.file;
        f.decode
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.device.clone())
            .or_else(|| {
                f.prefill
                    .iter()
                    .flat_map(|p| &p.stages)
                    .find(|s| s.name == name)
                    .map(|s| s.device.clone())
            })
            .unwrap_or_default()
    }
}

impl ClusterFile {
    /// Sets the device of node `name` (a role's `--device` over the file's).
    pub fn set_device(&mut self, name: &str, device: Device) {
        for d in self.decode.iter_mut().filter(|d| d.name == name) {
            d.device = device.clone();
        }
        for s in self
            .prefill
            .iter_mut()
            .flat_map(|p| p.stages.iter_mut())
            .filter(|s| s.name == name)
        {
            s.device = device.clone();
        }
    }

    /// Every prefill stage and decode group with a `health` address: its
    /// name, role (`prefill`, `decode`) and that address, in file order.
    pub fn health_targets(&self) -> Vec<(String, &'static str, NodeAddr)> {
        let stages = self
            .prefill
            .iter()
            .flat_map(|p| p.stages.iter())
            .filter_map(|s| Some((s.name.clone(), "prefill", s.health.clone()?)));
        let groups = self
            .decode
            .iter()
            .filter_map(|d| Some((d.name.clone(), "decode", d.health.clone()?)));
        stages.chain(groups).collect()
    }

    /// Node `name`'s health address in the file, if it has one.
    pub fn health_of(&self, name: &str) -> Option<NodeAddr> {
        self.health_targets()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, a)| a)
    }
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile> {
        let text = std::fs::read_to_string(path).map_err(|err| WireError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let mut f = Self::parse(&text, path)?;
        // Paths in the file are relative to the file.
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut f.cluster.model,
            &mut f.cluster.certs,
            &mut f.gateway.api_keys_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(f)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClusterFile> {
        toml::from_str(text).map_err(|e| WireError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks the file against the model; the first problem found is the error.
    pub fn validate(self, model: &ModelConfig, path: &Path) -> Result<Cluster> {
        let bad = |reason: String| WireError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let c = &self;
        if c.cluster.name.trim().is_empty() {
            return Err(bad("[cluster] name must not be empty".into()));
        }
        if c.cluster.block_size == 0 {
            return Err(bad("[cluster] block_size must be at least 1".into()));
        }
        let s = &c.sampling;
        let defaults = tandem_model::SamplingParams {
            temperature: s.temperature.unwrap_or(0.0),
            top_p: s.top_p.unwrap_or(1.0),
            min_p: s.min_p.unwrap_or(0.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            max_tokens: s.max_tokens.unwrap_or(1),
            ..Default::default()
        };
        defaults
            .validate()
            .map_err(|e| bad(format!("[sampling] {e}")))?;
        if s.max_choices == Some(0) {
            return Err(bad("[sampling] max_choices must be at least 1".into()));
        }
        let kv_dtype = KvDtype::parse(&c.cluster.kv_dtype).ok_or_else(|| {
            bad(format!(
                "[cluster] kv_dtype '{}' is not one of f32, f16, bf16",
                c.cluster.kv_dtype
            ))
        })?;
        let gpu_dtype = GpuDtype::parse(&c.cluster.gpu_dtype).ok_or_else(|| {
            bad(format!(
                "[cluster] gpu_dtype '{}' is not one of bf16, f32",
                c.cluster.gpu_dtype
            ))
        })?;
        // No [[prefill]] at all is a colocated cluster: every decode group
        // prefills its own prompts (chunked, mixed into decode steps).
        if c.decode.is_empty() {
            return Err(bad(
                "no [[decode]] group: a cluster needs at least one".into()
            ));
        }
        // Every node name and address once.
        let mut names: HashMap<String, String> = HashMap::new();
        let mut addrs: HashMap<NodeAddr, String> = HashMap::new();
        let mut claim = |name: &str, what: String, addr_list: &[&NodeAddr]| -> Result<()> {
            if name.trim().is_empty() {
                return Err(bad(format!("{what} has an empty name")));
            }
            if !crate::tls::valid_name(name) {
                return Err(bad(format!(
                    "{what}: a node name is at most 64 letters, digits, '.', '_' and '-' (it goes into the node's certificate)"
                )));
            }
            if let Some(prev) = names.insert(name.to_string(), what.clone()) {
                return Err(bad(format!("the name '{name}' is used twice ({prev} and {what}); node names must be unique")));
            }
            for a in addr_list {
                if let Some(prev) = addrs.insert((*a).clone(), what.clone()) {
                    return Err(bad(format!(
                        "the address {a} is used twice ({prev} and {what})"
                    )));
                }
            }
            Ok(())
        };
        claim(
            &c.gateway.name,
            format!("gateway '{}'", c.gateway.name),
            &[&c.gateway.http, &c.gateway.quic],
        )?;
        for p in &c.prefill {
            for s in &p.stages {
                claim(
                    &s.name,
                    format!("prefill stage '{}' of pipeline '{}'", s.name, p.name),
                    &[&s.addr],
                )?;
            }
        }
        for d in &c.decode {
            claim(&d.name, format!("decode group '{}'", d.name), &[&d.addr])?;
        }
        let mut pipeline_names = std::collections::HashSet::new();
        let mut pipelines = Vec::new();
        for p in &c.prefill {
            if !pipeline_names.insert(p.name.as_str()) {
                return Err(bad(format!("two pipelines are named '{}'", p.name)));
            }
            pipelines.push(
                validate_pipeline(p, model, c.cluster.kv_transport)
                    .map_err(|r| bad(format!("pipeline '{}': {r}", p.name)))?,
            );
        }
        let valid_tp = model.valid_tp();
        for d in &c.decode {
            if !valid_tp.contains(&d.tp) {
                return Err(bad(format!(
                    "decode group '{}': tp = {} does not divide the model's {} KV heads; use one of {:?}",
                    d.name, d.tp, model.n_kv_heads, valid_tp
                )));
            }
            model
                .check_ep(d.ep, d.tp)
                .map_err(|r| bad(format!("decode group '{}': {r}", d.name)))?;
            for (field, v) in [
                ("kv_blocks", d.kv_blocks),
                ("max_batch", d.max_batch),
                ("max_queue", d.max_queue),
                ("local_prefill_chunk", d.local_prefill_chunk),
            ] {
                if v == 0 {
                    return Err(bad(format!(
                        "decode group '{}': {field} must be at least 1",
                        d.name
                    )));
                }
            }
        }
        if c.limits.heartbeat_ms == 0 || c.limits.down_after_ms <= c.limits.heartbeat_ms {
            return Err(bad(format!(
                "[limits] down_after_ms ({}) must exceed heartbeat_ms ({}), which must be positive",
                c.limits.down_after_ms, c.limits.heartbeat_ms
            )));
        }
        if c.transport.kind == TransportKind::Ucx {
            return Err(bad(
                "[transport] kind = \"ucx\": this build has no UCX transport yet; use \"quic\" or \"auto\" (auto uses QUIC)".into(),
            ));
        }
        Ok(Cluster {
            file: self,
            kv_dtype,
            gpu_dtype,
            pipelines,
        })
    }
}

fn validate_pipeline(
    p: &PipelineSection,
    model: &ModelConfig,
    kv_transport: KvTransport,
) -> std::result::Result<Pipeline, String> {
    let n = model.n_layers;
    if p.stages.is_empty() {
        return Err("it has no stages".into());
    }
    if p.chunk == 0 {
        return Err("chunk must be at least 1 token".into());
    }
    if p.kv_blocks == 0 {
        return Err("kv_blocks must be at least 1".into());
    }
    let given = p.stages.iter().filter(|s| s.layers.is_some()).count();
    let ranges: Vec<Range<usize>> = if given == 0 {
        SliceSpec::even_split(n, p.stages.len()).map_err(|e| e.to_string())?
    } else if given != p.stages.len() {
        return Err(
            "give `layers` for every stage or for none (then they are split evenly)".into(),
        );
    } else {
        let mut next = 0;
        let mut out = Vec::new();
        for s in &p.stages {
            let [a, b] = s.layers.expect("counted above: every stage has layers");
            if b <= a {
                return Err(format!(
                    "stage '{}' has layers [{a}, {b}), which is empty",
                    s.name
                ));
            }
            if a > next {
                return Err(format!("stage '{}' starts at layer {a} but the stages before end at {next}: layers {next}..{a} are missing", s.name));
            }
            if a < next {
                return Err(format!("stage '{}' starts at layer {a} but layers up to {next} are already taken: layers {a}..{next} repeat", s.name));
            }
            next = b;
            out.push(a..b);
        }
        if next != n {
            return Err(if next < n {
                format!("the stages end at layer {next}; the model has {n} layers, so {next}..{n} are missing")
            } else {
                format!("the stages run to layer {next}; the model has only {n} layers")
            });
        }
        out
    };
    Ok(Pipeline {
        name: p.name.clone(),
        chunk: p.chunk,
        kv_blocks: p.kv_blocks,
        kv_transport: p.kv_transport.unwrap_or(kv_transport),
        stages: p
            .stages
            .iter()
            .zip(ranges)
            .map(|(s, r)| (s.name.clone(), s.addr.clone(), r))
            .collect(),
    })
}

#[cfg(test)]
mod tests;
