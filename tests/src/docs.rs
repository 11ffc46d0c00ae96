//! The generated reference documents: `docs/configuration.md` (every setting of the three
//! programs: settings-file key, flag, variable, default, meaning) and the man pages in
//! `docs/man/` (one per program and subcommand, from the clap definitions, `clap_mangen`).
//!
//! The relay's settings are the fields of `relay::config::Config`: their names and doc comments
//! are read from its source (`relay/src/config.rs`, embedded at build time), their flags and
//! variables from the clap definition of `relay`. The agents' settings are their flags (each
//! settable in their settings file, see `proto::cli`). `cargo xtask docs` writes the files; the
//! test `docs_are_current` fails when they differ from what the code gives.

use std::fmt::Write as _;
use std::path::Path;

use clap::CommandFactory;

/// The relay's configuration source, read for its fields' doc comments.
const RELAY_CONFIG_RS: &str = include_str!("../../relay/src/config.rs");

/// One row of the reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Settings-file key.
    pub key: String,
    /// `--flag`, if there is one.
    pub flag: Option<String>,
    /// Environment variable, if there is one.
    pub env: Option<String>,
    pub default: String,
    pub meaning: String,
}

/// A field of `Config` and its doc comment (joined lines).
fn config_fields() -> anyhow::Result<Vec<(String, String)>> {
    let start = RELAY_CONFIG_RS
        .find("pub struct Config {")
        .ok_or_else(|| anyhow::anyhow!("no `pub struct Config` in relay/src/config.rs"))?;
    let body = &RELAY_CONFIG_RS[start..];
    let end = body
        .find("\n}\n")
        .ok_or_else(|| anyhow::anyhow!("no end of `pub struct Config`"))?;
    let mut fields = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let mut skip = false;
    for line in body[..end].lines().skip(1) {
        let line = line.trim();
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
        } else if line.starts_with("#[serde(skip") {
            skip = true;
        } else if let Some(rest) = line.strip_prefix("pub ") {
            let name = rest
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            if !skip {
                if doc.is_empty() {
                    anyhow::bail!("Config::{name} has no doc comment");
                }
                fields.push((name, doc.join(" ")));
            }
            doc.clear();
            skip = false;
        }
    }
    Ok(fields)
}

/// Splits a doc comment into its sentences (a period, a space, then a capital letter).
fn sentences(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        current.push(chars[i]);
        if chars[i] == '.'
            && chars.get(i + 1) == Some(&' ')
            && chars.get(i + 2).is_some_and(|c| c.is_uppercase())
        {
            out.push(current.trim().to_string());
            current.clear();
        }
        i += 1;
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// The default a doc comment states (`Default 300 s.`, `Default: the advertised address.`,
/// `Default false: …`), and the meaning: the other sentences.
fn split_default(name: &str, doc: &str) -> anyhow::Result<(String, String)> {
    let mut default = None;
    let mut meaning = Vec::new();
    for s in sentences(doc) {
        if default.is_none() {
            if let Some(rest) = s.strip_prefix("Default") {
                let rest = rest.trim_start_matches(':').trim();
                default = Some(rest.strip_suffix('.').unwrap_or(rest).to_string());
                continue;
            }
        }
        meaning.push(s);
    }
    let default = default
        .ok_or_else(|| anyhow::anyhow!("Config::{name}: its doc comment states no default"))?;
    Ok((default, meaning.join(" ")))
}

fn flag_of(arg: &clap::Arg) -> Option<String> {
    arg.get_long().map(|l| format!("--{l}"))
}

fn env_of(arg: &clap::Arg) -> Option<String> {
    arg.get_env().map(|e| e.to_string_lossy().into_owned())
}

/// The relay's settings, and its global flags that are no setting (`--config`, …).
pub fn relay_settings() -> anyhow::Result<(Vec<Setting>, Vec<Setting>)> {
    let mut cmd = relay::cmd::Cli::command();
    cmd.build();
    let mut rows = Vec::new();
    let mut used = Vec::new();
    for (key, doc) in config_fields()? {
        let (default, meaning) = split_default(&key, &doc)?;
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()));
        if let Some(a) = arg {
            used.push(a.get_id().to_string());
        }
        rows.push(Setting {
            key,
            flag: arg.and_then(flag_of),
            env: arg.and_then(env_of),
            default,
            meaning,
        });
    }
    let only_flags = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !a.is_hide_set())
        .filter(|a| !matches!(a.get_long(), Some("help" | "version")))
        .filter(|a| !used.contains(&a.get_id().to_string()))
        .map(|a| Setting {
            key: String::new(),
            flag: flag_of(a),
            env: env_of(a),
            default: default_of(a),
            meaning: help_of(a),
        })
        .collect();
    Ok((rows, only_flags))
}

fn default_of(arg: &clap::Arg) -> String {
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    if values.is_empty() {
        "none".to_string()
    } else {
        format!("`{}`", values.join(", "))
    }
}

