//! What the operator sees while a run goes: a progress bar and a live line on a terminal,
//! one plain line per second otherwise (CI logs), nothing with `--quiet`.
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Plain,
    Quiet,
}

/// One live reading.
#[derive(Debug, Clone, Default)]
pub struct Line {
    pub elapsed: Duration,
    pub phase: &'static str,
    pub open: u64,
    pub total: u64,
    pub failed: u64,
    pub recv_per_s: f64,
    pub sent_per_s: f64,
    pub p99_ms: Option<f64>,
    pub server_cpu: f64,
    pub tool_cpu: f64,
    pub server_rss: u64,
}

impl Line {
    fn text(&self) -> String {
        let p99 = match self.p99_ms {
            Some(v) => format!("{v:.2}ms"),
            None => "-".into(),
        };
        format!(
            "{:<8} conns {}/{} failed {} | sent {:.0}/s recv {:.0}/s p99 {} | server cpu {:.0}% rss {} | tool cpu {:.0}%",
            self.phase,
            self.open,
            self.total,
            self.failed,
            self.sent_per_s,
            self.recv_per_s,
            p99,
            self.server_cpu,
            human_bytes(self.server_rss),
            self.tool_cpu
        )
    }
}

pub struct Live {
    mode: Mode,
    bar: Option<ProgressBar>,
}

impl Live {
    pub fn new(mode: Mode, label: &str, total: u64) -> Live {
        let tty = std::io::stderr().is_terminal();
        let bar = (mode == Mode::Auto && tty).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:24}] {pos}/{len} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(label.to_owned());
            b
        });
        Live { mode, bar }
    }

    pub fn update(&self, l: &Line) {
        match (&self.bar, self.mode) {
            (Some(b), _) => {
                b.set_position(l.open);
                b.set_message(l.text());
            }
            (None, Mode::Quiet) => {}
            (None, _) => eprintln!("[{:>6.1}s] {}", l.elapsed.as_secs_f64(), l.text()),
        }
    }

    pub fn say(&self, msg: &str) {
        match (&self.bar, self.mode) {
            (Some(b), _) => b.println(msg),
            (None, Mode::Quiet) => {}
            (None, _) => eprintln!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1}MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1}KiB", b / 1024.0)
    } else {
        format!("{b:.0}B")
    }
}
