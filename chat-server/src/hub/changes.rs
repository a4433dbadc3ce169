//! The requests that read or change sessions: create, join, resume, post, leave, userdata,
//! read, transcript. Each takes the session for its actor in one place (`session_for`: a fenced
//! connection is refused there).

use super::*;

impl Hub {
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            sessions_open: 0,
            sessions_closed: 0,
            connections: self.connections.len(),
            events: 0,
            refused: self.refusals.counts(),
        };
        for entry in self.sessions.iter() {
            let st = entry.value().lock();
            if st.is_closed() {
                s.sessions_closed += 1;
            } else {
                s.sessions_open += 1;
            }
            s.events += st.last_seq();
        }
        s
    }

    /// The session a change by `actor` applies to (a fenced connection changes nothing).
    pub(super) fn session_for(&self, actor: Actor<'_>, session_id: &str) -> Result<Arc<Session>> {
        if let Actor::Conn(c) = actor {
            c.check_live()?;
        }
        self.session(session_id)
    }

    pub fn session(&self, id: &str) -> Result<Arc<Session>> {
        match self.sessions.get(id) {
            Some(s) => Ok(s.value().clone()),
            None => refuse(ChatErrorCode::UnknownSession, format!("no session {id:?}")),
        }
    }

    pub(super) fn check_userdata(&self, changes: &UserdataChanges) -> Result<()> {
        if changes.len() > MAX_USERDATA_KEYS {
            return refuse(
                ChatErrorCode::BadRequest,
                format!(
                    "at most {MAX_USERDATA_KEYS} userdata keys at once, not {}",
                    changes.len()
                ),
            );
        }
        for (k, v) in changes {
            check_len("a userdata key", k, 1, 256)?;
            if let Some(v) = v {
                check_len("a userdata value", v, 0, self.config.max_text)?;
            }
        }
        Ok(())
    }

    /// A customer opens a session (HTTP). The interaction id is generated when not given.
    pub fn create_session(
        &self,
        interaction_id: Option<String>,
        nickname: String,
        userdata: Userdata,
    ) -> Result<Ack<(String, String, u64)>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let id = interaction_id.unwrap_or_else(new_id);
        check_id("interaction_id", &id)?;
        check_len("nickname", &nickname, 1, MAX_ID)?;
        let as_changes: UserdataChanges = userdata
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        self.check_userdata(&as_changes)?;
        if self.sessions.len() >= self.config.max_sessions {
            return refuse(
                ChatErrorCode::LimitExceeded,
                format!(
                    "the server holds its limit of {} sessions",
                    self.config.max_sessions
                ),
            );
        }
        let now = Instant::now();
        let ts = now_ms();
        let session = Session::new(SessionState::new(id.clone(), ts, userdata.clone(), now));
        match self.sessions.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return refuse(
                    ChatErrorCode::SessionExists,
                    format!("session {id:?} already exists"),
                )
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(session.clone());
            }
        }
        let mut st = session.lock();
        let customer = Participant {
            id: new_id(),
            nickname,
            participant_type: ParticipantType::Customer,
            style: Style::Regular,
            visibility: Visibility::All,
        };
        let pid = customer.id.clone();
        let stored = st.join(customer, Owner::Http, &self.limits, ts, now)?;
        let seq = stored.event.seq;
        let mut records = vec![JournalRecord::SessionCreated {
            session_id: id.clone(),
            created_ms: ts,
            userdata,
        }];
        records.extend(Self::event_records(&id, vec![stored]));
        let wait = self.persist(&session, &mut st, records)?;
        tracing::info!(session_id = %id, participant_id = %pid, "session created");
        Ok(Ack {
            value: (id, pid, seq),
            wait,
        })
    }

    pub fn join(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        nickname: String,
        participant_type: ParticipantType,
        style: Style,
        visibility: Visibility,
    ) -> Result<Ack<Joined>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        check_len("nickname", &nickname, 1, MAX_ID)?;
        let owner = match actor {
            Actor::Http => Owner::Http,
            Actor::Conn(c) => {
                c.check_live()?;
                c.owner.clone()
            }
        };
        let session = self.session(session_id)?;
        let mut st = session.lock();
        let info = Participant {
            id: new_id(),
            nickname,
            participant_type,
            style,
            visibility,
        };
        let pid = info.id.clone();
        let stored = st.join(info.clone(), owner, &self.limits, now_ms(), Instant::now())?;
        let seq = stored.event.seq;
        if let Actor::Conn(c) = actor {
            if c.attach((session_id.to_string(), pid.clone())) {
                if let Some(p) = st.participant_mut(&pid) {
                    p.attached = Some(c.id);
                    p.detached_since = None;
                }
            }
        }
        let wait = self.persist(
            &session,
            &mut st,
            Self::event_records(session_id, vec![stored]),
        )?;
        drop(st);
        tracing::info!(
            session_id,
            participant_id = %pid,
            participant_type = ?info.participant_type,
            style = ?info.style,
            visibility = %info.visibility,
            "participant joined"
        );
        Ok(Ack {
            value: Joined {
                session: session.clone(),
                participant_id: pid,
                seq,
            },
            wait,
        })
    }

    /// A connection takes over a participant (after a reconnect, a restart or a switchover).
    /// No event is emitted: nobody in the session sees it. Participants that have left, or whose
    /// session closed, may be resumed too: their feed then ends with the event that removed them.
    pub fn resume(
        &self,
        conn: &Connection,
        session_id: &str,
        participant_id: &str,
    ) -> Result<Joined> {
        conn.check_live()?;
        let session = self.session(session_id)?;
        let mut st = session.lock();
        // What is readable now (an event still on its way to disk is not a safe checkpoint).
        let last = st.visible_seq;
        let Some(p) = st.participant_mut(participant_id) else {
            return refuse(
                ChatErrorCode::UnknownParticipant,
                format!("no participant {participant_id} in session {session_id}"),
            );
        };
        if p.owner != conn.owner {
            return refuse(
                ChatErrorCode::NotAllowed,
                format!(
                    "participant {participant_id} belongs to {:?}, not to this connection",
                    p.owner
                ),
            );
        }
        // A connection opened later has it already: this one is the client's past (a resume
        // still in flight on a connection it has since replaced, read after the new one's).
        // Taking it back would leave it attached to a connection about to close.
        if let Some(newer) = p.attached.filter(|c| *c > conn.id) {
            return refuse(
                ChatErrorCode::NotAllowed,
                format!("participant {participant_id} is attached to a newer connection ({newer})"),
            );
        }
        let mut previous = None;
        if p.present && conn.attach((session_id.to_string(), participant_id.to_string())) {
            previous = p.attached.replace(conn.id);
            p.detached_since = None;
        }
        drop(st);
        if let Some(prev) = previous.filter(|prev| *prev != conn.id) {
            if let Some(c) = self.connections.get(&prev) {
                c.release(&(session_id.to_string(), participant_id.to_string()));
            }
        }
        tracing::info!(
            session_id,
            participant_id,
            connection = conn.id,
            "participant resumed"
        );
        Ok(Joined {
            session,
            participant_id: participant_id.to_string(),
            seq: last,
        })
    }

    pub(super) fn authorize(
        st: &SessionState,
        participant_id: &str,
        actor: Actor<'_>,
    ) -> Result<()> {
        st.check_present(participant_id)?;
        let Some(p) = st.participant(participant_id) else {
            return refuse(ChatErrorCode::UnknownParticipant, "unknown participant");
        };
        match actor {
            Actor::Http if p.owner != Owner::Http => refuse(
                ChatErrorCode::NotAllowed,
                format!("participant {participant_id} belongs to a TCP connection"),
            ),
            Actor::Conn(c) if p.attached != Some(c.id) => refuse(
                ChatErrorCode::NotAllowed,
                format!("participant {participant_id} is not attached to this connection: resume it first"),
            ),
            _ => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn post(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: &str,
        kind: PostKind,
        text: String,
        rich: Option<RichContent>,
        visibility: Visibility,
        key: Option<String>,
    ) -> Result<Ack<(u64, bool)>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        check_len("text", &text, 0, self.config.max_text)?;
        let rich = rich.filter(|r| !r.is_empty());
        if let Some(r) = &rich {
            if r.items() > MAX_RICH_ITEMS {
                return refuse(
                    ChatErrorCode::BadRequest,
                    format!(
                        "rich content has {} buttons and cards; at most {MAX_RICH_ITEMS}",
                        r.items()
                    ),
                );
            }
            if r.text_len() > self.config.max_text {
                return refuse(
                    ChatErrorCode::BadRequest,
                    format!(
                        "rich content holds {} bytes of text; at most {}",
                        r.text_len(),
                        self.config.max_text
                    ),
                );
            }
        }
        if let Some(k) = &key {
            check_len("key", k, 1, MAX_ID)?;
        }
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        Self::authorize(&st, participant_id, actor)?;
        let outcome = st.post(
            participant_id,
            kind,
            text,
            rich,
            visibility,
            key,
            &self.limits,
            now_ms(),
            Instant::now(),
        )?;
        match outcome {
            PostOutcome::New(stored) => {
                let seq = stored.event.seq;
                let wait = self.persist(
                    &session,
                    &mut st,
                    Self::event_records(session_id, vec![*stored]),
                )?;
                Ok(Ack {
                    value: (seq, false),
                    wait,
                })
            }
            PostOutcome::Duplicate(seq) => {
                tracing::debug!(
                    session_id,
                    participant_id,
                    seq,
                    "duplicate client key dropped"
                );
                Ok(Ack {
                    value: (seq, true),
                    wait: Wait::Visible(session.clone(), seq),
                })
            }
        }
    }

    pub fn leave(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: &str,
        after_action: AfterAction,
    ) -> Result<Ack<u64>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        Self::authorize(&st, participant_id, actor)?;
        let events = st.leave(
            participant_id,
            after_action,
            Reason::Requested,
            now_ms(),
            Instant::now(),
        )?;
        let seq = events.first().map_or(0, |e| e.event.seq);
        let closed = events
            .iter()
            .find(|e| e.event.kind == EventKind::Closed)
            .and_then(|e| e.event.reason);
        let wait = self.persist(&session, &mut st, Self::event_records(session_id, events))?;
        drop(st);
        tracing::info!(
            session_id,
            participant_id,
            ?after_action,
            ?closed,
            "participant left"
        );
        Ok(Ack { value: seq, wait })
    }

    pub fn userdata(&self, session_id: &str) -> Result<Userdata> {
        Ok(self.session(session_id)?.lock().userdata.clone())
    }

    /// Changes userdata; `participant_id` None: the change is the system's (HTTP PATCH).
    pub fn update_userdata(
        &self,
        actor: Actor<'_>,
        session_id: &str,
        participant_id: Option<&str>,
        changes: UserdataChanges,
    ) -> Result<Ack<Userdata>> {
        // Changes are journaled under the gate's read side (see `compact`).
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_userdata(&changes)?;
        let session = self.session_for(actor, session_id)?;
        let mut st = session.lock();
        if let Some(pid) = participant_id {
            Self::authorize(&st, pid, actor)?;
        }
        let stored = st.update_userdata(
            participant_id,
            changes,
            &self.limits,
            now_ms(),
            Instant::now(),
        )?;
        let wait = self.persist(
            &session,
            &mut st,
            Self::event_records(session_id, vec![stored]),
        )?;
        Ok(Ack {
            value: st.userdata.clone(),
            wait,
        })
    }

    /// Readable events of a session for one participant (HTTP): events, last seq examined, and
    /// whether the session is closed.
    pub fn read(
        &self,
        session: &Session,
        participant_id: &str,
        since: u64,
    ) -> Result<(Vec<ChatEvent>, u64, bool)> {
        let st = session.lock();
        let Some(p) = st.participant(participant_id) else {
            return refuse(
                ChatErrorCode::UnknownParticipant,
                format!("no participant {participant_id} in session {}", session.id),
            );
        };
        let (events, last) = st.read_for(p, since, 1000, 1 << 20);
        Ok((events, last.max(since.min(st.visible_seq)), st.is_closed()))
    }

    /// Every readable event, unfiltered, with the closed flag and the userdata.
    pub fn transcript(&self, session_id: &str) -> Result<(Vec<ChatEvent>, bool, Userdata)> {
        let session = self.session(session_id)?;
        let st = session.lock();
        let visible = st.visible_seq as usize;
        Ok((
            st.events()[..visible].to_vec(),
            st.is_closed(),
            st.userdata.clone(),
        ))
    }
}
