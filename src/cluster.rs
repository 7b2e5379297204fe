//! `tandem certs` and `tandem check-config`: cluster files and certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use tandem_wire::config::{Cluster, ClusterFile};

use crate::Common;

#[derive(Args)]
pub struct CertsArgs {
    /// Cluster file whose nodes get certificates.
    #[arg(long)]
    config: PathBuf,
    /// Output directory (default: the file's `[cluster] certs`, else ./certs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra address each certificate is valid for (repeatable), e.g. a public IP.
    #[arg(long)]
    ip: Vec<IpAddr>,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long)]
    config: PathBuf,
}

fn load(common: &Common, path: &Path) -> Result<Cluster> {
    let file = ClusterFile::load(path)?;
    let model_path = common.model_path(&file.cluster.model)?;
    let model = tandem_model::ModelFile::open(&model_path)?;
    Ok(file.validate(&model.config, path)?)
}

pub fn certs(_common: &Common, a: CertsArgs) -> Result<()> {
    // Certificates need names and addresses only, not the model.
    let file = ClusterFile::load(&a.config)?;
    let out = a
        .out
        .or_else(|| file.cluster.certs.clone())
        .unwrap_or_else(|| PathBuf::from("certs"));
    let with_extra = |ip: Option<IpAddr>| -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = ip.into_iter().collect();
        v.extend(a.ip.iter().copied());
        v
    };
    let mut nodes = vec![(
        file.gateway.name.clone(),
        "gateway",
        with_extra(file.gateway.quic.ip()),
    )];
    for p in &file.prefill {
        for s in &p.stages {
            nodes.push((s.name.clone(), "prefill", with_extra(s.addr.ip())));
        }
    }
    for d in &file.decode {
        nodes.push((d.name.clone(), "decode", with_extra(d.addr.ip())));
    }
    let written = tandem_wire::tls::write_cluster_certs(&out, &file.cluster.name, &nodes)
        .with_context(|| format!("writing certificates to {}", out.display()))?;
    println!(
        "cluster CA and {} node certificates in {}",
        nodes.len(),
        out.display()
    );
    for w in written {
        println!("  {}", w.display());
    }
    Ok(())
}

pub fn check(common: &Common, a: CheckArgs) -> Result<()> {
    let c = load(common, &a.config)?;
    println!("cluster '{}': valid", c.file.cluster.name);
    println!(
        "  gateway {}  http {}  quic {}",
        c.file.gateway.name, c.file.gateway.http, c.file.gateway.quic
    );
    for p in &c.pipelines {
        println!("  prefill pipeline {} (chunk {})", p.name, p.chunk);
        for (name, addr, layers) in &p.stages {
            println!(
                "    stage {name} at {addr}: layers {}..{}",
                layers.start, layers.end
            );
        }
    }
    for d in &c.file.decode {
        println!(
            "  decode group {} at {}: tp {}, ep {}, {} KV blocks per rank, batch {}",
            d.name, d.addr, d.tp, d.ep, d.kv_blocks, d.max_batch
        );
    }
    Ok(())
}
