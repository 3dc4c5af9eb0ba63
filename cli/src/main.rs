//! The `clawctl` binary: parse flags, run the verb, print errors as one line.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors are printed by clap, which exits with status 2.
    let cli = clawctl::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(clawctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if clawctl::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", clawctl::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
