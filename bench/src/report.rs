//! What a run leaves behind: a table on the terminal, every request's record
//! and the summary as JSON and CSV, and SVG plots (CDFs of TTFT, TPOT and
//! ITL; latency, attainment and goodput against request rate for sweeps).

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::metrics::{RequestRecord, Stats, Summary};
use crate::BenchError;

/// One measured point: a load level and what it gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    /// "concurrency 4" or "rate 2.0/s".
    pub label: String,
    /// Offered request rate (jobs per second), for open-loop runs.
    pub rate: Option<f64>,
    pub summary: Summary,
    pub harness_cpu_share: f64,
    pub records: Vec<RequestRecord>,
}

fn ms(s: Option<&Stats>, f: fn(&Stats) -> f64) -> String {
    s.map_or("-".into(), |s| format!("{:.1}", f(s) * 1e3))
}

/// The summary as a terminal table.
pub fn table(p: &Point) -> String {
    let s = &p.summary;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{}: {} requests, {} ok, {:.1} s; {:.2} req/s, {:.1} input tok/s, {:.1} output tok/s",
        p.label,
        s.requests,
        s.completed,
        s.duration_s,
        s.request_throughput,
        s.input_token_throughput,
        s.output_token_throughput
    );
    if !s.errors.is_empty() {
        let list: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "  errors: {}", list.join(", "));
    }
    let _ = writeln!(
        o,
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "ms", "mean", "median", "p90", "p95", "p99", "max"
    );
    for (name, st) in [
        ("TTFT", &s.ttft),
        ("TPOT", &s.tpot),
        ("ITL", &s.itl),
        ("E2E", &s.e2e),
    ] {
        let st = st.as_ref();
        let _ = writeln!(
            o,
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            ms(st, |s| s.mean),
            ms(st, |s| s.median),
            ms(st, |s| s.p90),
            ms(st, |s| s.p95),
            ms(st, |s| s.p99),
            ms(st, |s| s.max)
        );
    }
    if let (Some(slo), Some(att), Some(g)) = (s.slo, s.slo_attainment, s.goodput) {
        let _ = writeln!(
            o,
            "  SLO TTFT <= {:.0} ms and TPOT <= {:.0} ms: attainment {:.1}%, goodput {:.2} req/s",
            slo.ttft * 1e3,
            slo.tpot * 1e3,
            att * 100.0,
            g
        );
    }
    if let Some(ph) = &s.phases {
        let _ = writeln!(
            o,
            "  where TTFT went (Tandem, medians): gateway {:.1} ms, decode queue {:.1} ms, prefill queue {:.1} ms, last stage's compute {:.1} ms, prefill round trip {:.1} ms (of which beyond the last stage's queue and compute, such as earlier stages filling the pipeline: {:.1} ms), first step {:.1} ms",
            ph.gateway_ms, ph.decode_queue_ms, ph.prefill_queue_ms, ph.prefill_compute_ms, ph.kv_transfer_ms, ph.kv_tail_ms, ph.first_step_ms
        );
        if let Some(t) = s.ttft.as_ref().filter(|t| t.median > 0.0) {
            let _ = writeln!(
                o,
                "  waiting for KV after the last chunk's compute: {:.1} ms, {:.1}% of the median TTFT",
                ph.kv_wait_ms,
                ph.kv_wait_ms / (t.median * 1e3) * 100.0
            );
        }
        let _ = writeln!(
            o,
            "  prompt tokens cached on decode {:.1}%, computed by prefill {:.1}%, {:.2} MB KV per request",
            ph.cached_share * 100.0,
            ph.prefilled_share * 100.0,
            ph.kv_mb_per_request
        );
    }
    let _ = writeln!(
        o,
        "  harness: {:.1}% of one core",
        p.harness_cpu_share * 100.0
    );
    o
}

pub fn write_json(
    path: &Path,
    config: &serde_json::Value,
    points: &[Point],
) -> Result<(), BenchError> {
    let doc = serde_json::json!({ "config": config, "runs": points });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| BenchError::Usage(e.to_string()))?;
    write(path, text)
}

fn write(path: &Path, text: String) -> Result<(), BenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::Io(dir.display().to_string(), e))?;
    }
    std::fs::write(path, text).map_err(|e| BenchError::Io(path.display().to_string(), e))
}

