//! Where a process computes: the CPU, NVIDIA GPUs through CUDA, or the
//! CUDA emulator (the same kernels run on the CPU, for tests).
//!
//! `--device cuda` spreads tensor-parallel ranks over every visible GPU
//! (rank r on GPU r mod count); `cuda:N` puts every rank on GPU N;
//! `cuda:0,1,2` names one GPU per rank. Ranks on distinct GPUs reduce with
//! NCCL; ranks sharing a GPU reduce on it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which GPUs a group's ranks use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Gpus {
    /// Every visible GPU, round-robin over ranks.
    All,
    /// The listed GPUs: one for every rank, or one shared by all.
    List(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(Gpus),
    /// The CUDA code path with kernels run on the CPU by the emulator:
    /// slow, for testing the GPU path where there is no GPU.
    Emu,
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// The GPU ordinal rank `rank` of a group uses, given `count` visible
    /// GPUs (the emulator has one).
    pub fn ordinal(&self, rank: usize, count: usize) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Emu => Some(0),
            Device::Cuda(Gpus::All) => Some(rank % count.max(1)),
            Device::Cuda(Gpus::List(l)) if l.len() == 1 => Some(l[0]),
            Device::Cuda(Gpus::List(l)) => l.get(rank).copied(),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Emu => write!(f, "emu"),
            Device::Cuda(Gpus::All) => write!(f, "cuda"),
            Device::Cuda(Gpus::List(l)) => {
                let l: Vec<String> = l.iter().map(|d| d.to_string()).collect();
                write!(f, "cuda:{}", l.join(","))
            }
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Device, String> {
        let bad = || {
            format!(
                "unknown device {s:?}: expected cpu, cuda, cuda:N or cuda:N,M,... (GPU ordinals)"
            )
        };
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(Gpus::All)),
            "emu" | "cuda-emu" => Ok(Device::Emu),
            other => {
                let list = other.strip_prefix("cuda:").ok_or_else(bad)?;
                let ids = list
                    .split(',')
                    .map(|d| d.trim().parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| bad())?;
                if ids.is_empty() {
                    return Err(bad());
                }
                Ok(Device::Cuda(Gpus::List(ids)))
            }
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Device, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for s in ["cpu", "cuda", "cuda:1", "cuda:0,1,2", "emu"] {
            let d: Device = s.parse().expect(s);
            assert_eq!(d.to_string(), s);
        }
        for bad in ["", "gpu0", "cuda:", "cuda:x", "cuda:1,,2", "tpu"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ranks_map_to_gpus() {
        let all = Device::Cuda(Gpus::All);
        assert_eq!(all.ordinal(3, 2), Some(1));
        let one: Device = "cuda:2".parse().expect("parses");
        assert_eq!(one.ordinal(0, 8), Some(2));
        assert_eq!(one.ordinal(2, 8), Some(2));
        let three: Device = "cuda:4,5,6".parse().expect("parses");
        assert_eq!(three.ordinal(1, 8), Some(5));
        assert_eq!(three.ordinal(3, 8), None);
        assert_eq!(Device::Cpu.ordinal(0, 1), None);
    }
}
