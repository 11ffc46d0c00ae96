//! `cargo xtask tidy`: checks the Architecture Invariants of ARCHITECTURE.md that the code's
//! text can show, as rust-analyzer's tidy tests do:
//!
//! * no import circle between the source files of any crate (`use crate::…`, `crate::…`
//!   paths and `super::…` paths, resolved to the file that defines the module);
//! * each external crate is named only where the architecture allows it (for example only
//!   `relay::store` names `sqlx`, only `proto::grpc` and `relay::api` name tonic);
//! * nothing under `proto::sip` does I/O or reads a clock.
//!
//! Comments and string literals are not code: they are skipped. Test modules (`tests.rs`, `*_tests.rs`,
//! `#[cfg(test)] mod tests { … }` at the end of a file) are not checked for circles.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::util;

/// The crates whose `src/` is checked.
const CRATES: &[&str] = &["proto", "relay", "app-server-agent", "client-agent"];

/// Who may name an external crate (or path): (name, files or folders that may, why).
const ALLOWED: &[(&str, &[&str], &str)] = &[
    (
        "sqlx",
        &["relay/src/store/"],
        "only `relay::store` talks to the database",
    ),
    (
        "rsip",
        &["proto/src/sip/message/"],
        "only `proto::sip::message` uses rsip",
    ),
    (
        "tonic",
        &[
            "proto/src/grpc.rs",
            "relay/src/api.rs",
            "app-server-agent/src/billing.rs",
        ],
        "only `proto::grpc`, the relay's `api` (its gRPC endpoint) and the agent's `billing` (its client) see tonic",
    ),
    (
        "prost",
        &["proto/src/grpc.rs"],
        "only `proto::grpc` sees gRPC types",
    ),
    (
        "hyper",
        &[
            "app-server-agent/src/http_api.rs",
            "app-server-agent/src/admission.rs",
            "app-server-agent/src/demo_shop.rs",
            "relay/src/http.rs",
        ],
        "the agent's HTTP API, webhook client and demo shop, and the relay's metrics endpoint, are the only HTTP code",
    ),
    (
        "hyper_util",
        &[
            "app-server-agent/src/http_api.rs",
            "app-server-agent/src/admission.rs",
            "app-server-agent/src/demo_shop.rs",
            "relay/src/http.rs",
        ],
        "the agent's HTTP API, webhook client and demo shop, and the relay's metrics endpoint, are the only HTTP code",
    ),
    (
        "UdpSocket",
        &["proto/src/transport/", "proto/src/ua/"],
        "only `proto::transport` and `proto::ua` own sockets",
    ),
    (
        "TcpListener",
        &[
            "proto/src/transport/",
            "app-server-agent/src/",
            "relay/src/api.rs",
            "relay/src/http.rs",
        ],
        "only `proto::transport` owns SIP sockets (the agent's HTTP API and the relay's gRPC endpoint listen on their own)",
    ),
    (
        "SystemTime",
        &["proto/src/clock.rs"],
        "the wall clock is read in `proto::clock` alone",
    ),
];