/// One row per request.
pub fn write_csv(path: &Path, points: &[Point]) -> Result<(), BenchError> {
    let mut o = String::from(
        "run,rate,job,turn,sent_s,ttft_ms,tpot_ms,e2e_ms,input_tokens,output_tokens,error,cached_tokens,prefilled_tokens,kv_bytes,decode_queue_ms,prefill_queue_ms,prefill_compute_ms,kv_transfer_ms,first_step_ms\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{:.3}", x * 1e3));
    for p in points {
        for r in &p.records {
            let t = r.tandem.clone().unwrap_or_default();
            let has = r.tandem.is_some();
            let us = |v: u64| {
                if has {
                    format!("{:.3}", v as f64 / 1e3)
                } else {
                    String::new()
                }
            };
            let n = |v: u64| if has { v.to_string() } else { String::new() };
            let _ = writeln!(
                o,
                "{},{},{},{},{:.6},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                p.label.replace(',', ";"),
                p.rate.map_or(String::new(), |r| r.to_string()),
                r.job,
                r.turn,
                r.sent,
                f(r.ttft()),
                f(r.tpot()),
                f(Some(r.e2e())),
                r.input_tokens,
                r.output_tokens,
                r.error.as_deref().unwrap_or(""),
                n(t.cached_tokens),
                n(t.prefilled_tokens),
                n(t.kv_bytes),
                us(t.decode_queue_us),
                us(t.prefill_queue_us),
                us(t.prefill_compute_us),
                us(t.kv_transfer_us),
                us(t.first_step_us),
            );
        }
    }
    write(path, o)
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_err<E: std::fmt::Debug>(e: E) -> BenchError {
    BenchError::Plot(format!("{e:?}"))
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> Result<(), BenchError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

/// Empirical CDFs of TTFT, TPOT and ITL, one panel each, one line per point.
pub fn plot_cdfs(path: &Path, points: &[Point]) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (1500, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 3));
    type Pick = fn(&RequestRecord) -> Vec<f64>;
    let metrics: [(&str, Pick); 3] = [
        ("TTFT (ms)", |r| r.ttft().into_iter().collect()),
        ("TPOT (ms)", |r| r.tpot().into_iter().collect()),
        ("ITL (ms)", |r| r.itls().collect()),
    ];
    for (panel, (name, pick)) in panels.iter().zip(metrics) {
        let series: Vec<(String, Vec<f64>)> = points
            .iter()
            .map(|p| {
                let mut v: Vec<f64> = p
                    .records
                    .iter()
                    .filter(|r| r.ok())
                    .flat_map(&pick)
                    .map(|x| x * 1e3)
                    .collect();
                v.sort_by(f64::total_cmp);
                (p.label.clone(), v)
            })
            .collect();
        let xmax = series
            .iter()
            .filter_map(|(_, v)| v.last().copied())
            .fold(1e-3, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("CDF of {name}"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..xmax * 1.05, 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(name)
            .y_desc("fraction of requests")
            .draw()
            .map_err(plot_err)?;
        for (i, (label, v)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let n = v.len().max(1) as f64;
            chart
                .draw_series(LineSeries::new(
                    v.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    root.present().map_err(plot_err)
}

/// For a sweep of rates: median and p90 TTFT and TPOT, SLO attainment and
/// goodput against the offered rate. `series` names each system's points.
pub fn plot_sweep(path: &Path, series: &[(String, Vec<Point>)]) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (1500, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 3));
    let rmax = series
        .iter()
        .flat_map(|(_, ps)| ps.iter().filter_map(|p| p.rate))
        .fold(1e-3, f64::max);
    type Y = fn(&Summary) -> Option<f64>;
    let charts: [(&str, Vec<(&str, Y)>); 3] = [
        (
            "TTFT (ms)",
            vec![
                ("median", |s| s.ttft.map(|t| t.median * 1e3)),
                ("p90", |s| s.ttft.map(|t| t.p90 * 1e3)),
            ],
        ),
        (
            "TPOT (ms)",
            vec![
                ("median", |s| s.tpot.map(|t| t.median * 1e3)),
                ("p90", |s| s.tpot.map(|t| t.p90 * 1e3)),
            ],
        ),
        (
            "SLO attainment (%)",
            vec![("", |s| s.slo_attainment.map(|a| a * 100.0))],
        ),
    ];
    for (panel, (name, lines)) in panels.iter().zip(charts) {
        let ymax = series
            .iter()
            .flat_map(|(_, ps)| ps.iter())
            .flat_map(|p| lines.iter().filter_map(|(_, f)| f(&p.summary)))
            .fold(1e-3, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} vs request rate"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..rmax * 1.05, 0.0..ymax * 1.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("request rate (req/s)")
            .y_desc(name)
            .draw()
            .map_err(plot_err)?;
        let mut k = 0;
        for (sys, ps) in series {
            for (line, f) in &lines {
                let color = COLORS[k % COLORS.len()];
                k += 1;
                let pts: Vec<(f64, f64)> = ps
                    .iter()
                    .filter_map(|p| Some((p.rate?, f(&p.summary)?)))
                    .collect();
                let label = if line.is_empty() {
                    sys.clone()
                } else {
                    format!("{sys} {line}")
                };
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                    )
                    .map_err(plot_err)?;
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present().map_err(plot_err)
}
