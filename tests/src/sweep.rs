//! Removes what a killed test run left behind: lab network namespaces,
//! pod cgroups and iptables rules whose owning test process is gone. Names
//! carry the owner's pid, so a sweep never touches resources of test
//! processes running at the same time.

use std::{process::Command, sync::Once};

use crate::{
    RULE_COMMENT,
    cgroup::{all_roots, leftover_pods, remove_pod},
    netns::{NAME_PREFIX, list_netns, remove_netns, run},
};

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub netns: Vec<String>,
    pub cgroups: Vec<String>,
    pub rules: Vec<String>,
}

impl Swept {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.cgroups.is_empty() && self.rules.is_empty()
    }
}

/// Sweeps once per test process, before its first lab resource.
pub(crate) fn sweep_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| match sweep() {
        Ok(swept) if !swept.is_empty() => {
            eprintln!("lab: removed leftovers of dead test runs: {swept:?}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("lab: sweep failed: {e:#}"),
    });
}

/// Whether process `pid` is gone or a zombie (killed, not yet reaped by
/// whoever inherited it).
pub fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Removes leftovers of dead test processes (see the module doc).
pub fn sweep() -> anyhow::Result<Swept> {
    let mut swept = Swept::default();
    for name in list_netns()? {
        if owner(&name, &format!("{NAME_PREFIX}-"), '-').is_some_and(is_dead) {
            remove_netns(&name);
            swept.netns.push(name);
        }
    }
    for root in all_roots() {
        for path in leftover_pods(&root, is_dead) {
            match remove_pod(&root, &path) {
                Ok(()) => swept.cgroups.push(format!("{}{path}", root.display())),
                Err(e) => eprintln!("lab: {e:#}"),
            }
        }
    }
    // Lab rules in namespaces die with them; these are the host's own.
    let tag = format!("{RULE_COMMENT}:pid=");
    for table in ["filter", "mangle"] {
        let Ok(rules) = run(Command::new("iptables").args(["-w", "-t", table, "-S"])) else {
            continue;
        };
        for rule in rules.lines() {
            let Some(pid) = rule.find(&tag).and_then(|at| owner(&rule[at..], &tag, ':')) else {
                continue;
            };
            if !is_dead(pid) {
                continue;
            }
            // `-A CHAIN <spec>` → `-D CHAIN <spec>`; lab comments have no spaces.
            let args: Vec<&str> = rule
                .split_whitespace()
                .skip(1)
                .map(|arg| arg.trim_matches('"'))
                .collect();
            let deleted = run(Command::new("iptables")
                .args(["-w", "-t", table, "-D"])
                .args(&args));
            match deleted {
                Ok(_) => swept.rules.push(format!("{table}: {rule}")),
                Err(e) => eprintln!("lab: {e:#}"),
            }
        }
    }
    Ok(swept)
}

/// The pid right after `prefix` in `name`, up to `end`.
fn owner(name: &str, prefix: &str, end: char) -> Option<u32> {
    name.strip_prefix(prefix)?.split(end).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn owners_from_names() {
        assert_eq!(owner("rtl-4242-7-router", "rtl-", '-'), Some(4242));
        assert_eq!(owner("rtlx-4242-7", "rtl-", '-'), None);
        assert_eq!(
            owner(
                "resptrace-test:pid=99:3\" -j DROP",
                "resptrace-test:pid=",
                ':'
            ),
            Some(99)
        );
    }
}
