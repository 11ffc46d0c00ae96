//! Response relay (RFC 3261 §16.7): what the inquiry does with its branches' answers.
//! Provisional answers go up at once (Timer C restarts, a waiting CANCEL goes); a 2xx goes up
//! at once and makes a session (the first wins unless the service forks to all), or, when
//! nobody wants it any more, is released by the relay with ACK and BYE; other final answers
//! are kept until every branch has ended and the best goes up (§16.7 step 6), or the next
//! server is tried (`sequential`). Session control hears of each outcome as an [`Event`].

use super::*;

impl Inquiry {
    pub(super) fn provisional(&mut self, i: usize, mut resp: Response, now: Instant) {
        proto::service::strip_relay_headers(&mut resp.headers);
        let Some(b) = self.branches.get_mut(i) else {
            return;
        };
        if resp.status > 100 {
            b.timer_c = Some(now + TIMER_C);
        }
        if b.cancel_waits() {
            self.send_cancel(i, now);
        }
        if resp.status > 100 && !self.final_sent {
            resp.headers.remove_first("Via");
            self.restore_cseq(&mut resp);
            self.server.send_response(resp, now);
        }
    }

    pub(super) fn final_answer(&mut self, i: usize, mut resp: Response, now: Instant) {
        let Some(b) = self.branches.get(i) else {
            return;
        };
        let status = resp.status;
        if let Phase::Released(ack) = &b.phase {
            if (200..300).contains(&status) {
                // A retransmission of a 2xx the relay released: ACK it again.
                self.out.push_back(Transmit {
                    target: b.target,
                    msg: Message::Request((**ack).clone()),
                    origin: Origin::Server,
                });
            }
            return;
        }
        let first_final = b.waiting();
        let ring_expired = matches!(
            b.phase,
            Phase::Cancelling {
                why: CancelWhy::RingTimeout,
                ..
            }
        );
        resp.headers.remove_first("Via");
        self.restore_cseq(&mut resp);
        // Only the relay speaks these; a copy in a response is forged.
        proto::service::strip_relay_headers(&mut resp.headers);
        if (200..300).contains(&status) {
            self.success(i, resp, now);
        } else if !first_final {
            // A retransmitted final response: the transaction absorbs it.
        } else if status >= 600 {
            self.set_phase(i, Phase::Failed);
            self.pending.clear();
            self.cancel_others(i, now);
            self.send_final(resp, Some(i), now);
        } else {
            self.set_phase(i, Phase::Failed);
            let resp = if status == 487 && self.stop.is_none() && ring_expired {
                // Cancelled by the relay because it rang too long: a timeout.
                self.local_response(408, None)
            } else {
                resp
            };
            self.keep_best(resp, i);
            self.next_or_best(now);
        }
    }

    /// A 2xx from branch `i`.
    pub(super) fn success(&mut self, i: usize, mut resp: Response, now: Instant) {
        let first_2xx = self
            .branches
            .get(i)
            .is_some_and(|b| !matches!(b.phase, Phase::Accepted));
        // A 2xx nobody wants: another server already won (first, sequential), or with `all`
        // the caller has cancelled the servers still deciding after taking its sessions.
        let unwanted = if self.fork == Fork::All {
            self.stop.is_some() && self.final_sent
        } else {
            self.winner.is_some_and(|w| w != i)
        };
        let service = self.attempt.as_ref().is_some_and(|a| a.service.is_some());
        if unwanted && service && first_2xx {
            // Another server already has this session: the one that answered late gets ACK
            // and BYE from the relay, and the client never sees it (so never pays for it).
            self.release(i, &resp, now);
            return;
        }
        self.set_phase(i, Phase::Accepted);
        if first_2xx && self.winner.is_none() {
            self.winner = Some(i);
        }
        self.final_sent = true;
        let held = first_2xx && self.note_answered(i, &mut resp, now);
        if held {
            // The 200 for BYE tells the client its charge: it waits for its record.
        } else if matches!(
            self.server.state(),
            State::Completed | State::Confirmed | State::Terminated
        ) {
            // A 2xx after a 6xx was relayed (§16.7 step 5 still forwards it), or a further
            // 2xx with `all`: past the server transaction that already answered.
            self.out.push_back(Transmit {
                target: self.upstream,
                msg: Message::Response(resp),
                origin: Origin::Server,
            });
        } else {
            self.server.send_response(resp, now);
        }
        if !first_2xx {
            return;
        }
        if self.fork != Fork::All {
            // The first 2xx wins: the other branches are cancelled.
            self.pending.clear();
            self.cancel_others(i, now);
        } else {
            // `all`: the servers still deciding get a last window (the ring time) to join,
            // then they are cancelled.
            let window = now + self.settings.sequential_timeout;
            for b in &mut self.branches {
                if b.waiting() && b.ring_deadline.is_none() {
                    b.ring_deadline = Some(window);
                }
            }
        }
    }

