//! The quota state this gateway enforces: the last answer of the query API's `/v1/quota`,
//! plus what this gateway admitted since (see the `limits` module docs for what that
//! guarantees).
//!
//! The state is a table by consumer position in the [`Directory`], the order every
//! per-consumer structure of the gateway uses: one slot of 24 bytes per configured consumer
//! and one counter of 8, each in a single allocation, and the periods the entries share
//! (one per plan, usually). A request finds its slot by its identity's position, without
//! hashing the consumer's id. With 100,000 consumers the whole state is 3.2 MB in two
//! allocations; keyed by id, with a counter of its own per entry, it was 9.4 MB, 200,000
//! small allocations among it, made while the first answer's garbage was around them,
//! which kept the pages they landed on from being handed back (BENCHMARKS.md, "Many
//! consumers").
//!
//! Answers are read without building their entries ([`Staged`]): each entry is looked up as
//! it is parsed (the id in the directory, the period among the few the answer names) and kept
//! as a position, a period and two counts, 24 bytes; ids, plans and periods are borrowed from
//! the answer's bytes where it is in memory. The answer can also be read as it arrives
//! ([`QuotaState::update_reader`]), so a full answer for 100,000 consumers (16 MB of JSON)
//! never is all in memory: its entries held 16 MB beside the 16 MB of its bytes when the
//! gateway started, the largest part of a start-up's peak (BENCHMARKS.md, "Many consumers").

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::directory::Directory;

use crate::auth::Identity;
use crate::config::WhenStale;
use crate::limits::OverLimit;

pub use tollgate_schemas::quota::{QuotaEntry, QuotaEntryRef, QuotaSnapshot};

/// What the entries of one period share (every consumer of a plan, usually).
#[derive(Debug, PartialEq, Eq)]
struct Period {
    text: PeriodText,
    /// `text.end_text` read, when it reads.
    end: Option<chrono::DateTime<chrono::Utc>>,
}

/// A period as an answer names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeriodText {
    plan: Option<String>,
    name: String,
    /// As received (RFC 3339), for the state kept on disk.
    end_text: String,
}

impl PeriodText {
    fn is(&self, e: &Row<'_>) -> bool {
        self.plan.as_deref() == e.plan && self.name == e.period && self.end_text == e.period_end
    }
}

/// A slot's `period` when the consumer has no known limit (nothing to enforce).
const UNLIMITED: u32 = u32::MAX;

/// One consumer's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    limit: u64,
    /// Billable requests the store had counted at the last update.
    used: u64,
    /// The entry's period, in `Table::periods`; [`UNLIMITED`]: no entry.
    period: u32,
}

const EMPTY: Slot = Slot {
    limit: 0,
    used: 0,
    period: UNLIMITED,
};

/// The state, by consumer position.
struct Table {
    directory: Arc<Directory>,
    slots: Vec<Slot>,
    /// Per position: billable requests this gateway admitted that the store had not counted
    /// at the last update. A reservation holds the array and gives its unit back here.
    admitted: Counters,
    periods: Vec<Period>,
    /// Counters of a table this one replaced (a reload with other consumers), kept until no
    /// reservation holds them: what those reservations give back is then taken off here.
    retired: Vec<Retired>,
}

struct Retired {
    admitted: Counters,
    /// (position there, position here, the count when it was carried over).
    carried: Vec<(u32, u32, u64)>,
}

/// Per consumer position, a count of requests admitted; clones share the counts.
///
/// The counts start a cache line after the `Arc`'s reference counts, which every reservation
/// changes (it holds a clone). In one line with them, the first few consumers' counts (all of
/// them in a small configuration) were written by both workers' cores in the same line as the
/// reference counts, twice more per request. Against nginx, the padding moved the median of
/// eight rounds from 0.950 to 0.958, higher in seven (BENCHMARKS.md, sixteenth round).
#[derive(Clone)]
struct Counters(Arc<[AtomicU64]>);

/// Counts (8 bytes each) of room between the reference counts and the first count: a cache
/// line.
const LEAD: usize = 8;

impl Counters {
    fn new(n: usize) -> Counters {
        Counters((0..n + LEAD).map(|_| AtomicU64::new(0)).collect())
    }

    /// Whether a reservation still holds these counts.
    fn held(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

impl std::ops::Index<usize> for Counters {
    type Output = AtomicU64;

    fn index(&self, at: usize) -> &AtomicU64 {
        &self.0[LEAD + at]
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.0[LEAD..]).finish()
    }
}

impl Table {
    fn new(directory: Arc<Directory>) -> Table {
        let n = directory.len();
        Table {
            slots: vec![EMPTY; n],
            admitted: Counters::new(n),
            periods: Vec::new(),
            retired: Vec::new(),
            directory,
        }
    }

    /// The position of `who` here: its own, unless it was authenticated against other
    /// consumers (a request that began before a reload), then looked up by id.
    fn position(&self, who: &Identity) -> Option<usize> {
        let at = who.index;
        if Arc::ptr_eq(&who.directory, &self.directory) && at < self.directory.len() {
            return Some(at);
        }
        self.directory.position(who.consumer())
    }

