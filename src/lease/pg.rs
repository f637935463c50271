//! The lease as a row of a PostgreSQL table, one row per hot/cold pair:
//! `(pair, holder, epoch, renewals, renewed_at, released)`. Every change is one conditional
//! statement judged by the database's clock (`now()`), never a VM's wall clock:
//! - **take over**: only when the row is released or was not renewed for `wait_interval_ms`,
//!   and is still the row the agent saw (holder, epoch, renewals, released, and the cold copy's
//!   lag the agent judged it by), with a higher epoch (a missing row is inserted);
//! - **renew**: only a row that still names us, our epoch and our renewal count (or the count
//!   this renewal sets, when an earlier attempt committed but its answer was lost);
//! - **release**: the same condition, setting `released`.
//!
//! The agent adds its own rule on top (it tries a takeover only after seeing the row
//! unchanged for `wait_interval_ms` of its monotonic clock), so neither a step of the
//! database's clock nor of a VM's can shorten the wait. The client is tokio-postgres on a
//! current-thread runtime owned by the worker thread; every call is bounded by a timeout, and
//! a failed connection is dropped and made again on the next call.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::lease::dsn::{self, Dsn, DsnError, TlsMode};
use crate::lease::{Lease, LeaseState, LeaseStore, Obs, RenewFail, LEASE_VERSION};

/// The shortest bound on one database call, in milliseconds.
const MIN_CALL_TIMEOUT_MS: u64 = 1000;

/// Errors setting up the database lease, or creating its table.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum PgError {
    /// {0}
    Dsn(#[from] DsnError),
    /// cannot start the database client's runtime: {0}
    Runtime(#[source] std::io::Error),
    /// this config has no `[lease] backend = "postgres"`: there is no lease table to create
    NotPostgres,
    /// lease database {dsn}: {reason}
    Db { dsn: String, reason: String },
}

/// The SQL of one table, its name checked on load (a plain identifier, so it is written into
/// the statements as it is).
#[derive(Debug)]
struct Statements {
    create: String,
    select: String,
    insert: String,
    take: String,
    renew: String,
    release: String,
    report: String,
}

impl Statements {
    fn new(t: &str) -> Statements {
        let live = "pair = $1 AND holder = $2 AND epoch = $3 AND NOT released";
        Statements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (pair text PRIMARY KEY, holder text NOT NULL, \
                 epoch bigint NOT NULL CHECK (epoch > 0), renewals bigint NOT NULL, \
                 renewed_at timestamptz NOT NULL, released boolean NOT NULL, cold_lag_ms bigint); \
                 ALTER TABLE {t} ADD COLUMN IF NOT EXISTS cold_lag_ms bigint"
            ),
            select: format!(
                "SELECT holder, epoch, renewals, released, cold_lag_ms FROM {t} WHERE pair = $1"
            ),
            insert: format!(
                "INSERT INTO {t} (pair, holder, epoch, renewals, renewed_at, released) \
                 VALUES ($1, $2, $3, 0, now(), false) ON CONFLICT (pair) DO NOTHING"
            ),
            take: format!(
                "UPDATE {t} SET holder = $2, epoch = $3, renewals = 0, renewed_at = now(), \
                 released = false, cold_lag_ms = NULL WHERE pair = $1 AND holder = $4 AND epoch = $5 \
                 AND renewals = $6 AND released = $7 AND $3 > epoch \
                 AND cold_lag_ms IS NOT DISTINCT FROM $9 \
                 AND (released OR renewed_at <= now() - $8::bigint * interval '1 millisecond')"
            ),
            renew: format!(
                "UPDATE {t} SET renewals = $5, renewed_at = now() WHERE {live} \
                 AND renewals IN ($4, $5)"
            ),
            // `$4 + 1`: the renewal after `$4` may have been written although its answer
            // was lost (the row is still ours: nobody else writes our holder and epoch)
            release: format!(
                "UPDATE {t} SET released = true, renewals = renewals + 1, renewed_at = now() \
                 WHERE {live} AND renewals IN ($4::bigint, $4::bigint + 1)"
            ),
            report: format!("UPDATE {t} SET cold_lag_ms = $4 WHERE {live}"),
        }
    }
}

/// The database lease; see the module doc.
pub struct PgStore {
    rt: tokio::runtime::Runtime,
    dsn: Dsn,
    tls: Option<MakeRustlsConnect>,
    table: String,
    sql: Statements,
    pair: String,
    client: Option<Client>,
    call_timeout: Duration,
    update_interval_ms: u64,
    wait_interval_ms: u64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("dsn", &self.dsn)
            .field("table", &self.table)
            .field("pair", &self.pair)
            .finish()
    }
}

