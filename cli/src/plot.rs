//! `medtvt plot RUN_DIR`: PNG charts of a run's metrics.jsonl: the GRPO reward per step (raw and
//! moving average), loss, KL, the sampler/learner log-prob agreement of GRPO steps, and the
//! per-disease F1 of each stage's evaluation as grouped bars. One PNG per chart, written beside the
//! log.

use anyhow::{Context, Result};
use medtvt_learner::metrics_log::{read_all, MetricsRecord};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
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

const CHARTS: [Chart; 4] = [
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
];

/// Steps averaged by the reward chart's moving average (trailing window; shorter at the start).
const REWARD_WINDOW: usize = 5;

pub fn run(args: &PlotArgs) -> Result<()> {
    let log = if args.run_dir.is_file() { args.run_dir.clone() } else { args.run_dir.join("metrics.jsonl") };
    let records = read_all(&log)?;
    let out = args.out.clone().unwrap_or_else(|| log.parent().unwrap_or(Path::new(".")).join("plots"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = 0;
    let rewards = reward_series(&records);
    if !rewards.is_empty() {
        let path = out.join("reward.png");
        let root = BitMapBackend::new(&path, (900, 540)).into_drawing_area();
        draw_reward(&root, &rewards).with_context(|| format!("drawing {}", path.display()))?;
        println!("wrote {}", path.display());
        written += 1;
    }
    let f1 = f1_by_stage(&records);
    if !f1.is_empty() {
        let path = out.join("f1.png");
        let root = BitMapBackend::new(&path, F1_SIZE).into_drawing_area();
        draw_f1_bars(&root, &f1).with_context(|| format!("drawing {}", path.display()))?;
        println!("wrote {}", path.display());
        written += 1;
    }
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

/// The smallest and largest x and y over every point of `series`: (x0, x1, y0, y1).
fn bounds(series: &[(String, Vec<(f64, f64)>)]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|(_, p)| p.iter()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    (x0, x1, y0, y1)
}

fn draw(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let (x0, x1, y0, y1) = bounds(series);
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

/// The GRPO steps' reward values, on the GRPO step axis (the first GRPO step is x = 1, whatever ran
/// before): (name, points) for the mean sampled reward, its moving average, and its two parts.
fn reward_series(records: &[MetricsRecord]) -> Vec<(String, Vec<(f64, f64)>)> {
    let pick = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| !r.values.contains_key("eval/jaccard"))
            .filter_map(|r| r.values.get(key).filter(|v| v.is_finite()).map(|&v| (r.step as f64, v)))
            .collect()
    };
    let raw = pick("reward_mean");
    if raw.is_empty() {
        return Vec::new();
    }
    let avg = moving_average(&raw, REWARD_WINDOW);
    let mut series = vec![
        ("mean sampled reward (Jaccard + format)".to_string(), raw),
        (format!("moving average over {REWARD_WINDOW} steps"), avg),
    ];
    for (key, name) in [("jaccard", "mean sampled Jaccard"), ("format", "mean format reward")] {
        let points = pick(key);
        if !points.is_empty() {
            series.push((name.to_string(), points));
        }
    }
    series
}

/// Trailing moving average of the y values over `window` points (fewer at the start).
pub(crate) fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let from = (i + 1).saturating_sub(window);
            let slice = &points[from..=i];
            (x, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
        })
        .collect()
}

