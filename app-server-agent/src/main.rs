fn main() -> std::process::ExitCode {
    // The settings file fills in the flags of `run` the command line leaves out.
    let cli: app_server_agent::Cli = proto::cli::parse("APP_AGENT_CONFIG", Some("run"));
    let app_server_agent::Command::Run(args) = &cli.command;
    let format = args.log_format;
    proto::program::main("APP_AGENT_LOG", format, app_server_agent::run(cli))
}
