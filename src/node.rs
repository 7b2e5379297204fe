//! `tandem gateway|prefill|decode --config FILE --node NAME`: one role of a
//! cluster, in this process, until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::ModelFile;
use tandem_wire::config::ClusterFile;
use tandem_wire::node::NodeSetup;

use crate::Common;

#[derive(Args, Clone)]
pub struct RoleArgs {
    /// The cluster file.
    #[arg(long)]
    pub config: PathBuf,
    /// This node's name in the cluster file.
    #[arg(long)]
    pub node: String,
    /// Where this node computes (overrides its `device` in the cluster
    /// file): cpu, cuda, cuda:N or cuda:N,M,...
    #[arg(long)]
    pub device: Option<tandem_model::Device>,
}

/// SIGINT and SIGTERM set a flag the role's loop watches.
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
            tracing::warn!("cannot watch signal {sig}: {e}");
        }
    }
    flag
}

fn load(common: &Common, a: &RoleArgs) -> Result<(ModelFile, NodeSetup)> {
    let mut file = ClusterFile::load(&a.config)?;
    if let Some(d) = &a.device {
        file.set_device(&a.node, d.clone());
    }
    let model_path = common.model_path(&file.cluster.model)?;
    let model = ModelFile::open(&model_path)?;
    let cluster = file.validate(&model.config, &a.config)?;
    let setup = NodeSetup::new(cluster, &a.node)
        .with_context(|| format!("loading the certificate of node '{}'", a.node))?;
    Ok((model, setup))
}

pub fn prefill(common: &Common, threads: usize, a: RoleArgs) -> Result<()> {
    let (model, setup) = load(common, &a)?;
    let stop = stop_flag();
    tandem_prefill::run(&model, setup, threads, stop)?;
    Ok(())
}

pub fn decode(common: &Common, threads: usize, a: RoleArgs) -> Result<()> {
    let (model, setup) = load(common, &a)?;
    let stop = stop_flag();
    tandem_decode::group::run(&model, setup, threads, stop)?;
    Ok(())
}

pub use tandem_wire::node::served_name;

pub fn gateway(common: &Common, a: RoleArgs) -> Result<()> {
    let (model, setup) = load(common, &a)?;
    let name = setup.model_name(&model);
    let stop = stop_flag();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("gateway-io")
        .build()?;
    rt.block_on(tandem_gateway::server::run(
        Arc::new(model),
        setup,
        name,
        async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    ))
    .map_err(anyhow::Error::msg)?;
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