fn draw_reward<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, series: &[(String, Vec<(f64, f64)>)]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (x0, x1, y0, y1) = bounds(series);
    // Headroom above the data for the legend, so it never sits on a line.
    let span = (y1 - y0).max(0.05);
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption("GRPO: reward of the sampled answers per step", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - 0.05 * span)..(y1 + 0.55 * span))?;
    chart.configure_mesh().x_desc("GRPO step").y_desc("reward").draw()?;
    let styles: [(RGBColor, u32); 4] =
        [(RGBColor(150, 170, 220), 1), (BLUE, 3), (RGBColor(200, 80, 40), 1), (GREEN, 1)];
    for (i, (name, pts)) in series.iter().enumerate() {
        let (color, width) = styles[i.min(styles.len() - 1)];
        let style = color.stroke_width(width);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .margin(12)
        .legend_area_size(32)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

const F1_SIZE: (u32, u32) = (900, 560);

/// Per stage (in the order the stages ran), the per-disease F1 of its last evaluation record.
fn f1_by_stage(records: &[MetricsRecord]) -> Vec<(String, Vec<(String, f64)>)> {
    let mut stages: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for r in records {
        let scores: Vec<(String, f64)> = r
            .values
            .iter()
            .filter_map(|(k, &v)| k.strip_prefix("eval/f1/").filter(|_| v.is_finite()).map(|d| (d.to_string(), v)))
            .collect();
        if scores.is_empty() {
            continue;
        }
        match stages.iter_mut().find(|(s, _)| *s == r.stage) {
            Some((_, old)) => *old = scores,
            None => stages.push((r.stage.clone(), scores)),
        }
    }
    // A stage that never names a disease (PT answers physiological questions) has nothing to show.
    if stages.len() > 1 {
        stages.retain(|(_, scores)| scores.iter().any(|&(_, f)| f > 0.0));
    }
    stages
}

/// Stage colours of the F1 bars, in stage order.
const STAGE_COLORS: [RGBColor; 4] = [RGBColor(120, 120, 120), RGBColor(70, 110, 200), RGBColor(230, 120, 30), GREEN];

/// Horizontal grouped bars: one group per disease (names on the left), one bar per stage, its F1
/// written at the bar's end.
fn draw_f1_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    stages: &[(String, Vec<(String, f64)>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut diseases: Vec<String> = stages.iter().flat_map(|(_, s)| s.iter().map(|(d, _)| d.clone())).collect();
    diseases.sort();
    diseases.dedup();
    let n = diseases.len() as f64;
    let colors: Vec<RGBColor> = if stages.len() == 2 {
        vec![STAGE_COLORS[1], STAGE_COLORS[2]]
    } else {
        (0..stages.len()).map(|i| STAGE_COLORS[i % STAGE_COLORS.len()]).collect()
    };
    root.fill(&WHITE)?;
    let (label_area, bar_area) = root.split_horizontally(210);
    let mut chart = ChartBuilder::on(&bar_area)
        .caption("per-disease F1 on the test split", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(0)
        .build_cartesian_2d(0f64..1.12f64, 0f64..n)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.1}"))
        .x_desc("F1")
        .draw()?;
    let height = 0.8 / stages.len().max(1) as f64;
    for (s, (stage, scores)) in stages.iter().enumerate() {
        let color = colors[s];
        let bars: Vec<(f64, f64, f64)> = scores
            .iter()
            .filter_map(|(d, f)| diseases.iter().position(|x| x == d).map(|i| (i, f)))
            // The first disease at the top.
            .map(|(i, &f)| (f, n - 1.0 - i as f64 + 0.9 - (s + 1) as f64 * height, height))
            .collect();
        chart
            .draw_series(
                bars.iter().map(|&(f, y, h)| Rectangle::new([(0.0, y), (f.max(0.004), y + h)], color.filled())),
            )?
            .label(stage.to_uppercase())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], color.filled()));
        chart.draw_series(bars.iter().map(|&(f, y, h)| {
            Text::new(
                format!("{f:.2}"),
                (f + 0.01, y + h / 2.0),
                TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    // The disease names, right-aligned beside their group.
    for (i, d) in diseases.iter().enumerate() {
        let (_, py) = chart.backend_coord(&(0.0, n - 0.5 - i as f64));
        let (ox, oy) = label_area.get_base_pixel();
        label_area.draw(&Text::new(
            d.clone(),
            (205 - ox, py - oy),
            TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
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
    fn reward_chart_counts_grpo_steps_from_one_with_a_moving_average() {
        let mut records = Vec::new();
        for step in 1..=400 {
            records.push(MetricsRecord { stage: "sft".into(), step, values: [("loss".to_string(), 1.0)].into() });
        }
        for step in 1..=6 {
            let values = [("reward_mean".to_string(), step as f64), ("jaccard".to_string(), 0.5)].into();
            records.push(MetricsRecord { stage: "grpo".into(), step, values });
        }
        let series = reward_series(&records);
        let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[2].contains("Jaccard"), "the full name is in the legend: {names:?}");
        assert_eq!(series[0].1.first().unwrap().0, 1.0, "the x axis starts at the first GRPO step");
        assert_eq!(series[1].1[5], (6.0, (2.0 + 3.0 + 4.0 + 5.0 + 6.0) / 5.0));
        assert_eq!(moving_average(&[(1.0, 2.0), (2.0, 4.0)], 5), vec![(1.0, 2.0), (2.0, 3.0)]);
    }

    #[test]
    fn f1_chart_draws_one_bar_per_stage_and_disease() {
        let eval = |stage: &str, f1: [f64; 3]| MetricsRecord {
            stage: stage.into(),
            step: 10,
            values: ["sepsis", "pneumonia", "hypertension"]
                .iter()
                .zip(f1)
                .map(|(d, f)| (format!("eval/f1/{d}"), f))
                .chain([("eval/jaccard".to_string(), 0.5)])
                .collect(),
        };
        let records = vec![eval("pt", [0.0; 3]), eval("sft", [0.4, 0.6, 0.8]), eval("grpo", [0.5, 0.7, 0.0])];
        let stages = f1_by_stage(&records);
        assert_eq!(stages.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), ["sft", "grpo"], "PT names nothing");
        let (w, h) = F1_SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, F1_SIZE).into_drawing_area();
            draw_f1_bars(&root, &stages).unwrap();
        }
        let count = |c: RGBColor| buf.chunks(3).filter(|p| p == &[c.0, c.1, c.2]).count();
        // The bars' areas in pixels, roughly: F1 x plot width times bar height (plus the legend).
        let (sft, grpo) = (count(STAGE_COLORS[1]), count(STAGE_COLORS[2]));
        assert!(sft > 5_000, "SFT bars drawn: {sft} pixels");
        assert!(grpo > 3_000 && grpo < sft, "GRPO bars drawn, shorter in total: {grpo} vs {sft}");
    }

    #[test]
    fn empty_log_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "").unwrap();
        let err = run(&PlotArgs { run_dir: dir.path().to_path_buf(), out: None }).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl: no reward"), "{err}");
    }
}
