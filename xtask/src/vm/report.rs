//! What a guest run left in its results directory, the per-kernel summary,
//! and the generated table in `docs/kernels.md`.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use super::kernel::Kernel;

/// How the agent did when started alone in the guest.
#[derive(Debug, Default)]
pub struct AgentRun {
    /// `tracepoints` of its `started` event.
    pub attached: Vec<String>,
    /// Tracepoints it reported missing from this kernel (and ran without).
    pub absent: Vec<String>,
    /// The program that failed to load or attach, and how.
    pub rejected: Option<(String, String)>,
    /// Why it did not start, from its stderr.
    pub error: Option<String>,
}

/// One test executable's run in the guest.
#[derive(Debug)]
pub struct TestRun {
    pub binary: String,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// libtest's exit code; `None` if the guest never finished the binary.
    pub exit_code: Option<i32>,
}

impl TestRun {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && self.failed.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Timings {
    pub download: Duration,
    pub boot: Option<Duration>,
    pub agent: Option<Duration>,
    pub tests: Option<Duration>,
    pub total: Duration,
}

/// Everything known about one kernel's run.
#[derive(Debug)]
pub struct KernelRun {
    /// `6.1`, `5.10`, or this host's `major.minor`.
    pub series: String,
    /// The unpacked Debian kernel a guest booted; `None` on this host.
    pub kernel: Option<Kernel>,
    /// `uname -r` when the run was on this host's own kernel.
    pub host_release: Option<String>,
    pub agent: Option<AgentRun>,
    pub tests: Vec<TestRun>,
    pub timings: Timings,
    /// The step that failed and why (download, boot, guest setup).
    pub failure: Option<String>,
}

impl KernelRun {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
            && self.agent.as_ref().is_some_and(|a| a.error.is_none())
            && !self.tests.is_empty()
            && self.tests.iter().all(TestRun::ok)
    }

    pub fn counts(&self) -> (usize, usize) {
        self.tests.iter().fold((0, 0), |(p, f), t| {
            // A binary that failed without naming a test (crash, timeout,
            // no result) still counts as one failure.
            let failed = if t.ok() { 0 } else { t.failed.len().max(1) };
            (p + t.passed.len(), f + failed)
        })
    }
}

