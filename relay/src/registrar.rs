//! Registrar (RFC 3261 §10.3): REGISTER binds an address of record (`sip:USER@DOMAIN`) to the
//! contacts a user's devices give, for the time they ask within the operator's bounds. Bindings
//! live in the store, so they survive a restart and are shared by several relays on PostgreSQL;
//! each binding remembers where its REGISTER came from so a TCP device is reached over the
//! connection it opened.

use crate::core::Core;
use crate::store::{Binding, ClusterEvent};
use proto::clock::now_ms;
use proto::log::Esc;
use proto::sip::message::{self, Contact, Request, Response};
use proto::transport::Target;

/// Answers an authenticated REGISTER from `user`.
pub async fn handle(core: &Core, req: &Request, user: &str, source: &Target) -> Response {
    let resp = |status: u16, reason: Option<&str>| {
        message::make_response(req, status, reason, Some(&message::new_tag()))
    };
    let to = match req.to() {
        Ok(t) => t,
        Err(_) => return resp(400, Some("Bad To")),
    };
    let aor_user = to.uri.user.clone().unwrap_or_default();
    if aor_user.len() > crate::config::MAX_USER_LEN {
        return resp(403, Some("User name too long"));
    }
    // A user registers its own address; an application-server account registers the services
    // it may deliver (`relay appserver add … --service`), several servers sharing one service.
    let account = if aor_user == user {
        None
    } else {
        match core.catalog.rights(&core.store, user).await {
            Ok(rights) if rights.contains(&aor_user) => Some(user.to_string()),
            Ok(_) => return resp(403, Some("Not allowed to register this address")),
            Err(e) => {
                tracing::error!(error = %e, "Reading application-server rights failed");
                return resp(500, Some("Location service unavailable"));
            }
        }
    };
    let user = aor_user.as_str();
    if !core.identity.is_self_uri(&to.uri) {
        return resp(404, Some("Not a domain served here"));
    }
    let contacts = match message::contacts(&req.headers) {
        Ok(c) => c,
        Err(_) => return resp(400, Some("Bad Contact")),
    };
    let header_expires = match req.headers.get("Expires") {
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => return resp(400, Some("Bad Expires")),
        },
        None => None,
    };
    let call_id = req.call_id().unwrap_or_default().to_string();
    let cseq = req.cseq().map(|c| i64::from(c.seq)).unwrap_or(0);
    let now = now_ms();
    let store = &core.store;
    let cfg = &core.config;
    core.location.invalidate(user);

    if contacts.iter().any(|c| matches!(c, Contact::Star)) {
        if contacts.len() != 1 || header_expires != Some(0) {
            return resp(400, Some("Contact * needs Expires: 0 and no other Contact"));
        }
        let removed = match &account {
            // Only this server's own bindings of a shared service address.
            Some(acc) => match store.bindings(user, now).await {
                Ok(list) => {
                    let mut result = Ok(());
                    for b in list.iter().filter(|b| b.account.as_deref() == Some(acc)) {
                        result =
                            result.and(store.remove_binding(user, &b.contact, Some(acc)).await);
                    }
                    result
                }
                Err(e) => Err(e),
            },
            None => store.remove_bindings(user).await,
        };
        if let Err(e) = removed {
            tracing::error!(error = %e, "Removing bindings failed");
            return resp(500, Some("Location service unavailable"));
        }
        core.location.invalidate(user);
        tracing::info!(user = %Esc(user), source = %source, "Unregistered every contact");
        return with_bindings(core, req, user, account.as_deref(), now).await;
    }

    let all = match store.bindings(user, now).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "Reading bindings failed");
            return resp(500, Some("Location service unavailable"));
        }
    };
    // Of a service shared by several servers, each sees and changes only its own bindings, and
    // none may take over a contact another one registered.
    let existing: Vec<Binding> = all
        .iter()
        .filter(|b| b.account == account)
        .cloned()
        .collect();
    let foreign = |contact: &str| {
        all.iter()
            .any(|b| b.contact == contact && b.account != account)
    };
    // Check every contact before changing anything (RFC 3261 §10.3 step 7: all or nothing).
    let mut changes = Vec::new();
    for c in &contacts {
        let Contact::Addr(na) = c else { continue };
        let expires = c
            .expires()
            .or(header_expires)
            .unwrap_or(cfg.default_expires);
        if expires != 0 && expires < cfg.min_expires {
            let mut r = resp(423, None);
            r.headers.push("Min-Expires", cfg.min_expires.to_string());
            return r;
        }
        let expires = expires.min(cfg.max_expires);
        let contact = na.uri.to_string();
        if foreign(&contact) {
            return resp(403, Some("Contact registered by another account"));
        }
        let instance = c.instance();
        let previous = existing
            .iter()
            .find(|b| b.contact == contact || (instance.is_some() && b.instance == instance));
        if let Some(prev) = previous {
            if prev.call_id == call_id && prev.cseq >= cseq {
                return resp(500, Some("Out-of-order REGISTER"));
            }
        }
        changes.push((
            contact,
            instance,
            expires,
            previous.map(|p| p.contact.clone()),
            c.clone(),
        ));
    }
    // At most `max_contacts` bindings: a REGISTER that would add beyond it changes nothing.
    let mut after: std::collections::HashSet<&str> =
        existing.iter().map(|b| b.contact.as_str()).collect();
    for (contact, _, expires, previous, _) in &changes {
        if let Some(p) = previous {
            after.remove(p.as_str());
        }
        if *expires == 0 {
            after.remove(contact.as_str());
        } else {
            after.insert(contact.as_str());
        }
    }
    let max = cfg.max_contacts as usize;
    if after.len() > max && after.len() > existing.len() {
        return resp(
            403,
            Some(&format!(
                "Too many contacts: at most {max} registrations per user"
            )),
        );
    }
    let mut longest = 0;
    for (contact, instance, expires, previous, c) in changes {
        longest = longest.max(expires);
        let result = if expires == 0 {
            store
                .remove_binding(user, &contact, account.as_deref())
                .await
        } else {
            if let Some(prev) = previous.filter(|p| *p != contact) {
                let _ = store.remove_binding(user, &prev, account.as_deref()).await;
            }
            let q = match &c {
                Contact::Addr(na) => na.param("q").flatten().and_then(parse_q),
                Contact::Star => None,
            };
            store
                .upsert_binding(&Binding {
                    aor: user.to_string(),
                    contact: contact.clone(),
                    instance,
                    expires_at_ms: now + i64::from(expires) * 1000,
                    q,
                    call_id: call_id.clone(),
                    cseq,
                    source: format!(
                        "{}:{}",
                        source.transport.as_str().to_ascii_lowercase(),
                        source.addr
                    ),
                    updated_at_ms: now,
                    account: account.clone(),
                    user_agent: user_agent_of(req),
                    node: Some(core.lease.node_id.clone()),
                })
                .await
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "Writing a binding failed");
            return resp(500, Some("Location service unavailable"));
        }
        let user_agent = req.headers.get("User-Agent").unwrap_or("-");
        crate::metrics::METRICS.registration(expires != 0);
        if expires == 0 {
            tracing::info!(user = %Esc(user), contact = %Esc(&contact), source = %source, "Unregistered");
        } else {
            // Callers waiting for this address (auto-redial) are told now, here and, through
            // the database, at the other relays.
            core.watches.registered(user);
            if core.store.is_postgres() {
                let (store, event) = (
                    core.store.clone(),
                    ClusterEvent::Registered(user.to_string()),
                );
                tokio::spawn(async move {
                    if let Err(e) = store.announce(&event).await {
                        tracing::warn!(error = %e, "Could not tell the other relays of a registration");
                    }
                });
            }
            tracing::info!(
                user = %Esc(user),
                contact = %Esc(&contact),
                source = %source,
                expires,
                user_agent = %Esc(user_agent),
                "Registered"
            );
        }
    }
    core.location.invalidate(user);
    // The device is reached over the connection it registered on: keep it open as long as
    // the registration (and a little more for the refresh).
    if let Some(conn) = source.conn.filter(|_| longest > 0) {
        let until = std::time::Instant::now()
            + std::time::Duration::from_secs(u64::from(longest))
            + core.timers.t1 * 64;
        core.transport.hold(conn, until);
    }
    with_bindings(core, req, user, account.as_deref(), now).await
}

