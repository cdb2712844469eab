//! Where settings come from: flags, then `RESPTRACE_*` environment variables,
//! then an optional TOML file (`--config`), then the defaults in `cli.rs`.
//!
//! Nothing here names a flag: every long flag of [`Cli`] is also the env var
//! `RESPTRACE_<FLAG_IN_SCREAMING_SNAKE>` and the file key `<flag>`, so a flag
//! added to `Cli` is configurable all three ways without code here. The
//! layering works by turning env and file values into clap default values:
//! clap then applies its own precedence (command line over defaults) and
//! parses every value with the flag's own parser.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, Command, CommandFactory as _, FromArgMatches as _};

use crate::cli::Cli;

/// Prefix of the environment variable of every flag.
const ENV_PREFIX: &str = "RESPTRACE_";

/// The flag that names the config file; a file cannot name another.
const CONFIG_FLAG: &str = "config";

/// Environment variables read after `RESPTRACE_<FLAG>` and before the file,
/// for what Kubernetes already provides: `NODE_NAME` is what DaemonSets
/// conventionally set from the downward API (`spec.nodeName`).
const ENV_ALIASES: &[(&str, &str)] = &[("node-name", "NODE_NAME")];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad flags, and `--help`/`--version` (which are not failures).
    #[error(transparent)]
    Flags(#[from] clap::Error),
    #[error("config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: line {line}: {}", path.display(), source.message().trim_end())]
    Syntax {
        path: PathBuf,
        line: usize,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {}: unknown key `{key}`", path.display())]
    UnknownKey { path: PathBuf, key: String },
    #[error("config {}: key `{key}`: {reason}", path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{var}: {reason}")]
    BadEnv { var: String, reason: String },
}

/// The settings of this run, from the process's arguments and environment.
pub fn load() -> Result<Cli, ConfigError> {
    load_from(std::env::args_os(), |var| std::env::var_os(var))
}

/// The settings from `args` (program name first) and the environment
/// `env` (a lookup, so tests need not touch the process's environment).
pub fn load_from(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Cli, ConfigError> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // Flags first: `--help` and a bad flag win over a bad file or env var.
    // This parse leaves the environment out, so that a bad env value is
    // reported below naming its variable.
    let matches = match Cli::command().try_get_matches_from(&args) {
        Ok(matches) => matches,
        // Again with env vars, for them to show in `--help`.
        Err(err) => {
            return Err(command()
                .try_get_matches_from(&args)
                .err()
                .unwrap_or(err)
                .into());
        }
    };
    let command = command();

    let mut layers: HashMap<String, Vec<OsString>> = HashMap::new();
    let config_path = matches
        .get_one::<PathBuf>(CONFIG_FLAG)
        .cloned()
        .or_else(|| {
            env(&env_var(CONFIG_FLAG))
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
    if let Some(path) = config_path {
        layers.extend(file_values(&command, &path)?);
    }
    // Env over file: aliases first, so that `RESPTRACE_<FLAG>` overrides them.
    for (long, var) in ENV_ALIASES {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            let arg = configurable(&command, long).expect("aliases name flags");
            layers.insert(arg_id(arg), env_values(arg, var, value)?);
        }
    }
    for arg in command.get_arguments().filter(|a| is_configurable(a)) {
        let var = env_var(arg.get_long().expect("configurable flags are long"));
        if let Some(value) = env(&var).filter(|v| !v.is_empty()) {
            layers.insert(arg_id(arg), env_values(arg, &var, value)?);
        }
    }

    let command = command.mut_args(|arg| match layers.remove(arg.get_id().as_str()) {
        Some(values) => arg.default_values(values),
        None => arg,
    });
    let matches = command.try_get_matches_from(&args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The clap command of [`Cli`], every flag with its env var in `--help`.
pub fn command() -> Command {
    Cli::command().mut_args(|arg| {
        if !is_configurable(&arg) || arg.get_env().is_some() {
            return arg;
        }
        let var = env_var(arg.get_long().expect("configurable flags are long"));
        arg.env(var)
    })
}

/// `--ring-buffer-kib` → `RESPTRACE_RING_BUFFER_KIB`.
pub fn env_var(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.replace('-', "_").to_ascii_uppercase()
    )
}

/// Long flags that take a setting: not `--help`/`--version`.
fn is_configurable(arg: &Arg) -> bool {
    arg.get_long().is_some()
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

fn configurable<'a>(command: &'a Command, long: &str) -> Option<&'a Arg> {
    command
        .get_arguments()
        .find(|a| is_configurable(a) && a.get_long() == Some(long))
}

fn arg_id(arg: &Arg) -> String {
    arg.get_id().as_str().to_owned()
}

/// Whether a flag takes a list (`--ports 6379,6380`, or repeated).
fn takes_list(arg: &Arg) -> bool {
    arg.get_value_delimiter().is_some()
        || matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1)
}

fn env_values(arg: &Arg, var: &str, value: OsString) -> Result<Vec<OsString>, ConfigError> {
    let values = split_list(arg, value);
    for value in &values {
        check_value(arg, value).map_err(|reason| ConfigError::BadEnv {
            var: var.to_owned(),
            reason,
        })?;
    }
    Ok(values)
}

/// The file's settings by flag id, each checked with its flag's parser.
fn file_values(
    command: &Command,
    path: &Path,
) -> Result<HashMap<String, Vec<OsString>>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source: toml::de::Error| {
        let start = source.span().map_or(0, |span| span.start);
        ConfigError::Syntax {
            path: path.to_owned(),
            line: 1 + text.as_bytes()[..start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            source,
        }
    })?;
    let mut values = HashMap::with_capacity(table.len());
    for (key, value) in table {
        let bad_value = |reason: String| ConfigError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
            reason,
        };
        let arg = configurable(command, &key)
            .filter(|arg| arg.get_long() != Some(CONFIG_FLAG))
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            })?;
        let items: Vec<OsString> = match value {
            toml::Value::Array(items) if takes_list(arg) => items
                .into_iter()
                .map(|item| scalar(item).map(OsString::from))
                .collect::<Option<_>>()
                .ok_or("a list of strings or numbers"),
            toml::Value::Array(_) => Err("one value, not a list"),
            other => scalar(other)
                .map(|text| split_list(arg, text.into()))
                .ok_or("a string, number or boolean"),
        }
        .map_err(|expected| bad_value(format!("expected {expected}")))?;
        for item in &items {
            check_value(arg, item).map_err(bad_value)?;
        }
        values.insert(arg_id(arg), items);
    }
    Ok(values)
}

