//! Debian's linphonec (package `linphone-cli`, liblinphone 5.1), run headless as the second
//! real softphone: WAV files instead of a sound card, commands written to its standard input
//! (`register`, `call URI`, `terminate all`, `quit`), its console output in a file.
//!
//! What linphone does differently from baresip (../shared/notes/real-clients.md): it follows a
//! 302 with a new Call-ID and is challenged again, puts the first call on hold (re-INVITE with
//! `a=sendonly`) before it follows a REFER and sends its NOTIFYs only once that hold is
//! answered, allows UPDATE, and answers 603 to a REFER outside a call.
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::softphone::{Console, Phone};
use crate::util::{self, ChildGuard};

/// Fails with an installation hint when `linphonec` is missing.
pub(crate) fn require() -> anyhow::Result<()> {
    if util::have_program("linphonec", "--version") {
        Ok(())
    } else {
        bail!("`linphonec` not found: install it (Debian/Ubuntu: apt-get install linphone-cli)")
    }
}

/// One linphonec process with one account (UDP only here).
pub(crate) struct Linphone {
    pub(crate) name: String,
    console: Console,
    stdin: ChildStdin,
}

/// An even UDP port of 127.0.0.1 that is free, and its odd neighbour (RTP and RTCP).
fn free_rtp_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a UDP socket")?;
        let port = sock.local_addr()?.port() & !1;
        drop(sock);
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if port > 1024
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, next)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no pair of free UDP ports on 127.0.0.1 for linphone's audio")
}

impl Linphone {
    /// Writes its configuration into `DIR/NAME/` (its HOME), starts linphonec and waits until
    /// its account is registered with the relay. The account's proxy and route are always the
    /// relay (`phone.relay_addr`, `phone.outbound` is not looked at); its identity is
    /// `sip:USER@DOMAIN`.
    pub(crate) fn start(dir: &Path, phone: &Phone<'_>) -> anyhow::Result<Linphone> {
        if phone.transport != "udp" {
            bail!("the linphone driver runs over UDP only");
        }
        let home = dir.join(phone.name);
        // linphonec keeps its databases there and opens no SIP socket without it.
        std::fs::create_dir_all(home.join(".local/share/linphone"))?;
        let sip = util::free_port()?;
        let rtp = free_rtp_port()?;
        // No video; audio on ports of its own (two phones on one machine); network state
        // monitoring stays on (without it, liblinphone 5.1 takes the network as down and never
        // registers). The account as a user sets it up: identity sip:USER@DOMAIN, the relay
        // as its proxy and as the route of every request (the domain need not resolve).
        let relay = phone.relay_addr;
        std::fs::write(
            home.join(".linphonerc"),
            format!(
                "[sip]\nsip_port={sip}\ndefault_proxy=0\n\n[rtp]\naudio_rtp_port={rtp}\n\n\
                 [video]\nenabled=0\ncapture=0\ndisplay=0\n\n\
                 [proxy_0]\nreg_proxy=<sip:{relay}>\nreg_route=<sip:{relay};lr>\n\
                 reg_identity=sip:{user}@{domain}\nreg_expires=3600\nreg_sendregister=1\n\
                 publish=0\n\n\
                 [auth_info_0]\nusername={user}\npasswd={password}\nrealm={domain}\n\
                 domain={domain}\n",
                user = phone.user,
                domain = phone.domain,
                password = phone.password,
            ),
        )?;
        let log = dir.join(format!("{}.log", phone.name));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("linphonec");
        cmd.current_dir(&home)
            .env("HOME", &home)
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut guard = ChildGuard::spawn(&format!("linphonec ({})", phone.name), &mut cmd)?;
        guard.stop_signal = "TERM";
        let stdin = guard
            .child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("linphonec has no standard input"))?;
        let mut linphone = Linphone {
            name: phone.name.to_owned(),
            console: Console { guard, log },
            stdin,
        };
        linphone.command("soundcard use files")?;
        // The rc file's sip_port is not taken by linphonec 5.1; this is.
        linphone.command(&format!("ports sip {sip}"))?;
        if phone.auto_answer {
            linphone.command("autoanswer enable")?;
        }
        linphone.wait_for(&["Setting sip port to"], Duration::from_secs(10))?;
        // linphonec prints nothing when the registration succeeds: ask until it says so.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let before = linphone.output().matches("registered: yes").count();
            linphone.command("proxy list")?;
            std::thread::sleep(Duration::from_millis(300));
            if linphone.output().matches("registered: yes").count() > before {
                return Ok(linphone);
            }
            linphone.console.guard.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not register within 15 s; last lines:\n{}",
                    linphone.name,
                    linphone.console.last_lines(15)
                );
            }
        }
    }

    /// Writes one command line to its console.
    pub(crate) fn command(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("cannot send `{line}` to {}", self.name))
    }

    /// Waits until one line of its output holds every one of `needles`.
    pub(crate) fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        self.console.wait_for(needles, timeout)
    }

    /// Waits until a call whose remote URI begins with `uri` is connected (`Call N with
    /// <sip:…> connected.`; linphone writes the URI with or without angle brackets).
    pub(crate) fn wait_connected(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<()> {
        let (bare, bracketed) = (format!(" with {uri}"), format!(" with <{uri}"));
        self.console
            .wait_line(&format!("a call to {uri} connected"), timeout, |l| {
                is_call_line(l)
                    && l.contains(" connected")
                    && (l.contains(&bare) || l.contains(&bracketed))
            })
    }

    /// What it printed so far.
    pub(crate) fn output(&self) -> String {
        self.console.output()
    }

    /// `quit` (it un-registers), then stops the process if it is still there.
    pub(crate) fn quit(mut self) {
        let _ = self.command("terminate all");
        let _ = self.command("quit");
        self.console.finish();
    }
}

/// A console line about a call (`Call 3 with … connected.`), after any prompt.
pub(crate) fn is_call_line(line: &str) -> bool {
    line.trim_start_matches("linphonec> ").starts_with("Call ")
}
