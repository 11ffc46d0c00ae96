fn main() -> std::process::ExitCode {
    // The settings file fills in the flags of `run` the command line leaves out.
    let cli: app_server_agent::Cli = proto::cli::parse("APP_AGENT_CONFIG", Some("run"));
    let format = match &cli.command {
        app_server_agent::Command::Run(args) => args.log_format,
        app_server_agent::Command::DemoShop(args) => args.log_format,
    };
    proto::program::main("APP_AGENT_LOG", format, app_server_agent::run(cli))
}
