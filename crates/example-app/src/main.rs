//! The example app's own binary; `bluegreen example-app` runs the same code.

fn main() -> std::process::ExitCode {
    bluegreen_example_app::main_from(std::env::args_os())
}