    /// Branch `i` ended without an answer (timeout, transport error, given up).
    pub(super) fn branch_failed(&mut self, i: usize, status: u16, now: Instant) {
        self.give_up(i, status, Phase::Failed, now);
    }

    /// Branch `i`, still awaited, counts as failed with `status` and moves to `phase`.
    pub(super) fn give_up(&mut self, i: usize, status: u16, phase: Phase, now: Instant) {
        if !self.branches.get(i).is_some_and(Branch::waiting) {
            return;
        }
        self.set_phase(i, phase);
        let resp = self.local_response(status, None);
        self.keep_best(resp, i);
        self.next_or_best(now);
    }

    pub(super) fn set_phase(&mut self, i: usize, phase: Phase) {
        if let Some(b) = self.branches.get_mut(i) {
            b.phase = phase;
        }
    }

    /// Answers to an in-dialog request whose CSeq the relay shifted get the original back.
    pub(super) fn restore_cseq(&self, resp: &mut Response) {
        if let Some(v) = &self.original_cseq {
            resp.headers.set("CSeq", v.clone());
        }
    }

    /// Ends, from the relay, the dialog a late 2xx created (another server won the session):
    /// ACK and BYE built from that dialog, as the agents build theirs, the relay's own
    /// Record-Route dropped from its route set.
    pub(super) fn release(&mut self, i: usize, resp: &Response, now: Instant) {
        let Some(b) = self.branches.get(i) else {
            return;
        };
        let invite = b.tx.request();
        let Some(mut dialog) = Dialog::uac(invite, resp) else {
            // No dialog to end (no Contact, no tags): the 2xx is not relayed either.
            self.set_phase(i, Phase::Failed);
            return;
        };
        let identity = &self.settings.identity;
        dialog
            .route_set
            .retain(|r| NameAddr::parse(r).map_or(true, |na| !identity.is_self_uri(&na.uri)));
        let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
        let mut ack = dialog.ack(seq);
        let mut bye = dialog.request(Method::Bye);
        bye.headers
            .push("Reason", "SIP;cause=200;text=\"answered elsewhere\"");
        let target = b.target;
        identity.push_via(&mut ack, target.transport, &message::new_branch());
        identity.push_via(&mut bye, target.transport, &message::new_branch());
        tracing::info!(server = ?b.info.as_ref().map(|x| x.server.clone()), "Late 2xx released: the session went to another server");
        self.out.push_back(Transmit {
            target,
            msg: Message::Request(ack.clone()),
            origin: Origin::Server,
        });
        self.set_phase(i, Phase::Released(Box::new(ack)));
        let tx = ClientTransaction::new(bye, target.is_reliable(), self.settings.timers, now);
        self.keys.push_back(tx.key().clone());
        self.own.push((tx, target));
    }

    /// A branch failed: with `sequential` the next server is tried, else (or when none is
    /// left) the best answer goes up once every branch has ended.
    pub(super) fn next_or_best(&mut self, now: Instant) {
        if !self.final_sent && self.stop.is_none() {
            while let Some(next) = self.pending.pop_front() {
                if self.start_branch(next, now, false) {
                    return;
                }
            }
        }
        self.pending.clear();
        if self.final_sent || self.branches.iter().any(Branch::waiting) {
            return;
        }
        if let Some((best, branch)) = self.best.take() {
            self.send_final(best, Some(branch), now);
        }
    }

    /// §16.7 step 6: 6xx beats everything, else the lowest class; within 4xx a real answer
    /// beats a timeout.
    pub(super) fn keep_best(&mut self, resp: Response, branch: usize) {
        let rank = |s: u16| -> u32 {
            match s {
                600..=699 => 0,
                300..=399 => 1,
                408 => 3,
                400..=499 => 2,
                500..=599 => 4,
                _ => 5,
            }
        };
        let better = match &self.best {
            None => true,
            Some((b, _)) => rank(resp.status) < rank(b.status),
        };
        if better {
            self.best = Some((resp, branch));
        }
    }

