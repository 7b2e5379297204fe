//! The sampling fields every request shares: the server's defaults for
//! what a request leaves out, and the checks that turn the fields into
//! sampling parameters.

use super::*;

/// What a request gets for each sampling field it leaves out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Defaults {
    pub temperature: f64,
    pub top_p: f64,
    /// 0: no cut.
    pub top_k: usize,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub max_tokens: usize,
    /// Most choices (`n`) a request may ask for.
    pub max_choices: usize,
    /// Where each value came from: `cluster` (the cluster file or `serve`
    /// flags), `model` (its GGUF metadata or `generation_config.json`) or
    /// `built-in` (llama.cpp's sampler chain).
    pub source: BTreeMap<&'static str, &'static str>,
}

/// llama.cpp's default sampler chain, for what neither the cluster nor
/// the model sets.
const BUILT_IN: (f32, f32, usize, f32, f32) = (0.8, 0.95, 40, 0.05, 1.0);
/// Tokens generated when nothing else says.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Choices per request when nothing else says.
pub const DEFAULT_MAX_CHOICES: usize = 8;

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults::resolve(
            &tandem_wire::config::SamplingSection::default(),
            &GenerationDefaults::default(),
        )
    }
}

impl Defaults {
    /// The cluster's settings first, then the model's, then built-in ones.
    pub fn resolve(
        cluster: &tandem_wire::config::SamplingSection,
        model: &GenerationDefaults,
    ) -> Defaults {
        let mut source = BTreeMap::new();
        // The first of the cluster's and the model's values that is set,
        // else the built-in one; `source` records which.
        fn pick<T>(
            source: &mut BTreeMap<&'static str, &'static str>,
            name: &'static str,
            c: Option<T>,
            m: Option<T>,
            b: T,
        ) -> T {
            let (v, from) = match (c, m) {
                (Some(v), _) => (v, "cluster"),
                (None, Some(v)) => (v, "model"),
                (None, None) => (b, "built-in"),
            };
            source.insert(name, from);
            v
        }
        // Kept as the decimal the setting was written as (no f32 tail).
        let decimal = |v: f32| (v as f64 * 1e6).round() / 1e6;
        let s = &mut source;
        let (bt, bp, bk, bm, br) = BUILT_IN;
        let temperature = decimal(pick(
            s,
            "temperature",
            cluster.temperature,
            model.temperature,
            bt,
        ));
        let top_p = decimal(pick(s, "top_p", cluster.top_p, model.top_p, bp));
        let top_k = pick(s, "top_k", cluster.top_k, model.top_k, bk);
        let min_p = decimal(pick(s, "min_p", cluster.min_p, model.min_p, bm));
        let repetition_penalty = decimal(pick(
            s,
            "repetition_penalty",
            cluster.repetition_penalty,
            model.repetition_penalty,
            br,
        ));
        let max_tokens = pick(
            s,
            "max_tokens",
            cluster.max_tokens,
            None,
            DEFAULT_MAX_TOKENS,
        );
        let max_choices = pick(
            s,
            "max_choices",
            cluster.max_choices,
            None,
            DEFAULT_MAX_CHOICES,
        );
        Defaults {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            max_tokens,
            max_choices,
            source,
        }
    }
}

/// The model's limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tokens of prompt and completion together.
    pub context: usize,
    pub vocab: usize,
}

/// What [`validate_sampling`] makes of the shared fields.
pub struct SamplingJob {
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub n: usize,
    pub explicit_max: bool,
}

/// Checks the shared fields and turns them into sampling parameters;
/// `max_override` (chat's `max_completion_tokens`) wins over `max_tokens`.
pub fn validate_sampling(
    req: Sampling,
    max_override: Option<u64>,
    defaults: &Defaults,
    limits: Limits,
) -> Result<SamplingJob, ApiError> {
    let explicit = max_override.or(req.max_tokens);
    let max_tokens = match explicit {
        None => defaults.max_tokens,
        Some(0) => return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1")),
        Some(n) if n >= limits.context as u64 => {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "max_tokens is {n}, but this model's maximum context length is {} tokens (prompt and completion together)",
                    limits.context
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let temperature = req.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match req.top_k {
        None => defaults.top_k,
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("top_k must be positive (or -1 for none), got {k}"),
            ))
        }
    };
    let n = match req.n {
        None => 1,
        Some(n) if n >= 1 && n <= defaults.max_choices as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::bad(
                "n",
                format!("n must be between 1 and {}, got {n}", defaults.max_choices),
            ))
        }
    };
    // Ranges are checked with the rest of the parameters below.
    let min_p = req.min_p.unwrap_or(defaults.min_p);
    let repetition_penalty = req
        .repetition_penalty
        .unwrap_or(defaults.repetition_penalty);
    let mut logit_bias = Vec::new();
    if let Some(b) = &req.logit_bias {
        if b.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::bad(
                "logit_bias",
                format!("logit_bias may name at most {MAX_LOGIT_BIAS} tokens"),
            ));
        }
        for (k, v) in b {
            let t = k
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|t| (*t as usize) < limits.vocab)
                .ok_or_else(|| {
                    ApiError::bad(
                        "logit_bias",
                        format!(
                            "logit_bias key '{k}' is not a token id of this model (0 to {})",
                            limits.vocab.saturating_sub(1)
                        ),
                    )
                })?;
            if !(-100.0..=100.0).contains(v) {
                return Err(ApiError::bad(
                    "logit_bias",
                    format!("logit_bias for token {t} must be between -100 and 100, got {v}"),
                ));
            }
            logit_bias.push((t, *v as f32));
        }
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad(
            "stop",
            format!("at most {MAX_STOP} stop sequences are allowed"),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(ApiError::bad(
            "stop",
            format!("stop sequences must be 1 to {MAX_STOP_LEN} bytes"),
        ));
    }
    let params = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: req.seed.map(|s| s as u64),
        max_tokens,
        stop_token_ids: Vec::new(),
        stop,
        ignore_eos: req.ignore_eos,
        min_p: min_p as f32,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: req.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0) as f32,
        logit_bias,
        top_logprobs: 0,
        grammar: None,
    };
    params
        .check()
        .map_err(|(field, message)| ApiError::bad(field, message))?;
    if !req.stream && req.stream_options.is_some() {
        return Err(ApiError::bad(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    Ok(SamplingJob {
        params,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        user: req.user,
        n,
        explicit_max: explicit.is_some(),
    })
}
