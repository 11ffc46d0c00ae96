//! `cargo xtask topology`: the services of `docker-compose.yml`, run as local processes on
//! loopback, so that a broken command, variable or dependency in the file fails CI on a machine
//! without Docker.
//!
//! The file is read as Compose reads it (merge keys included): each service's `command`,
//! `environment`, `volumes`, `healthcheck` and `depends_on` conditions (`service_started`,
//! `service_healthy`, `service_completed_successfully`). What differs, and only that:
//! - every fixed address `IP:PORT` of the file's network becomes `127.0.0.1:FREE-PORT` wherever
//!   it is written (commands, variables, health checks), and a bare service IP `127.0.0.1`;
//! - the PostgreSQL image is a throwaway cluster ([`crate::pg::PgCluster`]), and the file's
//!   database URL its URL;
//! - a named volume is a directory of a temporary directory, the image's scripts
//!   (`/usr/local/share/sip-relay/compose/`) are `contrib/compose/`, and the programs are the
//!   ones just built (first on `PATH`).
//!
//! Services start in dependency order, each when its conditions hold (health checks run as the
//! file says, every 0.5 s for at most 90 s). The run ends when `client` exits; it must exit 0,
//! and the records must show each session ended and billed with its item.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_yaml::Value;

/// The image scripts' directory, and where they are in the repository.
const IMAGE_SCRIPTS: &str = "/usr/local/share/sip-relay/compose/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Started,
    Healthy,
    CompletedSuccessfully,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub image: Option<String>,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// (volume, path in the container)
    pub volumes: Vec<(String, String)>,
    /// `["CMD", …]` or `["CMD-SHELL", "…"]`.
    pub healthcheck: Option<Vec<String>>,
    pub depends_on: Vec<(String, Condition)>,
    pub ip: Option<String>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(text).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Reads the services of a compose file.
pub fn load(path: &Path) -> anyhow::Result<Vec<Service>> {
    let data =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut doc: Value =
        serde_yaml::from_str(&data).with_context(|| format!("{} is not YAML", path.display()))?;
    doc.apply_merge()
        .with_context(|| format!("{}: bad merge key", path.display()))?;
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or_else(|| anyhow::anyhow!("{}: no services", path.display()))?;
    let mut out = Vec::new();
    for (name, s) in services {
        let name = text(name).ok_or_else(|| anyhow::anyhow!("a service without a name"))?;
        let environment = match s.get("environment") {
            Some(Value::Mapping(m)) => m
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v).unwrap_or_default())))
                .collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .filter_map(text)
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect(),
            _ => Vec::new(),
        };
        let volumes = list(s.get("volumes"))
            .iter()
            .filter_map(|v| {
                let mut parts = v.split(':');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect();
        let healthcheck = s
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .map(|t| list(Some(t)));
        let depends_on = match s.get("depends_on") {
            Some(Value::Mapping(m)) => m
                .iter()
                .filter_map(|(k, v)| {
                    let cond = match v.get("condition").and_then(Value::as_str) {
                        Some("service_healthy") => Condition::Healthy,
                        Some("service_completed_successfully") => Condition::CompletedSuccessfully,
                        _ => Condition::Started,
                    };
                    Some((text(k)?, cond))
                })
                .collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .filter_map(text)
                .map(|k| (k, Condition::Started))
                .collect(),
            _ => Vec::new(),
        };
        let ip = s.get("networks").and_then(Value::as_mapping).and_then(|m| {
            m.values()
                .find_map(|n| n.get("ipv4_address").and_then(text))
        });
        out.push(Service {
            name,
            image: s.get("image").and_then(text),
            command: list(s.get("command")),
            environment,
            volumes,
            healthcheck,
            depends_on,
            ip,
        });
    }
    Ok(out)
}

