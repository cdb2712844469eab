//! `resptrace`: wiring only — parse the command line, check the host, load
//! the probes, run the pipeline until a signal.

use std::process::ExitCode;

use agent::{config, run};

fn main() -> ExitCode {
    let cli = match config::load() {
        Ok(cli) => cli,
        Err(config::ConfigError::Flags(err)) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            // One clear line, not clap's usage block.
            let rendered = err.render().to_string();
            eprintln!(
                "resptrace: {}",
                rendered.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(2);
        }
        Err(err) => {
            eprintln!("resptrace: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = init_logging(&cli.log) {
        eprintln!("resptrace: error: --log: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("resptrace: error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("resptrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The kube crates log every failed request and retry; the agent says
/// once when the API is unavailable, so theirs are off unless asked for.
const QUIET_KUBE: &str = "kube_client=off,kube_runtime=off";

fn init_logging(filter: &str) -> Result<(), String> {
    let filter = if filter.contains("kube") {
        filter.to_string()
    } else {
        format!("{filter},{QUIET_KUBE}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}