pub fn read_agent(results: &Path) -> AgentRun {
    let out = fs::read_to_string(results.join("agent.out")).unwrap_or_default();
    let err = fs::read_to_string(results.join("agent.err")).unwrap_or_default();
    let exit_code = read_exit_code(&results.join("agent.rc"));
    let started = out
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| event["type"] == "started");
    let attached = started
        .as_ref()
        .and_then(|event| event["tracepoints"].as_array())
        .map(|list| {
            list.iter()
                .filter_map(|tp| tp.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // `tracepoint tcp/x is missing (Linux 5.14+): running without it`
    let absent = err
        .lines()
        .filter_map(|line| line.split_once("tracepoint ")?.1.split_once(" is missing"))
        .map(|(name, _)| name.to_owned())
        .collect();
    let error = match (&started, exit_code) {
        (Some(_), Some(0)) => None,
        (Some(_), code) => Some(format!(
            "started, but exited with {} on SIGINT: {}",
            exit_text(code),
            err.trim()
        )),
        (None, code) => Some(format!(
            "exited with {} before `started`: {}",
            exit_text(code),
            if err.trim().is_empty() {
                "(no stderr)"
            } else {
                err.trim()
            }
        )),
    };
    // The agent stops at the first program that fails:
    // `verifier rejected program X` or `attaching to tracepoint cat/X`.
    let rejected = error.as_deref().and_then(|e| {
        let (program, cell) = if let Some((_, rest)) = e.split_once("verifier rejected program ") {
            (rest, "rejected by the verifier")
        } else {
            (e.split_once("attaching to tracepoint ")?.1, "attach failed")
        };
        let program = program.split([':', ' ']).next()?;
        Some((short_name(program).to_owned(), cell.to_owned()))
    });
    AgentRun {
        attached,
        absent,
        rejected,
        error,
    }
}

fn exit_text(code: Option<i32>) -> String {
    code.map_or("no exit code".to_owned(), |c| format!("exit code {c}"))
}

/// `sock/inet_sock_set_state` → `inet_sock_set_state`: the agent names each
/// program after its tracepoint.
fn short_name(tracepoint: &str) -> &str {
    tracepoint.rsplit('/').next().unwrap_or(tracepoint)
}

pub fn read_test(results: &Path, binary: &str) -> TestRun {
    let out = fs::read_to_string(results.join(format!("test-{binary}.out"))).unwrap_or_default();
    let mut run = TestRun {
        binary: binary.to_owned(),
        passed: Vec::new(),
        failed: Vec::new(),
        exit_code: read_exit_code(&results.join(format!("test-{binary}.rc"))),
    };
    // libtest: `test name ... ok` / `test name ... FAILED`
    for line in out.lines() {
        let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ... "))
        else {
            continue;
        };
        match result.trim() {
            "ok" => run.passed.push(name.to_owned()),
            "FAILED" => run.failed.push(name.to_owned()),
            _ => {}
        }
    }
    run
}

fn read_exit_code(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn secs(duration: Option<Duration>) -> String {
    duration.map_or("-".to_owned(), |d| format!("{:.0} s", d.as_secs_f64()))
}

/// The per-kernel summary printed at the end.
pub fn summary(runs: &[KernelRun]) -> String {
    let mut s = String::new();
    for run in runs {
        let title = match (&run.kernel, &run.host_release) {
            (Some(k), _) => format!("{} ({} {})", run.series, k.package, k.version),
            (None, Some(release)) => format!("{} ({release}, this host)", run.series),
            (None, None) => run.series.clone(),
        };
        let verdict = if run.ok() { "ok" } else { "FAILED" };
        let _ = writeln!(s, "{title}: {verdict}");
        let t = &run.timings;
        let _ = writeln!(
            s,
            "  time: download/unpack {}, boot {}, agent {}, tests {}, total {}",
            secs(Some(t.download)),
            secs(t.boot),
            secs(t.agent),
            secs(t.tests),
            secs(Some(t.total))
        );
        if let Some(failure) = &run.failure {
            let _ = writeln!(s, "  failed step: {failure}");
        }
        if let Some(agent) = &run.agent {
            let _ = writeln!(s, "  attached: {}", list(&agent.attached));
            if !agent.absent.is_empty() {
                let _ = writeln!(s, "  absent from this kernel: {}", list(&agent.absent));
            }
            if let Some((program, how)) = &agent.rejected {
                let _ = writeln!(s, "  program {program}: {how}");
            }
            if let Some(error) = &agent.error {
                let _ = writeln!(s, "  agent error: {error}");
            }
        }
        for test in &run.tests {
            let _ = writeln!(
                s,
                "  tests {}: {} passed, {} failed{}{}",
                test.binary,
                test.passed.len(),
                test.failed.len(),
                if test.failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", test.failed.join(", "))
                },
                match test.exit_code {
                    Some(0) => String::new(),
                    Some(code) => format!(", exit code {code}"),
                    None => ", did not finish".to_owned(),
                }
            );
        }
    }
    s
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

const BEGIN: &str =
    "<!-- vm-test:begin (generated by `cargo xtask vm-test`; rows are replaced per kernel) -->";
const END: &str = "<!-- vm-test:end -->";

/// One row of the generated table.
#[derive(Debug, Clone)]
struct Row {
    /// First cell; its first word is the series (`6.1`).
    kernel: String,
    /// (tracepoint, cell)
    programs: Vec<(String, String)>,
    tests: String,
    measured: String,
}

/// Replaces the rows of the kernels in `runs` in the table between the
/// markers of `path` (appending the table if the markers are missing).
pub fn update_docs(path: &Path, runs: &[KernelRun], date: &str) -> anyhow::Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (before, table, after) = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => (
            &text[..b],
            &text[b + BEGIN.len()..e],
            &text[e + END.len()..],
        ),
        _ => (text.as_str(), "", "\n"),
    };
    let mut rows = parse_rows(table);
    for run in runs {
        let row = row_of(run, date);
        rows.retain(|r| series_of(&r.kernel) != run.series);
        rows.push(row);
    }
    rows.sort_by_key(|row| std::cmp::Reverse(version_key(&row.kernel)));
    let new = format!("{before}{BEGIN}\n{}{END}{after}", render(&rows));
    fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn series_of(kernel_cell: &str) -> &str {
    kernel_cell.split_whitespace().next().unwrap_or("")
}

fn version_key(kernel_cell: &str) -> Vec<u32> {
    series_of(kernel_cell)
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn row_of(run: &KernelRun, date: &str) -> Row {
    let kernel = match (&run.kernel, &run.host_release) {
        (Some(k), _) => format!(
            "{} ({}, Debian `{}`)",
            run.series,
            k.upstream_version(),
            k.package
        ),
        (None, Some(release)) => format!(
            "{} (`{release}`, the development VM's own kernel, no qemu)",
            run.series
        ),
        (None, None) => run.series.clone(),
    };
    let mut programs = Vec::new();
    if let Some(agent) = &run.agent {
        for tp in &agent.attached {
            programs.push((short_name(tp).to_owned(), "attached".to_owned()));
        }
        for tp in &agent.absent {
            programs.push((short_name(tp).to_owned(), "not in kernel".to_owned()));
        }
        programs.extend(agent.rejected.clone());
    }
    let mut tests: Vec<String> = run
        .tests
        .iter()
        .map(|t| {
            let total = t.passed.len() + t.failed.len();
            let mut cell = format!("{} {}/{}", t.binary, t.passed.len(), total);
            if !t.failed.is_empty() {
                let _ = write!(cell, " (failed: {})", names(&t.failed));
            } else if !t.ok() {
                cell.push_str(" (did not finish)");
            }
            cell
        })
        .collect();
    if let Some(error) = run.agent.as_ref().and_then(|a| a.error.as_ref()) {
        tests.insert(0, format!("agent failed: {}", one_line(error)));
    }
    if let Some(failure) = &run.failure {
        tests.insert(0, format!("failed: {}", one_line(failure)));
    }
    let t = &run.timings;
    Row {
        kernel,
        programs,
        tests: if tests.is_empty() {
            "-".to_owned()
        } else {
            tests.join("; ")
        },
        measured: if run.kernel.is_some() {
            format!("{date}; boot {}, tests {}", secs(t.boot), secs(t.tests))
        } else {
            format!("{date}; tests {}", secs(t.tests))
        },
    }
}

/// A few test names, then how many more (the summary lists them all).
fn names(tests: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = tests[..tests.len().min(SHOWN)].join(", ");
    if tests.len() > SHOWN {
        let _ = write!(text, " and {} more", tests.len() - SHOWN);
    }
    text
}

fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = line.replace('|', "\\|");
    if line.chars().count() > 300 {
        format!("{}…", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim().trim_start_matches('|').trim_end_matches('|');
    line.split(" | ").map(|c| c.trim().to_owned()).collect()
}

fn parse_rows(table: &str) -> Vec<Row> {
    let mut lines = table.lines().filter(|l| l.trim_start().starts_with('|'));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header = cells(header);
    let programs = &header[1..header.len().saturating_sub(2)];
    lines
        .skip(1) // |---|
        .filter_map(|line| {
            let cells = cells(line);
            if cells.len() != header.len() {
                return None;
            }
            Some(Row {
                kernel: cells[0].clone(),
                programs: programs
                    .iter()
                    .zip(&cells[1..])
                    .filter(|(_, cell)| cell.as_str() != "?")
                    .map(|(p, c)| (p.trim_matches('`').to_owned(), c.clone()))
                    .collect(),
                tests: cells[cells.len() - 2].clone(),
                measured: cells[cells.len() - 1].clone(),
            })
        })
        .collect()
}

fn render(rows: &[Row]) -> String {
    let mut programs: Vec<String> = Vec::new();
    for row in rows {
        for (program, _) in &row.programs {
            if !programs.contains(program) {
                programs.push(program.clone());
            }
        }
    }
    let mut s = String::from("| kernel |");
    for program in &programs {
        let _ = write!(s, " `{program}` |");
    }
    s.push_str(" tests passed in the guest | measured |\n|---|");
    s.push_str(&"---|".repeat(programs.len() + 2));
    s.push('\n');
    for row in rows {
        let _ = write!(s, "| {} |", row.kernel);
        for program in &programs {
            let cell = row
                .programs
                .iter()
                .find(|(p, _)| p == program)
                .map_or("?", |(_, c)| c.as_str());
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s, " {} | {} |", row.tests, row.measured);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(series: &'static str, attached: &[&str], absent: &[&str]) -> KernelRun {
        KernelRun {
            series: series.to_owned(),
            kernel: None,
            host_release: None,
            agent: Some(AgentRun {
                attached: attached.iter().map(|s| s.to_string()).collect(),
                absent: absent.iter().map(|s| s.to_string()).collect(),
                rejected: None,
                error: None,
            }),
            tests: vec![TestRun {
                binary: "connect".into(),
                passed: vec!["a".into(), "b".into()],
                failed: vec![],
                exit_code: Some(0),
            }],
            timings: Timings::default(),
            failure: None,
        }
    }

    #[test]
    fn rows_of_other_kernels_survive_a_refresh() {
        let dir = std::env::temp_dir().join(format!("vm-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("kernels.md");
        fs::write(&doc, "# Kernels\n\ntext\n").unwrap();
        update_docs(&doc, &[run("5.10", &["sock/a"], &["sock/b"])], "2026-01-01").unwrap();
        update_docs(
            &doc,
            &[run("6.1", &["sock/a", "sock/b"], &[])],
            "2026-01-02",
        )
        .unwrap();
        update_docs(
            &doc,
            &[run("6.1", &["sock/a", "sock/b"], &[])],
            "2026-01-03",
        )
        .unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert!(text.starts_with("# Kernels\n\ntext\n"), "{text}");
        let rows = parse_rows(&text[text.find(BEGIN).unwrap()..]);
        assert_eq!(rows.len(), 2, "{text}");
        assert!(rows[0].kernel.starts_with("6.1") && rows[0].measured.starts_with("2026-01-03"));
        assert!(
            rows[1]
                .programs
                .contains(&("b".into(), "not in kernel".into()))
        );
        assert!(text.contains("| connect 2/2 |"), "{text}");
    }
}
