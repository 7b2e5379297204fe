//! `tandem bench kv`: KV blocks of the default model's layout moved from a
//! prefill-like process (this one) to a decode-like process (a child,
//! `tandem bench kv --receiver …`), over each transport and a few prompt
//! lengths, beside the references measured in the same run: `ucx_perftest`
//! for UCX, plain quinn streams for QUIC.
//!
//! A transfer is one prompt's KV: one operation per block (a put, or an
//! active message in rendezvous), then the completion the cluster waits for
//! (a flush for puts, every send's completion for active messages). QUIC
//! sends the cluster's own `Kv` messages (4 MiB) on a link and waits for
//! the receiver's echo of the completion notice. Every transfer is checked:
//! the receiver hashes what landed and the hash must match what was sent.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

mod quic;
mod ucx;

use quic::{quic_receiver, quic_rows};
use ucx::{ucx_receiver, ucx_rows};

#[derive(Args)]
pub struct BenchKvArgs {
    /// Transports: sm and tcp (UCX with `UCX_TLS` set so), auto (UCX with
    /// `UCX_TLS` as the environment has it, as Tandem's nodes run), quic.
    #[arg(long, value_delimiter = ',', default_value = "sm,tcp,quic")]
    transports: Vec<String>,
    /// Prompt lengths in tokens: each transfer moves that prompt's KV blocks.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    tokens: Vec<usize>,
    /// Transfers per point (after one warm-up); 0: as many as
    /// `ucx_perftest` makes of that size (about 1 GiB, 10 to 400), so a
    /// method and its reference run equally long, equally warm loops.
    #[arg(long, default_value_t = 0)]
    iters: usize,
    /// UCX rows: rounds per size. In a round each method runs right after
    /// each `ucx_perftest` test still in the running, in turns, so both
    /// sides have as many samples taken seconds apart, and the round
    /// compares each side's best; rows report medians over the rounds, and
    /// the ratio is the median of each round's own ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// UCX rows: only methods whose label contains one of these (e.g.
    /// `1 block` for what the cluster sends); all by default.
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// KV layout: the default model (30 layers, 3 KV heads of 64) with the
    /// cluster's default blocks (16 tokens of f32).
    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 4)]
    dtype_bytes: usize,
    /// Prompt tokens per prefill chunk (the cluster's `chunk`): the batch
    /// size of the batched active-message rows.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// QUIC reference: plain quinn with this many parallel streams (besides 1).
    #[arg(long, default_value_t = 4)]
    quinn_streams: usize,
    /// Where the receiving process's buffer lives: `ucx` (allocated by UCX,
    /// which over shared memory is a segment the sender maps, as decode's
    /// KV pools are when `/dev/shm` has room for them) or `heap` (ordinary
    /// memory registered with UCX, as they are otherwise).
    #[arg(long, default_value = "ucx")]
    receiver_memory: String,
    /// Skip `ucx_perftest` even when it is installed.
    #[arg(long)]
    no_perftest: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: run as the receiving process for this transport.
    #[arg(long, hide = true)]
    receiver: Option<String>,
    /// Internal: the receiver's buffer size in bytes.
    #[arg(long, hide = true, default_value_t = 0)]
    capacity: usize,
}

#[derive(serde::Serialize)]
struct Row {
    transport: String,
    method: String,
    tokens: usize,
    bytes: usize,
    gbps: f64,
    reference: String,
    reference_gbps: Option<f64>,
    /// Tandem's rate over the reference's, per round, then the median.
    ratio: Option<f64>,
    /// Per round: (GB/s, the reference's GB/s in the same round).
    rounds: Vec<(f64, Option<f64>)>,
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

pub fn run(a: BenchKvArgs) -> Result<()> {
    if let Some(t) = a.receiver.clone() {
        return receiver(&t, a.capacity);
    }
    let block = a.layers * 2 * a.kv_heads * a.block_size * a.head_dim * a.dtype_bytes;
    let max_blocks = a
        .tokens
        .iter()
        .map(|t| t.div_ceil(a.block_size))
        .max()
        .unwrap_or(1);
    println!(
        "KV block: {} layers x K,V x {} heads x {} tokens x {} dims x {} bytes = {} KiB",
        a.layers,
        a.kv_heads,
        a.block_size,
        a.head_dim,
        a.dtype_bytes,
        block / 1024
    );
    let mut rows = Vec::new();
    for t in &a.transports {
        match t.as_str() {
            "sm" | "tcp" | "auto" => rows.extend(ucx_rows(&a, t, block, max_blocks)?),
            "quic" => rows.extend(quic_rows(&a, block, max_blocks)?),
            other => bail!("unknown transport '{other}' (sm, tcp, auto, quic)"),
        }
    }
    println!(
        "\n{:<6} {:<32} {:>7} {:>9} {:>9}   {:<26} {:>9} {:>6}",
        "link", "method", "tokens", "MiB", "GB/s", "reference", "GB/s", "ratio"
    );
    for r in &rows {
        let rg = r.reference_gbps.map_or("-".into(), |g| format!("{g:.2}"));
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "{:<6} {:<32} {:>7} {:>9.1} {:>9.2}   {:<26} {:>9} {:>6}",
            r.transport,
            r.method,
            r.tokens,
            r.bytes as f64 / (1 << 20) as f64,
            r.gbps,
            r.reference,
            rg,
            ratio
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// The receiving process, driven over its stdin/stdout.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(transport: &str, capacity: usize, env: &[(&str, &str)]) -> Result<Peer> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "kv", "--receiver", transport, "--capacity"])
            .arg(capacity.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting the receiving process")?;
        let stdin = child.stdin.take().expect("piped");
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Peer { child, stdin, out })
    }

    fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        if self.out.read_line(&mut s)? == 0 {
            bail!("the receiving process exited");
        }
        Ok(s.trim().to_string())
    }

    fn ask(&mut self, q: &str) -> Result<String> {
        writeln!(self.stdin, "{q}")?;
        self.stdin.flush()?;
        self.line()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The messages `ucx_perftest` sends per run for messages of `size` bytes.
fn perftest_iters(size: usize) -> usize {
    ((1usize << 30) / size.max(1)).clamp(10, 400)
}

/// Transfers per point for `bytes`: `--iters`, or as `ucx_perftest`.
fn iters_for(a: &BenchKvArgs, bytes: usize) -> usize {
    if a.iters == 0 {
        perftest_iters(bytes)
    } else {
        a.iters
    }
}

/// GB/s over `iters` transfers of `bytes`, each timed by `once`.
fn timed(iters: usize, bytes: usize, once: &dyn Fn() -> Result<Duration>) -> Result<f64> {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        total += once()?;
    }
    Ok((bytes * iters) as f64 / total.as_secs_f64() / 1e9)
}

fn hash(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("x"), 16).map_err(|e| anyhow!("{e}")))
        .collect()
}

fn receiver(transport: &str, capacity: usize) -> Result<()> {
    match transport {
        "ucx" => ucx_receiver(capacity, false),
        "ucx-heap" => ucx_receiver(capacity, true),
        "quic" => quic_receiver(),
        other => bail!("unknown receiver {other}"),
    }
}
