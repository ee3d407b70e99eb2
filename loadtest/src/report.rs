//! Output: one JSON object per line on stdout (and appended to `--out`) for every result,
//! a human summary on stderr, and a progress line on stderr while a run is long.
//!
//! Every JSON line carries the run's label, the scenario and a UNIX timestamp, so the lines
//! of several runs (our node, Nchan, Pushpin) can be concatenated and compared.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::payload::now_nanos;

pub struct Reporter {
    label: String,
    scenario: &'static str,
    out: Option<File>,
    tty: bool,
    last_progress: Option<Instant>,
}

impl Reporter {
    pub fn new(label: &str, scenario: &'static str, out: Option<&Path>) -> Result<Self> {
        let out = match out {
            Some(p) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Self { label: label.to_string(), scenario, out, tty: std::io::stderr().is_terminal(), last_progress: None })
    }

    /// Writes one result line; `kind` says what it is (`step`, `checkpoint`, `summary`, ...).
    pub fn emit(&mut self, kind: &str, mut record: Value) -> Result<()> {
        if let Value::Object(map) = &mut record {
            map.insert("label".into(), json!(self.label));
            map.insert("scenario".into(), json!(self.scenario));
            map.insert("kind".into(), json!(kind));
            map.insert("unix_ms".into(), json!(now_nanos() / 1_000_000));
        }
        let line = record.to_string();
        self.clear_progress();
        println!("{line}");
        if let Some(f) = &mut self.out {
            writeln!(f, "{line}").context("writing --out file")?;
        }
        Ok(())
    }

    /// A line of the human summary.
    pub fn say(&mut self, text: &str) {
        self.clear_progress();
        eprintln!("[{} {}] {text}", self.label, self.scenario);
    }

    /// Overwrites the progress line on a terminal; elsewhere prints one every 5 seconds.
    pub fn progress(&mut self, text: &str) {
        let due = self.last_progress.is_none_or(|t| t.elapsed() >= Duration::from_secs(if self.tty { 0 } else { 5 }));
        if !due {
            return;
        }
        self.last_progress = Some(Instant::now());
        if self.tty {
            eprint!("\r\x1b[2K{text}");
        } else {
            eprintln!("  .. {text}");
        }
    }

    fn clear_progress(&mut self) {
        if self.tty && self.last_progress.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// A text bar for progress lines: `[#####.....]`.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 { width } else { ((done.min(total) as f64 / total as f64) * width as f64) as usize };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars() {
        assert_eq!(bar(0, 10, 4), "[....]");
        assert_eq!(bar(5, 10, 4), "[##..]");
        assert_eq!(bar(20, 10, 4), "[####]");
        assert_eq!(bar(0, 0, 2), "[##]");
    }

    #[test]
    fn lines_carry_label_and_scenario() {
        let dir = std::env::temp_dir().join(format!("sse-loadtest-report-{}", std::process::id()));
        let mut r = Reporter::new("nchan", "fanout", Some(&dir)).unwrap();
        r.emit("step", json!({"rate": 10})).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).ok();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["label"], "nchan");
        assert_eq!(v["scenario"], "fanout");
        assert_eq!(v["kind"], "step");
        assert_eq!(v["rate"], 10);
    }
}