    /// The period `text` names, added when new.
    fn period(&mut self, text: &PeriodText) -> u32 {
        if let Some(i) = self.periods.iter().position(|p| p.text == *text) {
            return i as u32;
        }
        self.periods.push(Period {
            text: text.clone(),
            end: chrono::DateTime::parse_from_rfc3339(&text.end_text)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc)),
        });
        (self.periods.len() - 1) as u32
    }

    /// Sets the entry at `at` from `row`. Within the same period the local count carries
    /// over, less what the store counted since (`used` grew by it), so requests still on
    /// their way through the bus stay counted. Taking the growth off this gateway's count is
    /// exact with one gateway; with several, the others' requests are taken off too, which
    /// can only let a consumer overshoot by what is in flight, never stop it early. A new
    /// entry, or one of a new period, starts the count afresh.
    ///
    /// `entry` is the period (in `periods`) and the limit; `None`: no limit to enforce.
    fn set(
        &mut self,
        at: usize,
        entry: Option<(u32, u64)>,
        used: u64,
        previous: Slot,
        previous_end: Option<EndOf>,
    ) {
        let Some((period, limit)) = entry else {
            self.slots[at] = EMPTY;
            return;
        };
        let admitted = &self.admitted[at];
        match previous_end {
            Some(end)
                if previous.period != UNLIMITED && end == self.periods[period as usize].end =>
            {
                let counted = used.saturating_sub(previous.used);
                let _ = admitted.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                    Some(a.saturating_sub(counted))
                });
            }
            _ => admitted.store(0, Ordering::Relaxed),
        }
        self.slots[at] = Slot {
            limit,
            used,
            period,
        };
    }

    /// Drops the periods no entry uses any more (they pile up over the months when no full
    /// answer comes).
    fn drop_unused_periods(&mut self) {
        let mut used = vec![false; self.periods.len()];
        for s in &self.slots {
            if s.period != UNLIMITED {
                used[s.period as usize] = true;
            }
        }
        if used.iter().all(|u| *u) {
            return;
        }
        let mut renumber = vec![UNLIMITED; self.periods.len()];
        let mut next = 0;
        for (i, keep) in used.iter().enumerate() {
            if *keep {
                renumber[i] = next;
                next += 1;
            }
        }
        let mut i = 0;
        self.periods.retain(|_| {
            i += 1;
            used[i - 1]
        });
        for s in &mut self.slots {
            if s.period != UNLIMITED {
                s.period = renumber[s.period as usize];
            }
        }
    }

    /// Takes off what reservations of replaced tables gave back since, once none is held.
    fn settle_retired(&mut self) {
        let admitted = self.admitted.clone();
        self.retired.retain(|r| {
            if r.admitted.held() {
                return true;
            }
            for &(there, here, carried) in &r.carried {
                let given_back =
                    carried.saturating_sub(r.admitted[there as usize].load(Ordering::Relaxed));
                let _ = admitted[here as usize].fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |a| Some(a.saturating_sub(given_back)),
                );
            }
            false
        });
    }

    /// The entries held, by position, as received.
    fn entry_refs(&self) -> impl Iterator<Item = QuotaEntryRef<'_>> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.period != UNLIMITED)
            .map(|(at, s)| {
                let p = &self.periods[s.period as usize];
                QuotaEntryRef::new(
                    self.directory.id(at),
                    p.text.plan.as_deref(),
                    &p.text.name,
                    &p.text.end_text,
                    Some(s.limit),
                    s.used,
                )
            })
    }
}

type EndOf = Option<chrono::DateTime<chrono::Utc>>;

/// The end of the period of `slot` among `periods`, if it has an entry.
fn end_of(periods: &[Period], slot: Slot) -> Option<EndOf> {
    (slot.period != UNLIMITED).then(|| periods[slot.period as usize].end)
}

/// One entry of an answer, as read: text borrowed from the answer where it has no escapes.
type Row<'a> = QuotaEntryRef<'a>;

/// Text of an answer: borrowed unless it holds escapes.
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// `QuotaEntry` as read (`remaining` and `state` follow from the rest and are not read).
#[derive(Debug, Deserialize)]
struct WireEntry<'a> {
    #[serde(borrow)]
    consumer: Text<'a>,
    #[serde(default, borrow)]
    plan: Option<Text<'a>>,
    #[serde(borrow)]
    period: Text<'a>,
    #[serde(borrow)]
    period_end: Text<'a>,
    limit: Option<u64>,
    used: u64,
}

impl WireEntry<'_> {
    fn row(&self) -> Row<'_> {
        Row::new(
            &self.consumer.0,
            self.plan.as_ref().map(|p| &*p.0),
            &self.period.0,
            &self.period_end.0,
            self.limit,
            self.used,
        )
    }
}