/// A database or connection error as one line: the server's code and message where there is
/// one. Neither carries the password.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => crate::error_chain(e),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PgStore {
    /// A store for `[lease]` of a loaded config (the DSN file is read here, once).
    pub fn open(config: &crate::config::Config) -> Result<PgStore, PgError> {
        let l = config.lease.clone().unwrap_or_default();
        let dsn = dsn::load(&l.dsn_file)?;
        let tls = match &dsn.tls {
            TlsMode::Disable => None,
            TlsMode::Verify(ca) => Some(MakeRustlsConnect::new(dsn::tls_config(ca)?)),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PgError::Runtime)?;
        let lock = &config.lock;
        let mut dsn = dsn;
        let call_timeout = Duration::from_millis(lock.update_interval_ms.max(MIN_CALL_TIMEOUT_MS));
        dsn.config.connect_timeout(call_timeout);
        Ok(PgStore {
            rt,
            dsn,
            tls,
            sql: Statements::new(&l.table),
            table: l.table,
            pair: l.pair,
            client: None,
            call_timeout,
            update_interval_ms: lock.update_interval_ms,
            wait_interval_ms: lock.wait_interval_ms,
        })
    }

    /// What the agent reports when the database fails: the server's words, and for a missing
    /// table the command that creates it.
    fn explain(&self, e: &tokio_postgres::Error) -> String {
        if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
            format!(
                "lease table {} does not exist in {}: create it with `artemis-sync lease init`",
                self.table, self.dsn.shown
            )
        } else {
            format!("lease database {}: {}", self.dsn.shown, describe(e))
        }
    }

    /// Runs one call with a connection (made first if there is none), bounded by the call
    /// timeout; on any failure the connection is dropped, to be made again next time.
    fn call<T>(
        &mut self,
        f: impl for<'c> FnOnce(
            &'c Client,
            &'c Statements,
            &'c str,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + 'c>,
        >,
    ) -> Result<T, String> {
        let timeout = self.call_timeout;
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            // the whole connection (TCP, TLS, authentication) within one call timeout: a
            // server that accepts but never answers must not hold the worker
            let connecting = async {
                let made = match &self.tls {
                    None => {
                        let (c, conn) = self.dsn.config.connect(NoTls).await?;
                        tokio::spawn(conn);
                        c
                    }
                    Some(tls) => {
                        let (c, conn) = self.dsn.config.connect(tls.clone()).await?;
                        tokio::spawn(conn);
                        c
                    }
                };
                Ok::<_, tokio_postgres::Error>(made)
            };
            // (the timer is made inside the runtime: tokio's timers need its context)
            let connected = self
                .rt
                .block_on(async { tokio::time::timeout(timeout, connecting).await });
            match connected {
                Ok(Ok(c)) => self.client = Some(c),
                Ok(Err(e)) => return Err(self.explain(&e)),
                Err(_) => {
                    return Err(format!(
                        "lease database {}: no connection within {} ms",
                        self.dsn.shown,
                        timeout.as_millis()
                    ))
                }
            }
        }
        let client = self.client.as_ref().expect("connected just above");
        let result = self.rt.block_on(async {
            tokio::time::timeout(timeout, f(client, &self.sql, &self.pair)).await
        });
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let why = self.explain(&e);
                self.client = None;
                Err(why)
            }
            Err(_) => {
                self.client = None;
                Err(format!(
                    "lease database {}: no answer within {} ms",
                    self.dsn.shown,
                    timeout.as_millis()
                ))
            }
        }
    }

    /// Creates the lease table if it is missing (`artemis-sync lease init`); idempotent.
    pub fn init_table(&mut self) -> Result<String, PgError> {
        self.call(|c, sql, _| Box::pin(async move { c.batch_execute(&sql.create).await }))
            .map_err(|reason| PgError::Db {
                dsn: self.dsn.shown.clone(),
                reason,
            })?;
        Ok(format!(
            "lease table {} ready in {}",
            self.table, self.dsn.shown
        ))
    }

    /// The row of our pair: `Ok(None)` when there is none.
    fn read(&mut self) -> Result<Option<Lease>, String> {
        let row = self.call(|c, sql, pair| {
            Box::pin(async move { c.query_opt(&sql.select, &[&pair]).await })
        })?;
        let Some(row) = row else { return Ok(None) };
        let (holder, epoch, renewals, released): (String, i64, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let cold_lag_ms: Option<i64> = row.get(4);
        let unsigned =
            |v: i64| u64::try_from(v).map_err(|_| format!("negative value {v} in the lease row"));
        Ok(Some(Lease {
            version: LEASE_VERSION,
            holder,
            epoch: unsigned(epoch)?,
            renewals: unsigned(renewals)?,
            state: if released {
                LeaseState::Released
            } else {
                LeaseState::Held
            },
            update_interval_ms: self.update_interval_ms,
            wait_interval_ms: self.wait_interval_ms,
            cold_lag_ms: cold_lag_ms.and_then(|v| u64::try_from(v).ok()),
            check: String::new(),
        }))
    }

    /// Records in our row (`holder` under `epoch`, still held) how far behind the cold copy
    /// is: `Some(0)` in sync, `None` unknown or degraded. Fails when the row no longer names us.
    pub fn report_cold_lag(
        &mut self,
        holder: &str,
        epoch: u64,
        lag_ms: Option<u64>,
    ) -> Result<(), String> {
        let (holder, e) = (holder.to_owned(), to_i64(epoch));
        let lag = lag_ms.map(to_i64);
        let rows = self.call(move |c, sql, pair| {
            Box::pin(async move { c.execute(&sql.report, &[&pair, &holder, &e, &lag]).await })
        })?;
        if rows == 1 {
            Ok(())
        } else {
            Err(format!("{}, not us under epoch {epoch}", self.now_says()))
        }
    }

    /// What the row says now, for a message.
    fn now_says(&mut self) -> String {
        match self.read() {
            Ok(Some(l)) => format!(
                "the lease row now names {} under epoch {} (renewal {}, {:?})",
                l.holder, l.epoch, l.renewals, l.state
            ),
            Ok(None) => "the lease row is gone".into(),
            Err(e) => e,
        }
    }
}

