//! `tandem serve`: a whole disaggregated cluster on this machine, one
//! process per role (gateway, every prefill stage, the decode group), on
//! loopback with throwaway certificates. Waits until the gateway is healthy,
//! prints the URL, and on Ctrl-C or SIGTERM stops every child.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::node::stop_flag;
use crate::Common;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// GGUF file or Hugging Face directory (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prefill pipeline stages, one process each.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Decode tensor-parallel ranks (must divide the model's KV heads).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Decode expert parallelism for a mixture-of-experts model: 1 (every
    /// rank holds every expert, cut like the MLP) or --tp (each rank holds
    /// experts / tp whole experts; tokens travel to them all-to-all).
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// HTTP port of the OpenAI-compatible API.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address the API listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Prompt tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// KV blocks per decode rank.
    #[arg(long, default_value_t = 2048)]
    pub kv_blocks: usize,
    /// Sequences per decode step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests waiting for a decode slot before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV storage: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    /// Prefill pipelines (each of --pp stages); 0 makes a colocated cluster
    /// whose decode groups prefill every prompt themselves.
    #[arg(long, default_value_t = 1)]
    pub pipelines: usize,
    /// Decode groups (each of --tp ranks).
    #[arg(long, default_value_t = 1)]
    pub decode_groups: usize,
    /// Uncached prompt suffixes this short are prefilled by the decode group
    /// itself (0: every prefill goes to a pipeline).
    #[arg(long, default_value_t = 256)]
    pub local_prefill_max: usize,
    /// Tokens of a local prefill computed per decode step (chunked prefill
    /// mixed into decoding).
    #[arg(long, default_value_t = 256)]
    pub local_prefill_chunk: usize,
    /// Compute threads of each decode group (default: --threads).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// API keys, one per line: `/v1` requests then need `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// How KV moves from prefill to decode: auto (UCX when installed, else
    /// QUIC), ucx or quic.
    #[arg(long, default_value = "auto")]
    pub kv_transport: String,
    /// Pin decode groups to these CPUs (a taskset list such as "1" or "0-1").
    #[arg(long)]
    pub decode_cpus: Option<String>,
    /// Gateway routing: sessions (sticky, KV-aware), least-loaded or round-robin.
    #[arg(long, default_value = "sessions")]
    pub routing: String,
    /// Pin stage i of the prefill pipeline to CPU i (taskset), for pipeline measurements.
    #[arg(long)]
    pub pin_stages: bool,
    /// Open HTTP connections the gateway serves at once (more wait to be accepted).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A request head must arrive whole within this many ms of its first byte.
    #[arg(long)]
    pub header_timeout_ms: Option<u64>,
    /// A connection with no request coming is closed after this many ms.
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// A request body must arrive whole within this many ms.
    #[arg(long)]
    pub body_timeout_ms: Option<u64>,
    /// Largest request body in bytes.
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Every request's deadline in ms.
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// A decode group whose loop has not turned for this many ms is dropped as lost.
    #[arg(long)]
    pub loop_stall_ms: Option<u64>,
    /// Default temperature for requests that give none (else the model's
    /// own default, else 0.8).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Default top-p (else the model's, else 0.95).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Default top-k, 0 for none (else the model's, else 40).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Default min-p (else the model's, else 0.05).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Default repetition penalty (else the model's, else 1: none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Tokens generated when a request gives no max_tokens (default 256).
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Most choices (n) one request may ask for (default 8).
    #[arg(long)]
    pub max_choices: Option<usize>,
    /// Where the cluster file and certificates go (default: a fresh directory under the cache).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Where prefill stages and decode groups compute.
    #[command(flatten)]
    pub device: crate::DeviceArgs,
}

