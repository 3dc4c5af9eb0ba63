//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self` at each scrape and
//! rendered as text for the servers to append to their `/metrics`.
//!
//! Rendered rather than recorded through the `metrics` facade: its counters
//! are integers, and CPU seconds are not. (The `metrics-process` crate goes
//! through the same facade, so it either rounds CPU seconds down to whole
//! seconds or exports them as a gauge named `_total`, which promtool flags.) Off Linux (no `/proc`) nothing is
//! rendered. Like Prometheus' own `procfs`, CPU ticks are taken as 1/100 s
//! (`USER_HZ` is 100 on every Linux the servers run on).

use std::fmt::Write as _;

/// Clock ticks per second in `/proc/*/stat` (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// Appends the process metrics, `# HELP` and `# TYPE` included, to `out`.
/// A value that cannot be read is left out (with its HELP and TYPE).
pub fn render(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let fields = stat.as_deref().and_then(stat_fields);
    let num = |i: usize| -> Option<f64> { fields.as_ref()?.get(i)?.parse().ok() };
    // Fields after the command, from field 3 (`state`) on: utime is 14,
    // stime 15, starttime 22 (proc(5)), so indexes 11, 12 and 19.
    if let (Some(utime), Some(stime)) = (num(11), num(12)) {
        metric(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / TICKS_PER_SECOND,
        );
    }
    if let Some(kb) = status_kb("VmRSS:") {
        metric(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            kb * 1024.0,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    if let Some(max) = max_fds() {
        metric(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
    if let (Some(start), Some(boot)) = (num(19), boot_time()) {
        metric(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / TICKS_PER_SECOND,
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

/// The fields of a `/proc/*/stat` line after `pid (comm)`: the command may
/// hold spaces and parentheses, so split after its last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// A `kB` value of `/proc/self/status`.
fn status_kb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Boot time (`btime` of `/proc/stat`), seconds since the epoch.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_with_spaces_and_parentheses_is_skipped_whole() {
        let f = stat_fields("42 (a (b) c) S 1 2 3").expect("a stat line");
        assert_eq!(f, ["S", "1", "2", "3"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_process_metric_renders_with_help_and_type() {
        let mut out = String::new();
        render(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("# HELP {name} ")), "{out}");
            assert!(out.contains(&format!("# TYPE {name} ")), "{out}");
            assert!(
                out.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{out}"
            );
        }
    }
}
