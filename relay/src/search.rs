//! Server search (SPEC features 1, 2): which service a request asks for, by the operator's rules,
//! and which application servers may deliver it.
//!
//! # The rule language
//! A rule is a list of conditions, all of which must hold, a service, and optionally the
//! application servers to use (in order). Rules are tried by priority (lowest first), then by
//! id; the first whose conditions all hold decides. Without a matching rule a request for
//! `sip:NAME@DOMAIN` goes to the service `NAME` if there is one, else to the user `NAME`.
//!
//! A rule's servers either restrict the request to them (`--servers`) or are tried before the
//! service's other servers (`--prefer`).
//!
//! A condition is `FIELD=PATTERN` or `FIELD!=PATTERN`; conditions are separated by `;`.
//! Fields: `ruri.user` and `ruri.host` (the Request-URI), `caller` (the authenticated user),
//! `body.NAME` (a field of the service-request body; absent fields equal nothing, so
//! `body.NAME!=x` holds for them). A pattern is literal text in which `*` stands for any run of
//! characters. Host comparisons ignore case; the others do not.
//!
//! This module reads the store only through [`Catalog`]'s short-lived cache and never changes it.

use crate::cache::TtlCache;
use crate::store::{RedirectRow, RuleRow, ServiceRow, Store, StoreError};
use proto::service::ServiceRequest;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    RuriUser,
    RuriHost,
    Caller,
    Body(String),
}

/// One `FIELD=PATTERN` or `FIELD!=PATTERN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub field: Field,
    pub negate: bool,
    pub pattern: String,
}

/// Parses `ruri.user=wine; body.lang=fr` (at least one condition).
pub fn parse_conditions(text: &str) -> Result<Vec<Condition>, String> {
    let mut out = Vec::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (lhs, negate, rhs) = if let Some((l, r)) = part.split_once("!=") {
            (l, true, r)
        } else if let Some((l, r)) = part.split_once('=') {
            (l, false, r)
        } else {
            return Err(format!(
                "condition {part:?} has no '=' or '!=' (write FIELD=PATTERN)"
            ));
        };
        let lhs = lhs.trim();
        let field = match lhs {
            "ruri.user" => Field::RuriUser,
            "ruri.host" => Field::RuriHost,
            "caller" => Field::Caller,
            other => match other.strip_prefix("body.") {
                Some(name) if !name.is_empty() => Field::Body(name.to_string()),
                _ => {
                    return Err(format!(
                        "unknown field {other:?} (use ruri.user, ruri.host, caller or body.NAME)"
                    ));
                }
            },
        };
        out.push(Condition {
            field,
            negate,
            pattern: rhs.trim().to_string(),
        });
    }
    if out.is_empty() {
        return Err("a rule needs at least one condition".into());
    }
    Ok(out)
}

/// Glob match where `*` is any run of characters (no allocation unless case is ignored).
fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    if ignore_case {
        return glob_exact(&pattern.to_ascii_lowercase(), &text.to_ascii_lowercase());
    }
    glob_exact(pattern, text)
}

fn glob_exact(p: &str, t: &str) -> bool {
    let mut parts = p.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = t.strip_prefix(first) else {
        return false;
    };
    let rest_parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = rest_parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for mid in middle {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What a request carries, for rules to look at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub ruri_user: &'a str,
    pub ruri_host: &'a str,
    pub caller: &'a str,
    pub body: Option<&'a ServiceRequest>,
}

impl Condition {
    fn holds(&self, f: &Facts<'_>) -> bool {
        let value = match &self.field {
            Field::RuriUser => Some(f.ruri_user),
            Field::RuriHost => Some(f.ruri_host),
            Field::Caller => Some(f.caller),
            Field::Body(name) => f.body.and_then(|b| b.fields.get(name)).map(String::as_str),
        };
        let hit = value.is_some_and(|v| glob(&self.pattern, v, self.field == Field::RuriHost));
        hit != self.negate
    }
}

/// A rule ready to be tried.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: i64,
    pub conditions: Vec<Condition>,
    pub service: String,
    pub servers: Option<Vec<String>>,
    /// Only `servers` (else: `servers` first, then the others).
    pub servers_only: bool,
}

impl Rule {
    pub fn from_row(row: &RuleRow) -> Result<Rule, String> {
        Ok(Rule {
            id: row.id,
            conditions: parse_conditions(&row.conditions)?,
            service: row.service.clone(),
            servers: row.servers.as_deref().map(split_servers),
            servers_only: row.servers_only,
        })
    }

    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        self.conditions.iter().all(|c| c.holds(facts))
    }
}

/// `a, b` → `["a", "b"]`.
pub fn split_servers(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    services: HashMap<String, ServiceRow>,
    rules: Vec<Rule>,
    redirects: Vec<RedirectRow>,
}

/// What a redirect rule looks at.
#[derive(Debug, Clone, Copy)]
pub struct RedirectFacts<'a> {
    /// The host of the caller's From URI.
    pub caller_domain: &'a str,
    /// The service the request is for, else the called user.
    pub service: &'a str,
    /// Sessions this relay carries now.
    pub sessions: usize,
}

impl RedirectFacts<'_> {
    fn hold(&self, r: &RedirectRow) -> bool {
        r.caller_domain
            .as_deref()
            .is_none_or(|d| d.eq_ignore_ascii_case(self.caller_domain))
            && r.service.as_deref().is_none_or(|s| s == self.service)
            && r.sessions_above
                .is_none_or(|n| i64::try_from(self.sessions).unwrap_or(i64::MAX) > n)
    }
}