/// A free local UDP port for a node's QUIC endpoint.
fn free_udp() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free local TCP port for a node's probes and metrics.
fn free_tcp() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes the cluster file `serve` runs; returns its path.
pub fn write_cluster(a: &ServeArgs, model: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let http = SocketAddr::new(a.host, a.port);
    let mut t = String::new();
    t += &format!(
        "[cluster]\nname = \"local\"\nmodel = {:?}\ncerts = \"certs\"\nkv_dtype = {:?}\nkv_transport = {:?}\ngpu_dtype = {:?}\n\n",
        model.display().to_string(),
        a.kv_dtype,
        a.kv_transport,
        match a.device.gpu_dtype {
            tandem_model::cuda::GpuDtype::Bf16 => "bf16",
            tandem_model::cuda::GpuDtype::F32 => "f32",
        }
    );
    let device = a.device.device.to_string();
    t += &format!(
        "[gateway]\nhttp = \"{http}\"\nquic = \"127.0.0.1:{}\"\nmax_queue = {}\nrouting = {:?}\n{}\n",
        free_udp()?,
        // The gateway's cap covers everything the decode groups hold or queue.
        (a.max_queue + a.max_batch) * a.decode_groups.max(1),
        a.routing,
        match &a.api_key_file {
            Some(f) => format!(
                "api_keys_file = {:?}\n",
                std::path::absolute(f)
                    .with_context(|| format!("{}", f.display()))?
                    .display()
                    .to_string()
            ),
            None => String::new(),
        }
    );
    let edge = [
        ("max_connections", a.max_connections.map(|v| v as u64)),
        ("header_timeout_ms", a.header_timeout_ms),
        ("idle_timeout_ms", a.idle_timeout_ms),
        ("body_timeout_ms", a.body_timeout_ms),
    ];
    for (k, v) in edge {
        if let Some(v) = v {
            t += &format!("{k} = {v}\n");
        }
    }
    t += "\n[limits]\n";
    let limits = [
        ("max_body_bytes", a.max_body_bytes.map(|v| v as u64)),
        ("request_timeout_ms", a.request_timeout_ms),
        ("loop_stall_ms", a.loop_stall_ms),
    ];
    for (k, v) in limits {
        if let Some(v) = v {
            t += &format!("{k} = {v}\n");
        }
    }
    t += "\n[sampling]\n";
    let sampling = [
        ("temperature", a.temperature.map(|v| format!("{v:?}"))),
        ("top_p", a.top_p.map(|v| format!("{v:?}"))),
        ("top_k", a.top_k.map(|v| v.to_string())),
        ("min_p", a.min_p.map(|v| format!("{v:?}"))),
        (
            "repetition_penalty",
            a.repetition_penalty.map(|v| format!("{v:?}")),
        ),
        ("max_tokens", a.default_max_tokens.map(|v| v.to_string())),
        ("max_choices", a.max_choices.map(|v| v.to_string())),
    ];
    for (k, v) in sampling {
        if let Some(v) = v {
            t += &format!("{k} = {v}\n");
        }
    }
    t += "\n";
    for p in 0..a.pipelines {
        t += &format!(
            "[[prefill]]\nname = \"p{p}\"\nchunk = {}\nstages = [\n",
            a.chunk
        );
        for i in 0..a.pp {
            t += &format!(
                "  {{ name = \"p{p}-s{i}\", addr = \"127.0.0.1:{}\", health = \"127.0.0.1:{}\", device = {device:?} }},\n",
                free_udp()?,
                free_tcp()?
            );
        }
        t += "]\n\n";
    }
    for d in 0..a.decode_groups {
        t += &format!(
            "[[decode]]\nname = \"d{d}\"\naddr = \"127.0.0.1:{}\"\nhealth = \"127.0.0.1:{}\"\ndevice = {device:?}\ntp = {}\nep = {}\nkv_blocks = {}\nmax_batch = {}\nmax_queue = {}\nlocal_prefill_max = {}\nlocal_prefill_chunk = {}\n\n",
            free_udp()?,
            free_tcp()?,
            a.tp,
            a.ep,
            a.kv_blocks,
            a.max_batch,
            a.max_queue,
            a.local_prefill_max,
            a.local_prefill_chunk
        );
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, t)?;
    Ok(path)
}

/// `GET path` on `addr`; the status code, or `None` when nothing answers.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// One supervised node process: how to start it, the running child, and
/// when it was restarted lately.
struct Node {
    name: String,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    child: Child,
    restarts: Vec<Instant>,
}

/// A node restarted this often within a minute is given up on.
const MAX_RESTARTS_PER_MINUTE: usize = 5;

struct Children(Vec<Node>);

impl Children {
    fn start(
        &mut self,
        name: String,
        program: PathBuf,
        args: Vec<std::ffi::OsString>,
    ) -> Result<()> {
        let child = Command::new(&program)
            .args(&args)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.0.push(Node {
            name,
            program,
            args,
            child,
            restarts: Vec::new(),
        });
        Ok(())
    }

    /// Restarts nodes that died (as systemd or Kubernetes would); fails
    /// when one keeps dying.
    fn supervise(&mut self) -> Result<()> {
        for n in &mut self.0 {
            let Ok(Some(status)) = n.child.try_wait() else {
                continue;
            };
            n.restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
            if n.restarts.len() >= MAX_RESTARTS_PER_MINUTE {
                bail!(
                    "{} exited ({status}) {} times within a minute; giving up",
                    n.name,
                    n.restarts.len() + 1
                );
            }
            eprintln!("{} exited ({status}); restarting it", n.name);
            n.restarts.push(Instant::now());
            n.child = Command::new(&n.program)
                .args(&n.args)
                .spawn()
                .with_context(|| format!("restarting {}", n.name))?;
        }
        Ok(())
    }