/// An answer of `/v1/quota` as applying it needs it: per entry the consumer's position, the
/// period (among the few the answer names) and two counts, 24 bytes, looked up as the entry is
/// read (see the module docs).
struct Staged {
    version: i64,
    epoch: u64,
    /// `None` until read (a full answer when the field is absent).
    full: Option<bool>,
    /// The consumers the positions are of (the table's when the answer was read).
    directory: Arc<Directory>,
    periods: Vec<PeriodText>,
    rows: Vec<StagedRow>,
    /// Entries read, those of unknown consumers included.
    entries: usize,
    unknown: usize,
    example: Option<String>,
}

/// One entry of [`Staged`].
#[derive(Debug, Clone, Copy)]
struct StagedRow {
    at: u32,
    /// In `Staged::periods`; [`UNLIMITED`]: no limit to enforce.
    period: u32,
    limit: u64,
    used: u64,
}

impl Staged {
    fn new(directory: Arc<Directory>) -> Staged {
        Staged {
            version: 0,
            epoch: 0,
            full: None,
            directory,
            periods: Vec::new(),
            rows: Vec::new(),
            entries: 0,
            unknown: 0,
            example: None,
        }
    }

    fn full(&self) -> bool {
        self.full.unwrap_or(true)
    }

    /// Adds an entry; one of a consumer the directory does not know is only counted.
    fn push(&mut self, row: &Row<'_>) {
        self.entries += 1;
        let Some(at) = self.directory.position(row.consumer) else {
            self.unknown += 1;
            self.example.get_or_insert_with(|| row.consumer.to_owned());
            return;
        };
        let (period, limit) = match row.limit {
            Some(limit) => (self.period(row), limit),
            None => (UNLIMITED, 0),
        };
        self.rows.push(StagedRow {
            at: at as u32,
            period,
            limit,
            used: row.used,
        });
    }

    fn period(&mut self, row: &Row<'_>) -> u32 {
        if let Some(i) = self.periods.iter().position(|p| p.is(row)) {
            return i as u32;
        }
        self.periods.push(PeriodText {
            plan: row.plan.map(str::to_owned),
            name: row.period.to_owned(),
            end_text: row.period_end.to_owned(),
        });
        (self.periods.len() - 1) as u32
    }

    /// Reads the JSON of an answer from `d`, entry by entry. The fields may come in any order;
    /// `version` and `consumers` are required, `epoch` (0) and `full` (true) are not.
    fn read<'de, D: serde::Deserializer<'de>>(&mut self, d: D) -> Result<(), D::Error> {
        use serde::de::DeserializeSeed;
        struct Answer<'s>(&'s mut Staged);
        struct Entries<'s>(&'s mut Staged);
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            Version,
            Epoch,
            Full,
            Consumers,
            #[serde(other)]
            Other,
        }
        impl<'de> serde::de::Visitor<'de> for Answer<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a quota answer")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                let (mut version, mut consumers) = (None, false);
                while let Some(field) = map.next_key()? {
                    match field {
                        Field::Version => version = Some(map.next_value()?),
                        Field::Epoch => self.0.epoch = map.next_value()?,
                        Field::Full => self.0.full = Some(map.next_value()?),
                        Field::Consumers if !consumers => {
                            map.next_value_seed(Entries(&mut *self.0))?;
                            consumers = true;
                        }
                        Field::Consumers => {
                            return Err(serde::de::Error::duplicate_field("consumers"));
                        }
                        Field::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                if !consumers {
                    return Err(serde::de::Error::missing_field("consumers"));
                }
                self.0.version =
                    version.ok_or_else(|| serde::de::Error::missing_field("version"))?;
                Ok(())
            }
        }
        impl<'de> DeserializeSeed<'de> for Entries<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_seq(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Entries<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of quota entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                if self.0.full == Some(true) {
                    // A full answer (said before its entries, as the query API writes it)
                    // has about an entry per consumer.
                    self.0.rows.reserve(self.0.directory.len());
                }
                while let Some(e) = seq.next_element::<WireEntry<'de>>()? {
                    self.0.push(&e.row());
                }
                Ok(())
            }
        }
        d.deserialize_map(Answer(self))
    }
}

/// The quota state this gateway enforces: the consumers with a limit.
pub struct QuotaState {
    table: RwLock<Table>,
    /// `(version, epoch)` of the last answer applied, for the next poll's `since`.
    position: Mutex<Option<(i64, u64)>>,
    /// Unix seconds of the last successful update (0: never).
    pub updated_at: AtomicU64,
    /// `gateway.quota.stale_after_s` and `when_stale`.
    stale: Option<(u64, WhenStale)>,
}

impl Default for QuotaState {
    fn default() -> Self {
        QuotaState::new(Arc::default(), None, WhenStale::default())
    }
}

/// Whether the quota state can be enforced as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    Fresh,
    /// Older than `stale_after_s`: the policy says what to do.
    Stale(WhenStale),
}

