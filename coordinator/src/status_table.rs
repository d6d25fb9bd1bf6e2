//! `medtvt status`: the run's state as a plain-text table, one row per job and per process.

use medtvt_proto::v1 as pb;
use medtvt_telemetry::metrics::StepMetric;
use std::fmt::Write;

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "FAILED",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "?",
    }
}

fn stage_name(stage: i32) -> &'static str {
    match pb::Stage::try_from(stage) {
        Ok(pb::Stage::Pt) => "pt",
        Ok(pb::Stage::Sft) => "sft",
        Ok(pb::Stage::Grpo) => "grpo",
        _ => "?",
    }
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::RolloutWorker) => "rollout",
        Ok(pb::Role::Learner) => "learner",
        _ => "?",
    }
}

/// Four decimals, or scientific notation for small magnitudes (a log-prob mismatch of 2e-7 is
/// not 0.0000).
fn number(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// The sampler/learner agreement of the latest GRPO step in words, when it was measured.
fn agreement_line(metrics: &std::collections::HashMap<String, f64>) -> Option<String> {
    let get = |m: StepMetric| metrics.get(m.key()).copied();
    let mean = get(StepMetric::SamplerMismatchMean)?;
    let (p99, max) = (get(StepMetric::SamplerMismatchP99)?, get(StepMetric::SamplerMismatchMax)?);
    let outside = get(StepMetric::SamplerMismatchOutsideClip)?;
    Some(format!(
        "sampler vs learner on lag-0 tokens: |logp diff| mean {} p99 {} max {}, ratio outside the clip range on {:.2}% of them",
        number(mean),
        number(p99),
        number(max),
        100.0 * outside
    ))
}

/// Renders the status as aligned columns.
pub fn render(status: &pb::RunStatus) -> String {
    let mut rows = vec![[
        "JOB", "NAME", "STAGE", "STATE", "STEP", "VERSION", "LEASED", "ACCEPTED", "TRAINED", "STALE", "DUP", "QUEUE",
        "OUT",
    ]
    .map(String::from)
    .to_vec()];
    for j in &status.jobs {
        rows.push(vec![
            j.job_id.to_string(),
            j.name.clone(),
            stage_name(j.stage).into(),
            state_name(j.state).into(),
            format!("{}/{}", j.step, j.total_steps),
            j.policy_version.to_string(),
            j.prompts_leased.to_string(),
            j.groups_accepted.to_string(),
            j.groups_trained.to_string(),
            j.groups_dropped_stale.to_string(),
            j.duplicates_ignored.to_string(),
            j.queue_depth.to_string(),
            j.leased_prompts_outstanding.to_string(),
        ]);
    }
    let mut out = table(&rows);
    out.push_str(&pipeline_line(status.pipeline.as_ref()));
    for j in status.jobs.iter().filter(|j| !j.message.is_empty()) {
        let _ = writeln!(out, "job {}: {}", j.job_id, j.message);
    }
    for j in status.jobs.iter().filter(|j| j.samples_skipped > 0) {
        let _ = writeln!(
            out,
            "job {}: {} samples skipped for broken modality files (listed in events.jsonl)",
            j.job_id, j.samples_skipped
        );
    }
    for j in status.jobs.iter().filter(|j| j.group_epoch > 0) {
        let _ = writeln!(
            out,
            "job {}: learner group {} of {} rank(s), {} rank(s) lost so far",
            j.job_id, j.group_epoch, j.learners, j.learners_lost
        );
    }
    for j in status.jobs.iter().filter(|j| !j.latest_metrics.is_empty()) {
        let mut metrics: Vec<_> = j.latest_metrics.iter().collect();
        metrics.sort_by(|a, b| a.0.cmp(b.0));
        let text: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={}", number(**v))).collect();
        let _ = writeln!(out, "job {} metrics: {}", j.job_id, text.join(" "));
        if let Some(line) = agreement_line(&j.latest_metrics) {
            let _ = writeln!(out, "job {} {line}", j.job_id);
        }
    }
    out.push('\n');
    let mut rows =
        vec![["WORKER", "NAME", "ROLE", "RANK", "ALIVE", "LAST SEEN", "PROGRESS"].map(String::from).to_vec()];
    for w in &status.workers {
        rows.push(vec![
            w.worker_id.to_string(),
            w.name.clone(),
            role_name(w.role).into(),
            w.rank.to_string(),
            if w.alive { "yes" } else { "DEAD" }.into(),
            format!("{:.1}s ago", w.last_heartbeat_ms_ago as f64 / 1000.0),
            // A learner's training loop: a rank whose phase stays put while its peers move is hung.
            if w.phase.is_empty() {
                "-".into()
            } else {
                format!("step {} {} for {:.1}s", w.step, w.phase, w.phase_ms_ago as f64 / 1000.0)
            },
        ]);
    }
    out.push_str(&table(&rows));
    if status.shutting_down {
        out.push_str("the coordinator is shutting down\n");
    }
    out
}

/// The running GRPO job's pipeline gauges (what the HPA scales rollout workers on).
fn pipeline_line(gauges: Option<&pb::PipelineGauges>) -> String {
    match gauges.filter(|g| g.job_id != 0) {
        Some(g) => format!(
            "pipeline of job {}: {} prompts waiting, {} leased prompts, queue depth {}, policy lag {}\n",
            g.job_id, g.prompts_waiting, g.leased_prompts, g.queue_depth, g.policy_lag
        ),
        None => "pipeline: no GRPO job running\n".to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_jobs_workers_and_failures() {
        let status = pb::RunStatus {
            jobs: vec![pb::JobStatus {
                job_id: 3,
                name: "tiny-grpo".into(),
                stage: pb::Stage::Grpo as i32,
                state: pb::JobState::Failed as i32,
                step: 2,
                total_steps: 30,
                groups_trained: 8,
                message: "learner rank 1 lost".into(),
                latest_metrics: [
                    ("loss".to_string(), 0.5),
                    ("mismatch/logp_abs/mean".to_string(), 2.5e-7),
                    ("mismatch/logp_abs/p99".to_string(), 1e-6),
                    ("mismatch/logp_abs/max".to_string(), 3e-6),
                    ("mismatch/outside_clip".to_string(), 0.0),
                ]
                .into(),
                samples_skipped: 4,
                group_epoch: 2,
                learners: 1,
                learners_lost: 1,
                ..Default::default()
            }],
            workers: vec![
                pb::WorkerInfo {
                    worker_id: 9,
                    name: "host-a".into(),
                    role: pb::Role::RolloutWorker as i32,
                    alive: false,
                    last_heartbeat_ms_ago: 31_500,
                    ..Default::default()
                },
                pb::WorkerInfo {
                    worker_id: 10,
                    name: "learner-1".into(),
                    role: pb::Role::Learner as i32,
                    rank: 1,
                    alive: true,
                    last_heartbeat_ms_ago: 400,
                    step: 7,
                    phase: "train".into(),
                    phase_ms_ago: 95_000,
                },
            ],
            shutting_down: false,
            pipeline: Some(pb::PipelineGauges {
                job_id: 3,
                prompts_waiting: 6,
                leased_prompts: 4,
                queue_depth: 2,
                policy_lag: 1,
            }),
        };
        let text = render(&status);
        assert!(
            text.contains("pipeline of job 3: 6 prompts waiting, 4 leased prompts, queue depth 2, policy lag 1"),
            "{text}"
        );
        assert!(render(&pb::RunStatus::default()).contains("pipeline: no GRPO job running"));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("JOB  NAME       STAGE  STATE"), "{text}");
        assert!(lines[1].starts_with("3    tiny-grpo  grpo   FAILED  2/30"), "{text}");
        assert!(text.contains("job 3: learner rank 1 lost"));
        assert!(text.contains("job 3 metrics: loss=0.5000 mismatch/logp_abs/max=3.00e-6"), "{text}");
        assert!(
            text.contains("job 3 sampler vs learner on lag-0 tokens: |logp diff| mean 2.50e-7 p99 1.00e-6 max 3.00e-6, ratio outside the clip range on 0.00%"),
            "{text}"
        );
        assert!(text.contains("job 3: 4 samples skipped for broken modality files"), "{text}");
        assert!(text.contains("9       host-a     rollout  0     DEAD   31.5s ago  -"), "{text}");
        assert!(text.contains("step 7 train for 95.0s"), "{text}");
        assert!(text.contains("job 3: learner group 2 of 1 rank(s), 1 rank(s) lost so far"), "{text}");
    }
}
