//! The record of a run: `bench-results/<date>-<scenario>/` with `result.json` (command, git
//! revision, machine, every figure, losses, full histograms), `summary.md`, SVG plots
//! (`latency.svg`: percentiles; `throughput.svg`: per second), and the per-scenario table of
//! latest results in `bench-results/README.md`.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::json;

use crate::live::human_bytes;
use crate::scenario::{tally, Options, Outcome, RunResult};

const TABLE_BEGIN: &str = "<!-- results:begin -->";
const TABLE_END: &str = "<!-- results:end -->";

/// Writes the run's folder and updates the README table; returns the folder.
pub fn record(opts: &Options, out: &Outcome) -> Result<PathBuf, String> {
    let root = opts.results_dir.clone().unwrap_or_else(default_results_dir);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let date = date_utc(crate::unix_nanos() / 1_000_000_000);
    let name = opts.record_name();
    let name = name.as_str();
    let mut dir = root.join(format!("{date}-{name}"));
    let mut i = 2;
    while dir.exists() {
        dir = root.join(format!("{date}-{name}-{i}"));
        i += 1;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let git = git_info();
    let machine = machine_info();
    let hists: BTreeMap<&str, serde_json::Value> = out
        .runs
        .iter()
        .map(|r| (r.target, json!({"connect_us": r.connect_hist.data(), "message_us": r.msg_hist.data()})))
        .collect();
    let result = json!({
        "scenario": opts.scenario.name(),
        "label": opts.label,
        "date": date,
        "command": opts.command,
        "git": git,
        "machine": machine,
        "options": options_json(opts),
        "runs": out.runs,
        "ratios_engine_to_wire_limit": out.ratios,
        "targets": out.targets,
        "repeats": out.repeats,
        "problems": out.problems(),
        "passed": out.problems().is_empty(),
        "histograms": hists,
    });
    let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
    write(&dir.join("result.json"), &text)?;
    write(&dir.join("summary.md"), &summary(opts, out, &git, &machine, &date))?;
    plot_latency(&dir.join("latency.svg"), opts, out)?;
    plot_throughput(&dir.join("throughput.svg"), opts, out)?;
    let rel = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    update_readme(&root.join("README.md"), name, &table_row(opts, out, &date, &rel))?;
    Ok(dir)
}

fn write(p: &Path, s: &str) -> Result<(), String> {
    std::fs::write(p, s).map_err(|e| format!("{}: {e}", p.display()))
}

/// The nearest `bench-results/` above the working directory, else the workspace's.
pub fn default_results_dir() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        for d in cwd.ancestors() {
            let c = d.join("bench-results");
            if c.is_dir() {
                return c;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("bench-results"))
        .unwrap_or_else(|| PathBuf::from("bench-results"))
}

fn options_json(o: &Options) -> serde_json::Value {
    json!({
        "connections": o.connections,
        "connect_rate": o.connect_rate,
        "hold_s": o.hold.as_secs_f64(),
        "msg_rate": o.msg_rate,
        "duration_s": o.duration.as_secs_f64(),
        "api_conns": o.api_conns,
        "pipeline": o.pipeline,
        "batch_size": o.batch_size,
        "threads": o.threads,
        "per_process_max": o.per_process_max,
        "max_inflight": o.max_inflight,
        "wire_limit": o.wire_limit,
        "groups": o.groups,
        "members": o.members,
        "group_mode": o.group_mode,
        "interval_ms": o.interval.as_secs_f64() * 1000.0,
        "window": o.window,
        "group_ack_ms": o.group_ack.as_millis() as u64,
        "chat_window": o.chat_window,
        "read_every": o.read_every,
        "drop_share": o.drop_share,
        "drop_after_s": o.drop_after.as_secs_f64(),
        "away_s": o.away.as_secs_f64(),
        "target": format!("{:?}", o.target).split([' ', '(', '{']).next().unwrap_or("").to_owned(),
    })
}

/// `YYYY-MM-DD` of a Unix time (UTC).
pub fn date_utc(secs: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn git_info() -> serde_json::Value {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = run(&["rev-parse", "HEAD"]);
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    json!({"rev": rev, "dirty": dirty})
}

fn machine_info() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: Option<u64> =
        meminfo.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).ok();
    let tcp_mem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").map(|s| s.trim().to_owned()).ok();
    json!({
        "cpu_model": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_bytes": mem_kb.map(|k| k * 1024),
        "kernel": kernel,
        "fd_limit": crate::procstat::raise_nofile_limit(),
        "tcp_mem_pages": tcp_mem,
    })
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 1.0 {
        format!("{v:.2} ms")
    } else {
        format!("{:.0} µs", v * 1000.0)
    }
}