/// Every `A.B.C.D:PORT` in `s`, with its byte range.
fn addresses(s: &str) -> Vec<(usize, usize, String, u16)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !(b[i - 1].is_ascii_digit() || b[i - 1] == b'.')) {
            let start = i;
            let mut dots = 0;
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                dots += usize::from(b[j] == b'.');
                j += 1;
            }
            let ip = &s[start..j];
            if dots == 3 && ip.parse::<std::net::Ipv4Addr>().is_ok() && b.get(j) == Some(&b':') {
                let mut k = j + 1;
                while k < b.len() && b[k].is_ascii_digit() {
                    k += 1;
                }
                if let Ok(port) = s[j + 1..k].parse::<u16>() {
                    out.push((start, k, ip.to_string(), port));
                    i = k;
                    continue;
                }
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// How the file's addresses, database, volumes and scripts become local ones.
pub struct Local {
    /// (service IP, port) → local port.
    ports: BTreeMap<(String, u16), u16>,
    ips: Vec<String>,
    database: Option<(String, String)>,
    paths: Vec<(String, String)>,
}

impl Local {
    pub fn rewrite(&self, s: &str) -> String {
        let mut out = String::new();
        let mut last = 0;
        for (start, end, ip, port) in addresses(s) {
            if let Some(local) = self.ports.get(&(ip, port)) {
                out.push_str(&s[last..start]);
                out.push_str(&format!("127.0.0.1:{local}"));
                last = end;
            }
        }
        out.push_str(&s[last..]);
        if let Some((from, to)) = &self.database {
            out = out.replace(from.as_str(), to);
        }
        for ip in &self.ips {
            if out == *ip {
                out = "127.0.0.1".to_string();
            }
        }
        for (from, to) in &self.paths {
            out = out.replace(from.as_str(), to);
        }
        out
    }
}

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        crate::procs::terminate(&mut self.child);
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the topology of `compose` with the programs of `bin_dir`; `root` is the repository.
pub fn run(compose: &Path, root: &Path, bin_dir: &Path) -> anyhow::Result<()> {
    let services = load(compose)?;
    let work = tempfile::Builder::new()
        .prefix("sip-relay-topology")
        .tempdir()?;
    println!(
        "== topology: {} services from {} (logs in {})",
        services.len(),
        compose.display(),
        work.path().display()
    );
    let result = run_in(&services, root, bin_dir, work.path());
    if result.is_err() {
        let kept = work.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    result
}

fn run_in(services: &[Service], root: &Path, bin_dir: &Path, work: &Path) -> anyhow::Result<()> {
    // The addresses: every IP:PORT of a service's IP written anywhere.
    let ips: Vec<String> = services.iter().filter_map(|s| s.ip.clone()).collect();
    let mut ports = BTreeMap::new();
    for s in services {
        let mut strings: Vec<&String> = s.command.iter().collect();
        strings.extend(s.environment.iter().map(|(_, v)| v));
        strings.extend(s.healthcheck.iter().flatten());
        for text in strings {
            for (_, _, ip, port) in addresses(text) {
                if ips.contains(&ip) && !ports.contains_key(&(ip.clone(), port)) {
                    let local = crate::procs::free_port()?.port();
                    ports.insert((ip, port), local);
                }
            }
        }
    }
    let mut paths = vec![(
        IMAGE_SCRIPTS.to_string(),
        format!("{}/", root.join("contrib/compose").display()),
    )];
    for s in services {
        for (volume, path) in &s.volumes {
            let dir = work.join("volumes").join(volume);
            std::fs::create_dir_all(&dir)?;
            if !paths.iter().any(|(p, _)| p == path) {
                paths.push((path.clone(), dir.display().to_string()));
            }
        }
    }
    let mut local = Local {
        ports,
        ips,
        database: None,
        paths,
    };
    let path_var = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut pg = None;
    let mut running: Vec<Running> = Vec::new();
    let mut healthy: Vec<String> = Vec::new();
    let mut completed: Vec<String> = Vec::new();
    let mut pending: Vec<&Service> = services.iter().collect();
    let started = Instant::now();
    while !pending.is_empty() {
        let ready = pending.iter().position(|s| {
            s.depends_on.iter().all(|(dep, cond)| match cond {
                Condition::Started => {
                    running.iter().any(|r| r.name == *dep) || healthy.contains(dep)
                }
                Condition::Healthy => healthy.contains(dep),
                Condition::CompletedSuccessfully => completed.contains(dep),
            })
        });
        let Some(i) = ready else {
            // Something waits for a health check or an exit: see what changed.
            for r in &mut running {
                if completed.contains(&r.name) {
                    continue;
                }
                if let Some(status) = r.child.try_wait()? {
                    if status.success() {
                        println!("   {} exited 0", r.name);
                        completed.push(r.name.clone());
                    } else {
                        bail!("{} exited with {status}:\n{}", r.name, tail(&r.log, 20));
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(180) {
                let names: Vec<&str> = pending.iter().map(|s| s.name.as_str()).collect();
                bail!("services never ready to start: {names:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let s = pending.remove(i);
        if s.image
            .as_deref()
            .is_some_and(|i| i.starts_with("postgres"))
        {
            // The database, as a throwaway cluster.
            let cluster = crate::pg::PgCluster::start()?;
            let url = cluster.fresh_database()?;
            let user = s
                .environment
                .iter()
                .find(|(k, _)| k == "POSTGRES_USER")
                .map(|(_, v)| v.as_str())
                .unwrap_or("postgres");
            let password = s
                .environment
                .iter()
                .find(|(k, _)| k == "POSTGRES_PASSWORD")
                .map(|(_, v)| v.as_str())
                .unwrap_or("");
            let db = s
                .environment
                .iter()
                .find(|(k, _)| k == "POSTGRES_DB")
                .map(|(_, v)| v.as_str())
                .unwrap_or(user);
            local.database = Some((
                format!("postgres://{user}:{password}@{}:5432/{db}", s.name),
                url,
            ));
            println!("   {}: a throwaway PostgreSQL cluster", s.name);
            pg = Some(cluster);
            healthy.push(s.name.clone());
            continue;
        }
        if s.command.is_empty() {
            bail!("{} has no command", s.name);
        }
        let argv: Vec<String> = s.command.iter().map(|a| local.rewrite(a)).collect();
        let env: Vec<(String, String)> = s
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), local.rewrite(v)))
            .collect();
        let dir = work.join(&s.name);
        std::fs::create_dir_all(&dir)?;
        let log = work.join(format!("{}.log", s.name));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", &path_var)
            .env("NO_COLOR", "1")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("{}: cannot start {:?}", s.name, argv))?;
        println!("   {}: {}", s.name, argv.join(" "));
        running.push(Running {
            name: s.name.clone(),
            child,
            log,
        });
        if let Some(test) = &s.healthcheck {
            wait_healthy(s, test, &local, &env, &path_var, running.last_mut())?;
            println!("   {}: healthy", s.name);
            healthy.push(s.name.clone());
        }
    }
    // The run ends with the client.
    let client = running
        .iter_mut()
        .find(|r| r.name == "client")
        .ok_or_else(|| anyhow::anyhow!("no `client` service"))?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = client.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "the client did not finish within 90 s:\n{}",
                tail(&client.log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = std::fs::read_to_string(&client.log).unwrap_or_default();
    print!(
        "{}",
        said.lines()
            .map(|l| format!("   client| {l}\n"))
            .collect::<String>()
    );
    if !status.success() {
        bail!("the client exited with {status}");
    }
    check_records(&local, services, &path_var)?;
    // Stop in the reverse order of the start, then the database.
    while let Some(r) = running.pop() {
        drop(r);
    }
    drop(pg);
    Ok(())
}

fn wait_healthy(
    s: &Service,
    test: &[String],
    local: &Local,
    env: &[(String, String)],
    path_var: &str,
    mut proc: Option<&mut Running>,
) -> anyhow::Result<()> {
    let argv: Vec<String> = test.iter().map(|a| local.rewrite(a)).collect();
    let mut cmd = match argv.first().map(String::as_str) {
        Some("CMD") if argv.len() > 1 => {
            let mut c = Command::new(&argv[1]);
            c.args(&argv[2..]);
            c
        }
        Some("CMD-SHELL") if argv.len() > 1 => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(argv[1..].join(" ").replace("$$", "$"));
            c
        }
        _ => bail!(
            "{}: a health check this runner does not know: {test:?}",
            s.name
        ),
    };
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .env("PATH", path_var)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if cmd.status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        if let Some(p) = proc.as_deref_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was healthy:\n{}",
                    s.name,
                    tail(&p.log, 20)
                );
            }
        }
        if Instant::now() > deadline {
            bail!("{} was not healthy within 90 s ({argv:?})", s.name);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The records the client's run must leave: each session it opened ended, its item billed.
fn check_records(local: &Local, services: &[Service], path_var: &str) -> anyhow::Result<()> {
    let relay = services
        .iter()
        .find(|s| s.name == "relay")
        .ok_or_else(|| anyhow::anyhow!("no `relay` service"))?;
    let env: Vec<(String, String)> = relay
        .environment
        .iter()
        .filter(|(k, _)| k == "RELAY_DATABASE_URL" || k == "RELAY_DOMAIN")
        .map(|(k, v)| (k.clone(), local.rewrite(v)))
        .collect();
    let admin = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new("relay")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", path_var)
            .output()?;
        if !out.status.success() {
            bail!("relay {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let cdrs = admin(&["cdr", "list", "--user", "alice", "--format", "json"])?;
    let cdrs = cdrs.as_array().cloned().unwrap_or_default();
    let ended: Vec<&serde_json::Value> = cdrs.iter().filter(|c| c["state"] == "ended").collect();
    let services_ended: Vec<&str> = ended.iter().filter_map(|c| c["service"].as_str()).collect();
    let redirected = cdrs.iter().filter(|c| c["reason"] == "redirected").count();
    println!(
        "   records: sessions ended {services_ended:?}, redirected attempts {redirected}, bread carried by relay b"
    );
    for service in ["wine", "bread"] {
        if !services_ended.contains(&service) {
            bail!("no ended {service} session among alice's records: {cdrs:?}");
        }
    }
    if redirected != 1 {
        bail!("expected one redirected attempt (bread, to relay b): {cdrs:?}");
    }
    // The redirected session ran at b (its node id: its SIP address).
    let b = services
        .iter()
        .find(|s| s.name == "relay-b")
        .and_then(|s| s.environment.iter().find(|(k, _)| k == "RELAY_SIP"))
        .map(|(_, v)| local.rewrite(v))
        .ok_or_else(|| anyhow::anyhow!("no relay-b with RELAY_SIP"))?;
    let bread_owner = ended
        .iter()
        .find(|c| c["service"] == "bread")
        .and_then(|c| c["owner"].as_str())
        .unwrap_or_default();
    if bread_owner != b {
        bail!("the bread session ran at {bread_owner:?}, not at relay b ({b})");
    }
    let statement = admin(&[
        "billing",
        "statement",
        "--user",
        "alice",
        "--format",
        "json",
    ])?;
    let items: Vec<(String, i64)> = statement["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i["item_name"].as_str().unwrap_or_default().to_string(),
                i["amount_minor"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    println!("   alice's statement: items {items:?}");
    for (name, price) in [("a glass of riesling", 450), ("a sourdough loaf", 380)] {
        if !items.iter().any(|(n, p)| n == name && *p == price) {
            bail!("alice's statement lacks {name} at {price}: {statement}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_found_where_they_are_written() {
        let found: Vec<(String, u16)> =
            addresses("b=sip:172.30.0.21:5060,http://172.30.0.40:8080/ 1.2.3:4 10.0.0.1")
                .into_iter()
                .map(|(_, _, ip, p)| (ip, p))
                .collect();
        assert_eq!(
            found,
            [
                ("172.30.0.21".to_string(), 5060),
                ("172.30.0.40".to_string(), 8080)
            ]
        );
    }
}