impl QuotaState {
    /// An empty state for `directory`'s consumers that turns stale `stale_after_s` seconds
    /// after its last update.
    pub fn new(
        directory: Arc<Directory>,
        stale_after_s: Option<u64>,
        when: WhenStale,
    ) -> QuotaState {
        QuotaState {
            table: RwLock::new(Table::new(directory)),
            position: Mutex::new(None),
            updated_at: AtomicU64::new(0),
            stale: stale_after_s.map(|s| (s, when)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the state is older than `stale_after_s` (never, when that is unset).
    pub fn staleness(&self) -> Staleness {
        let Some((after, when)) = self.stale else {
            return Staleness::Fresh;
        };
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let updated = self.updated_at.load(Ordering::Relaxed);
        if updated == 0 || now.saturating_sub(updated) > after {
            Staleness::Stale(when)
        } else {
            Staleness::Fresh
        }
    }

    /// The consumer table the state is kept for.
    pub fn directory(&self) -> Arc<Directory> {
        self.read().directory.clone()
    }

    /// Moves the state to another set of consumers (a reload): each entry and its local count
    /// go to the same consumer's position there; entries of consumers no longer configured
    /// are dropped.
    pub fn rebind(&self, directory: Arc<Directory>) {
        let mut t = self.write();
        if Arc::ptr_eq(&t.directory, &directory) {
            return;
        }
        let mut next = Table::new(directory);
        next.periods = std::mem::take(&mut t.periods);
        let mut carried = Vec::new();
        for (there, slot) in t.slots.iter().enumerate() {
            if slot.period == UNLIMITED {
                continue;
            }
            let Some(here) = next.directory.position(t.directory.id(there)) else {
                continue;
            };
            next.slots[here] = *slot;
            let count = t.admitted[there].load(Ordering::Relaxed);
            next.admitted[here].store(count, Ordering::Relaxed);
            if count > 0 {
                carried.push((there as u32, here as u32, count));
            }
        }
        next.retired = std::mem::take(&mut t.retired);
        next.retired.push(Retired {
            admitted: t.admitted.clone(),
            carried,
        });
        next.drop_unused_periods();
        *t = next;
    }

    /// Applies an answer of `/v1/quota` given as its JSON (what the feed receives and what is
    /// kept on disk); see [`QuotaState::update`]. `Ok(true)` when the answer changed anything
    /// (a full answer, or a partial one with entries).
    pub fn update_json(&self, json: &[u8]) -> Result<bool, serde_json::Error> {
        self.update_from(serde_json::Deserializer::from_slice(json))
    }

    /// [`QuotaState::update_json`] with the JSON read from `json` as it comes: only the
    /// entries' positions and counts are held, never the answer's bytes.
    pub fn update_reader(&self, json: impl std::io::Read) -> Result<bool, serde_json::Error> {
        self.update_from(serde_json::Deserializer::from_reader(json))
    }

    /// Applies the one answer `de` reads (nothing may follow it).
    fn update_from<'de, R: serde_json::de::Read<'de>>(
        &self,
        mut de: serde_json::Deserializer<R>,
    ) -> Result<bool, serde_json::Error> {
        let staged = self.stage(&mut de)?;
        de.end()?;
        Ok(self.apply(staged))
    }

    fn stage<'de, D: serde::Deserializer<'de>>(&self, d: D) -> Result<Staged, D::Error> {
        let mut staged = Staged::new(self.directory());
        staged.read(d)?;
        Ok(staged)
    }

    /// Applies an answer of `/v1/quota`: a full one replaces the state, a partial one
    /// (`full: false`, the entries that changed) is merged into it. A consumer's local count
    /// carries over, less what the store counted meanwhile (see `Table::set`). Entries of
    /// consumers this gateway does not know are left out.
    pub fn update(&self, snap: QuotaSnapshot) {
        let mut staged = Staged::new(self.directory());
        (staged.version, staged.epoch, staged.full) = (snap.version, snap.epoch, Some(snap.full));
        for e in &snap.consumers {
            staged.push(&Row::from(e));
        }
        self.apply(staged);
    }

    /// Applies `s`; whether it changed anything (see [`QuotaState::update_json`]).
    fn apply(&self, s: Staged) -> bool {
        let full = s.full();
        let mut t = self.write();
        t.settle_retired();
        // A full answer replaces every entry: the ones before it only carry counts over.
        let (before, periods_before) = if full {
            let n = t.directory.len();
            (
                Some(std::mem::replace(&mut t.slots, vec![EMPTY; n])),
                std::mem::take(&mut t.periods),
            )
        } else {
            (None, Vec::new())
        };
        // The answer's periods among the table's, those of entries with a limit only.
        let periods: Vec<u32> = s.periods.iter().map(|p| t.period(p)).collect();
        // A reload between reading the answer and now moved the consumers: by id, then.
        let moved = !Arc::ptr_eq(&t.directory, &s.directory);
        for r in &s.rows {
            let at = if moved {
                match t.directory.position(s.directory.id(r.at as usize)) {
                    Some(at) => at,
                    None => continue,
                }
            } else {
                r.at as usize
            };
            let (previous, end) = match &before {
                Some(before) => (before[at], end_of(&periods_before, before[at])),
                None => (t.slots[at], end_of(&t.periods, t.slots[at])),
            };
            let entry = (r.period != UNLIMITED).then(|| (periods[r.period as usize], r.limit));
            t.set(at, entry, r.used, previous, end);
        }
        if moved || (!full && t.periods.len() > 64) {
            t.drop_unused_periods();
        }
        drop(t);
        if let Some(example) = &s.example {
            tracing::debug!(
                unknown = s.unknown,
                example,
                "quota entries of consumers this gateway does not know were left out"
            );
        }
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = Some((s.version, s.epoch));
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        self.updated_at.store(now, Ordering::Relaxed);
        full || s.entries > 0
    }

    /// `(version, epoch)` of the state held, if any.
    pub fn position(&self) -> Option<(i64, u64)> {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The whole state held, as a full answer (what is kept on disk).
    pub fn snapshot(&self) -> QuotaSnapshot {
        let (version, epoch) = self.position().unwrap_or_default();
        QuotaSnapshot {
            version,
            epoch,
            full: true,
            consumers: self.read().entry_refs().map(QuotaEntry::from).collect(),
        }
    }

    /// Writes the whole state held as the JSON of a full answer (what is kept on disk) to
    /// `out`, entry by entry: with 100,000 consumers neither the entries nor their JSON
    /// (17 MB) are ever all in memory.
    pub fn write_snapshot(&self, out: impl std::io::Write) -> std::io::Result<()> {
        let (version, epoch) = self.position().unwrap_or_default();
        let t = self.read();
        tollgate_schemas::quota::write_snapshot(out, version, epoch, true, t.entry_refs())
    }

    /// Admits one request of `who` against its quota: counts it locally at once (so
    /// concurrent requests cannot all pass the last unit) and returns the count's handle,
    /// which gives the unit back when dropped unless the request turned out billable
    /// ([`Reservation::keep`]). `Err(retry_after)` when the quota for the period is used up;
    /// `Ok(None)` for a consumer without a known limit. `now` is the request's start (its
    /// event's `ts`): the period a request counts in is the one its event is counted in by
    /// the store, and the request path reads no clock of its own for it.
    pub fn reserve(
        &self,
        who: &Identity,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Reservation>, OverLimit> {
        let t = self.read();
        let Some(at) = t.position(who) else {
            return Ok(None);
        };
        let slot = t.slots[at];
        if slot.period == UNLIMITED {
            return Ok(None);
        }
        let end = t.periods[slot.period as usize].end;
        if end.is_some_and(|end| now >= end) {
            return Ok(None); // a new period began since the last poll
        }
        let free = |a: u64| (slot.used.saturating_add(a) < slot.limit).then_some(a + 1);
        match t.admitted[at].fetch_update(Ordering::AcqRel, Ordering::Acquire, free) {
            Ok(_) => Ok(Some(Reservation {
                count: Some((t.admitted.clone(), at as u32)),
            })),
            Err(_) => Err(OverLimit {
                wait: end
                    .map(|end| (end - now).to_std().unwrap_or_default())
                    .unwrap_or(Duration::from_secs(60)),
                limit: slot.limit,
            }),
        }
    }
}

/// One request counted against a quota before it is forwarded; see [`QuotaState::reserve`].
#[derive(Debug)]
pub struct Reservation {
    count: Option<(Counters, u32)>,
}

impl Reservation {
    /// The request was billable: it stays counted until the store counts it.
    pub fn keep(mut self) {
        self.count = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((counts, at)) = self.count.take() {
            let _ = counts[at as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                Some(a.saturating_sub(1))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_schemas::config::Consumer;
    use tollgate_schemas::quota::QuotaLevel;

    fn directory(ids: &[&str]) -> Arc<Directory> {
        let consumers: Vec<Consumer> = ids
            .iter()
            .map(|id| Consumer {
                id: id.to_string(),
                plan: "p".into(),
                api_keys: vec![],
            })
            .collect();
        Arc::new(Directory::new(&consumers).unwrap())
    }

    #[test]
    fn counts_start_a_cache_line_past_the_reference_counts() {
        let c = Counters::new(3);
        // The reference counts are just before the slice's data.
        let data = Arc::as_ptr(&c.0).cast::<AtomicU64>() as usize;
        assert!(std::ptr::from_ref(&c[0]) as usize - data >= 64);
        c[2].store(5, Ordering::Relaxed);
        assert_eq!(
            c.0.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>(),
            5
        );
        assert!(!c.held());
        let held = c.clone();
        assert!(c.held() && held.held());
    }

    fn state(ids: &[&str]) -> QuotaState {
        QuotaState::new(directory(ids), None, WhenStale::Open)
    }

    /// The identity of consumer `id` as the gateway's authentication gives it.
    fn who(q: &QuotaState, id: &str) -> Identity {
        let d = q.read().directory.clone();
        Identity::configured(&d, d.position(id).expect("a configured consumer"))
    }

    fn reserve(q: &QuotaState, id: &str) -> Result<Option<Reservation>, OverLimit> {
        q.reserve(&who(q, id), chrono::Utc::now())
    }

    fn entry(limit: u64, used: u64, period_end: &str) -> QuotaEntry {
        QuotaEntry {
            consumer: "a".into(),
            plan: None,
            period: "2026-11".into(),
            period_end: period_end.into(),
            limit: Some(limit),
            used,
            remaining: Some(limit.saturating_sub(used)),
            state: QuotaLevel::of(Some(limit), used),
        }
    }

    fn later(days: i64) -> String {
        (chrono::Utc::now() + chrono::Duration::days(days)).to_rfc3339()
    }

    #[test]
    fn the_state_kept_on_disk_is_what_was_received_and_entries_share_their_period() {
        let q = state(&["c0", "c1", "c2", "free", "other"]);
        let end = "2026-12-01T00:00:00.000Z";
        let mut sent: Vec<QuotaEntry> = (0..3)
            .map(|i| QuotaEntry {
                consumer: format!("c{i}"),
                plan: Some("pro".into()),
                ..entry(10, i, end)
            })
            .collect();
        sent.push(QuotaEntry {
            consumer: "free".into(),
            plan: Some("free".into()),
            ..entry(5, 5, end)
        });
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 2,
            full: true,
            consumers: sent.clone(),
        });
        let mut kept = q.snapshot().consumers;
        let mut json = Vec::new();
        q.write_snapshot(&mut json).unwrap();
        let from_json: QuotaSnapshot = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            from_json,
            q.snapshot(),
            "the file says what the state holds"
        );
        kept.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        sent.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        assert_eq!(kept, sent);
        assert_eq!(q.read().periods.len(), 2, "one period per plan");
        // Read back from its JSON, the state is the same.
        let again = state(&["c0", "c1", "c2", "free", "other"]);
        again.update_json(&json).unwrap();
        assert_eq!(again.snapshot(), q.snapshot());
    }

    /// A reader that hands out at most `n` bytes a call, as a body arriving in pieces does.
    struct Trickle<'a>(&'a [u8], usize);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_answer_read_as_it_arrives_is_the_answer_read_whole() {
        let end = later(3);
        let ids: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let entries: Vec<QuotaEntry> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| QuotaEntry {
                consumer: id.clone(),
                plan: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
                ..entry(10, i as u64 % 12, &end)
            })
            .collect();
        let snap = QuotaSnapshot {
            version: 9,
            epoch: 2,
            full: true,
            consumers: entries,
        };
        let json = serde_json::to_vec(&snap).unwrap();
        let whole = state(&id_refs);
        assert!(whole.update_json(&json).unwrap());
        let read = state(&id_refs);
        assert!(read.update_reader(Trickle(&json, 7)).unwrap());
        assert_eq!(read.snapshot(), whole.snapshot());
        assert_eq!(read.position(), Some((9, 2)));
        assert_eq!(read.read().periods.len(), 2, "one period per plan");
        assert!(reserve(&read, "c11").is_err() && reserve(&read, "c1").unwrap().is_some());

        // The fields in another order: the entries come before what says the answer is
        // partial, and an unknown field is skipped.
        let partial = format!(
            r#"{{"consumers":[{{"consumer":"c1","plan":"odd","period":"2026-11","period_end":"{end}","limit":10,"used":10}},
            {{"consumer":"gone","period":"2026-11","period_end":"{end}","limit":1,"used":0}}],
            "extra":{{"x":[1,2]}},"full":false,"epoch":2,"version":10}}"#
        );
        assert!(read.update_reader(Trickle(partial.as_bytes(), 5)).unwrap());
        assert_eq!(read.position(), Some((10, 2)));
        assert!(reserve(&read, "c1").is_err(), "c1 used its 10 now");
        assert!(
            reserve(&read, "c3").unwrap().is_some(),
            "a partial answer keeps the rest"
        );
        assert!(
            !read
                .update_reader(Trickle(
                    br#"{"version":11,"epoch":2,"full":false,"consumers":[]}"#,
                    3
                ))
                .unwrap(),
            "an empty partial answer changes nothing"
        );
    }