fn summary(opts: &Options, out: &Outcome, git: &serde_json::Value, machine: &serde_json::Value, date: &str) -> String {
    let mut s = String::new();
    let problems = out.problems();
    let _ = writeln!(s, "# {} — {}\n", opts.record_name(), date);
    let _ = writeln!(
        s,
        "**{}**{}\n",
        if problems.is_empty() { "Passed" } else { "FAILED" },
        if problems.is_empty() { String::new() } else { format!(": {}", problems.join("; ")) }
    );
    let _ = writeln!(s, "Command: `{}`  ", opts.command.join(" "));
    let _ = writeln!(
        s,
        "Git: `{}`{}  ",
        git["rev"].as_str().unwrap_or("?"),
        if git["dirty"].as_bool() == Some(true) { " (dirty)" } else { "" }
    );
    let _ = writeln!(
        s,
        "Machine: {} cores, {}, kernel {}\n",
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
    let heads: Vec<&str> = out.runs.iter().map(|r| r.target).collect();
    let _ = writeln!(s, "| figure | {} |", heads.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(heads.len()));
    let mut row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
        let cells: Vec<String> = out.runs.iter().map(f).collect();
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    };
    row("terminals connected", &|r| format!("{} / {}", r.connections.connected, r.connections.requested));
    row("failed / dropped", &|r| format!("{} / {}", r.connections.failed, r.connections.dropped));
    row("handshakes/s", &|r| format!("{:.0}", r.connections.handshakes_per_s));
    row("connect p50 / p99", &|r| {
        format!("{} / {}", ms(r.connections.connect_latency.p50_ms), ms(r.connections.connect_latency.p99_ms))
    });
    row("server RSS before → connected", &|r| {
        format!("{} → {}", human_bytes(r.memory.server_rss_before), human_bytes(r.memory.server_rss_connected))
    });
    row("server RSS per connection (just connected)", &|r| format!("{:.0} B", r.memory.server_rss_per_conn));
    row("server RSS per connection (idle, end of main phase)", &|r| {
        format!("{:.0} B", r.memory.server_rss_idle_per_conn)
    });
    row("kernel TCP memory per connection", &|r| format!("{:.0} B", r.memory.kernel_tcp_mem_per_conn));
    row("kernel slab per connection", &|r| format!("{:.0} B", r.memory.kernel_slab_per_conn));
    row("server CPU connect / main", &|r| format!("{:.0}% / {:.0}%", r.cpu.server_connect_pct, r.cpu.server_main_pct));
    row("tool CPU connect / main", &|r| {
        format!(
            "{:.0}% / {:.0}% ({} threads; busiest thread {:.0}% / {:.0}%)",
            r.cpu.tool_connect_pct,
            r.cpu.tool_main_pct,
            r.cpu.tool_threads,
            r.cpu.tool_busiest_thread_connect_pct,
            r.cpu.tool_busiest_thread_main_pct
        )
    });
    if out.runs.iter().any(|r| r.cpu.server_us_per_delivery.is_some()) {
        row("CPU per delivered message, server / tool (main phase)", &|r| {
            let us = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1} µs"));
            format!("{} / {}", us(r.cpu.server_us_per_delivery), us(r.cpu.tool_us_per_delivery))
        });
    }
    row("other processes' CPU connect / main", &|r| {
        format!("{:.0}% / {:.0}%", r.cpu.others_connect_pct, r.cpu.others_main_pct)
    });
    if out.runs.iter().any(|r| r.tool_unread_per_socket.is_some()) {
        row("tool's unread bytes per socket (main phase)", &|r| {
            r.tool_unread_per_socket.map_or_else(|| "-".into(), |b| format!("{b:.0} B"))
        });
    }
    row("tool's timers late at most", &|r| format!("{} ms", r.tool_timer_late_ms_max));
    if out.runs.iter().any(|r| r.frames_per_write.is_some()) {
        row("frames per socket write (node's counters)", &|r| {
            r.frames_per_write.map_or_else(|| "-".into(), |f| format!("{f:.1}"))
        });
    }
    if out.runs.iter().any(|r| r.messages.is_some()) {
        let m = |r: &RunResult, f: &dyn Fn(&crate::scenario::MsgFigures) -> String| {
            r.messages.as_ref().map(f).unwrap_or_default()
        };
        row("messages sent / acked / received", &|r| m(r, &|m| format!("{} / {} / {}", m.sent, m.acked, m.received)));
        row("lost / duplicates / reordered", &|r| {
            m(r, &|m| format!("{} / {} / {}", m.lost, m.duplicates, m.reordered))
        });
        row("sent/s (target)", &|r| {
            m(r, &|m| {
                let target = if m.target_rate > 0.0 { format!("{:.0}", m.target_rate) } else { "max".into() };
                format!("{:.0} ({target})", m.sent_per_s)
            })
        });
        row("delivered/s", &|r| m(r, &|m| format!("{:.0}", m.delivered_per_s)));
        row("latency p50 / p99 / p99.9 / max", &|r| {
            m(r, &|m| {
                format!(
                    "{} / {} / {} / {}",
                    ms(m.latency.p50_ms),
                    ms(m.latency.p99_ms),
                    ms(m.latency.p999_ms),
                    ms(m.latency.max_ms)
                )
            })
        });
        row(
            if opts.scenario == crate::scenario::Scenario::Chat {
                "send → sent p50 / p99"
            } else {
                "API answer p50 / p99"
            },
            &|r| m(r, &|m| format!("{} / {}", ms(m.api_latency.p50_ms), ms(m.api_latency.p99_ms))),
        );
        row("API / send errors", &|r| {
            m(r, &|m| {
                if m.api_errors.is_empty() {
                    "none".into()
                } else {
                    tally(&m.api_errors)
                }
            })
        });
        let g = |r: &RunResult, f: &dyn Fn(&crate::scenario::GroupFigures) -> String| {
            r.messages.as_ref().and_then(|m| m.group.as_ref()).map(f).unwrap_or_default()
        };
        if out.runs.iter().any(|r| r.messages.as_ref().is_some_and(|m| m.group.is_some())) {
            row("groups × members, mode", &|r| {
                g(r, &|x| {
                    let how = match x.mode {
                        crate::scenario::GroupMode::Hot => format!("window {}", x.window),
                        crate::scenario::GroupMode::Sparse => format!("every {:.0} ms", x.interval_ms),
                    };
                    format!("{} × {}, {} ({how})", x.groups, x.members, x.mode.name())
                })
            });
            row("published/s", &|r| g(r, &|x| format!("{:.1}", x.published_per_s)));
            row("deliveries expected / incomplete messages", &|r| {
                g(r, &|x| format!("{} / {}", x.expected_deliveries, x.messages_incomplete))
            });
            row("publish → last member p50 / p99 / max (per message)", &|r| {
                g(r, &|x| {
                    format!(
                        "{} / {} / {}",
                        ms(x.last_member.p50_ms),
                        ms(x.last_member.p99_ms),
                        ms(x.last_member.max_ms)
                    )
                })
            });
            row("slowest messages to the last member (publish number: time)", &|r| {
                g(r, &|x| slowest(&x.last_member_by_message, 3))
            });
        }
        let c = |r: &RunResult, f: &dyn Fn(&crate::scenario::ChatFigures) -> String| {
            r.messages.as_ref().and_then(|m| m.chat.as_ref()).map(f).unwrap_or_default()
        };
        if out.runs.iter().any(|r| r.messages.as_ref().is_some_and(|m| m.chat.is_some())) {
            row("window / read every", &|r| c(r, &|x| format!("{} / {}", x.window, x.read_every)));
            row("own copies / reads / receipts / unanswered", &|r| {
                c(r, &|x| format!("{} / {} / {} / {}", x.echoes, x.reads_sent, x.receipts, x.unanswered))
            });
        }
        let x = |r: &RunResult, f: &dyn Fn(&crate::scenario::ReconnectFigures) -> String| {
            r.messages.as_ref().and_then(|m| m.reconnect.as_ref()).map(f).unwrap_or_default()
        };
        if out.runs.iter().any(|r| r.messages.as_ref().is_some_and(|m| m.reconnect.is_some())) {
            row("to drop / dropped / back / synced / failed", &|r| {
                x(r, &|x| {
                    format!("{} / {} / {} / {} / {}", x.to_drop, x.dropped, x.reconnected, x.synced, x.reconnect_failed)
                })
            });
            row("away", &|r| x(r, &|x| format!("{:.1} s", x.away_s)));
            row("back and synced (order → last synced)", &|r| x(r, &|x| format!("{:.3} s", x.back_and_synced_s)));
            row("per terminal p50 / p99", &|r| {
                x(r, &|x| format!("{} / {}", ms(x.per_terminal.p50_ms), ms(x.per_terminal.p99_ms)))
            });
            row("sync frames sent", &|r| x(r, &|x| x.syncs_sent.to_string()));
            row("ids accepted / received / lost / unreachable / duplicate receipts / unexpected", &|r| {
                x(r, &|x| {
                    format!(
                        "{} / {} / {} / {} / {} / {}",
                        x.ids_accepted,
                        x.ids_received,
                        x.ids_missing,
                        x.ids_unreachable,
                        x.id_duplicates,
                        x.ids_unexpected
                    )
                })
            });
        }
    }
    if let Some(r) = &out.ratios {
        let _ = writeln!(s, "\nEngine / wire-limit: `{r}`");
    }
    if out.repeats.len() > 1 {
        s.push_str(&repeats_table(&out.repeats));
    }
    if !out.targets.is_empty() {
        let _ = writeln!(s, "\nTargets (issue 6), engine run:\n");
        let _ = writeln!(s, "| target | wanted | measured | |\n|---|---|---|---|");
        for t in &out.targets {
            let _ = writeln!(s, "| {} | {} | {} | {} |", t.what, t.target, t.measured, t.margin);
        }
    }
    let _ = writeln!(s, "\nOther processes on this machine (the machine is shared):");
    for r in &out.runs {
        let _ = writeln!(
            s,
            "- {}: {:.0}% CPU while connecting, {:.0}% during the main phase (server {:.0}%, tool {:.0}% of {} cores)",
            r.target,
            r.cpu.others_connect_pct,
            r.cpu.others_main_pct,
            r.cpu.server_main_pct,
            r.cpu.tool_main_pct,
            r.cpu.cores
        );
    }
    for r in &out.runs {
        if !r.saturation.is_empty() {
            let _ = writeln!(s, "\nSaturation ({}):", r.target);
            for x in &r.saturation {
                let _ = writeln!(s, "- {x}");
            }
        }
        if !r.connections.failures.is_empty() {
            let _ = writeln!(s, "\nConnect failures ({}): {}", r.target, tally(&r.connections.failures));
        }
    }
    let _ = writeln!(s, "\n![latency](latency.svg)\n\n![throughput](throughput.svg)");
    s
}

