//! The structured event log: every [`Event`] of the state machine goes to tracing (target
//! `medtvt::events`) and, with a run directory, as one JSON line to `<run-dir>/events.jsonl`.

use crate::error::CoordinatorError;
use crate::state::Event;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub const EVENTS_FILE: &str = "events.jsonl";

#[derive(Default)]
pub struct EventLog {
    file: Option<Mutex<std::fs::File>>,
}

impl EventLog {
    pub fn open(run_dir: Option<&Path>) -> Result<Self, CoordinatorError> {
        let Some(dir) = run_dir else { return Ok(EventLog::default()) };
        let path = dir.join(EVENTS_FILE);
        let open = || {
            std::fs::create_dir_all(dir)?;
            std::fs::OpenOptions::new().create(true).append(true).open(&path)
        };
        let file = open().map_err(|source| CoordinatorError::EventLog { path: path.clone(), source })?;
        Ok(EventLog { file: Some(Mutex::new(file)) })
    }

    pub fn record(&self, events: Vec<Event>) {
        for event in events {
            let json = serde_json::to_value(&event).unwrap_or_default();
            tracing::info!(target: "medtvt::events", event = %json);
            if let Some(file) = &self.file {
                let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                let line = serde_json::json!({ "unix_ms": unix_ms, "record": json });
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Err(err) = writeln!(file, "{line}") {
                    tracing::warn!(error = %err, "cannot append to the event log");
                }
            }
        }
    }
}
