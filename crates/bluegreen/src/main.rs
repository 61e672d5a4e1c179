//! The `bluegreen` binary: parse arguments, run one command, print one error, exit with a code.

use std::io::IsTerminal;
use std::process::ExitCode;

use bluegreen::{cli, exit};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The example app runs from this binary too, so `bluegreen demo` needs nothing else.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "example-app")
    {
        return bluegreen_example_app::main_from(std::env::args_os().skip(1));
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLUEGREEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    // BLUEGREEN_WORKER_THREADS pins the runtime's size, e.g. to one per core the router owns.
    // One thread is a current-thread runtime: every task on the thread that accepts, with no
    // hand-over between a worker and the main thread.
    let threads = std::env::var("BLUEGREEN_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let mut runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    if let Some(threads) = threads.filter(|n| *n > 1) {
        runtime.worker_threads(threads);
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bluegreen: cannot start the async runtime: {error}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bluegreen: {}", error.message);
            ExitCode::from(error.code)
        }
    }
}