    /// Sends the final answer; for an INVITE that made no session, its `failed` record (with
    /// the session id and server of `branch`, the one whose answer this is, when the relay
    /// vouched for a session there). Any final answer to a BYE ends the session (§15).
    pub(super) fn send_final(&mut self, resp: Response, branch: Option<usize>, now: Instant) {
        if self.final_sent {
            return;
        }
        // The relay cancelled the callees because it is stopping: the caller learns that, not
        // a 487 for a CANCEL it never sent.
        let resp = if self.stop == Some(Stop::Stopping) && resp.status == 487 {
            self.stopping_response()
        } else {
            resp
        };
        self.final_sent = true;
        if let Some(attempt) = &self.attempt {
            let offered = branch
                .and_then(|i| self.branches.get(i))
                .and_then(|b| b.info.clone());
            self.events.push_back(Event::Failed {
                attempt: attempt.clone(),
                offered,
                status: resp.status,
                reason: self.failure_reason(resp.status),
            });
        }
        if let Some(ev) = self.bye_answered(resp.status, now, None) {
            self.events.push_back(ev);
        }
        if let Some(ev) = self.change_answered(resp.status, now) {
            self.events.push_back(ev);
        }
        self.server.send_response(resp, now);
    }

    /// A 2xx goes up: session control hears of it. The 200 for BYE, which tells the client its
    /// charge, is handed out in the event instead of sent (true).
    pub(super) fn note_answered(&mut self, i: usize, resp: &mut Response, now: Instant) -> bool {
        match &self.kind {
            Kind::Invite => {
                if let Some(answer) = self.answer(i, resp) {
                    if let Some(attempt) = &self.attempt {
                        self.events.push_back(Event::Answered {
                            attempt: attempt.clone(),
                            answer: Box::new(answer),
                            at: now,
                        });
                    }
                }
                false
            }
            Kind::Bye { .. } => {
                let ev = self.bye_answered(resp.status, now, Some(Box::new(resp.clone())));
                self.events.extend(ev);
                self.holding = true;
                true
            }
            Kind::Change { service, .. } => {
                // Both parties learn what the session runs under now.
                resp.headers
                    .set(proto::service::SERVICE_HEADER, service.name.as_str());
                self.events.extend(self.change_answered(resp.status, now));
                false
            }
            Kind::Pass | Kind::Other => false,
        }
    }

    /// For a service change: session control's event for its final answer.
    pub(super) fn change_answered(&self, status: u16, at: Instant) -> Option<Event> {
        let Kind::Change { key, service } = &self.kind else {
            return None;
        };
        Some(Event::ChangeAnswered {
            key: key.clone(),
            service: service.clone(),
            status,
            at,
        })
    }

    /// For a BYE: session control's event for its final answer (`held`: the 2xx that waits for
    /// the charge).
    pub(super) fn bye_answered(
        &self,
        status: u16,
        at: Instant,
        held: Option<Box<Response>>,
    ) -> Option<Event> {
        let Kind::Bye {
            call_id,
            from_tag,
            to_tag,
        } = &self.kind
        else {
            return None;
        };
        Some(Event::ByeAnswered {
            call_id: call_id.clone(),
            from_tag: from_tag.clone(),
            to_tag: to_tag.clone(),
            status,
            at,
            held,
        })
    }

    /// What a 2xx from branch `i` says about the new dialog. Requests reach the caller where
    /// its INVITE came from (the TCP connection it opened; for UDP the packet's source, which
    /// also gets through a NAT), the callee where the INVITE went; never where only a Contact
    /// points.
    pub(super) fn answer(&self, i: usize, resp: &Response) -> Option<Answer> {
        self.attempt.as_ref()?;
        let (from, to) = (resp.from().ok()?, resp.to().ok()?);
        let (ft, tt) = (from.tag()?, to.tag()?);
        let invite = self.server.request();
        let branch = self.branches.get(i);
        let callee_target = branch.map(|b| b.target);
        let leg = |header: &str, contact: Option<String>, target: Option<Target>| Leg {
            header: header.to_string(),
            contact: contact.unwrap_or_default(),
            target: target
                .map(|t| crate::session::target_string(&t))
                .unwrap_or_default(),
        };
        Some(Answer {
            caller_tag: ft.to_string(),
            callee_tag: tt.to_string(),
            status: resp.status,
            session_id: branch.and_then(|b| b.info.as_ref().map(|x| x.session_id.clone())),
            server: branch.and_then(|b| b.info.as_ref().map(|x| x.server.clone())),
            legs: [
                leg(
                    invite.headers.get("From").unwrap_or_default(),
                    first_contact(&invite.headers),
                    Some(self.source),
                ),
                leg(
                    resp.headers.get("To").unwrap_or_default(),
                    first_contact(&resp.headers),
                    callee_target,
                ),
            ],
            targets: [Some(self.source), callee_target],
            invite_cseq: invite.cseq().map(|c| c.seq).unwrap_or(1),
        })
    }
}

/// The URI of the first Contact, as text.
fn first_contact(headers: &message::Headers) -> Option<String> {
    match message::contacts(headers).ok()?.into_iter().next()? {
        message::Contact::Addr(na) => Some(na.uri.to_string()),
        message::Contact::Star => None,
    }
}