/// Services, rules and application servers' rights, read through a cache that lives
/// `cache_ttl`: admin commands take effect within that time, without a restart.
#[derive(Debug)]
pub struct Catalog {
    snapshot: TtlCache<(), Arc<Snapshot>>,
    rights: TtlCache<String, Arc<Vec<String>>>,
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A service session: the service, the servers a rule named (in order), whether only
    /// those may serve it, the rule.
    Service {
        service: ServiceRow,
        servers: Option<Vec<String>>,
        servers_only: bool,
        rule: Option<i64>,
    },
    /// A plain call to the user of the Request-URI.
    User,
}

impl Catalog {
    pub fn new(ttl: Duration) -> Catalog {
        Catalog {
            snapshot: TtlCache::new(ttl, 4),
            rights: TtlCache::new(ttl, 100_000),
        }
    }

    async fn snapshot(&self, store: &Store) -> Result<Arc<Snapshot>, StoreError> {
        let now = Instant::now();
        if let Some(s) = self.snapshot.get(&(), now) {
            return Ok(s);
        }
        let services = store
            .list_services()
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut rules = Vec::new();
        for row in store.list_rules().await? {
            match Rule::from_row(&row) {
                Ok(r) => rules.push(r),
                Err(e) => {
                    tracing::warn!(rule = row.id, error = %e, "Ignoring a rule that does not parse")
                }
            }
        }
        let redirects = store.list_redirects().await?;
        let snap = Arc::new(Snapshot {
            services,
            rules,
            redirects,
        });
        self.snapshot.put((), snap.clone(), now);
        Ok(snap)
    }

    /// The first redirect rule (by id) whose conditions hold and whose target `known` accepts
    /// (an additional server this relay knows, never itself).
    pub async fn redirect(
        &self,
        store: &Store,
        facts: &RedirectFacts<'_>,
        known: impl Fn(&str) -> bool,
    ) -> Result<Option<RedirectRow>, StoreError> {
        let snap = self.snapshot(store).await?;
        Ok(snap
            .redirects
            .iter()
            .find(|r| known(&r.target) && facts.hold(r))
            .cloned())
    }

    /// The services `account` may deliver.
    pub async fn rights(
        &self,
        store: &Store,
        account: &str,
    ) -> Result<Arc<Vec<String>>, StoreError> {
        let now = Instant::now();
        if let Some(r) = self.rights.get(&account.to_string(), now) {
            return Ok(r);
        }
        let r = Arc::new(store.appserver_services(account).await?);
        self.rights.put(account.to_string(), r.clone(), now);
        Ok(r)
    }

    /// Decides where a request with these facts goes: the first matching rule, else a service
    /// named by the Request-URI user, else that user.
    pub async fn resolve(
        &self,
        store: &Store,
        facts: &Facts<'_>,
    ) -> Result<Destination, StoreError> {
        let snap = self.snapshot(store).await?;
        for rule in &snap.rules {
            if rule.matches(facts) {
                match snap.services.get(&rule.service) {
                    Some(service) => {
                        return Ok(Destination::Service {
                            service: service.clone(),
                            servers: rule.servers.clone(),
                            servers_only: rule.servers_only,
                            rule: Some(rule.id),
                        });
                    }
                    None => {
                        tracing::warn!(rule = rule.id, service = %rule.service, "Rule names a service that no longer exists");
                    }
                }
            }
        }
        if let Some(service) = snap.services.get(facts.ruri_user) {
            return Ok(Destination::Service {
                service: service.clone(),
                servers: None,
                servers_only: false,
                rule: None,
            });
        }
        Ok(Destination::User)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(user: &'a str, body: Option<&'a ServiceRequest>) -> Facts<'a> {
        Facts {
            ruri_user: user,
            ruri_host: "Relay.Example",
            caller: "alice",
            body,
        }
    }

    #[test]
    fn conditions_parse_and_refuse_nonsense() {
        let c = parse_conditions("ruri.user=wine; body.lang!=fr ;caller=a*").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].field, Field::Body("lang".into()));
        assert!(c[1].negate);
        assert!(parse_conditions("").is_err());
        assert!(
            parse_conditions("ruri.user")
                .unwrap_err()
                .contains("no '='")
        );
        assert!(
            parse_conditions("to=x")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(parse_conditions("body.=x").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob("wine", "wine", false));
        assert!(!glob("wine", "Wine", false));
        assert!(glob("w*", "wine", false));
        assert!(glob("*ne", "wine", false));
        assert!(glob("w*n*e", "wine", false));
        assert!(glob("*", "", false));
        assert!(!glob("w*x", "wine", false));
        assert!(!glob("ab*ba", "aba", false));
        assert!(glob("RELAY.*", "relay.example", true));
    }

    #[test]
    fn rules_match_all_their_conditions() {
        let body = ServiceRequest::with_detail("red");
        let mut fr = body.clone();
        fr.fields.insert("lang".into(), "fr".into());
        let rule = Rule {
            id: 1,
            conditions: parse_conditions("ruri.user=wine; body.lang=fr").unwrap(),
            service: "wine-fr".into(),
            servers: None,
            servers_only: false,
        };
        assert!(rule.matches(&facts("wine", Some(&fr))));
        assert!(!rule.matches(&facts("wine", Some(&body))));
        assert!(!rule.matches(&facts("wine", None)));
        assert!(!rule.matches(&facts("beer", Some(&fr))));
        let not_fr = Rule {
            conditions: parse_conditions("body.lang!=fr").unwrap(),
            ..rule
        };
        assert!(not_fr.matches(&facts("x", None)));
        assert!(!not_fr.matches(&facts("x", Some(&fr))));
        let host = parse_conditions("ruri.host=relay.example").unwrap();
        assert!(host[0].holds(&facts("x", None)));
    }

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(split_servers(" a, b ,,c"), vec!["a", "b", "c"]);
    }
}
