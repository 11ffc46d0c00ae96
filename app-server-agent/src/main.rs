//! app-server-agent: runs beside a vendor's web service (registers its services with the relay,
//! accepts or refuses sessions). Not built yet: this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!("app-server-agent: not built yet; this release has the relay and client-agent only");
    std::process::ExitCode::FAILURE
}