impl LeaseStore for PgStore {
    fn has_lock(&self) -> bool {
        false
    }

    fn observe(&mut self, _try_lock: bool) -> (Result<bool, String>, Obs) {
        let obs = match self.read() {
            Ok(None) => Obs::Missing,
            Ok(Some(l)) => Obs::Lease(l),
            Err(e) => Obs::Error(e),
        };
        (Ok(true), obs)
    }

    fn take_over(
        &mut self,
        expect: &Obs,
        lease: &Lease,
        _settle: Duration,
    ) -> Result<(), (bool, String)> {
        let (holder, epoch) = (lease.holder.clone(), to_i64(lease.epoch));
        let wait = to_i64(self.wait_interval_ms);
        let rows = match expect {
            Obs::Missing => self.call(move |c, sql, pair| {
                Box::pin(async move { c.execute(&sql.insert, &[&pair, &holder, &epoch]).await })
            }),
            Obs::Lease(seen) => {
                let (h, e, r) = (
                    seen.holder.clone(),
                    to_i64(seen.epoch),
                    to_i64(seen.renewals),
                );
                let released = seen.state == LeaseState::Released;
                // the cold copy's state as seen: a hot that reported "behind" since refuses it
                let lag: Option<i64> = seen.cold_lag_ms.map(to_i64);
                self.call(move |c, sql, pair| {
                    Box::pin(async move {
                        c.execute(
                            &sql.take,
                            &[&pair, &holder, &epoch, &h, &e, &r, &released, &wait, &lag],
                        )
                        .await
                    })
                })
            }
            Obs::Error(e) => return Err((false, format!("no takeover on an unread lease: {e}"))),
        };
        match rows {
            Ok(1) => Ok(()),
            Ok(_) => Err((
                false,
                format!(
                    "the database refused the takeover (the row changed, or by its clock it was \
                     renewed less than wait_interval_ms = {wait} ago): {}",
                    self.now_says()
                ),
            )),
            // the statement may have committed before its answer was lost: release it
            Err(e) => Err((true, e)),
        }
    }

    fn renew(&mut self, current: &Lease, next: &Lease) -> Result<(), RenewFail> {
        let (holder, epoch) = (current.holder.clone(), to_i64(current.epoch));
        let (r, n) = (to_i64(current.renewals), to_i64(next.renewals));
        let rows = self
            .call(move |c, sql, pair| {
                Box::pin(async move {
                    c.execute(&sql.renew, &[&pair, &holder, &epoch, &r, &n])
                        .await
                })
            })
            .map_err(RenewFail::Io)?;
        if rows == 1 {
            Ok(())
        } else {
            Err(RenewFail::Lost(format!(
                "{}, not us under epoch {} (renewal {})",
                self.now_says(),
                current.epoch,
                current.renewals
            )))
        }
    }

    fn release(&mut self, current: &Lease) -> Result<(), String> {
        let (holder, epoch, r) = (
            current.holder.clone(),
            to_i64(current.epoch),
            to_i64(current.renewals),
        );
        let rows = self.call(move |c, sql, pair| {
            Box::pin(async move { c.execute(&sql.release, &[&pair, &holder, &epoch, &r]).await })
        })?;
        if rows == 1 {
            Ok(())
        } else {
            Err(format!("{}; not marking it released", self.now_says()))
        }
    }

    fn unlock(&mut self) {}
}