/// The repeats of a `--repeat` run, in the order they ran, the one shown marked.
fn repeats_table(repeats: &[crate::scenario::Repeat]) -> String {
    let mut s = String::new();
    let Some(first) = repeats.first() else { return s };
    let chosen = repeats.iter().position(|r| r.chosen).map_or(0, |i| i + 1);
    let _ = writeln!(
        s,
        "\nRepeats: the figures above are repeat {chosen} of {}, the median by `{}` ({} is better; of an even number, the worse middle one). Each repeat ran the wire-limit twin (if asked) and then the target, one after the other.\n",
        repeats.len(),
        first.metric,
        if first.higher_is_better { "more" } else { "less" }
    );
    let _ = writeln!(s, "| repeat | wire-limit | engine | engine / wire-limit | |\n|---|---|---|---|---|");
    for (i, r) in repeats.iter().enumerate() {
        let fmt = |v: f64| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") };
        let ratio = r.wire_limit.filter(|w| *w > 0.0).map(|w| format!("{:.3}", r.engine / w)).unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}{} |",
            i + 1,
            r.wire_limit.map(fmt).unwrap_or_else(|| "-".into()),
            fmt(r.engine),
            ratio,
            if r.chosen { "shown" } else { "" },
            if r.passed { "" } else { " FAILED" }
        );
    }
    s
}

