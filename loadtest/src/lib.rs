//! `ether-loadtest`: drives an Ether-IM node like thousands of real terminals and business
//! systems, counts everything at the receiving terminals, and records what it saw in
//! `bench-results/`.
//!
//! Layout (one file per concern):
//! - [`scenario`]: the scenarios: sets up the target (and the groups), starts the terminal
//!   fleets and the API driver, runs the main phase, samples the processes, turns the
//!   accounts into figures, decides pass/fail and checks the targets:
//!   - `idle`: N terminals held open (connect rate, memory per connection);
//!   - `unicast`, `batch`: API pushes to the users in turn (`/v1/messages`, `/batch`);
//!   - `group`: `--groups` x `--members` online members, `POST /v1/groups/{gid}/messages`;
//!     `--mode hot` as fast as the members take them, `--mode sparse` one message per group
//!     every `--interval`; counted per member by group seq, publish-to-last-member latency
//!     per message;
//!   - `chat`: terminals `send` to random peers, ack, `read` now and then; messages end to end;
//!   - `reconnect`: API pushes while a share of the terminals is dropped abruptly, kept away,
//!     ordered back and `sync`ed; time until all are back and synced, every accepted id
//!     checked.
//! - [`spawn`]: the target node: `ether serve` started from the same build on free ports with
//!   a temporary data dir (killed on drop), or an existing node's addresses and secrets.
//! - [`fleet`]: one process's share of terminals, spread over glommio executor threads;
//!   progress snapshots while running, the coordinator's orders ([`fleet::FleetCmd`]: chat,
//!   stop sending, drop, reconnect), the chat driver, a [`stats::FleetReport`] at the end.
//! - [`workers`]: more connections than one process may hold (`--per-process-max`): the tool
//!   re-executes itself as `ether-loadtest worker` processes, each running a fleet, taking
//!   orders on stdin and streaming JSON progress and its final report over stdout.
//! - [`terminal`]: one lean WebSocket terminal: raw TCP (optionally bound to a 127.0.0.x source
//!   address), a hand-written upgrade, frames parsed from a per-thread scratch buffer (an idle
//!   terminal holds no read buffer), `msg` frames scanned without a JSON parse, masked client
//!   frames written only by the terminal's own task (others queue them and wake it), pings
//!   answered, cumulative acks (inbox; group acks at most every `--group-ack`), heartbeat
//!   `ping`s at the welcome's `heartbeat_s` from one ticker per thread (no timer per
//!   terminal); per role: group stream tracking, chat sends/answers/reads, abrupt drop,
//!   reconnect and paged `sync`.
//! - [`wsframe`]: the WebSocket frame codec shared by the terminals and the wire-limit server.
//! - [`token`]: HS256 terminal tokens.
//! - [`api`]: the business-system side: a keep-alive, pipelining HTTP/1.1 client that pushes
//!   `POST /v1/messages` (or `/v1/messages/batch`, or `/v1/groups/{gid}/messages`) at a
//!   target rate, or as fast as a window of undelivered messages allows; a blocking call for
//!   set-up.
//! - [`wire_limit`]: a minimal in-tool server (own process, `ether-loadtest wire-server`) that
//!   accepts the same WebSocket upgrades and API calls (messages, groups, terminal `send` and
//!   `read`) and writes pre-encoded frames: this machine's ceiling for a scenario, so the
//!   engine's figure can be given as a ratio. It stores nothing, so `reconnect` cannot use it.
//! - [`stats`]: HDR histograms, per-stream sequence tracking (loss, duplicates, reorders),
//!   the serializable progress and report types.
//! - [`procstat`]: RSS and CPU of a process from /proc, kernel socket memory from
//!   /proc/net/sockstat, the fd limit.
//! - [`live`]: progress bars on a terminal, plain lines otherwise.
//! - [`report`]: `bench-results/<date>-<scenario>[-<label>]/` with `result.json`, `summary.md`
//!   (figures, the targets met or missed and by how much, other processes' CPU) and
//!   SVG plots, and the table of latest results per scenario and label in
//!   `bench-results/README.md`.
//!
//! Everything is counted at the receiving terminals; message latency is taken from the send
//! timestamp carried in the payload (`{"text":"t=<unix nanos>;k=<n>;r=<run>"}`).

pub mod api;
pub mod fleet;
pub mod live;
pub mod procstat;
pub mod report;
pub mod scenario;
pub mod spawn;
pub mod stats;
pub mod terminal;
pub mod tls;
pub mod token;
pub mod wire_limit;
pub mod workers;
pub mod wsframe;

/// io_uring entries of the tool's executors (terminals and the wire-limit server). Each of
/// thousands of sockets keeps a poll armed, and the kernel sizes its table of armed polls from
/// the ring: with glommio's default of 128, every poll arm and cancel walks long chains (the
/// engine sizes its rings the same way, `engine/src/node.rs`).
pub const RING_DEPTH: usize = 4096;

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Parses durations like `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?} (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown duration unit in {s:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3x").is_err());
    }
}
