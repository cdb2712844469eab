//! Bad input and missing privileges: one clear line on stderr and a non-zero
//! exit, never a panic or a silent empty stream.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::{Command, Output},
};

use lab::agent_binary;

fn run(args: &[&str]) -> Output {
    Command::new(agent_binary())
        .args(args)
        .output()
        .expect("run resptrace")
}

fn assert_one_line_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {}", output.status);
    assert!(
        output.stdout.is_empty(),
        "nothing on stdout: {:?}",
        output.stdout
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "`{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn ports_that_are_not_ports_are_rejected() {
    assert_one_line_error(&run(&["--ports", "abc"]), "abc");
    assert_one_line_error(&run(&["--ports", "70000"]), "70000");
    assert_one_line_error(&run(&["--ports", "6379,0"]), "0");
    let too_many: Vec<String> = (7000..7020).map(|p| p.to_string()).collect();
    assert_one_line_error(&run(&["--ports", &too_many.join(",")]), "at most 16");
}

/// A config file's mistakes: one line naming the file and the key, exit 2.
#[test]
fn config_file_mistakes_name_the_file_and_the_key() {
    let dir = std::env::temp_dir().join(format!("resptrace-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, needle) in [
        ("intervall = \"5s\"\n", "unknown key `intervall`"),
        ("interval = \"5 fortnights\"\n", "key `interval`: "),
        (
            "ports = [6379, 70000]\n",
            "key `ports`: invalid value: 70000",
        ),
        (
            "emit = \"everything\"\n",
            "key `emit`: invalid value `everything` (one of: slow, all)",
        ),
        ("ports = [6379\n", "line 1: "),
    ] {
        let path = dir.join("resptrace.toml");
        std::fs::write(&path, text).unwrap();
        let output = run(&["--config", path.to_str().unwrap()]);
        let prefix = format!("resptrace: config {}: ", path.display());
        assert!(
            String::from_utf8_lossy(&output.stderr).starts_with(&prefix),
            "{text}"
        );
        assert_one_line_error(&output, needle);
        assert_eq!(output.status.code(), Some(2), "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let output = Command::new(agent_binary())
        .env("RESPTRACE_INTERVAL", "soon")
        .output()
        .unwrap();
    assert_one_line_error(&output, "RESPTRACE_INTERVAL: invalid value: `soon`");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn help_documents_every_flag() {
    let output = run(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--ports",
        "--ring-buffer-kib",
        "--stats-interval",
        "--log",
        "--format",
        "--node-name",
        "--config",
        "RESPTRACE_PORTS",
        "--http-addr",
        "--kubernetes",
        "--kubeconfig",
        "--pod-labels",
        "--redis-pod-selector",
        "--watch-services",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

#[test]
fn without_privileges_the_agent_says_what_it_needs() {
    // A copy any user can execute, wherever the checkout lives.
    let dir = std::env::temp_dir().join(format!("resptrace-noroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.join("resptrace");
    std::fs::copy(agent_binary(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();

    // ETXTBSY while a child forked by a parallel test still holds the fd the
    // copy was written through (until its exec closes it): try again.
    let output = loop {
        match Command::new(&binary)
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .output()
        {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => break other.expect("run resptrace as nobody"),
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert_one_line_error(&output, "CAP_BPF");
    assert_eq!(output.status.code(), Some(1));
}
