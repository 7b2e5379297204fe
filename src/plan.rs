//! `tandem plan`: a PP/TP layout per role for a model and hardware.

use std::path::Path;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use tandem_model::plan::{self, Hardware, Interconnect, ModelShape};

#[derive(Clone, Copy, ValueEnum)]
pub enum Link {
    Nvlink,
    Pcie,
    Ib,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    Bf16,
    Fp8,
    Int4,
}

#[derive(Args)]
pub struct PlanArgs {
    /// A GGUF file, a Hugging Face directory, or a well-known name (e.g. Llama-3-70B, Qwen3-235B-A22B).
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Memory per GPU in GB.
    #[arg(long, default_value_t = 80.0)]
    gpu_mem: f64,
    #[arg(long, value_enum, default_value = "nvlink")]
    interconnect: Link,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let shape = match plan::known_model(&a.model) {
        Some(s) => s,
        None if Path::new(&a.model).exists() => {
            ModelShape::from_config(&tandem_model::ModelFile::open(Path::new(&a.model))?.config)
        }
        None => bail!(
            "'{}' is neither a model file nor a known model ({})",
            a.model,
            plan::known_names().join(", ")
        ),
    };
    let (weight_bytes, kv_bytes) = match a.dtype {
        Dtype::Bf16 => (2.0, 2.0),
        Dtype::Fp8 => (1.0, 1.0),
        Dtype::Int4 => (0.5, 1.0),
    };
    let interconnect = match a.interconnect {
        Link::Nvlink => Interconnect::Nvlink,
        Link::Pcie => Interconnect::Pcie,
        Link::Ib => Interconnect::Ib,
    };
    let hw = Hardware {
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        gpu_mem_gb: a.gpu_mem,
        interconnect,
        weight_bytes,
        kv_bytes,
    };
    let p = plan::plan(&shape, &hw).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!(
        "{}: {} layers, {} KV heads, {:.1}B parameters = {:.1} GB of weights; decode TP <= {}",
        shape.name,
        shape.layers,
        shape.kv_heads,
        shape.params / 1e9,
        p.weights_gb,
        p.max_decode_tp
    );
    println!(
        "hardware: {} node(s) x {} GPU(s) x {:.0} GB\n",
        a.nodes, a.gpus_per_node, a.gpu_mem
    );
    for r in [&p.prefill, &p.decode] {
        println!(
            "{:8} TP {}{} x PP {} = {} GPUs per instance, {} instance(s) fit; {:.1} GB weights per GPU; {:.0} bytes KV per token; KV for {:.0} tokens per instance",
            r.role,
            r.tp,
            if r.ep > 1 { format!(" (EP {})", r.ep) } else { String::new() },
            r.pp,
            r.gpus,
            r.instances,
            r.weights_per_gpu_gb,
            r.kv_bytes_per_token,
            r.kv_capacity_tokens
        );
        for line in &r.reasoning {
            println!("         - {line}");
        }
        println!();
    }
    Ok(())
}
