//! Goodput across seeds: what `tandem bench goodput` concludes from a sweep
//! of rates run once per seed.
//!
//! One seed's sweep is a handful of requests per rate, so one unlucky
//! arrival burst moves attainment by a step and can flip which system looks
//! better. A claim is made only when it holds in every seed: per point the
//! attainment's spread over seeds (min–max) and the pooled share's 95%
//! Wilson interval, per system the goodput each seed gives, and per pair of
//! systems whether one's goodput is higher in every seed.

use std::cmp::Ordering;
use std::fmt;

/// The goodput one seed's sweep gives: the highest rate such that it and
/// every lower rate of the sweep met the attainment target. Rates above a
/// failing one do not count, so one lucky point past a failure cannot raise
/// it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goodput {
    /// Even the lowest rate missed the target.
    Below(f64),
    /// The highest passing rate; the next one failed.
    At(f64),
    /// Every rate passed: the sweep did not find the limit.
    AtLeast(f64),
}

impl Goodput {
    /// From `(rate, attainment)` points (any order) and the target share.
    /// `None` for an empty sweep.
    pub fn of(points: &[(f64, f64)], target: f64) -> Option<Goodput> {
        let mut pts = points.to_vec();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let lowest = pts.first()?.0;
        let mut best = None;
        for &(rate, att) in &pts {
            if att >= target {
                best = Some(rate);
            } else {
                return Some(best.map_or(Goodput::Below(lowest), Goodput::At));
            }
        }
        Some(Goodput::AtLeast(pts.last()?.0))
    }

    /// A number to order goodputs by: the rate, 0 below the sweep.
    fn key(self) -> f64 {
        match self {
            Goodput::Below(_) => 0.0,
            Goodput::At(r) | Goodput::AtLeast(r) => r,
        }
    }

    /// How this seed's goodput compares with another system's on the same
    /// seed. Two sweeps that both passed every rate, or both failed the
    /// lowest, cannot be told apart.
    pub fn compare(self, other: Goodput) -> Ordering {
        self.key().total_cmp(&other.key())
    }
}

impl fmt::Display for Goodput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goodput::Below(r) => write!(f, "<{r}/s"),
            Goodput::At(r) => write!(f, "{r}/s"),
            Goodput::AtLeast(r) => write!(f, ">={r}/s"),
        }
    }
}

/// What several seeds say about system A against system B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// A's goodput is higher in every seed.
    Higher { p: f64 },
    /// A's goodput is lower in every seed.
    Lower { p: f64 },
    /// Equal within the sweep in every seed.
    Same,
    /// Equal in every seed, at least once because both passed every rate
    /// or both failed the lowest: the sweep could not tell them apart.
    Unresolved,
    /// The seeds disagree: no claim either way.
    Mixed {
        higher: usize,
        same: usize,
        lower: usize,
    },
}

/// The two-sided sign test's p-value for `n` seeds that all went one way:
/// how often that happens by chance when neither system is better. Three
/// seeds can do no better than 0.25, so "every seed" is a necessary
/// condition for a claim, not proof.
fn sign_p(n: usize) -> f64 {
    (2.0 * 0.5f64.powi(n as i32)).min(1.0)
}

impl Verdict {
    /// Pairs the two systems' goodputs seed by seed.
    pub fn of(a: &[Goodput], b: &[Goodput]) -> Option<Verdict> {
        if a.is_empty() || a.len() != b.len() {
            return None;
        }
        let (mut higher, mut same, mut lower, mut outside) = (0, 0, 0, 0);
        for (x, y) in a.iter().zip(b) {
            match x.compare(*y) {
                Ordering::Greater => higher += 1,
                Ordering::Equal => {
                    same += 1;
                    outside += usize::from(matches!(
                        (x, y),
                        (Goodput::AtLeast(_), Goodput::AtLeast(_))
                            | (Goodput::Below(_), Goodput::Below(_))
                    ));
                }
                Ordering::Less => lower += 1,
            }
        }
        let n = a.len();
        Some(if higher == n {
            Verdict::Higher { p: sign_p(n) }
        } else if lower == n {
            Verdict::Lower { p: sign_p(n) }
        } else if same == n && outside > 0 {
            Verdict::Unresolved
        } else if same == n {
            Verdict::Same
        } else {
            Verdict::Mixed {
                higher,
                same,
                lower,
            }
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Higher { p } => write!(f, "higher in every seed (sign test p = {p:.2})"),
            Verdict::Lower { p } => write!(f, "lower in every seed (sign test p = {p:.2})"),
            Verdict::Same => write!(f, "the same in every seed"),
            Verdict::Unresolved => write!(
                f,
                "not separated: the same in every seed, both beyond the sweep at least once"
            ),
            Verdict::Mixed {
                higher,
                same,
                lower,
            } => write!(
                f,
                "no claim: higher in {higher}, same in {same}, lower in {lower} seeds"
            ),
        }
    }
}

/// The 95% Wilson score interval of a share `good / n` (`None` for n = 0).
/// Unlike the normal approximation it stays inside [0, 1] and is not zero
/// wide at 0% or 100%, which is where SLO attainment usually sits.
///
/// It treats the `n` requests as independent. Requests of one run share a
/// queue (and a session's turns share a conversation), so the spread over
/// seeds is the better guide; the interval is a lower bound on the
/// uncertainty.
pub fn wilson(good: usize, n: usize) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, good as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    let lo = if good == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if good as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    Some((lo, hi))
}

