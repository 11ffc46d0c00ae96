fn main() -> std::process::ExitCode {
    // The settings file fills in the options the command line leaves out.
    let cli: client_agent::cli::Cli = proto::cli::parse("CLIENT_CONFIG", None);
    let format = cli.log_format;
    proto::program::main("CLIENT_LOG", format, client_agent::agent::run(cli))
}
