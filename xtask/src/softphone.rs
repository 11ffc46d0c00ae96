//! Debian's baresip (package `baresip-core`), run headless as a real softphone against the
//! relay: no audio device (a sine tone as the source, a file sink), commands sent to its `cons`
//! module as UDP datagrams (`/dial URI`, `/hangup`, `/quit`), its console output in a file.
//!
//! What a user of baresip 1.0 needs is what the relay must accept with its defaults: baresip
//! answers an MD5 challenge only, sends no Expires (the lifetime is a Contact parameter), puts a
//! Route naming the relay on every request and, over TCP, wants requests on the connection it
//! opened (see ../shared/notes/real-clients.md).
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::linphone::Linphone;
use crate::util::{self, ChildGuard};

/// Fails with an installation hint when `baresip` is missing.
pub(crate) fn require() -> anyhow::Result<()> {
    if util::have_program("baresip", "-h") {
        Ok(())
    } else {
        bail!("`baresip` not found: install it (Debian/Ubuntu: apt-get install baresip-core)")
    }
}

/// One baresip process with one account.
pub(crate) struct Baresip {
    pub(crate) name: String,
    console: Console,
    cons: u16,
}

/// A softphone process whose console output goes to a file, read as it grows.
pub(crate) struct Console {
    pub(crate) guard: ChildGuard,
    pub(crate) log: PathBuf,
}

impl Console {
    /// Waits until one line of its output satisfies `wanted` (described as `what`).
    pub(crate) fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().lines().any(&wanted) {
                return Ok(());
            }
            self.guard.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} printed no line with {what} within {timeout:?}; last lines:\n{}",
                    self.guard.name,
                    self.last_lines(15)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until one line of its output holds every one of `needles`.
    pub(crate) fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        self.wait_line(&format!("{needles:?}"), timeout, |l| {
            needles.iter().all(|n| l.contains(n))
        })
    }

    /// What it printed so far (a console may hold colour codes: read leniently).
    pub(crate) fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub(crate) fn last_lines(&self, n: usize) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits up to 3 s for the process to exit by itself, then stops it.
    pub(crate) fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.guard.try_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.guard.stop();
    }
}

/// What a softphone is started with.
pub(crate) struct Phone<'a> {
    /// Directory name and log name.
    pub(crate) name: &'a str,
    pub(crate) user: &'a str,
    pub(crate) password: &'a str,
    pub(crate) domain: &'a str,
    pub(crate) relay_addr: &'a str,
    /// `udp` or `tcp` towards the relay.
    pub(crate) transport: &'a str,
    /// Answer incoming calls at once.
    pub(crate) auto_answer: bool,
    /// Print every SIP message it sends and receives (`-s`).
    pub(crate) sip_trace: bool,
    /// Send everything through the relay (`outbound=`); without it the account's domain must
    /// be the relay's address, and a redirect is followed straight to the address it names.
    pub(crate) outbound: bool,
}

/// A port of 127.0.0.1 free for UDP and TCP whose next port is free for TCP as well (baresip
/// listens for SIP over UDP and TCP on its port, and for TLS on the next).
fn free_sip_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = util::free_port()?;
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no pair of free ports on 127.0.0.1 for baresip")
}

fn free_udp_port() -> anyhow::Result<u16> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a UDP socket")?;
    Ok(sock.local_addr()?.port())
}

impl Baresip {
    /// Writes the configuration into `DIR/NAME/`, starts baresip and waits until its account
    /// is registered with the relay.
    pub(crate) fn start(dir: &Path, phone: &Phone<'_>) -> anyhow::Result<Baresip> {
        let home = dir.join(phone.name);
        std::fs::create_dir_all(&home)?;
        let sip = free_sip_port()?;
        let cons = free_udp_port()?;
        // ausine plays a 440 Hz tone at 48 kHz stereo; the file sink swallows what is heard.
        let config = format!(
            "poll_method\t\tepoll\n\
             sip_listen\t\t127.0.0.1:{sip}\n\
             net_interface\t\t127.0.0.1\n\
             module_path\t\t/usr/lib/baresip/modules\n\
             module\t\t\tg711.so\n\
             module\t\t\tausine.so\n\
             module\t\t\taufile.so\n\
             module_app\t\taccount.so\n\
             module_app\t\tmenu.so\n\
             module\t\t\tcons.so\n\
             cons_listen\t\t127.0.0.1:{cons}\n\
             audio_source\t\tausine,440\n\
             audio_player\t\taufile,/dev/null\n\
             audio_alert\t\taufile,/dev/null\n\
             ausrc_srate\t\t48000\n\
             auplay_srate\t\t48000\n\
             ausrc_channels\t\t2\n\
             auplay_channels\t\t2\n"
        );
        std::fs::write(home.join("config"), config)?;
        let outbound = match (phone.outbound, phone.transport) {
            (false, _) => String::new(),
            (true, "tcp") => format!(";outbound=\"sip:{};transport=tcp\"", phone.relay_addr),
            (true, _) => format!(";outbound=\"sip:{}\"", phone.relay_addr),
        };
        let answermode = if phone.auto_answer { "auto" } else { "manual" };
        std::fs::write(
            home.join("accounts"),
            format!(
                "<sip:{}@{}>;auth_pass={}{outbound};regint=600;answermode={answermode}\n",
                phone.user, phone.domain, phone.password
            ),
        )?;
        let log = dir.join(format!("{}.log", phone.name));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("baresip");
        cmd.arg("-f").arg(&home);
        if phone.sip_trace {
            cmd.arg("-s");
        }
        cmd.env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut guard = ChildGuard::spawn(&format!("baresip ({})", phone.name), &mut cmd)?;
        guard.stop_signal = "TERM";
        let mut phone_proc = Baresip {
            name: phone.name.to_owned(),
            console: Console { guard, log },
            cons,
        };
        // baresip names the account by its host, without a port.
        let host = phone.domain.split(':').next().unwrap_or(phone.domain);
        let registered = format!("{}@{host}: {{0/", phone.user);
        phone_proc
            .wait_for(&[&registered, "200 OK"], Duration::from_secs(15))
            .with_context(|| format!("{} did not register", phone_proc.name))?;
        Ok(phone_proc)
    }

