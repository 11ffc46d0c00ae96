//! `app-server-agent run` processes: a vendor's agent registered with a relay for its services.
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::relay::Relay;
use crate::util::{self, ChildGuard};

/// The application server of `wine` in interop and bench.
pub(crate) const VENDOR: &str = "vendor";
pub(crate) const VENDOR_PW: &str = "vendor-secret";

/// Service `wine` (1.20 EUR a minute, 0.10 EUR set-up, 1 s increments) and the application
/// server [`VENDOR`] that may deliver it.
pub(crate) fn add_wine(relay: &Relay) -> anyhow::Result<()> {
    let mut cmd = relay.admin();
    cmd.args(["service", "add", "wine", "--per-minute", "120"])
        .args(["--setup-fee", "10", "--increment", "1", "--currency", "EUR"]);
    util::run_output(&mut cmd, "relay service add wine")?;
    let mut cmd = relay.admin();
    cmd.args(["appserver", "add", VENDOR, "--service", "wine"])
        .env("RELAY_PASSWORD", VENDOR_PW);
    util::run_output(&mut cmd, "relay appserver add")?;
    Ok(())
}

/// (billed seconds, charge in cents) of a `wine` session of `duration_ms`: the duration
/// rounded up to whole seconds; 10 + 120 a minute for them, rounded up to a whole cent.
pub(crate) fn wine_charge(duration_ms: i64) -> (i64, i64) {
    let secs = (duration_ms + 999) / 1000;
    (secs, 10 + (120 * secs + 59) / 60)
}

/// What an agent is started with.
pub(crate) struct Spec<'a> {
    pub(crate) account: &'a str,
    pub(crate) password: &'a str,
    pub(crate) services: &'a [&'a str],
    /// The vendor's web page; clients get it with `?token=…` added.
    pub(crate) url: &'a str,
    /// `--http ADDR`: the local HTTP API (introspect, close, sessions, health).
    pub(crate) http: Option<String>,
    /// `udp` or `tcp` towards the relay.
    pub(crate) transport: &'a str,
}

impl Spec<'_> {
    /// The arguments after the program name, as typed on a command line (the password goes in
    /// `APP_AGENT_PASSWORD`, see [`Spec::command`]).
    pub(crate) fn args(&self, relay: &Relay) -> Vec<String> {
        let mut args: Vec<String> = ["run", "--relay", &relay.addr(), "--domain", &relay.domain]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--account", self.account].map(String::from));
        for s in self.services {
            args.extend(["--service".to_owned(), s.to_string()]);
        }
        args.extend(["--url".to_owned(), self.url.to_owned()]);
        if let Some(http) = &self.http {
            args.extend(["--http".to_owned(), http.clone()]);
        }
        if self.transport != "udp" {
            args.extend(["--transport".to_owned(), self.transport.to_owned()]);
        }
        args
    }

    /// The command, with the `APP_AGENT_*` environment removed (the flags say everything) but
    /// for the password in `APP_AGENT_PASSWORD`.
    pub(crate) fn command(&self, bin_dir: &Path, relay: &Relay) -> anyhow::Result<Command> {
        let bin = bin_dir.join("app-server-agent");
        if !bin.exists() {
            bail!("{} does not exist (build failed?)", bin.display());
        }
        let mut cmd = Command::new(bin);
        cmd.args(self.args(relay));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("APP_AGENT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("APP_AGENT_PASSWORD", self.password);
        cmd.stdin(Stdio::null());
        Ok(cmd)
    }

    /// The lines the agent prints once it serves every service: `registered SERVICE with`
    /// for each, and `serving SIP on`.
    pub(crate) fn ready_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .services
            .iter()
            .map(|s| format!("registered {s} with "))
            .collect();
        lines.push("serving SIP on ".to_owned());
        lines
    }
}

/// Starts an agent with its standard output in `DIR/ACCOUNT.out` and its log (standard error)
/// in `DIR/ACCOUNT.err`; waits until it has registered every service (at most 20 s).
pub(crate) fn start_logged(
    bin_dir: &Path,
    dir: &Path,
    relay: &Relay,
    spec: &Spec<'_>,
) -> anyhow::Result<ChildGuard> {
    let out = dir.join(format!("{}.out", spec.account));
    let err = dir.join(format!("{}.err", spec.account));
    let mut cmd = spec.command(bin_dir, relay)?;
    cmd.stdout(File::create(&out).with_context(|| format!("cannot create {}", out.display()))?)
        .stderr(File::create(&err).with_context(|| format!("cannot create {}", err.display()))?);
    let mut guard = ChildGuard::spawn(&format!("app-server-agent ({})", spec.account), &mut cmd)?;
    // SIGTERM: the agent un-registers and exits.
    guard.stop_signal = "TERM";
    if let Err(e) = util::wait_file_lines(
        &out,
        &spec.ready_lines(),
        "failed",
        Duration::from_secs(20),
        &mut guard,
    ) {
        bail!(
            "{e:#}\n--- {} (stderr) ---\n{}",
            guard.name,
            util::tail(&err, 15)
        );
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    #[test]
    fn wine_is_rated_like_the_relay_does() {
        // 2.5 s: 3 s billed, 6 cents of time + 10 set-up (as `cargo xtask demo` shows).
        assert_eq!(super::wine_charge(2500), (3, 16));
        assert_eq!(super::wine_charge(1000), (1, 12));
        assert_eq!(super::wine_charge(1001), (2, 14));
        assert_eq!(super::wine_charge(0), (0, 10));
    }
}