fn help_of(arg: &clap::Arg) -> String {
    arg.get_long_help()
        .or_else(|| arg.get_help())
        .map(|h| {
            h.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The settings of an agent: the flags of `cmd` (hidden ones left out).
fn flag_settings(cmd: &clap::Command) -> Vec<Setting> {
    proto::cli::settable(cmd)
        .filter(|a| !a.is_hide_set())
        .map(|a| Setting {
            key: a.get_long().map(proto::cli::key_of).unwrap_or_default(),
            flag: flag_of(a),
            env: env_of(a),
            default: default_of(a),
            meaning: help_of(a),
        })
        .collect()
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn code(v: &Option<String>) -> String {
    v.as_ref().map_or("—".to_string(), |v| format!("`{v}`"))
}

fn table(out: &mut String, rows: &[Setting], with_key: bool) {
    if with_key {
        out.push_str("| Key | Flag | Variable | Default | Meaning |\n|---|---|---|---|---|\n");
    } else {
        out.push_str("| Flag | Variable | Default | Meaning |\n|---|---|---|---|\n");
    }
    for r in rows {
        if with_key {
            let _ = write!(out, "| `{}` ", r.key);
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            code(&r.flag),
            code(&r.env),
            cell(&r.default),
            cell(&r.meaning)
        );
    }
}

/// `docs/configuration.md`.
pub fn configuration_md() -> anyhow::Result<String> {
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         Generated from the code by `cargo xtask docs` (the relay's `Config` and the three \
         programs' command-line definitions); CI fails when this file is stale. Do not edit \
         it by hand.\n\n\
         Each program takes a setting from, first to last: its command-line flag, its \
         environment variable, its TOML settings file (`--config FILE`), its default. A list \
         setting (a flag that may be repeated) is a TOML array; its variable, where it has \
         one, separates the items with commas. Durations and sizes are in the unit the name \
         says (`_secs`, `_ms`, bytes).\n\n",
    );
    let (relay, relay_flags) = relay_settings()?;
    out.push_str(
        "## relay\n\n`relay --config /etc/sip-relay/relay.toml serve` (also `RELAY_CONFIG`); a \
         sample file is `contrib/relay.toml`. `routes` is a TOML array of tables (`[[routes]]` \
         with `domain` and `next_hop`). The admin subcommands read the same settings (the \
         database, the domain); their own flags are in `relay SUBCOMMAND --help` and the man \
         pages (`docs/man/`).\n\n",
    );
    table(&mut out, &relay, true);
    out.push_str("\nFlags that are not settings of the file:\n\n");
    table(&mut out, &relay_flags, false);

    let mut agent = app_server_agent::Cli::command();
    agent.build();
    let run = agent
        .find_subcommand("run")
        .ok_or_else(|| anyhow::anyhow!("app-server-agent has no `run`"))?;
    out.push_str(
        "\n## app-server-agent\n\n`app-server-agent run --config FILE` (also \
         `APP_AGENT_CONFIG`); a sample file is `contrib/app-server-agent.toml`. Each key is a \
         flag of `run` with `_` for `-`. The log filter is the variable `APP_AGENT_LOG` \
         (default `warn`).\n\n",
    );
    table(&mut out, &flag_settings(run), true);

    let mut client = client_agent::cli::Cli::command();
    client.build();
    out.push_str(
        "\n## client-agent\n\n`client-agent --config FILE COMMAND …` (also `CLIENT_CONFIG`); \
         a sample file is `contrib/client-agent.toml`. Each key is an option before the \
         command, with `_` for `-`; the options of each command (`open --for`, …) are in \
         `client-agent COMMAND --help` and the man pages. The log filter is the variable \
         `CLIENT_LOG` (default `warn`).\n\n",
    );
    table(&mut out, &flag_settings(&client), true);
    Ok(out)
}

/// The man pages: `(file name, roff text)` for each program and each of its subcommands.
pub fn man_pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    for cmd in [
        relay::cmd::Cli::command(),
        app_server_agent::Cli::command(),
        client_agent::cli::Cli::command(),
    ] {
        let mut cmd = cmd;
        // Global flags reach the subcommands' pages only in a built command.
        cmd.build();
        let name = cmd.get_name().to_string();
        pages_named(&cmd, &name, &name, &mut pages)?;
    }
    Ok(pages)
}

/// The page of `cmd` (file `FILE.1`, synopsis `BIN …`), then those of its subcommands.
fn pages_named(
    cmd: &clap::Command,
    file: &str,
    bin: &str,
    pages: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let cmd = cmd.clone().name(file.to_string()).bin_name(bin.to_string());
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
    pages.push((format!("{file}.1"), roff));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let file = format!("{file}-{}", sub.get_name());
        let bin = format!("{bin} {}", sub.get_name());
        pages_named(sub, &file, &bin, pages)?;
    }
    Ok(())
}

/// Writes both into `root/docs/`.
pub fn write(root: &Path) -> anyhow::Result<()> {
    let docs = root.join("docs");
    std::fs::create_dir_all(docs.join("man"))?;
    std::fs::write(docs.join("configuration.md"), configuration_md()?)?;
    for (name, roff) in man_pages()? {
        std::fs::write(docs.join("man").join(name), roff)?;
    }
    Ok(())
}