fn headline(r: &RunResult) -> String {
    match &r.messages {
        Some(m) if m.group.is_some() => {
            let g = m.group.as_ref().map(|g| g.last_member.p99_ms).unwrap_or_default();
            format!("{:.0} deliveries/s, publish→last member p99 {}", m.delivered_per_s, ms(g))
        }
        Some(m) if m.reconnect.is_some() => {
            let x = m.reconnect.as_ref().map(|x| (x.synced, x.back_and_synced_s)).unwrap_or_default();
            format!("{} back and synced in {:.2} s; {:.0} msgs/s delivered", x.0, x.1, m.delivered_per_s)
        }
        Some(m) if m.chat.is_some() => {
            format!("{:.0} msgs/s end to end, p99 {}", m.delivered_per_s, ms(m.latency.p99_ms))
        }
        Some(m) => format!("{:.0} msgs/s delivered, p99 {}", m.delivered_per_s, ms(m.latency.p99_ms)),
        None => format!(
            "{:.0} handshakes/s, {:.0} B server RSS/idle conn ({:.0} B just connected), {:.0} B kernel slab/conn",
            r.connections.handshakes_per_s,
            r.memory.server_rss_idle_per_conn,
            r.memory.server_rss_per_conn,
            r.memory.kernel_slab_per_conn,
        ),
    }
}

