//! When requests are sent: a constant rate, a Poisson process, or gamma
//! inter-arrival times with a burstiness factor (1 = Poisson; below 1
//! burstier, above 1 more regular), as vLLM's benchmark defines them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Arrivals {
    Constant { rate: f64 },
    Poisson { rate: f64 },
    Gamma { rate: f64, burstiness: f64 },
}

impl Arrivals {
    /// Mean requests per second.
    pub fn rate(&self) -> f64 {
        match *self {
            Arrivals::Constant { rate } | Arrivals::Poisson { rate } => rate,
            Arrivals::Gamma { rate, .. } => rate,
        }
    }

    /// `kind` is `constant`, `poisson` or `gamma` (with `burstiness`).
    pub fn parse(kind: &str, rate: f64, burstiness: f64) -> Result<Arrivals, crate::BenchError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(crate::BenchError::Usage(format!(
                "request rate {rate} must be a positive number"
            )));
        }
        match kind {
            "constant" => Ok(Arrivals::Constant { rate }),
            "poisson" if burstiness == 1.0 => Ok(Arrivals::Poisson { rate }),
            "poisson" | "gamma" => {
                if !(burstiness.is_finite() && burstiness > 0.0) {
                    return Err(crate::BenchError::Usage(format!(
                        "burstiness {burstiness} must be a positive number"
                    )));
                }
                Ok(Arrivals::Gamma { rate, burstiness })
            }
            other => Err(crate::BenchError::Usage(format!(
                "unknown arrival process {other:?} (constant, poisson or gamma)"
            ))),
        }
    }

    /// Send times (seconds from the start) of `n` requests.
    pub fn schedule(&self, n: usize, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = 0.0;
        (0..n)
            .map(|_| {
                let now = t;
                t += match *self {
                    Arrivals::Constant { rate } => 1.0 / rate,
                    Arrivals::Poisson { rate } => -(1.0 - rng.random::<f64>()).ln() / rate,
                    Arrivals::Gamma { rate, burstiness } => {
                        gamma(&mut rng, burstiness) / (rate * burstiness)
                    }
                };
                now
            })
            .collect()
    }
}

/// A Gamma(shape, 1) sample.
fn gamma(rng: &mut StdRng, shape: f64) -> f64 {
    // `parse` admits only finite, positive shapes.
    rand_distr::Gamma::new(shape, 1.0).map_or(1.0, |g| rng.sample(g))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(a: Arrivals) -> (f64, f64) {
        let t = a.schedule(20_001, 42);
        let g: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (g.len() - 1) as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn the_arrival_processes_have_the_requested_statistics() {
        let (m, cv) = gaps(Arrivals::Constant { rate: 4.0 });
        assert!((m - 0.25).abs() < 1e-12 && cv < 1e-9);
        // Exponential gaps: mean 1/rate, coefficient of variation 1.
        let (m, cv) = gaps(Arrivals::Poisson { rate: 4.0 });
        assert!((m - 0.25).abs() < 0.01, "mean gap {m}");
        assert!((cv - 1.0).abs() < 0.03, "cv {cv}");
        // Gamma gaps with burstiness b: mean 1/rate, CV = 1/sqrt(b).
        for b in [0.25, 4.0] {
            let (m, cv) = gaps(Arrivals::Gamma {
                rate: 4.0,
                burstiness: b,
            });
            assert!((m - 0.25).abs() < 0.015, "b={b}: mean gap {m}");
            assert!(
                (cv - 1.0 / b.sqrt()).abs() < 0.06 / b.sqrt(),
                "b={b}: cv {cv}"
            );
        }
        // Same seed, same schedule.
        let p = Arrivals::Poisson { rate: 2.0 };
        assert_eq!(p.schedule(10, 7), p.schedule(10, 7));
    }
}
