//! Running SIPp (`sipp`, Debian package `sip-tester`) with the scenarios in `tests/sipp/`.
//!
//! SIPp writes its logs and statistics into its working directory (a temporary directory
//! here), named after the scenario file. Every SIPp is started through `sh -c 'ulimit -n …;
//! exec sipp …'` so it has a raised open-files limit (needed for TCP at high rates) and the
//! PID we hold is SIPp's own.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::util::{self, ChildGuard};

/// The directory of the SIPp scenarios.
pub(crate) fn scenario(name: &str) -> PathBuf {
    util::project_root().join("tests").join("sipp").join(name)
}

/// Fails with an installation hint when `sipp` is missing.
pub(crate) fn require() -> anyhow::Result<()> {
    if util::have_program("sipp", "-v") {
        Ok(())
    } else {
        bail!("`sipp` not found: install SIPp (Debian/Ubuntu: apt-get install sip-tester)")
    }
}

/// A `sipp` command with a raised open-files limit, working in `dir`,
/// standard output (SIPp's screen) going to `dir/<log_name>.out`.
pub(crate) fn command(dir: &Path, log_name: &str) -> anyhow::Result<Command> {
    let out = File::create(dir.join(format!("{log_name}.out")))?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec sipp \"$@\"")
        .arg("sipp")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

/// `-t u1` or `-t t1`.
pub(crate) fn transport_flag(transport: &str) -> &'static str {
    if transport == "tcp" { "t1" } else { "u1" }
}

/// The arguments of a SIPp that registers as `user` at the relay of `domain` (digest auth, the
/// digest uri the REGISTER's Request-URI).
fn registrant<'a>(user: &'a str, password: &'a str, domain: &'a str) -> [&'a str; 11] {
    [
        "-s",
        user,
        "-au",
        user,
        "-ap",
        password,
        "-auth_uri",
        domain,
        "-key",
        "domain",
        domain,
    ]
}

/// Registers `contact` as `user` at the relay with register.xml (one REGISTER with digest auth).
#[allow(clippy::too_many_arguments)]
pub(crate) fn register(
    dir: &Path,
    relay_addr: &str,
    domain: &str,
    transport: &str,
    user: &str,
    password: &str,
    contact: &str,
    expires: u32,
) -> anyhow::Result<()> {
    let log_name = format!("register-{transport}-{expires}-{}", util::free_port()?);
    let mut cmd = command(dir, &log_name)?;
    cmd.arg(relay_addr)
        .arg("-sf")
        .arg(scenario("register.xml"))
        .args(["-i", "127.0.0.1", "-p", &util::free_port()?.to_string()])
        .args(["-t", transport_flag(transport)])
        .args(registrant(user, password, domain))
        .args(["-key", "contact", contact])
        .args(["-key", "expires", &expires.to_string()])
        .args([
            "-m",
            "1",
            "-recv_timeout",
            "5000",
            "-timeout",
            "15",
            "-timeout_error",
        ])
        .args(["-nostdin", "-trace_err", "-trace_msg"]);
    let mut child = ChildGuard::spawn("sipp register", &mut cmd)?;
    let status = child.wait_timeout(Duration::from_secs(20))?;
    if !status.success() {
        bail!(
            "SIPp REGISTER of {contact} (expires {expires}) failed ({}); see {}/register_*_messages.log\n{}",
            util::describe_status(status),
            dir.display(),
            util::tail(&dir.join(format!("{log_name}.out")), 15)
        );
    }
    Ok(())
}

