use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = app_server_agent::Cli::parse();
    proto::program::main("APP_AGENT_LOG", app_server_agent::run(cli))
}