/// A TOML scalar as the text a flag would be given.
fn scalar(value: toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// `6379,6380` → `6379`, `6380` for flags with a value delimiter.
fn split_list(arg: &Arg, value: OsString) -> Vec<OsString> {
    match (arg.get_value_delimiter(), value.to_str()) {
        (Some(delimiter), Some(text)) => text.split(delimiter).map(OsString::from).collect(),
        _ => vec![value],
    }
}

/// Runs the flag's own parser on `value`; the reason it failed, in one line.
fn check_value(arg: &Arg, value: &OsStr) -> Result<(), String> {
    // `ValueParser` has no public parse: a one-flag command with the value
    // as its default runs it (a copy of the flag would bring its relations
    // to other flags along).
    let probe = Arg::new("value")
        .long("value")
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone())
        .default_value(value.to_owned());
    let Err(err) = Command::new("resptrace")
        .arg(probe)
        .try_get_matches_from(["resptrace"])
    else {
        return Ok(());
    };
    let shown = value.to_string_lossy();
    let reason = match std::error::Error::source(&err).map(ToString::to_string) {
        // Most parsers name the value themselves.
        Some(cause) if cause.contains(shown.as_ref()) => format!("invalid value: {cause}"),
        Some(cause) => format!("invalid value `{shown}`: {cause}"),
        None => format!("invalid value `{shown}`"),
    };
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_owned())
        .collect();
    Err(if possible.is_empty() {
        reason
    } else {
        format!("{reason} (one of: {})", possible.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cli::{Emit, Format};

    /// A config file with `text`, removed on drop.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn new(text: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("resptrace-config-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn arg(&self) -> String {
            format!("--config={}", self.0.display())
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Cli, ConfigError> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        load_from(
            std::iter::once("resptrace").chain(args.iter().copied()),
            |var| env.get(var).cloned(),
        )
    }

    #[test]
    fn defaults_without_file_or_env() {
        let cli = load(&[], &[]).unwrap();
        assert_eq!(cli.ports, vec![6379]);
        assert_eq!(cli.interval, Duration::from_secs(10));
        assert_eq!(cli.format, Format::Json);
        assert_eq!(cli.node_name, None);
    }

    #[test]
    fn file_keys_are_the_long_flags() {
        let file = ConfigFile::new(
            "ports = [6379, 6380]\ninterval = \"5s\"\nslow-threshold = \"250ms\"\n\
             emit = \"all\"\nring-buffer-kib = 256\nbare-hook = true\nnode-name = \"ip-10-0-1-5\"\n",
        );
        let cli = load(&[&file.arg()], &[]).unwrap();
        assert_eq!(cli.ports, vec![6379, 6380]);
        assert_eq!(cli.interval, Duration::from_secs(5));
        assert_eq!(cli.slow_threshold, Duration::from_millis(250));
        assert_eq!(cli.emit, Emit::All);
        assert_eq!(cli.ring_buffer_kib, 256);
        assert!(cli.bare_hook);
        assert_eq!(cli.node_name.as_deref(), Some("ip-10-0-1-5"));
    }

    #[test]
    fn lists_are_arrays_or_delimited_strings() {
        let file = ConfigFile::new("ports = \"7000,7001\"\n");
        assert_eq!(load(&[&file.arg()], &[]).unwrap().ports, vec![7000, 7001]);
        let cli = load(&[], &[("RESPTRACE_PORTS", "7002,7003")]).unwrap();
        assert_eq!(cli.ports, vec![7002, 7003]);
    }

    #[test]
    fn config_file_named_by_env() {
        let file = ConfigFile::new("interval = \"3s\"\n");
        let path = file.0.to_str().unwrap();
        let cli = load(&[], &[("RESPTRACE_CONFIG", path)]).unwrap();
        assert_eq!(cli.interval, Duration::from_secs(3));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let file = ConfigFile::new("interval = \"3s\"\nports = [1, 2]\nemit = \"all\"\n");
        let env = [("RESPTRACE_INTERVAL", "4s"), ("RESPTRACE_PORTS", "3")];
        let cli = load(&[&file.arg()], &env).unwrap();
        assert_eq!(cli.interval, Duration::from_secs(4));
        assert_eq!(cli.ports, vec![3]);
        assert_eq!(cli.emit, Emit::All, "from the file");

        let cli = load(&[&file.arg(), "--interval", "5s", "--ports", "4,5"], &env).unwrap();
        assert_eq!(cli.interval, Duration::from_secs(5));
        assert_eq!(cli.ports, vec![4, 5], "flag lists replace, not extend");
    }

    #[test]
    fn node_name_env_alias_sits_between_resptrace_env_and_file() {
        let file = ConfigFile::new("node-name = \"from-file\"\n");
        let cli = load(&[&file.arg()], &[("NODE_NAME", "from-downward-api")]).unwrap();
        assert_eq!(cli.node_name.as_deref(), Some("from-downward-api"));
        let env = [
            ("NODE_NAME", "from-downward-api"),
            ("RESPTRACE_NODE_NAME", "explicit"),
        ];
        let cli = load(&[&file.arg()], &env).unwrap();
        assert_eq!(cli.node_name.as_deref(), Some("explicit"));
        let cli = load(&["--node-name", "flag"], &env).unwrap();
        assert_eq!(cli.node_name.as_deref(), Some("flag"));
    }

    #[test]
    fn empty_env_values_are_unset() {
        let cli = load(&[], &[("RESPTRACE_INTERVAL", ""), ("NODE_NAME", "")]).unwrap();
        assert_eq!(cli.interval, Duration::from_secs(10));
        assert_eq!(cli.node_name, None);
    }

    fn error(args: &[&str], env: &[(&str, &str)]) -> String {
        load(args, env).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_rejected_naming_key_and_file() {
        let file = ConfigFile::new("interval = \"5s\"\nintervall = \"5s\"\n");
        let message = error(&[&file.arg()], &[]);
        assert_eq!(
            message,
            format!("config {}: unknown key `intervall`", file.0.display())
        );
        for key in [
            "config = \"/etc/other.toml\"",
            "help = true",
            "version = true",
        ] {
            let file = ConfigFile::new(key);
            assert!(error(&[&file.arg()], &[]).contains("unknown key"), "{key}");
        }
    }

    #[test]
    fn bad_values_are_rejected_naming_the_key() {
        for (text, key, needle) in [
            ("interval = \"10 parsecs\"", "interval", "10 parsecs"),
            ("interval = \"1ms\"", "interval", "at least 100ms"),
            ("ports = [6379, 70000]", "ports", "70000"),
            ("ports = [[6379]]", "ports", "expected a list"),
            ("emit = \"some\"", "emit", "one of: slow, all"),
            ("ring-buffer-kib = 1000", "ring-buffer-kib", "power of two"),
            (
                "interval = [\"1s\", \"2s\"]",
                "interval",
                "one value, not a list",
            ),
            ("bare-hook = \"yes please\"", "bare-hook", "yes please"),
            ("log = { level = \"debug\" }", "log", "expected a string"),
        ] {
            let file = ConfigFile::new(text);
            let message = error(&[&file.arg()], &[]);
            let prefix = format!("config {}: key `{key}`: ", file.0.display());
            assert!(message.starts_with(&prefix), "{text}: {message}");
            assert!(message.contains(needle), "{text}: {message}");
        }
    }

    #[test]
    fn a_bad_value_is_rejected_even_when_a_flag_overrides_it() {
        let file = ConfigFile::new("interval = \"soon\"");
        assert!(error(&[&file.arg(), "--interval", "5s"], &[]).contains("key `interval`"));
    }

    #[test]
    fn bad_env_values_are_rejected_naming_the_variable() {
        let message = error(&[], &[("RESPTRACE_EMIT", "some")]);
        assert!(
            message.starts_with("RESPTRACE_EMIT: invalid value `some`"),
            "{message}"
        );
    }

    #[test]
    fn syntax_errors_and_missing_files_name_the_file() {
        let file = ConfigFile::new("ports = [6379\n");
        let message = error(&[&file.arg()], &[]);
        assert!(
            message.starts_with(&format!("config {}: line 1: ", file.0.display())),
            "{message}"
        );
        let message = error(&["--config", "/nonexistent/resptrace.toml"], &[]);
        assert!(
            message.starts_with("config /nonexistent/resptrace.toml: "),
            "{message}"
        );
    }

    #[test]
    fn every_flag_has_its_env_var() {
        let command = command();
        for arg in command.get_arguments().filter(|a| is_configurable(a)) {
            let long = arg.get_long().unwrap();
            assert_eq!(arg.get_env(), Some(OsStr::new(&env_var(long))), "--{long}");
        }
        assert_eq!(env_var("ring-buffer-kib"), "RESPTRACE_RING_BUFFER_KIB");
    }
}