/// 200 OK listing every current binding (of this server, for a service) with its remaining
/// lifetime.
async fn with_bindings(
    core: &Core,
    req: &Request,
    user: &str,
    account: Option<&str>,
    now: i64,
) -> Response {
    let mut ok = message::make_response(req, 200, None, Some(&message::new_tag()));
    match core.store.bindings(user, now).await {
        Ok(bindings) => {
            // A server sees its own bindings of a service, not its competitors'.
            for b in bindings.iter().filter(|b| b.account.as_deref() == account) {
                let left = ((b.expires_at_ms - now).max(0) + 999) / 1000;
                ok.headers
                    .push("Contact", format!("<{}>;expires={left}", b.contact));
            }
        }
        Err(e) => tracing::error!(error = %e, "Reading bindings failed"),
    }
    ok
}

/// `q=0.5` → 500.
fn parse_q(v: &str) -> Option<i32> {
    let f: f64 = v.trim().parse().ok()?;
    (0.0..=1.0)
        .contains(&f)
        .then(|| (f * 1000.0).round() as i32)
}

/// The REGISTER's User-Agent as a binding keeps it: one line, control characters dropped, at
/// most 200 characters.
fn user_agent_of(req: &Request) -> Option<String> {
    let ua = req.headers.get("User-Agent")?;
    let clean: String = ua.chars().filter(|c| !c.is_control()).take(200).collect();
    let clean = clean.trim();
    (!clean.is_empty()).then(|| clean.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values() {
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("2"), None);
        assert_eq!(parse_q("x"), None);
    }
}