fn table_row(opts: &Options, out: &Outcome, date: &str, dir: &str) -> String {
    let Some(main) = out.runs.last() else {
        return String::new();
    };
    let scale = match &main.messages {
        Some(m) if m.group.is_some() => {
            let g = m.group.as_ref().map(|g| (g.groups, g.members, g.mode.name())).unwrap_or_default();
            format!("{} × {} members, {}", g.0, g.1, g.2)
        }
        Some(m) if m.chat.is_some() => format!(
            "{} terminals, {}",
            main.connections.requested,
            if m.target_rate > 0.0 { format!("{:.0} msgs/s target", m.target_rate) } else { "max rate".into() }
        ),
        Some(m) => format!(
            "{} terminals{}, {}{}",
            main.connections.requested,
            m.reconnect.as_ref().map(|x| format!(" ({} dropped)", x.to_drop)).unwrap_or_default(),
            if m.target_rate > 0.0 { format!("{:.0} msgs/s target", m.target_rate) } else { "max rate".into() },
            if m.batch_size > 0 { format!(", batches of {}", m.batch_size) } else { String::new() }
        ),
        None => format!("{} terminals", main.connections.requested),
    };
    let losses = match &main.messages {
        Some(m) => format!("{} lost, {} dup", m.lost, m.duplicates),
        None => format!("{} failed, {} dropped", main.connections.failed, main.connections.dropped),
    };
    let ratio = out
        .ratios
        .as_ref()
        .map(|r| {
            let key = if main.messages.is_some() { "delivered_per_s" } else { "handshakes_per_s" };
            format!("{key} ×{}", r[key])
        })
        .unwrap_or_else(|| "-".into());
    let missed = out.targets.iter().filter(|t| !t.met).count();
    let ratio = if missed > 0 { format!("{ratio}; {missed} target(s) missed") } else { ratio };
    let status = if out.problems().is_empty() {
        if main.saturation.is_empty() {
            "pass"
        } else {
            "pass (saturated)"
        }
    } else {
        "FAIL"
    };
    format!(
        "| {} | {date} | {} | {scale} | {} | {ratio} | {losses} | {status} | [{dir}]({dir}/summary.md) |",
        opts.record_name(),
        main.target,
        if out.repeats.len() > 1 {
            format!("{} (median of {} runs)", headline(main), out.repeats.len())
        } else {
            headline(main)
        }
    )
}