    fn stop(&mut self) {
        for Node { child: c, .. } in &self.0 {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for Node { name, child: c, .. } in &mut self.0 {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!("{name} did not stop in 5 s; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }

    /// The first child that has exited, with its status.
    fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        for n in &mut self.0 {
            if let Ok(Some(s)) = n.child.try_wait() {
                return Some((n.name.clone(), s));
            }
        }
        None
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run(common: &Common, threads: usize, a: ServeArgs) -> Result<()> {
    if a.pp == 0 || a.tp == 0 || a.ep == 0 || a.decode_groups == 0 || a.local_prefill_chunk == 0 {
        bail!("--pp, --tp, --ep, --decode-groups and --local-prefill-chunk must be at least 1");
    }
    let model = common.model_path(&a.model)?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => common
            .cache_dir()
            .join("serve")
            .join(std::process::id().to_string()),
    };
    // A directory made for this run goes when the run ends.
    let _scratch = ScratchDir(a.dir.is_none().then(|| dir.clone()));
    let config = write_cluster(&a, &model, &dir)?;
    // Validate before starting anything, so a bad --tp is one clear message.
    let file = tandem_wire::config::ClusterFile::load(&config)?;
    let m = tandem_model::ModelFile::open(&model)?;
    let cluster = file.validate(&m.config, &config)?;
    drop(m);
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let status = Command::new(&exe)
        .arg("certs")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("could not create certificates in {}", dir.display());
    }
    let stop = stop_flag();
    let mut children = Children(Vec::new());
    let stage_threads = (threads / a.pp).max(1);
    let mut spawn = |role: &str, node: &str, threads: usize, cpu: Option<String>| -> Result<()> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let program = match cpu {
            Some(c) => {
                args.extend(["-c".into(), c.into(), exe.clone().into()]);
                PathBuf::from("taskset")
            }
            None => exe.clone(),
        };
        if let Some(h) = &common.home {
            args.extend(["--home".into(), h.clone().into()]);
        }
        args.extend([
            "--threads".into(),
            threads.to_string().into(),
            role.into(),
            "--config".into(),
            config.clone().into(),
            "--node".into(),
            node.into(),
        ]);
        children.start(format!("{role} {node}"), program, args)
    };
    spawn("gateway", &cluster.file.gateway.name, 1, None)?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    for p in &cluster.pipelines {
        for (i, (name, _, _)) in p.stages.iter().enumerate() {
            let cpu = a.pin_stages.then(|| (i % ncpu).to_string());
            let t = if a.pin_stages { 1 } else { stage_threads };
            spawn("prefill", name, t, cpu)?;
        }
    }
    for d in &cluster.file.decode {
        spawn(
            "decode",
            &d.name,
            a.decode_threads.unwrap_or(threads).max(1),
            a.decode_cpus.clone(),
        )?;
    }
    let http = cluster.file.gateway.http.resolve()?;
    let started = Instant::now();
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            children.stop();
            return Ok(());
        }
        if let Some((name, s)) = children.exited() {
            children.stop();
            bail!("{name} exited ({s}) before the cluster was up");
        }
        if http_status(http, "/health") == Some(200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            children.stop();
            bail!("the cluster was not healthy after 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let name = crate::node::served_name(&tandem_model::ModelFile::open(&model)?);
    println!(
        "Tandem is serving {name} at http://{http}/v1 ({} prefill pipeline(s) of PP {}, {} decode group(s) of TP {}{}; cluster file {})",
        a.pipelines,
        a.pp,
        a.decode_groups,
        a.tp,
        if a.ep > 1 { format!(", EP {}", a.ep) } else { String::new() },
        config.display()
    );
    println!(
        "  curl http://{http}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'"
    );
    println!(
        "  metrics: http://{http}/metrics for the cluster; every node's /metrics address is listed at http://{http}/metrics/targets"
    );
    println!("Ctrl-C stops it.");
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("stopping the cluster");
            children.stop();
            return Ok(());
        }
        if let Err(e) = children.supervise() {
            children.stop();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a throwaway cluster directory (certificates, cluster file) on drop.
struct ScratchDir(Option<PathBuf>);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A `tandem serve` child process (benchmarks start clusters this way).
pub struct ServeChild {
    child: Child,
    pub http: SocketAddr,
}

impl ServeChild {
    /// Starts `tandem serve ARGS --port PORT` and waits until it serves.
    pub fn start(common: &Common, args: &[String]) -> Result<ServeChild> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        if let Some(h) = &common.home {
            cmd.arg("--home").arg(h);
        }
        if let Some(t) = common.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        let mut child = cmd
            .arg("serve")
            .args(args)
            .arg("--port")
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting tandem serve")?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("serve's stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        if !line.contains("Tandem is serving") {
            let _ = child.kill();
            bail!("tandem serve {args:?} did not come up");
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Ok(ServeChild {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}