/// A SIPp callee that registers itself as `user` (register_and_answer.xml, digest auth) and
/// answers every call the relay sends it on that same socket (uas.xml as its out-of-call
/// scenario); over TCP on the connection it registered on, the only way the relay reaches a TCP
/// device. Returns once the registration succeeded, with the port of its Contact.
pub(crate) fn start_registered_uas(
    dir: &Path,
    relay_addr: &str,
    domain: &str,
    transport: &str,
    user: &str,
    password: &str,
    trace_msg: bool,
) -> anyhow::Result<(ChildGuard, u16)> {
    let port = util::free_port()?;
    let log_name = format!("uas-{transport}");
    let mut cmd = command(dir, &log_name)?;
    cmd.arg(relay_addr)
        .arg("-sf")
        .arg(scenario("register_and_answer.xml"))
        .arg("-oocsf")
        .arg(scenario("uas.xml"))
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", transport_flag(transport)])
        .args(registrant(user, password, domain))
        .args(["-key", "expires", "3600"])
        // Registered and answering for up to a day; stopped by its PID.
        .args(["-m", "1", "-d", "86400000", "-recv_timeout", "10000"])
        .args(["-nostdin", "-trace_logs", "-trace_err"]);
    if trace_msg {
        cmd.arg("-trace_msg");
    }
    let mut guard = ChildGuard::spawn(&format!("sipp UAS ({transport})"), &mut cmd)?;
    guard.stop_signal = "TERM";
    let pid = guard.child.id();
    let logs = dir.join(format!("register_and_answer_{pid}_logs.log"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::fs::read_to_string(&logs).is_ok_and(|t| t.contains("registered")) {
            return Ok((guard, port));
        }
        if let Err(e) = guard.check_running() {
            bail!(
                "{e:#}: the SIPp callee did not register; see {}/register_and_answer_*\n{}",
                dir.display(),
                util::tail(&dir.join(format!("{log_name}.out")), 15)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the SIPp callee did not register within 15 s; see {}/register_and_answer_*",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a SIPp UAC run reported.
#[derive(Debug, Clone, Default)]
pub(crate) struct UacResult {
    pub(crate) exit_ok: bool,
    pub(crate) exit: String,
    pub(crate) created: u64,
    pub(crate) successful: u64,
    pub(crate) failed: u64,
    pub(crate) retransmissions: u64,
    pub(crate) elapsed: Duration,
    pub(crate) stats_found: bool,
}

impl UacResult {
    /// The one-line summary interop prints after a run.
    pub(crate) fn summary(&self) -> String {
        format!(
            "SIPp: {} created, {} successful, {} failed, {} retransmissions in {:.1} s ({})",
            self.created,
            self.successful,
            self.failed,
            self.retransmissions,
            self.elapsed.as_secs_f64(),
            self.exit
        )
    }
}

/// Parameters of a UAC run.
pub(crate) struct Uac<'a> {
    /// The scenario in tests/sipp/: `uac_auth.xml` (calls) or `uac_service.xml` (service
    /// sessions; `callee` is then the service).
    pub(crate) scenario: &'a str,
    pub(crate) relay_addr: &'a str,
    pub(crate) domain: &'a str,
    pub(crate) transport: &'a str,
    pub(crate) caller: &'a str,
    pub(crate) password: &'a str,
    pub(crate) callee: &'a str,
    pub(crate) calls: u64,
    pub(crate) rate: u64,
    pub(crate) pause_ms: u64,
    pub(crate) trace_msg: bool,
    /// Every call's response times into `<scenario>_<pid>_rtt.csv` (`-trace_rtt`).
    pub(crate) trace_rtt: bool,
    /// Callers and their credentials from a SIPp injection file (`-inf`, scenario
    /// `uac_users.xml`) instead of `caller` and `password`.
    pub(crate) users: Option<&'a Path>,
    pub(crate) name: String,
}

/// Runs a UAC scenario (uac_auth.xml, uac_service.xml) to completion and reads its statistics.
pub(crate) fn run_uac(dir: &Path, uac: &Uac<'_>) -> anyhow::Result<UacResult> {
    let stat_file = format!("{}.csv", uac.name);
    let mut cmd = command(dir, &uac.name)?;
    // Enough time for all calls at the rate, their duration, and slack.
    let budget = uac.calls / uac.rate.max(1) + uac.pause_ms / 1000 + 60;
    cmd.arg(uac.relay_addr)
        .arg("-sf")
        .arg(scenario(uac.scenario))
        .args(["-i", "127.0.0.1", "-p", &util::free_port()?.to_string()])
        .args(["-t", transport_flag(uac.transport)])
        .args(["-s", uac.callee])
        .args(["-auth_uri", &format!("{}@{}", uac.callee, uac.domain)])
        .args(["-key", "domain", uac.domain]);
    match uac.users {
        Some(file) => {
            cmd.arg("-inf").arg(file);
        }
        None => {
            cmd.args(["-au", uac.caller, "-ap", uac.password])
                .args(["-key", "caller", uac.caller]);
        }
    }
    cmd.args(["-d", &uac.pause_ms.to_string()])
        .args(["-r", &uac.rate.to_string(), "-m", &uac.calls.to_string()])
        .args(["-recv_timeout", "15000"])
        .args(["-timeout", &budget.to_string(), "-timeout_error"])
        .args(["-nostdin", "-trace_err"])
        .args(["-trace_stat", "-stf", &stat_file, "-fd", "1"]);
    if uac.trace_msg {
        cmd.arg("-trace_msg");
    }
    if uac.trace_rtt {
        cmd.args(["-trace_rtt", "-rtt_freq", "1000"]);
    }
    let start = Instant::now();
    let mut child = ChildGuard::spawn(&format!("sipp UAC ({})", uac.transport), &mut cmd)?;
    let status = child.wait_timeout(Duration::from_secs(budget + 30))?;
    let elapsed = start.elapsed();
    let mut result = UacResult {
        exit_ok: status.success(),
        exit: util::describe_status(status),
        elapsed,
        ..UacResult::default()
    };
    if let Ok(text) = std::fs::read_to_string(dir.join(&stat_file)) {
        if let Some(stats) = last_stats(&text) {
            result.created = stats.0;
            result.successful = stats.1;
            result.failed = stats.2;
            result.retransmissions = stats.3;
            result.stats_found = true;
        }
    }
    Ok(result)
}

/// From a SIPp `-trace_stat` CSV (`;`-separated, header first), the cumulative
/// (created, successful, failed, retransmissions) of the last row.
fn last_stats(text: &str) -> Option<(u64, u64, u64, u64)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let last: Vec<&str> = lines.next_back()?.split(';').collect();
    let col = |name: &str| -> Option<u64> {
        let i = header.iter().position(|h| h.trim() == name)?;
        last.get(i)?.trim().parse().ok()
    };
    Some((
        col("TotalCallCreated")?,
        col("SuccessfulCall(C)")?,
        col("FailedCall(C)")?,
        col("Retransmissions(C)").unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::last_stats;

    #[test]
    fn reads_trace_stat() {
        let csv = "StartTime;LastResetTime;CurrentTime;ElapsedTime(P);ElapsedTime(C);TargetRate;CallRate(P);CallRate(C);IncomingCall(P);IncomingCall(C);OutgoingCall(P);OutgoingCall(C);TotalCallCreated;CurrentCall;SuccessfulCall(P);SuccessfulCall(C);FailedCall(P);FailedCall(C);Retransmissions(P);Retransmissions(C);\n\
                   a;b;c;d;e;50;1;1;0;0;0;0;10;5;5;5;0;0;0;0;\n\
                   a;b;c;d;e;50;1;1;0;0;0;0;200;0;5;198;0;2;0;3;\n";
        assert_eq!(last_stats(csv), Some((200, 198, 2, 3)));
    }
}
