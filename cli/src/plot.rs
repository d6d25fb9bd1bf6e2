//! `medtvt plot RUN_DIR`: PNG charts of a run's metrics.jsonl: reward, loss, KL, the sampler/learner
//! log-prob agreement of GRPO steps, and the per-disease F1 of the evaluations, over steps. One
//! PNG per chart, written beside the log.

use anyhow::{Context, Result};
use medtvt_learner::metrics_log::{read_all, MetricsRecord};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PlotArgs {
    /// A run directory holding metrics.jsonl (or the path of a metrics.jsonl file).
    pub run_dir: PathBuf,
    /// Where to write the PNGs (default: RUN_DIR/plots).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One chart: a title and the metric names (or a name prefix ending in '/') it draws.
struct Chart {
    file: &'static str,
    title: &'static str,
    series: &'static [&'static str],
    /// Plot log10 of the (positive) values: for quantities spanning many decades.
    log10: bool,
}

const CHARTS: [Chart; 6] = [
    Chart { file: "reward.png", title: "GRPO reward", series: &["reward_mean", "jaccard", "format"], log10: false },
    Chart { file: "loss.png", title: "training loss", series: &["loss"], log10: false },
    Chart { file: "kl.png", title: "KL to the reference policy", series: &["kl"], log10: false },
    Chart {
        file: "mismatch.png",
        title: "log10 |learner - sampler| log-prob, lag-0 tokens",
        series: &["mismatch/logp_abs/"],
        log10: true,
    },
    Chart {
        file: "mismatch_clip.png",
        title: "lag-0 tokens outside the clip range; importance weights corrected",
        series: &["mismatch/outside_clip", "is/corrected_fraction"],
        log10: false,
    },
    Chart { file: "f1.png", title: "per-disease F1 (evaluation)", series: &["eval/f1/"], log10: false },
];

pub fn run(args: &PlotArgs) -> Result<()> {
    let log = if args.run_dir.is_file() { args.run_dir.clone() } else { args.run_dir.join("metrics.jsonl") };
    let records = read_all(&log)?;
    let out = args.out.clone().unwrap_or_else(|| log.parent().unwrap_or(Path::new(".")).join("plots"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = 0;
    for chart in &CHARTS {
        let mut series = collect_series(&records, chart.series);
        if chart.log10 {
            for (_, points) in &mut series {
                points.retain(|&(_, y)| y > 0.0);
                points.iter_mut().for_each(|(_, y)| *y = y.log10());
            }
            series.retain(|(_, points)| !points.is_empty());
        }
        if series.is_empty() {
            continue;
        }
        let path = out.join(chart.file);
        draw(&path, chart.title, &series).with_context(|| format!("drawing {}", path.display()))?;
        println!("wrote {}", path.display());
        written += 1;
    }
    if written == 0 {
        anyhow::bail!("{}: no reward, loss, kl or eval/f1 values to plot", log.display());
    }
    Ok(())
}

/// (name, points) for every metric matching `wanted`, points ordered by a global x: stages are
/// laid end to end (PT steps, then SFT, then GRPO) so one chart can span a whole pipeline.
fn collect_series(records: &[MetricsRecord], wanted: &[&str]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut offset = 0.0;
    let mut stage = None;
    let mut stage_max = 0.0f64;
    for r in records {
        if stage.as_deref() != Some(r.stage.as_str()) {
            offset += stage_max;
            stage_max = 0.0;
            stage = Some(r.stage.clone());
        }
        stage_max = stage_max.max(r.step as f64);
        for (name, &value) in &r.values {
            let matches = wanted.iter().any(|w| if w.ends_with('/') { name.starts_with(w) } else { name == w });
            if !matches || !value.is_finite() {
                continue;
            }
            let label = format!("{} ({})", name, r.stage);
            match series.iter_mut().find(|(n, _)| *n == label) {
                Some((_, pts)) => pts.push((offset + r.step as f64, value)),
                None => series.push((label, vec![(offset + r.step as f64, value)])),
            }
        }
    }
    series
}

fn draw(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    chart.configure_mesh().x_desc("step").draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medtvt_learner::metrics_log::append;

    #[test]
    fn plots_a_two_stage_log_into_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("metrics.jsonl");
        for (stage, steps) in [("sft", 5), ("grpo", 5)] {
            for step in 1..=steps {
                let mut values = std::collections::BTreeMap::new();
                values.insert("loss".to_string(), 1.0 / step as f64);
                if stage == "grpo" {
                    values.insert("reward_mean".to_string(), step as f64 * 0.1);
                    values.insert("kl".to_string(), 0.01 * step as f64);
                    values.insert("eval/f1/sepsis".to_string(), 0.5);
                    values.insert("mismatch/logp_abs/p99".to_string(), 1e-7 * step as f64);
                    values.insert("mismatch/outside_clip".to_string(), 0.0);
                }
                append(&log, &MetricsRecord { stage: stage.into(), step, values }).unwrap();
            }
        }
        run(&PlotArgs { run_dir: dir.path().to_path_buf(), out: None }).unwrap();
        for f in ["reward.png", "loss.png", "kl.png", "f1.png", "mismatch.png", "mismatch_clip.png"] {
            let bytes = std::fs::read(dir.path().join("plots").join(f)).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{f} is a PNG");
        }
        let series = collect_series(&read_all(&log).unwrap(), &["loss"]);
        assert_eq!(series.len(), 2, "one loss line per stage");
        assert_eq!(series[1].1[0].0, 6.0, "GRPO steps continue after the 5 SFT steps");
    }

    #[test]
    fn empty_log_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "").unwrap();
        let err = run(&PlotArgs { run_dir: dir.path().to_path_buf(), out: None }).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl: no reward"), "{err}");
    }
}
