//! Where a job submitted over the network may point the cluster. Learners and rollout workers
//! read and write the paths a job's config names (`run.out_dir`, `data.dir`, `model.checkpoint`,
//! the encoder weight files: [`RunConfig::paths`]) as their own user, so a SubmitJob call could
//! otherwise make them write checkpoints anywhere. With [`JobRoots::Confined`] each of those
//! paths must lie under one of the configured roots, or the job is refused naming the key and
//! the path. The configs given to the coordinator on its own command line are the operator's and
//! are not checked.
//!
//! A path is resolved the way the processes resolve it: a relative one against the coordinator's
//! working directory, `.` and `..` taken lexically, and the longest part of it that exists
//! followed through symbolic links (so a link inside a root that points out of it does not get
//! out). Roots are resolved the same way when they are set and need not exist yet.

use medtvt_config::RunConfig;
use std::path::{Component, Path, PathBuf};

/// The paths jobs submitted over the network may name.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum JobRoots {
    /// Any path (the library's default, for tests and embedding; the `medtvt coordinator`
    /// command always confines).
    #[default]
    Any,
    /// Only paths under one of `roots` (absolute, resolved); relative paths in a config are
    /// taken from `base`, the directory the coordinator runs in.
    Confined { roots: Vec<PathBuf>, base: PathBuf },
}

/// Why a submitted job was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobRootsError {
    #[error(
        "`{key}` = {} is outside the folders this coordinator lets submitted jobs use ({}); \
         put the job's files under one of them, or start the coordinator with --job-root for their folder",
        path.display(),
        list(roots)
    )]
    Outside { key: String, path: PathBuf, roots: Vec<PathBuf> },
    #[error("cannot resolve the job root {}: {problem}", path.display())]
    BadRoot { path: PathBuf, problem: String },
}

fn list(roots: &[PathBuf]) -> String {
    roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl JobRoots {
    /// Confines jobs to `roots`; relative roots, and relative paths in configs, are taken from
    /// `base` (the working directory).
    pub fn confined(roots: &[PathBuf], base: &Path) -> Result<JobRoots, JobRootsError> {
        let resolved = roots
            .iter()
            .map(|r| {
                resolve(r, base)
                    .ok_or_else(|| JobRootsError::BadRoot { path: r.clone(), problem: "it climbs above /".into() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JobRoots::Confined { roots: resolved, base: base.to_path_buf() })
    }

    /// `Ok` when every path `config` names lies under a root.
    pub fn check(&self, config: &RunConfig) -> Result<(), JobRootsError> {
        let JobRoots::Confined { roots, base } = self else {
            return Ok(());
        };
        for (key, path) in config.paths() {
            let inside = resolve(path, base).is_some_and(|p| roots.iter().any(|root| p.starts_with(root)));
            if !inside {
                return Err(JobRootsError::Outside {
                    key: key.to_string(),
                    path: path.to_path_buf(),
                    roots: roots.clone(),
                });
            }
        }
        Ok(())
    }
}

/// `path` made absolute against `base`, normalised lexically, with its longest existing prefix
/// canonicalised (symbolic links followed). `None` when `..` climbs above the root.
pub fn resolve(path: &Path, base: &Path) -> Option<PathBuf> {
    let joined = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    let mut normal = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::Prefix(_) | Component::RootDir => normal.push(part.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !normal.pop() || normal.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(name) => normal.push(name),
        }
    }
    // Follow links in the part that exists; what does not exist yet is appended as written.
    let mut existing = normal.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            out.extend(rest.iter().rev());
            return Some(out);
        }
        let name = existing.file_name()?.to_os_string();
        rest.push(name);
        if !existing.pop() {
            return Some(normal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(out_dir: &str, data_dir: &str, weights: Option<&str>) -> RunConfig {
        let weights = weights.map(|w| format!("cxr_encoder_weights = \"{w}\"\n")).unwrap_or_default();
        let text = format!(
            "[run]\nname = \"t\"\nstage = \"pt\"\nout_dir = \"{out_dir}\"\n[data]\ndir = \"{data_dir}\"\n\
             [model]\n{weights}[train]\nsteps = 1\nbatch_size = 2\nlearning_rate = 0.001\n"
        );
        medtvt_config::parse_run_config_unvalidated(&text, Path::new("t.toml"), &[]).unwrap()
    }

    #[test]
    fn paths_under_a_root_pass_and_others_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("runs")).unwrap();
        std::fs::create_dir_all(base.join("data")).unwrap();
        let roots = JobRoots::confined(&[PathBuf::from("runs"), base.join("data")], &base).unwrap();
        roots.check(&config("runs/x/pt", "data/set", None)).unwrap();
        roots.check(&config(&base.join("runs/new/deeper").display().to_string(), "./data", None)).unwrap();

        let e = roots.check(&config("/etc/cron.d", "data", None)).unwrap_err();
        assert!(
            matches!(&e, JobRootsError::Outside { key, path, .. } if key == "run.out_dir" && path == Path::new("/etc/cron.d"))
        );
        let message = e.to_string();
        assert!(
            message.contains("`run.out_dir` = /etc/cron.d")
                && message.contains(&base.join("runs").display().to_string()),
            "{message}"
        );

        let e = roots.check(&config("runs/../../escape", "data", None)).unwrap_err();
        assert!(e.to_string().contains("runs/../../escape"), "{e}");
        let e = roots.check(&config("runs/x", "data", Some("/home/someone/vit.safetensors"))).unwrap_err();
        assert!(e.to_string().contains("model.cxr_encoder_weights"), "{e}");
        JobRoots::Any.check(&config("/etc/cron.d", "/", None)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_link_out_of_a_root_does_not_get_out() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("runs")).unwrap();
        std::fs::create_dir_all(base.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(base.join("elsewhere"), base.join("runs/link")).unwrap();
        let roots = JobRoots::confined(&[base.join("runs")], &base).unwrap();
        let e = roots.check(&config("runs/link/out", "runs", None)).unwrap_err();
        assert!(e.to_string().contains("runs/link/out"), "{e}");
    }

    #[test]
    fn resolving_is_lexical_where_nothing_exists() {
        let base = Path::new("/nonexistent-base-for-medtvt-test");
        assert_eq!(resolve(Path::new("a/./b/../c"), base), Some(base.join("a/c")));
        assert_eq!(resolve(Path::new("/../x"), base), None);
    }
}