const TABLE_HEAD: &str = "| scenario | date | target | scale | headline | vs wire-limit | losses | status | run |\n|---|---|---|---|---|---|---|---|---|";

/// Replaces (or adds) the row of `scenario` in the README's results table.
pub fn update_readme(path: &Path, scenario: &str, row: &str) -> Result<(), String> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let text = upsert_row(&old, scenario, row);
    write(path, &text)
}

fn upsert_row(old: &str, scenario: &str, row: &str) -> String {
    let (before, rows, after) = match (old.find(TABLE_BEGIN), old.find(TABLE_END)) {
        (Some(b), Some(e)) if b < e => {
            let inner = &old[b + TABLE_BEGIN.len()..e];
            let rows: Vec<String> = inner
                .lines()
                .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario |"))
                .map(str::to_owned)
                .collect();
            (old[..b].to_owned(), rows, old[e + TABLE_END.len()..].to_owned())
        }
        _ => {
            let head = if old.trim().is_empty() {
                "# Benchmark results\n\nLatest result per scenario, written by `ether-loadtest` \
                 (one folder per run beside this file).\n\n"
                    .to_owned()
            } else {
                format!("{}\n\n", old.trim_end())
            };
            (head, Vec::new(), "\n".to_owned())
        }
    };
    let mut map: BTreeMap<String, String> = rows
        .into_iter()
        .filter_map(|r| {
            let key = r.trim_start_matches('|').split('|').next()?.trim().to_owned();
            Some((key, r))
        })
        .collect();
    map.insert(scenario.to_owned(), row.to_owned());
    let mut t = String::new();
    t.push_str(&before);
    t.push_str(TABLE_BEGIN);
    t.push('\n');
    t.push_str(TABLE_HEAD);
    t.push('\n');
    for r in map.values() {
        t.push_str(r);
        t.push('\n');
    }
    t.push_str(TABLE_END);
    t.push_str(&after);
    t
}

fn plot_err<E: std::fmt::Debug>(e: E) -> String {
    format!("plot: {e:?}")
}

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