    #[test]
    fn an_answer_cut_short_or_malformed_changes_nothing() {
        let end = later(3);
        let q = state(&["a", "b"]);
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 1,
            consumers: vec![entry(5, 5, &end)],
            ..Default::default()
        });
        let before = q.snapshot();
        let json = format!(
            r#"{{"version":2,"epoch":1,"full":true,"consumers":[{{"consumer":"b","period":"2026-11","period_end":"{end}","limit":5,"used":5}}]}}"#
        );
        for bad in [
            &json[..json.len() - 3],                          // cut short
            &json.replace(r#""version":2,"#, ""),             // no version
            r#"{"version":2}"#,                               // no entries
            &json.replace(r#"]}"#, r#"],"consumers":[]}"#),   // entries twice
            &json.replace(r#""used":5"#, r#""used":"five""#), // a count that is not one
        ] {
            assert!(
                q.update_reader(Trickle(bad.as_bytes(), 4)).is_err(),
                "{bad}"
            );
            assert!(q.update_json(bad.as_bytes()).is_err(), "{bad}");
            assert_eq!(q.snapshot(), before, "{bad}");
            assert_eq!(q.position(), Some((1, 1)));
        }
        assert!(q.update_reader(Trickle(json.as_bytes(), 4)).unwrap());
        assert!(reserve(&q, "a").unwrap().is_none() && reserve(&q, "b").is_err());
    }

    #[test]
    fn an_answer_read_before_a_reload_lands_by_id() {
        let end = later(3);
        let q = state(&["a", "b", "c"]);
        let json = format!(
            r#"{{"version":2,"epoch":1,"full":true,"consumers":[{{"consumer":"c","period":"2026-11","period_end":"{end}","limit":5,"used":5}},{{"consumer":"b","period":"2026-11","period_end":"{end}","limit":5,"used":1}}]}}"#
        );
        let mut de = serde_json::Deserializer::from_slice(json.as_bytes());
        let staged = q.stage(&mut de).unwrap();
        // Consumers reloaded while the answer was read: `b` left, the others moved.
        q.rebind(directory(&["c", "d", "a"]));
        assert!(q.apply(staged));
        assert!(reserve(&q, "c").is_err(), "c's entry followed it");
        assert!(reserve(&q, "a").unwrap().is_none() && reserve(&q, "d").unwrap().is_none());
        assert_eq!(q.read().periods.len(), 1);
    }

    #[test]
    fn answers_are_read_without_copying_their_text_unless_it_is_escaped() {
        // The period ends after now, so its limit is still enforced when the test runs.
        let end = later(3);
        let json = format!(
            r#"{{"version":3,"epoch":4,"full":false,"consumers":[
            {{"consumer":"a\u00e9","plan":"pro","period":"2026-11","period_end":"{end}","limit":5,"used":5,"remaining":0,"state":"exceeded"}},
            {{"consumer":"b","period":"2026-11","period_end":"{end}","limit":null,"used":0}}]}}"#
        );
        let json = json.as_bytes();
        #[derive(Deserialize)]
        struct Answer<'a> {
            #[serde(borrow)]
            consumers: Vec<WireEntry<'a>>,
        }
        let snap: Answer<'_> = serde_json::from_slice(json).unwrap();
        assert!(matches!(snap.consumers[0].consumer.0, Cow::Owned(_)));
        assert!(matches!(snap.consumers[1].consumer.0, Cow::Borrowed(_)));
        assert!(matches!(
            snap.consumers[0].plan.as_ref().unwrap().0,
            Cow::Borrowed(_)
        ));
        assert_eq!(snap.consumers[0].consumer.0, "aé");
        let q = state(&["aé", "b"]);
        assert!(q.update_json(json).unwrap());
        assert_eq!(q.position(), Some((3, 4)));
        assert!(reserve(&q, "aé").is_err() && reserve(&q, "b").unwrap().is_none());
        assert!(
            q.update_json(br#"{"version":1,"consumers":[{"consumer":"a"}]}"#)
                .is_err(),
            "an entry without its fields is refused"
        );
    }

    #[test]
    fn quota_counts_local_admissions_until_the_next_poll() {
        let q = state(&["a"]);
        let end = later(3);
        q.update(QuotaSnapshot {
            version: 1,
            consumers: vec![entry(5, 3, &end)],
            ..Default::default()
        });
        reserve(&q, "a").unwrap().unwrap().keep();
        reserve(&q, "a").unwrap().unwrap().keep();
        let over = reserve(&q, "a").unwrap_err();
        assert!(over.wait > Duration::from_secs(2 * 86_400));
        assert_eq!(over.limit, 5);
        q.update(QuotaSnapshot {
            version: 2,
            consumers: vec![entry(10, 5, &end)],
            ..Default::default()
        });
        assert!(reserve(&q, "a").unwrap().is_some());
    }

    #[test]
    fn requests_not_yet_counted_by_the_store_stay_counted_across_updates() {
        let q = state(&["a"]);
        let end = later(3);
        let snap = |version, used, period_end: &str| QuotaSnapshot {
            version,
            full: version == 1,
            consumers: vec![entry(10, used, period_end)],
            ..Default::default()
        };
        q.update(snap(1, 0, &end));
        (0..6).for_each(|_| reserve(&q, "a").unwrap().unwrap().keep());
        // The store has counted 4 of the 6: 2 are still on their way.
        q.update(snap(2, 4, &end));
        (0..3).for_each(|_| reserve(&q, "a").unwrap().unwrap().keep());
        // A request that was not billable gives its unit back.
        drop(reserve(&q, "a").unwrap().unwrap());
        reserve(&q, "a").unwrap().unwrap().keep();
        assert!(reserve(&q, "a").is_err(), "4 counted + 6 in flight = 10");
        // A new period starts the local count afresh.
        q.update(snap(3, 0, &later(33)));
        assert!(reserve(&q, "a").unwrap().is_some());
    }

    #[test]
    fn a_partial_answer_changes_only_the_consumers_it_names() {
        let q = state(&["a", "b"]);
        let end = later(3);
        let named = |consumer: &str, limit: Option<u64>, used: u64| QuotaEntry {
            consumer: consumer.into(),
            limit,
            ..entry(limit.unwrap_or(0), used, &end)
        };
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 9,
            full: true,
            consumers: vec![named("a", Some(5), 5), named("b", Some(5), 5)],
        });
        assert!(reserve(&q, "a").is_err() && reserve(&q, "b").is_err());
        q.update(QuotaSnapshot {
            version: 2,
            epoch: 9,
            full: false,
            consumers: vec![named("a", Some(10), 5)],
        });
        assert!(reserve(&q, "a").is_ok(), "a's new limit applies");
        assert!(reserve(&q, "b").is_err(), "b is unchanged");
        assert_eq!(q.position(), Some((2, 9)));
        q.update(QuotaSnapshot {
            version: 3,
            epoch: 9,
            full: false,
            consumers: vec![named("b", None, 5)],
        });
        assert!(
            reserve(&q, "b").is_ok(),
            "an entry without a limit removes b"
        );
        let kept = q.snapshot();
        assert!(kept.full && kept.version == 3 && kept.consumers.len() == 1);
        // A full answer replaces everything.
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 10,
            full: true,
            consumers: vec![],
        });
        assert!(reserve(&q, "a").is_ok() && q.snapshot().consumers.is_empty());
    }

    #[test]
    fn entries_of_unknown_consumers_are_left_out_and_old_periods_dropped() {
        let q = state(&["a"]);
        q.update(QuotaSnapshot {
            version: 1,
            consumers: vec![
                QuotaEntry {
                    consumer: "stranger".into(),
                    ..entry(1, 1, &later(3))
                },
                entry(1, 0, &later(3)),
            ],
            ..Default::default()
        });
        assert_eq!(q.snapshot().consumers.len(), 1);
        // Partial answers, each of another period: the periods no entry uses go.
        for v in 2..100 {
            q.update(QuotaSnapshot {
                version: v,
                full: false,
                consumers: vec![entry(1, 0, &later(3 + v))],
                ..Default::default()
            });
        }
        assert!(q.read().periods.len() <= 65, "{}", q.read().periods.len());
        assert!(reserve(&q, "a").unwrap().is_some());
    }

    #[test]
    fn a_reload_moves_entries_and_counts_to_the_consumers_new_positions() {
        let q = state(&["a", "b", "gone"]);
        let end = later(3);
        q.update(QuotaSnapshot {
            version: 1,
            consumers: ["a", "b", "gone"]
                .iter()
                .map(|c| QuotaEntry {
                    consumer: c.to_string(),
                    ..entry(3, 0, &end)
                })
                .collect(),
            ..Default::default()
        });
        let before_reload = who(&q, "b");
        reserve(&q, "b").unwrap().unwrap().keep();
        let in_flight = reserve(&q, "b").unwrap().unwrap();
        // b moves from position 1 to 2; a new consumer takes position 0.
        q.rebind(directory(&["new", "a", "b"]));
        assert_eq!(q.snapshot().consumers.len(), 2, "gone's entry is dropped");
        assert!(reserve(&q, "new").unwrap().is_none(), "no entry yet");
        // A request authenticated before the reload finds b by id.
        reserve(&q, "b").unwrap().unwrap().keep();
        assert!(
            q.reserve(&before_reload, chrono::Utc::now()).is_err(),
            "3 of 3"
        );
        // The request in flight was not billable: its unit comes back at the next update.
        drop(in_flight);
        assert!(reserve(&q, "b").is_err(), "not settled yet");
        q.update(QuotaSnapshot {
            version: 2,
            full: false,
            consumers: vec![],
            ..Default::default()
        });
        // Settled: 2 of 3 counted.
        reserve(&q, "b").unwrap().unwrap().keep();
        assert!(reserve(&q, "b").is_err());
    }

    #[test]
    fn the_state_turns_stale_past_its_age_limit_and_fresh_on_update() {
        let now = chrono::Utc::now().timestamp() as u64;
        assert_eq!(
            QuotaState::default().staleness(),
            Staleness::Fresh,
            "no limit: never stale"
        );
        let q = QuotaState::new(Arc::default(), Some(30), WhenStale::Closed);
        assert_eq!(
            q.staleness(),
            Staleness::Stale(WhenStale::Closed),
            "never fetched"
        );
        q.updated_at.store(now - 10, Ordering::Relaxed);
        assert_eq!(q.staleness(), Staleness::Fresh);
        q.updated_at.store(now - 31, Ordering::Relaxed);
        assert_eq!(q.staleness(), Staleness::Stale(WhenStale::Closed));
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 1,
            full: true,
            consumers: vec![],
        });
        assert_eq!(q.staleness(), Staleness::Fresh, "a poll makes it fresh");
    }
}