/// One rate's attainment over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    pub rate: f64,
    pub min: f64,
    pub max: f64,
    /// Requests that met both SLOs, over all seeds, and how many were sent.
    pub good: usize,
    pub requests: usize,
}

impl Spread {
    /// The pooled share of requests that met the SLOs.
    pub fn pooled(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.good as f64 / self.requests as f64
        }
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = wilson(self.good, self.requests).unwrap_or((0.0, 0.0));
        write!(
            f,
            "{:>5.1}% (seeds {:.0}-{:.0}%, Wilson 95% {:.0}-{:.0}% if independent, {}/{})",
            self.pooled() * 100.0,
            self.min * 100.0,
            self.max * 100.0,
            lo * 100.0,
            hi * 100.0,
            self.good,
            self.requests
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn goodput_stops_at_the_first_failing_rate() {
        let g = |pts: &[(f64, f64)]| Goodput::of(pts, 0.9).expect("points");
        assert_eq!(g(&[(0.1, 1.0), (0.2, 0.85), (0.3, 0.95)]), Goodput::At(0.1));
        assert_eq!(
            g(&[(0.3, 0.95), (0.1, 1.0), (0.2, 0.9)]),
            Goodput::AtLeast(0.3)
        );
        assert_eq!(g(&[(0.1, 0.5), (0.2, 1.0)]), Goodput::Below(0.1));
        assert_eq!(Goodput::of(&[], 0.9), None);
        assert_eq!(Goodput::At(0.1).to_string(), "0.1/s");
        assert_eq!(Goodput::AtLeast(0.2).to_string(), ">=0.2/s");
    }

    #[test]
    fn a_claim_needs_every_seed() {
        use Goodput::*;
        let v = |a: &[Goodput], b: &[Goodput]| Verdict::of(a, b).expect("paired");
        assert_eq!(
            v(&[AtLeast(0.2), At(0.1)], &[At(0.1), Below(0.1)]),
            Verdict::Higher { p: 0.5 }
        );
        assert_eq!(
            v(&[AtLeast(0.2), At(0.1)], &[At(0.1), AtLeast(0.2)]),
            Verdict::Mixed {
                higher: 1,
                same: 0,
                lower: 1
            }
        );
        assert_eq!(v(&[At(0.1), At(0.2)], &[At(0.1), At(0.2)]), Verdict::Same);
        // Both passed every rate: the sweep did not separate them.
        assert_eq!(
            v(&[AtLeast(0.2), At(0.1)], &[AtLeast(0.2), At(0.1)]),
            Verdict::Unresolved
        );
        assert_eq!(v(&[Below(0.1)], &[At(0.1)]), Verdict::Lower { p: 1.0 });
        assert_eq!(sign_p(3), 0.25);
        assert_eq!(Verdict::of(&[At(0.1)], &[]), None);
    }

    #[test]
    fn wilson_matches_published_values() {
        // 18 of 20: 0.699–0.972, computed by hand with z = 1.96.
        let (lo, hi) = wilson(18, 20).expect("n > 0");
        assert!(
            (lo - 0.6990).abs() < 5e-4 && (hi - 0.9721).abs() < 5e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(20, 20).expect("n > 0");
        assert!(hi == 1.0 && (lo - 0.8389).abs() < 5e-4, "{lo}");
        // The endpoints at 0% and 100% are exact for any n.
        assert_eq!(wilson(60, 60).expect("n > 0").1, 1.0);
        assert_eq!(wilson(0, 6).expect("n > 0").0, 0.0);
        assert_eq!(wilson(0, 0), None);
    }

    proptest! {
        #[test]
        fn wilson_contains_the_share(n in 1usize..500, k in 0usize..500) {
            let good = k % (n + 1);
            let (lo, hi) = wilson(good, n).expect("n > 0");
            let p = good as f64 / n as f64;
            prop_assert!(0.0 <= lo && lo <= p + 1e-12 && p <= hi + 1e-12 && hi <= 1.0);
            prop_assert!(hi - lo > 0.0);
        }

        #[test]
        fn swapping_the_systems_reverses_the_verdict(
            a in proptest::collection::vec(0u8..4, 1..6),
            b in proptest::collection::vec(0u8..4, 1..6),
        ) {
            let n = a.len().min(b.len());
            let g = |x: u8| match x { 0 => Goodput::Below(0.1), 3 => Goodput::AtLeast(0.3), r => Goodput::At(f64::from(r) / 10.0) };
            let a: Vec<_> = a[..n].iter().map(|&x| g(x)).collect();
            let b: Vec<_> = b[..n].iter().map(|&x| g(x)).collect();
            let (ab, ba) = (Verdict::of(&a, &b).expect("paired"), Verdict::of(&b, &a).expect("paired"));
            let flipped = match ab {
                Verdict::Higher { p } => Verdict::Lower { p },
                Verdict::Lower { p } => Verdict::Higher { p },
                Verdict::Same => Verdict::Same,
                Verdict::Unresolved => Verdict::Unresolved,
                Verdict::Mixed { higher, same, lower } => Verdict::Mixed { higher: lower, same, lower: higher },
            };
            prop_assert_eq!(ba, flipped);
        }
    }
}
