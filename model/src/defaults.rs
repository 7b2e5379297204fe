//! The sampling defaults a model ships with: GGUF's `general.sampling.*`
//! keys, or a Hugging Face directory's `generation_config.json`. A server
//! applies them to requests that leave a field out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;

use crate::error::{ModelError, Result};

/// Each field is the model's default when it names one.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// From a GGUF file's metadata (`general.sampling.temp`, `.top_k`,
    /// `.top_p`, `.min_p`, `.penalty_repeat`, as llama.cpp writes them).
    pub fn from_gguf(md: &HashMap<String, Value>) -> GenerationDefaults {
        let f = |k: &str| {
            md.get(&format!("general.sampling.{k}"))
                .and_then(number)
                .map(|v| v as f32)
        };
        GenerationDefaults {
            temperature: f("temp"),
            top_k: md
                .get("general.sampling.top_k")
                .and_then(number)
                .filter(|v| *v >= 0.0)
                .map(|v| v as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("penalty_repeat"),
        }
    }

    /// From `generation_config.json` in `dir`, if there is one; a file that
    /// is there but unreadable or not JSON is an error.
    pub fn from_hf_dir(dir: &Path) -> Result<GenerationDefaults> {
        let p = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(GenerationDefaults::default())
            }
            Err(err) => return Err(ModelError::Io { path: p, err }),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::malformed(&p, e.to_string()))?;
        let f = |k: &str| v[k].as_f64().map(|x| x as f32);
        Ok(GenerationDefaults {
            temperature: f("temperature"),
            top_k: v["top_k"].as_u64().map(|k| k as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == GenerationDefaults::default()
    }
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
    .filter(|x| x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_keys_are_read_and_others_ignored() {
        let mut md = HashMap::new();
        md.insert("general.sampling.temp".into(), Value::F32(0.6));
        md.insert("general.sampling.top_k".into(), Value::I32(20));
        md.insert("general.sampling.penalty_repeat".into(), Value::F64(1.1));
        md.insert("general.sampling.min_p".into(), Value::String("x".into()));
        let d = GenerationDefaults::from_gguf(&md);
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.repetition_penalty, Some(1.1));
        assert_eq!(d.min_p, None);
        assert_eq!(d.top_p, None);
        assert!(GenerationDefaults::from_gguf(&HashMap::new()).is_empty());
    }

    #[test]
    fn generation_config_json_is_read_when_present() {
        let dir = std::env::temp_dir().join(format!("tandem-gencfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert!(GenerationDefaults::from_hf_dir(&dir)
            .expect("absent is fine")
            .is_empty());
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}"#,
        )
        .expect("write");
        let d = GenerationDefaults::from_hf_dir(&dir).expect("parsed");
        assert_eq!(d.temperature, Some(0.7));
        assert_eq!(d.top_p, Some(0.8));
        assert_eq!(d.top_k, Some(20));
        assert_eq!(d.repetition_penalty, Some(1.05));
        std::fs::write(dir.join("generation_config.json"), "{not json").expect("write");
        assert!(GenerationDefaults::from_hf_dir(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