/// Names code under these folders must not use at all: (folder, names, why).
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "proto/src/sip/",
        &[
            "tokio",
            "Instant::now",
            "std::net::UdpSocket",
            "std::fs",
            "crate::transport",
        ],
        "`proto::sip` does no I/O and reads no clock: time is an argument",
    ),
    (
        "relay/src/proxy/inquiry/",
        &[
            "tokio",
            "Instant::now",
            "crate::core",
            "Core",
            "Store",
            "Sessions",
            "sqlx",
            "spawn",
        ],
        "the proxy's inquiry is a state machine: time, input and output go through its calls",
    ),
    (
        "relay/src/session/mod.rs",
        &[
            "tokio",
            "Instant::now",
            "Store",
            "sqlx",
            "spawn",
            "SipTransport",
        ],
        "session control's table takes the time of every event; its records go to the writer",
    ),
    (
        "relay/src/identity.rs",
        &["tokio", "Instant::now", "crate::core"],
        "the relay's identity is plain data",
    ),
    (
        "relay/src/proxy/decision.rs",
        &["tokio", "Instant::now", "crate::core", "Store", "Sessions"],
        "a decision is plain data",
    ),
    (
        "relay/src/billing.rs",
        &["tokio", "crate::store", "sqlx"],
        "billing is arithmetic: no store, no I/O",
    ),
    (
        "relay/src/search.rs",
        &[
            "save_", "insert_", "update_", "upsert_", "purge_", "add_", "remove_", "set_", "claim_",
        ],
        "search reads the store, never writes it",
    ),
];

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("tidy takes no options");
    }
    let root = util::project_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let files = rust_files(&src)?;
        let mut code = BTreeMap::new();
        for f in &files {
            let text = std::fs::read_to_string(f)?;
            let rel = f
                .strip_prefix(&root)
                .unwrap_or(f)
                .to_string_lossy()
                .replace('\\', "/");
            code.insert(rel, strip_comments_and_strings(&text));
        }
        problems.extend(check_names(&code));
        let graph = module_graph(krate, &src, &code);
        for circle in circles(&graph) {
            problems.push(format!("import circle in {krate}: {}", circle.join(" -> ")));
        }
    }
    if problems.is_empty() {
        println!(
            "tidy: no import circles; every external crate used only where ARCHITECTURE.md allows it"
        );
        Ok(())
    } else {
        for p in &problems {
            println!("tidy: {p}");
        }
        bail!(
            "{} architecture rule(s) broken (see ARCHITECTURE.md, Architecture Invariants)",
            problems.len()
        )
    }
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The text with comments, string and char literals blanked (lines kept).
pub(crate) fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // Raw string r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\''), else a lifetime.
            let lit = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match lit {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            // Copy one whole UTF-8 character.
            let len = utf8_len(c);
            out.push_str(&text[i..(i + len).min(text.len())]);
            i += len;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Whether `code` names `name` as a whole word (a crate, a type, a path).
fn names(code: &str, name: &str) -> bool {
    let b = code.as_bytes();
    let mut from = 0;
    while let Some(p) = code[from..].find(name) {
        let at = from + p;
        let end = at + name.len();
        let before_ok = at == 0 || !is_ident(b[at - 1]);
        // A name ending in `_` is a prefix (`save_` covers `save_cdrs`).
        let after_ok = name.ends_with('_') || end >= b.len() || !is_ident(b[end]);
        if before_ok && after_ok {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Whether a file holds only tests (`tests.rs`, or a test module such as `clock_tests.rs`).
fn is_test_file(file: &str) -> bool {
    file.ends_with("/tests.rs") || file.ends_with("_tests.rs")
}

fn check_names(code: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in code {
        // Tests may read files and the clock.
        if is_test_file(file) {
            continue;
        }
        let text = &without_tests(text);
        for (name, allowed, why) in ALLOWED {
            if names(text, name) && !allowed.iter().any(|a| file.starts_with(a)) {
                problems.push(format!("{file} names `{name}`: {why}"));
            }
        }
        for (folder, names_list, why) in FORBIDDEN {
            if !file.starts_with(folder) {
                continue;
            }
            for name in *names_list {
                if names(text, name) {
                    problems.push(format!("{file} names `{name}`: {why}"));
                }
            }
        }
    }
    problems
}

/// The code before the file's `#[cfg(test)]` module.
fn without_tests(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_string(),
        None => text.to_string(),
    }
}

/// The module path of a source file (`relay/src/session/mod.rs` → `session`).
fn module_of(src: &Path, krate: &str, file: &str) -> Vec<String> {
    let prefix = format!(
        "{}/",
        src.strip_prefix(util::project_root())
            .unwrap_or(src)
            .to_string_lossy()
    );
    let _ = krate;
    let rel = file.strip_prefix(&prefix).unwrap_or(file);
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Edges between files: `from` uses something defined in (or re-exported by) `to`.
fn module_graph(
    krate: &str,
    src: &Path,
    code: &BTreeMap<String, String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeMap<Vec<String>, String> = code
        .keys()
        .map(|f| (module_of(src, krate, f), f.clone()))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in code {
        // Test modules and test files may reach anywhere.
        if is_test_file(file) {
            continue;
        }
        let text = &without_tests(text);
        let here = module_of(src, krate, file);
        let is_mod_file =
            file.ends_with("/mod.rs") || file.ends_with("/lib.rs") || file.ends_with("/main.rs");
        let mut targets = BTreeSet::new();
        for path in paths_in(text) {
            let abs: Vec<String> = match path.first().map(String::as_str) {
                Some("crate") => path[1..].to_vec(),
                Some("super") => {
                    let mut base = here.clone();
                    let mut rest = &path[..];
                    // In `a/b.rs` (module a::b), `super` is `a`; in `a/mod.rs` (module a) too
                    // it is the parent of `a`.
                    while rest.first().map(String::as_str) == Some("super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                    base.extend(rest.iter().cloned());
                    base
                }
                Some("self") if is_mod_file => {
                    let mut base = here.clone();
                    base.extend(path[1..].iter().cloned());
                    base
                }
                _ => continue,
            };
            // The longest prefix that is a file of its own.
            let mut best = None;
            for n in (1..=abs.len()).rev() {
                if let Some(f) = modules.get(&abs[..n]) {
                    best = Some(f.clone());
                    break;
                }
            }
            if let Some(target) = best {
                if &target != file {
                    targets.insert(target);
                }
            }
        }
        // A parent declaring its children (`mod x;`) is not an import; a child using its
        // parent's items is.
        graph.insert(file.clone(), targets);
    }
    graph
}

/// Every `crate::a::b`, `super::x`, `self::y` path in the code, `use` groups expanded one level
/// (`use crate::a::{b, c::d}` gives `crate::a::b` and `crate::a::c::d`).
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    for start_word in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(p) = code[from..].find(start_word) {
            let at = from + p;
            from = at + start_word.len();
            if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b':') {
                continue;
            }
            let mut j = at;
            let mut segs: Vec<String> = Vec::new();
            let mut cur = String::new();
            while j < b.len() {
                let c = b[j];
                if is_ident(c) {
                    cur.push(c as char);
                    j += 1;
                } else if c == b':' && b.get(j + 1) == Some(&b':') {
                    segs.push(std::mem::take(&mut cur));
                    j += 2;
                    if b.get(j) == Some(&b'{') {
                        // A group: each item, to its first segment.
                        let end = code[j..].find('}').map(|e| j + e).unwrap_or(b.len());
                        for item in code[j + 1..end].split(',') {
                            let first: Vec<String> = item
                                .trim()
                                .split("::")
                                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
                                .filter(|s| !s.is_empty() && s != "self")
                                .collect();
                            let mut p = segs.clone();
                            p.extend(first);
                            out.push(p);
                        }
                        segs.clear();
                        break;
                    }
                } else {
                    break;
                }
            }
            if !segs.is_empty() {
                if !cur.is_empty() {
                    segs.push(cur);
                }
                out.push(segs);
            }
        }
    }
    out
}

/// The circles: strongly connected components of more than one file, each sorted.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm.
    struct St<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        on: BTreeSet<&'a str>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut St<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        if let Some(edges) = s.graph.get(v) {
            for w in edges {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_strings_are_not_code() {
        let code = strip_comments_and_strings(
            "use a; // sqlx::x\nlet s = \"sqlx::y\"; /* sqlx */ let c = '\"'; let r = r#\"sqlx\"#;\nfn f<'a>() {}",
        );
        assert!(!names(&code, "sqlx"), "{code}");
        assert!(code.contains("fn f<'a>"));
        assert_eq!(code.lines().count(), 3);
    }

    #[test]
    fn paths_and_groups() {
        let p = paths_in("use crate::a::{b, c::d};\nlet x = super::e::f(); crate::g::h;");
        assert!(p.contains(&vec!["crate".into(), "a".into(), "b".into()]));
        assert!(p.contains(&vec!["crate".into(), "a".into(), "c".into(), "d".into()]));
        assert!(p.contains(&vec!["super".into(), "e".into(), "f".into()]));
        assert!(p.contains(&vec!["crate".into(), "g".into(), "h".into()]));
    }

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        g.insert("a".into(), ["b".to_string()].into());
        g.insert("b".into(), ["c".to_string()].into());
        g.insert("c".into(), ["a".to_string()].into());
        g.insert("d".into(), ["a".to_string()].into());
        assert_eq!(
            circles(&g),
            vec![vec!["a".to_string(), "b".into(), "c".into()]]
        );
        g.insert("c".into(), BTreeSet::new());
        assert!(circles(&g).is_empty());
    }

    #[test]
    fn whole_words_only() {
        assert!(names("use sqlx::Pool;", "sqlx"));
        assert!(!names("let mysqlx = 1;", "sqlx"));
        assert!(names("x.save_cdrs()", "save_"));
        assert!(names("Instant::now()", "Instant::now"));
    }
}
