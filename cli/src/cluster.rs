//! A local cluster of separate `medtvt` processes on loopback: one coordinator, N learners and M
//! rollout workers, each logging to `<run_dir>/logs/<role>.log`. Used by `medtvt train` (when
//! no coordinator is given) and `medtvt demo`. Every child is killed when the cluster is dropped,
//! so an error or ctrl-c never leaves processes behind. Learners and workers get no `--device`:
//! each job runs on its config's `model.device` (unless `MEDTVT_DEVICE` is set).
//!
//! The learners and workers share this machine's cores, so each gets an equal share of them as
//! its OpenMP (libtorch CPU) threads, with passive waiting, unless `OMP_NUM_THREADS` /
//! `OMP_WAIT_POLICY` are already set: by default every process would start one spinning thread
//! per core, and on 2 cores two learners spent 60 % of their time in libgomp's spin-wait
//! (measured with perf during the showcase's SFT: 4 s per step instead of 1.3 s).

use anyhow::{bail, Context};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// An equal share of this machine's cores for each of `processes` compute processes (at least 1).
fn threads_per_process(processes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes.max(1)).max(1)
}

/// The OpenMP settings of a child: `threads` threads that wait passively, except where the user
/// set them.
fn cpu_thread_env(threads: usize) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        env.push(("OMP_NUM_THREADS", threads.to_string()));
    }
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        env.push(("OMP_WAIT_POLICY", "PASSIVE".to_string()));
    }
    env
}

/// Processes of one local cluster.
pub struct LocalCluster {
    children: Vec<(String, Child)>,
    /// `http://127.0.0.1:PORT` of the coordinator.
    pub url: String,
    pub log_dir: PathBuf,
}

/// How many of each role, and where logs go.
#[derive(Debug, Clone)]
pub struct ClusterShape {
    pub learners: usize,
    pub rollout_workers: usize,
    pub run_dir: PathBuf,
    /// The coordinator's `--job-root` folders: where the jobs submitted to it may point (its
    /// working directory when empty).
    pub job_roots: Vec<PathBuf>,
}

impl LocalCluster {
    /// Starts the coordinator, waits for its `coordinator listening on ADDR` line, then starts
    /// the learners and workers pointed at it.
    pub fn start(shape: &ClusterShape) -> anyhow::Result<LocalCluster> {
        let exe = std::env::current_exe().context("locating the medtvt binary")?;
        let log_dir = shape.run_dir.join("logs");
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let mut cluster = LocalCluster { children: Vec::new(), url: String::new(), log_dir: log_dir.clone() };

        let coordinator_log = log_dir.join("coordinator.log");
        let mut coordinator = Command::new(&exe);
        coordinator.args(["coordinator", "--listen", "127.0.0.1:0", "--run-dir"]).arg(&shape.run_dir);
        for root in &shape.job_roots {
            coordinator.arg("--job-root").arg(root);
        }
        let mut coordinator = coordinator
            .stdout(Stdio::piped())
            .stderr(log_file(&coordinator_log)?)
            .env_remove("MEDTVT_CONFIG")
            .env_remove("MEDTVT_JOB_ROOTS")
            .spawn()
            .context("starting the coordinator")?;
        let stdout = coordinator.stdout.take().context("coordinator stdout")?;
        cluster.children.push(("coordinator".into(), coordinator));
        let addr = wait_for_listen_line(stdout, &coordinator_log)?;
        cluster.url = format!("http://{addr}");

        let threads = threads_per_process(shape.learners + shape.rollout_workers);
        for rank in 0..shape.learners {
            let name = format!("learner-{rank}");
            let child = Command::new(&exe)
                .envs(cpu_thread_env(threads))
                .args(["learner", "--coordinator", &cluster.url])
                .args(["--rank", &rank.to_string(), "--world-size", &shape.learners.to_string()])
                .stdout(log_file(&log_dir.join(format!("{name}.log")))?)
                .stderr(log_file(&log_dir.join(format!("{name}.log")))?)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            cluster.children.push((name, child));
        }
        for i in 0..shape.rollout_workers {
            let name = format!("rollout-worker-{i}");
            let child = Command::new(&exe)
                .envs(cpu_thread_env(threads))
                .args(["rollout-worker", "--coordinator", &cluster.url, "--name", &name])
                .stdout(log_file(&log_dir.join(format!("{name}.log")))?)
                .stderr(log_file(&log_dir.join(format!("{name}.log")))?)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            cluster.children.push((name, child));
        }
        Ok(cluster)
    }

    /// Fails naming the first child that has exited (a crashed learner or worker), with the tail
    /// of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().context("polling a child process")? {
                let log = self.log_dir.join(format!("{name}.log"));
                bail!("{name} exited ({status}); last lines of {}:\n{}", log.display(), tail(&log, 15));
            }
        }
        Ok(())
    }

    /// Waits up to `grace` for every child to exit on its own (after a coordinator shutdown),
    /// then kills what is left.
    pub fn wait_then_kill(mut self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.children.iter_mut().all(|(_, c)| matches!(c.try_wait(), Ok(Some(_)))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for (_, child) in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn log_file(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

/// Reads the coordinator's stdout until its readiness line, copying everything into its log (on
/// a thread that keeps copying afterwards).
fn wait_for_listen_line(stdout: std::process::ChildStdout, log: &Path) -> anyhow::Result<String> {
    let (tx, rx) = mpsc::channel();
    let mut file = log_file(log)?;
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            if !sent {
                if let Some(addr) = line.strip_prefix("coordinator listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
        anyhow::anyhow!(
            "the coordinator did not report its address within 60 s; see {}:\n{}",
            log.display(),
            tail(log, 15)
        )
    })
}

/// The last `n` lines of a log file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