    /// Sends a console command (`/dial sip:bob@example.com`, `/hangup`, …).
    pub(crate) fn command(&self, line: &str) -> anyhow::Result<()> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        sock.send_to(
            format!("{line}\n").as_bytes(),
            (Ipv4Addr::LOCALHOST, self.cons),
        )?;
        Ok(())
    }

    /// Waits until one line of its output holds every one of `needles`.
    pub(crate) fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        self.console.wait_for(needles, timeout)
    }

    /// Calls `uri`, waits until the call is established, holds it `hold`, hangs up and waits
    /// until the call has ended.
    pub(crate) fn call_and_hang_up(&mut self, uri: &str, hold: Duration) -> anyhow::Result<()> {
        self.command(&format!("/dial {uri}"))?;
        self.wait_for(
            &[&format!("Call established: {uri}")],
            Duration::from_secs(10),
        )?;
        std::thread::sleep(hold);
        self.command("/hangup")?;
        self.wait_for(&["terminated (duration"], Duration::from_secs(10))
    }

    /// What it printed so far.
    pub(crate) fn output(&self) -> String {
        self.console.output()
    }

    /// `/quit` (it un-registers), then stops the process if it is still there.
    pub(crate) fn quit(mut self) {
        let _ = self.command("/quit");
        self.console.finish();
    }
}

/// The real softphones the interop step drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Program {
    Baresip,
    Linphone,
}

impl Program {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Program::Baresip => "baresip",
            Program::Linphone => "linphone",
        }
    }

    /// Starts this program with `phone`'s account and waits until it is registered.
    pub(crate) fn start(self, dir: &Path, phone: &Phone<'_>) -> anyhow::Result<AnyPhone> {
        Ok(match self {
            Program::Baresip => AnyPhone::Baresip(Baresip::start(dir, phone)?),
            Program::Linphone => AnyPhone::Linphone(Linphone::start(dir, phone)?),
        })
    }
}

/// A running baresip or linphonec, driven by the same few actions.
pub(crate) enum AnyPhone {
    Baresip(Baresip),
    Linphone(Linphone),
}

impl AnyPhone {
    /// Places a call to `uri`.
    pub(crate) fn dial(&mut self, uri: &str) -> anyhow::Result<()> {
        match self {
            AnyPhone::Baresip(p) => p.command(&format!("/dial {uri}")),
            AnyPhone::Linphone(p) => p.command(&format!("call {uri}")),
        }
    }

    /// Waits until a call to (or from) a URI beginning with `uri` is established.
    pub(crate) fn wait_established(&mut self, uri: &str, timeout: Duration) -> anyhow::Result<()> {
        match self {
            AnyPhone::Baresip(p) => p.wait_for(&[&format!("Call established: {uri}")], timeout),
            AnyPhone::Linphone(p) => p.wait_connected(uri, timeout),
        }
    }

    /// How many calls it has seen end so far.
    fn ended_calls(&self) -> usize {
        match self {
            AnyPhone::Baresip(p) => p.output().matches("terminated (duration").count(),
            AnyPhone::Linphone(p) => p
                .output()
                .lines()
                .filter(|l| crate::linphone::is_call_line(l) && l.contains(" ended ("))
                .count(),
        }
    }

    /// Hangs up every call and waits until one more call has ended than before.
    pub(crate) fn hang_up(&mut self) -> anyhow::Result<()> {
        let before = self.ended_calls();
        match self {
            AnyPhone::Baresip(p) => p.command("/hangup")?,
            AnyPhone::Linphone(p) => p.command("terminate all")?,
        }
        self.wait_calls_ended(before + 1, Duration::from_secs(10))
    }

    /// Waits until `count` calls have ended (the other side hung up, or the relay did).
    pub(crate) fn wait_calls_ended(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.ended_calls() < count {
            if Instant::now() > deadline {
                bail!(
                    "{} saw {} calls end within {timeout:?}, expected {count}",
                    self.name(),
                    self.ended_calls()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            AnyPhone::Baresip(p) => &p.name,
            AnyPhone::Linphone(p) => &p.name,
        }
    }

    /// What it printed so far (with baresip's `-s`, its SIP trace).
    pub(crate) fn output(&self) -> String {
        match self {
            AnyPhone::Baresip(p) => p.output(),
            AnyPhone::Linphone(p) => p.output(),
        }
    }

    /// Quits (un-registering), then stops the process if it is still there.
    pub(crate) fn quit(self) {
        match self {
            AnyPhone::Baresip(p) => p.quit(),
            AnyPhone::Linphone(p) => p.quit(),
        }
    }
}