/// Percentile curves: x is the number of nines (0 = p0, 2 = p99, 3 = p99.9), y in ms.
fn plot_latency(path: &Path, opts: &Options, out: &Outcome) -> Result<(), String> {
    let pushes = out.runs.iter().any(|r| r.messages.is_some());
    let curves: Vec<(String, Vec<(f64, f64)>)> = out
        .runs
        .iter()
        .flat_map(|r| {
            let mut v = vec![(format!("{} connect", r.target), r.connect_hist.percentile_curve())];
            if pushes {
                v.push((format!("{} message", r.target), r.msg_hist.percentile_curve()));
            }
            v
        })
        .map(|(n, c)| {
            let pts = c.into_iter().filter(|(p, _)| *p < 100.0).map(|(p, v)| (-(1.0 - p / 100.0).log10(), v)).collect();
            (n, pts)
        })
        .collect();
    let ymax = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(0.001) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: latency by percentile", opts.scenario.name()), ("sans-serif", 20))
        .margin(15)
        .margin_right(45)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0f64..5.0f64, 0.0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(6)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("p{}", trim_pct(p))
        })
        .draw()
        .map_err(plot_err)?;
    for (i, (name, pts)) in curves.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn trim_pct(p: f64) -> String {
    let s = format!("{p:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Per-second series: messages received and sent (push scenarios) or open connections.
fn plot_throughput(path: &Path, opts: &Options, out: &Outcome) -> Result<(), String> {
    let pushes = opts.scenario != crate::scenario::Scenario::Idle;
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in &out.runs {
        if pushes {
            lines.push((format!("{} received/s", r.target), r.series.iter().map(|p| (p.t_s, p.recv_per_s)).collect()));
            lines.push((format!("{} sent/s", r.target), r.series.iter().map(|p| (p.t_s, p.sent_per_s)).collect()));
        } else {
            lines.push((
                format!("{} open connections", r.target),
                r.series.iter().map(|p| (p.t_s, p.open as f64)).collect(),
            ));
        }
    }
    let xmax = lines.iter().flat_map(|(_, l)| l.iter().map(|p| p.0)).fold(1.0f64, f64::max);
    let ymax = lines.iter().flat_map(|(_, l)| l.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: {} per second", opts.scenario.name(), if pushes { "messages" } else { "connections" }),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..xmax, 0.0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_desc(if pushes { "per second" } else { "open" })
        .draw()
        .map_err(plot_err)?;
    for (i, (name, pts)) in lines.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The `n` slowest of `[k, ms]`, slowest first: `#k: ms`, comma separated.
fn slowest(by_message: &[(u64, f64)], n: usize) -> String {
    let mut v = by_message.to_vec();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter().take(n).map(|&(k, t)| format!("#{k}: {}", ms(t))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowest_messages_come_first() {
        let by_message = [(0, 95.0), (1, 505.2), (2, 12.5), (3, 301.0)];
        assert_eq!(slowest(&by_message, 2), "#1: 505 ms, #3: 301 ms");
        assert_eq!(slowest(&[], 3), "");
    }

    #[test]
    fn dates() {
        assert_eq!(date_utc(0), "1970-01-01");
        assert_eq!(date_utc(951_782_400), "2000-02-29");
        assert_eq!(date_utc(1_767_225_600), "2026-01-01");
    }

    #[test]
    fn readme_rows_are_kept_per_scenario() {
        let a = upsert_row("", "idle", "| idle | 1 |");
        assert!(a.contains("# Benchmark results"));
        assert!(a.contains("| idle | 1 |"));
        let b = upsert_row(&a, "unicast", "| unicast | 2 |");
        let c = upsert_row(&b, "idle", "| idle | 3 |");
        assert!(c.contains("| unicast | 2 |"));
        assert!(c.contains("| idle | 3 |"));
        assert!(!c.contains("| idle | 1 |"));
        assert_eq!(c.matches(TABLE_BEGIN).count(), 1);
        assert_eq!(c.matches("| scenario |").count(), 1);
        let ours = include_str!("../../bench-results/README.md");
        let d = upsert_row(ours, "idle", "| idle | 5 |");
        let table = &d[d.find(TABLE_BEGIN).unwrap()..d.find(TABLE_END).unwrap()];
        assert!(table.contains("\n| idle | 5 |\n"), "{table}");
        let rows = |t: &str| t.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| scenario |")).count();
        let before = &ours[ours.find(TABLE_BEGIN).unwrap()..ours.find(TABLE_END).unwrap()];
        assert_eq!(rows(table), rows(before) + usize::from(!before.contains("\n| idle |")));
        assert_eq!(d.matches("| scenario |").count(), 1);
        assert!(d.starts_with("# Benchmark results"));
        let custom = upsert_row("# Mine\n\nText.\n", "batch", "| batch | 4 |");
        assert!(custom.starts_with("# Mine\n\nText.\n\n<!-- results:begin -->"));
    }
}
