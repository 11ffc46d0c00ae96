//! Secrets the programs are given (passwords): from an environment variable or a file, so that
//! no password has to stand on a command line, where every local user can read it (`ps`).

use std::path::Path;

/// The first line of `path` (without its line end), for `--password-file`. The error names the
/// file and the problem.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    read_named(path, "password")
}

/// The first line of `path`, a file holding the secret called `what` (e.g. "billing token").
pub fn read_named(path: &Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(format!(
            "the {what} file {} is empty (the {what} is its first line)",
            path.display()
        ));
    }
    Ok(line.to_string())
}

/// The password given directly (`--password` or its variable), else the first line of `file`
/// (`--password-file` or its variable); `None` when neither is given.
pub fn given_or_file(given: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
    given_or_named_file(given, file, "password")
}

/// [`given_or_file`] for the secret called `what`.
pub fn given_or_named_file(
    given: Option<&str>,
    file: Option<&Path>,
    what: &str,
) -> Result<Option<String>, String> {
    match (given, file) {
        (Some(p), _) => Ok(Some(p.to_string())),
        (None, Some(file)) => read_named(file, what).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::read_secret_file;

    #[test]
    fn the_first_line_is_the_secret() {
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret pass\r\nignored\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), "s3cret pass");
        std::fs::write(&f, "\nsecond\n").unwrap();
        let err = read_secret_file(&f).unwrap_err();
        assert!(err.contains("empty") && err.contains("pw"), "{err}");
        let err = read_secret_file(&dir.join("missing")).unwrap_err();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
