use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = client_agent::cli::Cli::parse();
    proto::program::main("CLIENT_LOG", client_agent::agent::run(cli))
}
