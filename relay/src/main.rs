//! The `relay` binary: parses the command line and hands it to [`relay::cmd::run`].
use clap::Parser;

fn main() -> std::process::ExitCode {
    relay::cmd::run(relay::cmd::Cli::parse())
}
