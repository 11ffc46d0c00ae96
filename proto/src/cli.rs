//! Command lines with a settings file. `--config FILE` (or the program's variable) names a TOML
//! file whose keys are the long flags' names with `_` for `-` (`register_expires = 300` for
//! `--register-expires 300`; a list for a flag that may be repeated). A setting is decided by
//! its flag, then its variable, then the file, then the built-in default: the file's values
//! become the flags' defaults before the command line is parsed, so each is checked by the
//! flag's own parser.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};

/// Why a command line could not be taken.
#[derive(Debug)]
pub enum CliError {
    /// What clap says (bad flag or value, `--help`, `--version`).
    Clap(clap::Error),
    /// The settings file: unreadable, not TOML, or naming an unknown setting.
    File(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{e}"),
            CliError::File(e) => f.write_str(e),
        }
    }
}

/// Parses the process's command line as `T`, the flags of `T`'s subcommand `sub` (or of `T`
/// itself) taking their defaults from the settings file. On an error (or `--help`) prints
/// what clap prints, or `error: …` naming the file, and exits.
pub fn parse<T: CommandFactory + FromArgMatches>(config_env: &str, sub: Option<&str>) -> T {
    match try_parse_from::<T>(std::env::args_os(), config_env, sub) {
        Ok(t) => t,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::File(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}

/// [`parse`] for the given arguments (the program's name first), without exiting.
pub fn try_parse_from<T: CommandFactory + FromArgMatches>(
    args: impl IntoIterator<Item = impl Into<OsString>>,
    config_env: &str,
    sub: Option<&str>,
) -> Result<T, CliError> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = T::command();
    if let Some(path) = config_path(&args, config_env) {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            CliError::File(format!(
                "cannot read the settings file {}: {e}",
                path.display()
            ))
        })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            CliError::File(format!(
                "bad settings file {}: {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })?;
        cmd = match sub {
            Some(name) => {
                let mut failed = None;
                let cmd =
                    cmd.mut_subcommand(name, |c| match with_defaults(c.clone(), &table, &path) {
                        Ok(c) => c,
                        Err(e) => {
                            failed = Some(e);
                            c
                        }
                    });
                if let Some(e) = failed {
                    return Err(CliError::File(e));
                }
                cmd
            }
            None => with_defaults(cmd, &table, &path).map_err(CliError::File)?,
        };
    }
    let matches = cmd.try_get_matches_from(args).map_err(CliError::Clap)?;
    T::from_arg_matches(&matches).map_err(CliError::Clap)
}

/// The settings file named on the command line (`--config FILE`, `--config=FILE`), else by
/// the variable.
fn config_path(args: &[OsString], config_env: &str) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(config_env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The long flags a settings file may set: all but `--config`, `--help` and `--version`.
pub fn settable(cmd: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long()
            .is_some_and(|l| !matches!(l, "config" | "help" | "version"))
    })
}

/// The settings file's key of a long flag (`register-expires` → `register_expires`).
pub fn key_of(long: &str) -> String {
    long.replace('-', "_")
}

fn with_defaults(
    mut cmd: clap::Command,
    table: &toml::Table,
    path: &Path,
) -> Result<clap::Command, String> {
    for (key, value) in table {
        let Some(id) = settable(&cmd)
            .find(|a| a.get_long().map(key_of).as_deref() == Some(key.as_str()))
            .map(|a| a.get_id().clone())
        else {
            let mut known: Vec<String> = settable(&cmd)
                .filter_map(|a| a.get_long().map(key_of))
                .collect();
            known.sort();
            return Err(format!(
                "{}: unknown setting {key:?} (the settings are: {})",
                path.display(),
                known.join(", ")
            ));
        };
        let values = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| scalar(key, v, path))
                .collect::<Result<Vec<_>, _>>()?,
            v => vec![scalar(key, v, path)?],
        };
        // A value from the file satisfies a flag that must otherwise be given.
        cmd = cmd.mut_arg(id, |a| a.required(false).default_values(values));
    }
    Ok(cmd)
}

fn scalar(key: &str, v: &toml::Value, path: &Path) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!(
            "{}: {key} must be a string, a number, a boolean or a list of them",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Demo {
        #[arg(long)]
        relay: String,
        #[arg(long, default_value_t = 300)]
        register_expires: u32,
        #[arg(long = "service")]
        services: Vec<String>,
        #[arg(long)]
        verbose: bool,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    }

    /// A settings file in the temporary directory, removed on drop.
    struct File(PathBuf);

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(text: &str) -> File {
        let path = std::env::temp_dir().join(format!(
            "proto-cli-{}-{}.toml",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, text).expect("write the settings file");
        File(path)
    }

    fn parse(args: &[&str]) -> Result<Demo, CliError> {
        let mut argv = vec!["demo"];
        argv.extend_from_slice(args);
        try_parse_from::<Demo>(argv, "PROTO_CLI_TEST_NO_SUCH_VARIABLE", None)
    }

    #[test]
    fn the_file_fills_in_what_the_command_line_leaves_out() {
        let f = file(
            "relay = \"192.0.2.5:5060\"\nregister_expires = 600\nservice = [\"wine\", \"beer\"]\nverbose = true\n",
        );
        let path = f.0.to_str().expect("utf-8 path");
        let d = parse(&["--config", path]).expect("parsed");
        assert_eq!(d.relay, "192.0.2.5:5060");
        assert_eq!(d.register_expires, 600);
        assert_eq!(d.services, ["wine", "beer"]);
        assert!(d.verbose);
        // A flag wins over the file.
        let d = parse(&[&format!("--config={path}"), "--register-expires", "60"]).expect("parsed");
        assert_eq!(d.register_expires, 60);
        // Without a file, the built-in default; a required flag is still required.
        assert!(matches!(parse(&[]), Err(CliError::Clap(_))));
        assert_eq!(
            parse(&["--relay", "x"]).expect("parsed").register_expires,
            300
        );
    }

    #[test]
    fn a_bad_file_is_named_with_the_problem() {
        let f = file("relay = \"x\"\nregister_expiry = 600\n");
        let path = f.0.to_str().expect("utf-8 path");
        let e = parse(&["--config", path])
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("unknown setting \"register_expiry\""), "{e}");
        assert!(e.contains("register_expires"), "{e}");
        let f = file("relay = \n");
        let e = parse(&["--config", f.0.to_str().expect("utf-8")])
            .expect_err("not TOML")
            .to_string();
        assert!(e.starts_with("bad settings file"), "{e}");
        let e = parse(&["--config", "/nonexistent/agent.toml"])
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("cannot read the settings file /nonexistent/agent.toml"),
            "{e}"
        );
        // A value of the wrong kind is refused by the flag's own parser.
        let f = file("relay = \"x\"\nregister_expires = \"soon\"\n");
        let e = parse(&["--config", f.0.to_str().expect("utf-8")])
            .expect_err("not a number")
            .to_string();
        assert!(e.contains("--register-expires"), "{e}");
    }
}
