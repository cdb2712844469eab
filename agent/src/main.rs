//! `resptrace`: wiring only — parse the command line, check the host, load
//! the probes, run the pipeline until a signal.

mod aggregate;
mod cli;
mod clock;
mod decode;
mod detect;
mod enrich;
mod gauges;
mod http;
mod preflight;
mod probes;
mod procfs;
mod resp;
mod run;
mod sinks;
mod tracefs;
mod tracker;
mod workload;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
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

fn init_logging(filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}
