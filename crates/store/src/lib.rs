//! Storage: one interface ([`Store`]) over SQLite (a file in WAL mode, the default) and PostgreSQL
//! (by URL), with versioned migrations (`migrations/sqlite`, `migrations/postgres`: the same
//! schema, differing only in auto-numbered keys).
//!
//! Both backends go through sqlx's `Any` driver with the same SQL text (`$1` placeholders work on
//! both), so one contract test-suite (`tests/contract.rs`) checks both. Times are milliseconds since
//! the Unix epoch; money is integer micro-USD; JSON bodies are text.
//!
//! Architecture invariant: an adapter. It stores and reads; it makes no decisions. Every list is
//! paged with a hard maximum page size ([`MAX_PAGE`]). Writes that the platform acknowledges are
//! committed before the call returns (SQLite: WAL with `synchronous=FULL`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// The largest page any list returns.
pub const MAX_PAGE: u32 = 1_000;
/// Most rows one batch insert takes.
pub const MAX_BATCH: usize = 10_000;
/// Rows per multi-row INSERT statement. sqlx's SQLite driver binds `$n` parameters by name, at a
/// cost that grows with the square of the parameters in one statement: 300,000 device rows took
/// 32 s in statements of 2,000 rows, 3.5 s in statements of 100 and 2.9 s in statements of 40.
const ROWS_PER_INSERT: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {0:?}: must start with sqlite: or postgres:")]
    Url(String),
    #[error("{field}: {rule}")]
    Invalid { field: &'static str, rule: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    /// The change would leave the platform with no admin account.
    #[error("account {0} is the last admin: make another admin first")]
    LastAdmin(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored value that is none of its type's (a row written by something else).
    #[error("stored row: {0}")]
    Stored(#[from] hcp_model::Invalid),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A page request: rows after `after` (an id or key from the previous page), at most `limit`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct Page {
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

impl Page {
    /// The page's size: `limit` (1 to [`MAX_PAGE`]), 100 when not given.
    pub fn limit(&self) -> Result<i64> {
        match self.limit {
            Some(0) => Err(StoreError::Invalid { field: "limit", rule: "must be >= 1".into() }),
            Some(l) if l > MAX_PAGE => {
                Err(StoreError::Invalid { field: "limit", rule: format!("must be <= {MAX_PAGE}") })
            }
            Some(l) => Ok(i64::from(l)),
            None => Ok(100),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SiteRow {
    pub id: String,
    pub idx: i64,
    pub power_cap_w: f64,
    pub settlement_point: String,
}

/// Which devices a listing returns (None: any).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeviceFilter<'a> {
    pub site: Option<&'a str>,
    pub model: Option<&'a str>,
    pub maintenance: Option<bool>,
    pub status: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceRow {
    pub idx: i64,
    pub site_id: String,
    pub feeder_id: String,
    pub rack_idx: i64,
    pub model: String,
    /// "asic" or "gpu".
    pub kind: String,
    pub maintenance: bool,
    /// Live status from the resource manager: "available", "unknown" (not heard from) or
    /// "quarantined"; not written by `sync_topology`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub status_ms: Option<i64>,
    /// The latest minute of telemetry stored for the device (read, never written by
    /// `sync_topology`; left out of the JSON when none, so topology fingerprints stay the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_telemetry_ms: Option<i64>,
}

/// A device's status change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatusRow {
    pub idx: i64,
    pub status: String,
    pub reason: Option<String>,
    pub at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub weight: f64,
    pub guaranteed_gpus: f64,
    pub borrow_limit_gpus: f64,
    pub created_ms: i64,
    /// Requests a minute over all the tenant's keys and every API process (each key has its
    /// own rate as well).
    #[serde(default = "default_requests_per_min")]
    pub requests_per_min: i64,
    /// Tokens (prompt and output) a minute over all its keys and every API process.
    #[serde(default = "default_tokens_per_min")]
    pub tokens_per_min: i64,
}

/// A tenant's requests a minute unless it is given others.
pub const DEFAULT_REQUESTS_PER_MIN: i64 = 60_000;
/// A tenant's tokens a minute unless it is given others.
pub const DEFAULT_TOKENS_PER_MIN: i64 = 20_000_000;

fn default_requests_per_min() -> i64 {
    DEFAULT_REQUESTS_PER_MIN
}

fn default_tokens_per_min() -> i64 {
    DEFAULT_TOKENS_PER_MIN
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountRow {
    pub name: String,
    /// admin, operator or viewer.
    pub role: String,
    pub secret_hash: String,
    pub created_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKeyRow {
    /// The key's public id (its prefix); the secret is stored only as a hash.
    pub id: String,
    pub tenant_id: String,
    pub secret_hash: String,
    pub default_band: i64,
    pub rate_per_s: f64,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// The most keys a tenant may hold unrevoked at once: more keys would otherwise mean more of
/// every per-key allowance.
pub const MAX_KEYS_PER_TENANT: i64 = 20;

/// A dashboard session (the cookie holds the secret; this, its SHA-256).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRow {
    pub id_hash: String,
    /// `account` or `key`.
    pub kind: String,
    /// The account's name or the key's id.
    pub subject: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// The answer a request with an idempotency key was given, and its usage record (JSON).
#[derive(Clone, Debug, PartialEq)]
pub struct OutcomeRow {
    /// The usage id: `idem:<tenant>:<key>`.
    pub id: String,
    pub status: i64,
    pub content_type: String,
    pub body: String,
    pub usage: String,
    pub at_ms: i64,
}

/// The largest answer kept for a retry (bytes of its body).
pub const MAX_OUTCOME_BYTES: usize = 4 * 1024 * 1024;

/// What one process adds to a tenant's one-minute window.
#[derive(Clone, Debug, PartialEq)]
pub struct RateDelta {
    pub tenant_id: String,
    pub window_ms: i64,
    pub requests: i64,
    pub tokens: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyRow {
    pub name: String,
    pub version: i64,
    pub body: String,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DecisionRow {
    pub id: i64,
    pub at_ms: i64,
    pub site_id: String,
    pub kind: String,
    pub reason: String,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanRow {
    pub id: i64,
    pub at_ms: i64,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandRow {
    pub id: i64,
    pub device_idx: i64,
    pub target: String,
    pub attempt: i64,
    pub issued_ms: i64,
    pub outcome: Option<String>,
    pub outcome_ms: Option<i64>,
}

/// A batch of commands for one site's agent, as sent (the bytes of `hcp_fleet::wire`).
#[derive(Clone, Debug, PartialEq)]
pub struct CommandBatchRow {
    /// Assigned by storage in the order written (0 when adding).
    pub seq: i64,
    pub epoch: i64,
    pub site_id: String,
    pub issued_ms: i64,
    pub first_id: i64,
    pub last_id: i64,
    pub commands: i64,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignalRow {
    pub kind: String,
    pub key: String,
    pub at_ms: i64,
    pub value: f64,
}

/// A replica's capacity (see `replicas` in the schema).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaRow {
    pub id: i64,
    pub site_id: String,
    pub gpus: i64,
    pub slots: i64,
    pub kv_tokens: i64,
    /// The plan's power cap per GPU (W); 0 when the plan has none.
    #[serde(default)]
    pub cap_w: f64,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceMinuteRow {
    pub device_idx: i64,
    pub minute_ms: i64,
    pub samples: i64,
    pub power_w_avg: f64,
    pub hashrate_ths_avg: Option<f64>,
    pub temp_c_max: f64,
    pub errors: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SiteSecondRow {
    pub site_id: String,
    pub at_ms: i64,
    pub power_w: f64,
    pub mining_w: f64,
    pub inference_w: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkloadRow {
    pub id: String,
    pub tenant_id: String,
    pub kind: String,
    #[schema(value_type = String)]
    pub state: hcp_model::JobState,
    pub body: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// One metered request (`kind` `tokens`) or job (`gpu`). `id` is the idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// Write order (set by storage; 0 when writing).
    #[serde(default)]
    pub seq: i64,
    pub id: String,
    pub tenant_id: String,
    pub key_id: String,
    #[schema(value_type = String)]
    pub kind: hcp_model::UsageKind,
    pub tier: i64,
    pub model: String,
    pub site_id: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub gpu_ms: i64,
    pub spot: bool,
    /// `completed`, `cancelled` (client went away or cancelled), `failed` (backend failed after
    /// the first byte), `preempted`, or `rejected` (a job the router refused after it ran).
    #[schema(value_type = String)]
    pub status: hcp_model::UsageStatus,
    pub tag: Option<String>,
    pub at_ms: i64,
}

/// Usage summed by kind, tier, model and spot flag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageSum {
    pub kind: hcp_model::UsageKind,
    pub tier: i64,
    pub model: String,
    pub spot: bool,
    pub records: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub gpu_ms: i64,
}

/// A tenant's usage on one UTC day for one kind, tier and model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageDay {
    /// Midnight UTC of the day (ms since the epoch).
    pub day_ms: i64,
    pub kind: String,
    pub tier: i64,
    pub model: String,
    pub records: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub gpu_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct UsageFilter<'a> {
    pub tenant: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub site: Option<&'a str>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PricePlanRow {
    pub tenant_id: String,
    pub effective_ms: i64,
    pub body: String,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SitePnlRow {
    pub site_id: String,
    pub at_ms: i64,
    pub hours: f64,
    pub mining_revenue: i64,
    pub inference_revenue: i64,
    pub energy_cost: i64,
    pub grid_credits: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before_json: Option<String>,
    pub after_json: Option<String>,
}

/// The store: a connection pool and its backend.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

fn check_text(field: &'static str, v: &str, max: usize) -> Result<()> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(StoreError::Invalid {
            field,
            rule: format!("must be 1 to {max} characters, no control characters"),
        });
    }
    Ok(())
}

impl Store {
    /// Opens (and for SQLite creates) the database at `url`: `sqlite:PATH` or `sqlite::memory:`, or
    /// `postgres://...`. Does not migrate.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(url.into()));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') && !url.contains(":memory:") => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let mut opts = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        opts = match backend {
            // One writer at a time in SQLite; several readers in WAL mode.
            Backend::Sqlite => {
                opts.max_connections(if url.contains(":memory:") { 1 } else { 4 }).after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::raw_sql(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=30000; \
                             PRAGMA foreign_keys=ON;",
                        )
                        .execute(&mut *conn)
                        .await?;
                        Ok(())
                    })
                })
            }
            Backend::Postgres => opts.max_connections(16),
        };
        let pool = opts.connect(&url).await?;
        Ok(Store { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations not yet applied; returns the schema version.
    pub async fn migrate(&self) -> Result<i64> {
        let m = match self.backend {
            Backend::Sqlite => &SQLITE,
            Backend::Postgres => &POSTGRES,
        };
        m.run(&self.pool).await?;
        Ok(m.iter().map(|x| x.version).max().unwrap_or(0))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Runs one administrative statement (tests create and drop databases with it).
    pub async fn exec_admin(&self, sql: &str) -> Result<()> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- sites and devices -------------------------------------------------------------------

    /// Writes the fleet's topology (sites and devices), replacing rows with the same keys and
    /// keeping each device's maintenance flag, unless the topology with this `fingerprint` is
    /// what was last written. One transaction. Returns whether it wrote.
    pub async fn sync_topology(&self, fingerprint: &str, sites: &[SiteRow], devices: &[DeviceRow]) -> Result<bool> {
        let last = sqlx::query("SELECT value FROM meta WHERE key = 'topology'").fetch_optional(&self.pool).await?;
        if last.is_some_and(|r| r.get::<String, _>(0) == fingerprint) {
            return Ok(false);
        }
        let mut tx = self.pool.begin().await?;
        for s in sites {
            check_text("site.id", &s.id, 64)?;
            sqlx::query(
                "INSERT INTO sites (id, idx, power_cap_w, settlement_point) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET idx = excluded.idx, power_cap_w = excluded.power_cap_w, \
                 settlement_point = excluded.settlement_point",
            )
            .bind(&s.id)
            .bind(s.idx)
            .bind(s.power_cap_w)
            .bind(&s.settlement_point)
            .execute(&mut *tx)
            .await?;
        }
        for chunk in devices.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from(
                "INSERT INTO devices (idx, site_id, feeder_id, rack_idx, model, kind, maintenance) VALUES ",
            );
            sql.push_str(&values(chunk.len(), 7));
            sql.push_str(
                " ON CONFLICT (idx) DO UPDATE SET site_id = excluded.site_id, feeder_id = excluded.feeder_id, \
                 rack_idx = excluded.rack_idx, model = excluded.model, kind = excluded.kind",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for d in chunk {
                q = q
                    .bind(d.idx)
                    .bind(&d.site_id)
                    .bind(&d.feeder_id)
                    .bind(d.rack_idx)
                    .bind(&d.model)
                    .bind(&d.kind)
                    .bind(i64::from(d.maintenance));
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('topology', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(fingerprint)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn sites(&self) -> Result<Vec<SiteRow>> {
        let rows = sqlx::query("SELECT id, idx, power_cap_w, settlement_point FROM sites ORDER BY idx")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| SiteRow { id: r.get(0), idx: r.get(1), power_cap_w: r.get(2), settlement_point: r.get(3) })
            .collect())
    }

    /// Records status changes (in order: the last for a device wins).
    pub async fn set_device_status(&self, rows: &[DeviceStatusRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            if !matches!(r.status.as_str(), "available" | "unknown" | "quarantined") {
                return Err(StoreError::Invalid {
                    field: "status",
                    rule: "must be available, unknown or quarantined".into(),
                });
            }
            sqlx::query("UPDATE devices SET status = $2, status_reason = $3, status_ms = $4 WHERE idx = $1")
                .bind(r.idx)
                .bind(&r.status)
                .bind(&r.reason)
                .bind(r.at_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Devices in index order, filtered; paged by index.
    pub async fn devices(&self, filter: &DeviceFilter<'_>, page: &Page) -> Result<Vec<DeviceRow>> {
        // Only the filters given appear in the statement: each combination is its own prepared
        // statement with a plan that can use the (site, idx) and (status, idx) indexes. LIMIT is a
        // literal (a validated integer) in every query of this store: SQLite's planner reads a
        // bound LIMIT, so rebinding it made SQLite prepare the statement again on every call
        // (13 % of the CPU of a device list under load).
        let mut sql = String::from(
            "SELECT idx, site_id, feeder_id, rack_idx, model, kind, maintenance, status, status_reason, status_ms, \
             (SELECT MAX(m.minute_ms) FROM telemetry_device_minute m WHERE m.device_idx = devices.idx) \
             FROM devices WHERE idx > $1",
        );
        let mut n = 1;
        let mut cond = |col: &str, present: bool| {
            if present {
                n += 1;
                sql.push_str(&format!(" AND {col} = ${n}"));
            }
        };
        cond("site_id", filter.site.is_some());
        cond("model", filter.model.is_some());
        cond("maintenance", filter.maintenance.is_some());
        cond("status", filter.status.is_some());
        sql.push_str(&format!(" ORDER BY idx LIMIT {}", page.limit()?));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(page.after.unwrap_or(-1));
        if let Some(v) = filter.site {
            q = q.bind(v);
        }
        if let Some(v) = filter.model {
            q = q.bind(v);
        }
        if let Some(v) = filter.maintenance {
            q = q.bind(i64::from(v));
        }
        if let Some(v) = filter.status {
            q = q.bind(v);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows.iter().map(device_row).collect())
    }

    pub async fn device(&self, idx: i64) -> Result<DeviceRow> {
        let r = sqlx::query(
            "SELECT idx, site_id, feeder_id, rack_idx, model, kind, maintenance, status, status_reason, status_ms, \
             (SELECT MAX(m.minute_ms) FROM telemetry_device_minute m WHERE m.device_idx = devices.idx) \
             FROM devices WHERE idx = $1",
        )
        .bind(idx)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(device_row).ok_or_else(|| StoreError::NotFound(format!("device {idx}")))
    }

    /// Sets the maintenance flag of devices by index; returns how many rows changed.
    pub async fn set_maintenance(&self, idxs: &[i64], on: bool) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for chunk in idxs.chunks(4 * ROWS_PER_INSERT) {
            let list: Vec<String> = (0..chunk.len()).map(|k| format!("${}", k + 2)).collect();
            let sql =
                format!("UPDATE devices SET maintenance = $1 WHERE maintenance <> $1 AND idx IN ({})", list.join(","));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i64::from(on));
            for i in chunk {
                q = q.bind(*i);
            }
            n += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    // ---- tenants, accounts, keys ---------------------------------------------------------------

    pub async fn create_tenant(&self, t: &TenantRow) -> Result<()> {
        check_text("id", &t.id, 64)?;
        check_text("name", &t.name, 200)?;
        if !(t.weight.is_finite() && t.weight > 0.0) {
            return Err(StoreError::Invalid { field: "weight", rule: "must be a finite number > 0".into() });
        }
        if !(t.guaranteed_gpus >= 0.0 && t.borrow_limit_gpus >= 0.0) {
            return Err(StoreError::Invalid {
                field: "guaranteed_gpus",
                rule: "guaranteed_gpus and borrow_limit_gpus must be >= 0".into(),
            });
        }
        if t.requests_per_min < 1 || t.tokens_per_min < 1 {
            return Err(StoreError::Invalid {
                field: "requests_per_min",
                rule: "requests_per_min and tokens_per_min must be >= 1".into(),
            });
        }
        let r = sqlx::query(
            "INSERT INTO tenants (id, name, weight, guaranteed_gpus, borrow_limit_gpus, created_ms, requests_per_min, \
             tokens_per_min) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(t.weight)
        .bind(t.guaranteed_gpus)
        .bind(t.borrow_limit_gpus)
        .bind(t.created_ms)
        .bind(t.requests_per_min)
        .bind(t.tokens_per_min)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    pub async fn tenants(&self, page: &Page) -> Result<Vec<TenantRow>> {
        // Tenants page by creation order; `after` is a creation time.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, weight, guaranteed_gpus, borrow_limit_gpus, created_ms, requests_per_min, tokens_per_min \
             FROM tenants \
             WHERE created_ms > $1 ORDER BY created_ms, id LIMIT {}",
            page.limit()?
        )))
        .bind(page.after.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(tenant_row).collect())
    }

    pub async fn tenant(&self, id: &str) -> Result<TenantRow> {
        let r = sqlx::query(
            "SELECT id, name, weight, guaranteed_gpus, borrow_limit_gpus, created_ms, requests_per_min, tokens_per_min \
             FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(tenant_row).ok_or_else(|| StoreError::NotFound(format!("tenant {id}")))
    }

    /// Creates or replaces an operator account.
    pub async fn put_account(&self, a: &AccountRow) -> Result<()> {
        check_text("name", &a.name, 64)?;
        if !["admin", "operator", "viewer"].contains(&a.role.as_str()) {
            return Err(StoreError::Invalid { field: "role", rule: "must be admin, operator or viewer".into() });
        }
        // An admin keeps the admin role while it is the last one: the platform would have no
        // one left to manage it (`hcp admin-reset` is the local way back). On PostgreSQL the
        // admin rows are locked first: two admins demoting each other at once would otherwise
        // both count two admins (each statement's snapshot) and both succeed; the second now
        // waits for the first and counts again. SQLite runs one write at a time.
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT name FROM accounts WHERE role = 'admin' FOR UPDATE").fetch_all(&mut *tx).await?;
        }
        let r = sqlx::query(
            "INSERT INTO accounts (name, role, secret_hash, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, secret_hash = excluded.secret_hash \
             WHERE excluded.role = 'admin' OR accounts.role <> 'admin' \
             OR (SELECT COUNT(*) FROM accounts WHERE role = 'admin') > 1",
        )
        .bind(&a.name)
        .bind(&a.role)
        .bind(&a.secret_hash)
        .bind(a.created_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::LastAdmin(a.name.clone()));
        }
        Ok(())
    }

    pub async fn accounts(&self) -> Result<Vec<AccountRow>> {
        let rows = sqlx::query("SELECT name, role, secret_hash, created_ms FROM accounts ORDER BY name LIMIT 1000")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AccountRow { name: r.get(0), role: r.get(1), secret_hash: r.get(2), created_ms: r.get(3) })
            .collect())
    }

    pub async fn create_key(&self, k: &ApiKeyRow) -> Result<()> {
        check_text("id", &k.id, 64)?;
        if !(k.rate_per_s.is_finite() && k.rate_per_s > 0.0) {
            return Err(StoreError::Invalid { field: "rate_per_s", rule: "must be a finite number > 0".into() });
        }
        self.tenant(&k.tenant_id).await?;
        // The cap is checked in the insert itself; on PostgreSQL the tenant's row is locked first,
        // so two inserts at once do not both count the keys before either is written (SQLite
        // runs one write at a time).
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
                .bind(&k.tenant_id)
                .fetch_all(&mut *tx)
                .await?;
        }
        let r = sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_hash, default_band, rate_per_s, created_ms, revoked_ms) \
             SELECT $1, $2, $3, $4, $5, $6, NULL WHERE \
             (SELECT COUNT(*) FROM api_keys WHERE tenant_id = $2 AND revoked_ms IS NULL) < $7",
        )
        .bind(&k.id)
        .bind(&k.tenant_id)
        .bind(&k.secret_hash)
        .bind(k.default_band)
        .bind(k.rate_per_s)
        .bind(k.created_ms)
        .bind(MAX_KEYS_PER_TENANT)
        .execute(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict(format!("key {}", k.id)),
            e => e.into(),
        })?;
        tx.commit().await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Invalid {
                field: "tenant",
                rule: format!(
                    "tenant {} already has {MAX_KEYS_PER_TENANT} active keys, the most one may hold: revoke one first",
                    k.tenant_id
                ),
            });
        }
        Ok(())
    }

    pub async fn key(&self, id: &str) -> Result<ApiKeyRow> {
        let r = sqlx::query(
            "SELECT id, tenant_id, secret_hash, default_band, rate_per_s, created_ms, revoked_ms FROM api_keys \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(key_row).ok_or_else(|| StoreError::NotFound(format!("key {id}")))
    }

    pub async fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKeyRow>> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, secret_hash, default_band, rate_per_s, created_ms, revoked_ms FROM api_keys \
             WHERE tenant_id = $1 ORDER BY created_ms, id LIMIT 1000",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_row).collect())
    }

    /// Revokes a key; revoking twice keeps the first time. Returns whether it was active.
    pub async fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool> {
        self.key(id).await?;
        let r = sqlx::query("UPDATE api_keys SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL")
            .bind(id)
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- sessions -------------------------------------------------------------------------------

    pub async fn create_session(&self, row: &SessionRow) -> Result<()> {
        if !["account", "key"].contains(&row.kind.as_str()) {
            return Err(StoreError::Invalid { field: "kind", rule: "must be account or key".into() });
        }
        // Expired sessions go as new ones come.
        sqlx::query("DELETE FROM sessions WHERE expires_ms < $1").bind(row.created_ms).execute(&self.pool).await?;
        sqlx::query(
            "INSERT INTO sessions (id_hash, kind, subject, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&row.id_hash)
        .bind(&row.kind)
        .bind(&row.subject)
        .bind(row.created_ms)
        .bind(row.expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session, if it exists and has not expired at `now_ms`.
    pub async fn session(&self, id_hash: &str, now_ms: i64) -> Result<Option<SessionRow>> {
        let r = sqlx::query(
            "SELECT id_hash, kind, subject, created_ms, expires_ms FROM sessions WHERE id_hash = $1 AND expires_ms > $2",
        )
        .bind(id_hash)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| SessionRow {
            id_hash: r.get(0),
            kind: r.get(1),
            subject: r.get(2),
            created_ms: r.get(3),
            expires_ms: r.get(4),
        }))
    }

    /// Ends a session; whether it existed.
    pub async fn end_session(&self, id_hash: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sessions WHERE id_hash = $1").bind(id_hash).execute(&self.pool).await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- idempotent outcomes ----------------------------------------------------------------------

    /// Keeps an answer for retries with its key; the first kept stays (a second is ignored).
    pub async fn put_outcome(&self, o: &OutcomeRow) -> Result<()> {
        check_text("outcome.id", &o.id, 200)?;
        if o.body.len() > MAX_OUTCOME_BYTES {
            return Err(StoreError::Invalid {
                field: "outcome.body",
                rule: format!("at most {MAX_OUTCOME_BYTES} bytes, got {}", o.body.len()),
            });
        }
        sqlx::query(
            "INSERT INTO outcomes (id, status, content_type, body, usage, at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&o.id)
        .bind(o.status)
        .bind(&o.content_type)
        .bind(&o.body)
        .bind(&o.usage)
        .bind(o.at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn outcome(&self, id: &str) -> Result<Option<OutcomeRow>> {
        let r = sqlx::query("SELECT id, status, content_type, body, usage, at_ms FROM outcomes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.map(|r| OutcomeRow {
            id: r.get(0),
            status: r.get(1),
            content_type: r.get(2),
            body: r.get(3),
            usage: r.get(4),
            at_ms: r.get(5),
        }))
    }

    /// Drops answers kept since before `before_ms`.
    pub async fn prune_outcomes(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM outcomes WHERE at_ms < $1").bind(before_ms).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    /// Ends every session of an account or key; how many there were.
    pub async fn end_sessions_of(&self, kind: &str, subject: &str) -> Result<u64> {
        let r = sqlx::query("DELETE FROM sessions WHERE kind = $1 AND subject = $2")
            .bind(kind)
            .bind(subject)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // ---- shared rate windows --------------------------------------------------------------------

    /// Adds each delta to its tenant's window and returns the windows' totals (requests, tokens)
    /// in the same order: what every process together has admitted.
    pub async fn add_rate_usage(&self, deltas: &[RateDelta]) -> Result<Vec<(i64, i64)>> {
        // Rows are written in one order by every process (tenant, window), so two processes'
        // transactions cannot wait on each other's rows.
        let mut order: Vec<usize> = (0..deltas.len()).collect();
        order.sort_by(|a, b| {
            (&deltas[*a].tenant_id, deltas[*a].window_ms).cmp(&(&deltas[*b].tenant_id, deltas[*b].window_ms))
        });
        let mut out = vec![(0, 0); deltas.len()];
        let mut tx = self.pool.begin().await?;
        for i in order {
            let d = &deltas[i];
            let r = sqlx::query(
                "INSERT INTO rate_windows (tenant_id, window_ms, requests, tokens) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (tenant_id, window_ms) DO UPDATE SET requests = rate_windows.requests + excluded.requests, \
                 tokens = rate_windows.tokens + excluded.tokens RETURNING requests, tokens",
            )
            .bind(&d.tenant_id)
            .bind(d.window_ms)
            .bind(d.requests)
            .bind(d.tokens)
            .fetch_one(&mut *tx)
            .await?;
            out[i] = (r.get(0), r.get(1));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Drops windows that began before `before_ms`.
    pub async fn prune_rate_windows(&self, before_ms: i64) -> Result<u64> {
        let r =
            sqlx::query("DELETE FROM rate_windows WHERE window_ms < $1").bind(before_ms).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    // ---- policies -------------------------------------------------------------------------------

    /// Writes a policy if `expected_version` is its current version (0 for a new one): optimistic
    /// concurrency. Returns the new version.
    pub async fn put_policy(&self, name: &str, body: &str, expected_version: i64, at_ms: i64) -> Result<i64> {
        check_text("name", name, 64)?;
        let new = expected_version + 1;
        let r = if expected_version == 0 {
            sqlx::query(
                "INSERT INTO policies (name, version, body, updated_ms) VALUES ($1, 1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(body)
            .bind(at_ms)
            .execute(&self.pool)
            .await?
        } else {
            sqlx::query("UPDATE policies SET version = $2, body = $3, updated_ms = $4 WHERE name = $1 AND version = $5")
                .bind(name)
                .bind(new)
                .bind(body)
                .bind(at_ms)
                .bind(expected_version)
                .execute(&self.pool)
                .await?
        };
        if r.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("policy {name} at another version than {expected_version}")));
        }
        Ok(new)
    }

    pub async fn policy(&self, name: &str) -> Result<PolicyRow> {
        let r = sqlx::query("SELECT name, version, body, updated_ms FROM policies WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(policy_row).ok_or_else(|| StoreError::NotFound(format!("policy {name}")))
    }

    pub async fn policies(&self) -> Result<Vec<PolicyRow>> {
        let rows = sqlx::query("SELECT name, version, body, updated_ms FROM policies ORDER BY name LIMIT 1000")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(policy_row).collect())
    }

    // ---- plans, decisions, commands ------------------------------------------------------------

    pub async fn add_plan(&self, at_ms: i64, body: &str) -> Result<i64> {
        let r = sqlx::query("INSERT INTO plans (at_ms, body) VALUES ($1, $2) RETURNING id")
            .bind(at_ms)
            .bind(body)
            .fetch_one(&self.pool)
            .await?;
        Ok(r.get(0))
    }

    /// Plans, newest first.
    pub async fn plans(&self, page: &Page) -> Result<Vec<PlanRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, at_ms, body FROM plans WHERE id < $1 ORDER BY id DESC LIMIT {}",
            page.limit()?
        )))
        .bind(page.after.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| PlanRow { id: r.get(0), at_ms: r.get(1), body: r.get(2) }).collect())
    }

    /// Appends decisions (the audit trail of the dispatcher) in one transaction; returns their ids.
    pub async fn add_decisions(&self, rows: &[DecisionRow]) -> Result<Vec<i64>> {
        if rows.len() > MAX_BATCH {
            return Err(StoreError::Invalid { field: "decisions", rule: format!("at most {MAX_BATCH} per batch") });
        }
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(rows.len());
        for d in rows {
            let r = sqlx::query(
                "INSERT INTO decisions (at_ms, site_id, kind, reason, body) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(d.at_ms)
            .bind(&d.site_id)
            .bind(&d.kind)
            .bind(&d.reason)
            .bind(&d.body)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(r.get(0));
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Decisions, newest first, optionally of one site.
    pub async fn decisions(&self, site: Option<&str>, page: &Page) -> Result<Vec<DecisionRow>> {
        // One statement per filter combination (see `devices`).
        let after = page.after.unwrap_or(i64::MAX);
        let rows = match site {
            Some(site) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT id, at_ms, site_id, kind, reason, body FROM decisions WHERE id < $1 AND site_id = $2 \
                     ORDER BY id DESC LIMIT {}",
                    page.limit()?
                )))
                .bind(after)
                .bind(site)
                .fetch_all(&self.pool)
                .await?
            }
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT id, at_ms, site_id, kind, reason, body FROM decisions WHERE id < $1 ORDER BY id DESC LIMIT {}",
                page.limit()?
            )))
            .bind(after)
            .fetch_all(&self.pool)
            .await?,
        };
        Ok(rows
            .iter()
            .map(|r| DecisionRow {
                id: r.get(0),
                at_ms: r.get(1),
                site_id: r.get(2),
                kind: r.get(3),
                reason: r.get(4),
                body: r.get(5),
            })
            .collect())
    }

    /// Records commands sent (idempotent by id: a retry updates the attempt).
    pub async fn add_commands(&self, rows: &[CommandRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from(
                "INSERT INTO commands (id, device_idx, target, attempt, issued_ms, outcome, outcome_ms) VALUES ",
            );
            sql.push_str(&values(chunk.len(), 7));
            sql.push_str(" ON CONFLICT (id) DO UPDATE SET attempt = excluded.attempt, issued_ms = excluded.issued_ms");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for c in chunk {
                q = q
                    .bind(c.id)
                    .bind(c.device_idx)
                    .bind(&c.target)
                    .bind(c.attempt)
                    .bind(c.issued_ms)
                    .bind(None::<String>)
                    .bind(None::<i64>);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_command_outcome(&self, id: i64, outcome: &str, at_ms: i64) -> Result<()> {
        let r = sqlx::query("UPDATE commands SET outcome = $2, outcome_ms = $3 WHERE id = $1")
            .bind(id)
            .bind(outcome)
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("command {id}")));
        }
        Ok(())
    }

    /// Records answers: (command id, outcome, time). Answers to commands not recorded are skipped
    /// and counted in the result (an agent may answer a command twice; the first answer stays).
    pub async fn set_command_outcomes(&self, rows: &[(i64, String, i64)]) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut skipped = 0;
        for (id, outcome, at_ms) in rows {
            let r = sqlx::query("UPDATE commands SET outcome = $2, outcome_ms = $3 WHERE id = $1 AND outcome IS NULL")
                .bind(id)
                .bind(outcome)
                .bind(at_ms)
                .execute(&mut *tx)
                .await?;
            skipped += u64::from(r.rows_affected() == 0);
        }
        tx.commit().await?;
        Ok(skipped)
    }

    /// Records command batches before they are sent, in one transaction (all or none).
    pub async fn add_command_batches(&self, rows: &[CommandBatchRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO command_batches (epoch, site_id, issued_ms, first_id, last_id, commands, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(r.epoch)
            .bind(&r.site_id)
            .bind(r.issued_ms)
            .bind(r.first_id)
            .bind(r.last_id)
            .bind(r.commands)
            .bind(&r.body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A site's command batches issued at or after `from_ms`, oldest first, at most `limit`.
    pub async fn command_batches(&self, site_id: &str, from_ms: i64, limit: u32) -> Result<Vec<CommandBatchRow>> {
        let rows = sqlx::query(
            "SELECT seq, epoch, site_id, issued_ms, first_id, last_id, commands, body FROM command_batches \
             WHERE site_id = $1 AND issued_ms >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(site_id)
        .bind(from_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CommandBatchRow {
                seq: r.get(0),
                epoch: r.get(1),
                site_id: r.get(2),
                issued_ms: r.get(3),
                first_id: r.get(4),
                last_id: r.get(5),
                commands: r.get(6),
                body: r.get(7),
            })
            .collect())
    }

    /// The highest command id recorded (0 when none): a restarted engine continues after it.
    pub async fn max_command_id(&self) -> Result<i64> {
        let r = sqlx::query(
            "SELECT MAX(m) FROM (SELECT COALESCE(MAX(id), 0) AS m FROM commands \
             UNION ALL SELECT COALESCE(MAX(last_id), 0) AS m FROM command_batches) AS t",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(r.get(0))
    }

    /// Commands, newest first, optionally to one device.
    pub async fn commands(&self, device: Option<i64>, page: &Page) -> Result<Vec<CommandRow>> {
        // One statement per filter combination (see `devices`).
        const COLS: &str = "SELECT id, device_idx, target, attempt, issued_ms, outcome, outcome_ms FROM commands";
        let after = page.after.unwrap_or(i64::MAX);
        let rows = match device {
            Some(d) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{COLS} WHERE id < $1 AND device_idx = $2 ORDER BY id DESC LIMIT {}",
                    page.limit()?
                )))
                .bind(after)
                .bind(d)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{COLS} WHERE id < $1 ORDER BY id DESC LIMIT {}",
                    page.limit()?
                )))
                .bind(after)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| CommandRow {
                id: r.get(0),
                device_idx: r.get(1),
                target: r.get(2),
                attempt: r.get(3),
                issued_ms: r.get(4),
                outcome: r.get(5),
                outcome_ms: r.get(6),
            })
            .collect())
    }

    // ---- signals and telemetry -----------------------------------------------------------------

    /// Appends signal values (a repeated (kind, key, time) keeps the first value).
    pub async fn add_signals(&self, rows: &[SignalRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from("INSERT INTO signals (kind, key, at_ms, value) VALUES ");
            sql.push_str(&values(chunk.len(), 4));
            sql.push_str(" ON CONFLICT (kind, key, at_ms) DO NOTHING");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for s in chunk {
                if !s.value.is_finite() {
                    return Err(StoreError::Invalid { field: "value", rule: "must be a finite number".into() });
                }
                q = q.bind(&s.kind).bind(&s.key).bind(s.at_ms).bind(s.value);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A signal's values in [from, to), oldest first.
    pub async fn signals(&self, kind: &str, key: &str, from_ms: i64, to_ms: i64, limit: u32) -> Result<Vec<SignalRow>> {
        let limit = Page { after: None, limit: Some(limit) }.limit()?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT kind, key, at_ms, value FROM signals WHERE kind = $1 AND key = $2 AND at_ms >= $3 AND at_ms < $4 \
             ORDER BY at_ms LIMIT {}",
            limit
        )))
        .bind(kind)
        .bind(key)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| SignalRow { kind: r.get(0), key: r.get(1), at_ms: r.get(2), value: r.get(3) }).collect())
    }

    /// Writes replicas' capacity (a known id is replaced).
    pub async fn put_replicas(&self, rows: &[ReplicaRow]) -> Result<()> {
        for r in rows {
            if r.gpus < 1 || r.slots < 0 || r.kv_tokens < 0 || !(r.cap_w >= 0.0 && r.cap_w.is_finite()) {
                return Err(StoreError::Invalid {
                    field: "replicas",
                    rule: format!("replica {}: gpus >= 1, slots, kv_tokens and cap_w >= 0", r.id),
                });
            }
        }
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql =
                String::from("INSERT INTO replicas (id, site_id, gpus, slots, kv_tokens, cap_w, updated_ms) VALUES ");
            sql.push_str(&values(chunk.len(), 7));
            sql.push_str(
                " ON CONFLICT (id) DO UPDATE SET site_id = excluded.site_id, gpus = excluded.gpus, \
                 slots = excluded.slots, kv_tokens = excluded.kv_tokens, cap_w = excluded.cap_w, \
                 updated_ms = excluded.updated_ms",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.id)
                    .bind(&r.site_id)
                    .bind(r.gpus)
                    .bind(r.slots)
                    .bind(r.kv_tokens)
                    .bind(r.cap_w)
                    .bind(r.updated_ms);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every replica, by id.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        let rows =
            sqlx::query("SELECT id, site_id, gpus, slots, kv_tokens, cap_w, updated_ms FROM replicas ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                id: r.get(0),
                site_id: r.get(1),
                gpus: r.get(2),
                slots: r.get(3),
                kv_tokens: r.get(4),
                cap_w: r.get(5),
                updated_ms: r.get(6),
            })
            .collect())
    }

    /// Writes per-device minute rollups (a repeated minute replaces the row: rollups are recomputed
    /// whole).
    pub async fn put_device_minutes(&self, rows: &[DeviceMinuteRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from(
                "INSERT INTO telemetry_device_minute (device_idx, minute_ms, samples, power_w_avg, hashrate_ths_avg, \
                 temp_c_max, errors) VALUES ",
            );
            sql.push_str(&values(chunk.len(), 7));
            sql.push_str(
                " ON CONFLICT (device_idx, minute_ms) DO UPDATE SET samples = excluded.samples, \
                 power_w_avg = excluded.power_w_avg, hashrate_ths_avg = excluded.hashrate_ths_avg, \
                 temp_c_max = excluded.temp_c_max, errors = excluded.errors",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.device_idx)
                    .bind(r.minute_ms)
                    .bind(r.samples)
                    .bind(r.power_w_avg)
                    .bind(r.hashrate_ths_avg)
                    .bind(r.temp_c_max)
                    .bind(r.errors);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn device_minutes(&self, device: i64, from_ms: i64, to_ms: i64) -> Result<Vec<DeviceMinuteRow>> {
        let rows = sqlx::query(
            "SELECT device_idx, minute_ms, samples, power_w_avg, hashrate_ths_avg, temp_c_max, errors \
             FROM telemetry_device_minute WHERE device_idx = $1 AND minute_ms >= $2 AND minute_ms < $3 \
             ORDER BY minute_ms LIMIT 1000",
        )
        .bind(device)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| DeviceMinuteRow {
                device_idx: r.get(0),
                minute_ms: r.get(1),
                samples: r.get(2),
                power_w_avg: r.get(3),
                hashrate_ths_avg: r.get(4),
                temp_c_max: r.get(5),
                errors: r.get(6),
            })
            .collect())
    }

    pub async fn put_site_seconds(&self, rows: &[SiteSecondRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO telemetry_site_second (site_id, at_ms, power_w, mining_w, inference_w) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (site_id, at_ms) DO UPDATE SET power_w = excluded.power_w, \
                 mining_w = excluded.mining_w, inference_w = excluded.inference_w",
            )
            .bind(&r.site_id)
            .bind(r.at_ms)
            .bind(r.power_w)
            .bind(r.mining_w)
            .bind(r.inference_w)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn site_seconds(&self, site: &str, from_ms: i64, to_ms: i64) -> Result<Vec<SiteSecondRow>> {
        let rows = sqlx::query(
            "SELECT site_id, at_ms, power_w, mining_w, inference_w FROM telemetry_site_second \
             WHERE site_id = $1 AND at_ms >= $2 AND at_ms < $3 ORDER BY at_ms LIMIT 1000",
        )
        .bind(site)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SiteSecondRow {
                site_id: r.get(0),
                at_ms: r.get(1),
                power_w: r.get(2),
                mining_w: r.get(3),
                inference_w: r.get(4),
            })
            .collect())
    }

    /// Retention: deletes device minutes older than `device_before_ms` and site seconds older than
    /// `site_before_ms`. Returns rows deleted.
    pub async fn prune_telemetry(&self, device_before_ms: i64, site_before_ms: i64) -> Result<u64> {
        let a = sqlx::query("DELETE FROM telemetry_device_minute WHERE minute_ms < $1")
            .bind(device_before_ms)
            .execute(&self.pool)
            .await?;
        let b = sqlx::query("DELETE FROM telemetry_site_second WHERE at_ms < $1")
            .bind(site_before_ms)
            .execute(&self.pool)
            .await?;
        Ok(a.rows_affected() + b.rows_affected())
    }

    // ---- metering and billing -----------------------------------------------------------------

    /// Writes usage records in one transaction; a record whose id is already stored is left as it
    /// is (a retried or replayed write counts once). Returns how many were new.
    pub async fn put_usage(&self, rows: &[UsageRow]) -> Result<u64> {
        for r in rows {
            check_text("usage.id", &r.id, 200)?;
            if r.input_tokens < 0 || r.output_tokens < 0 || r.gpu_ms < 0 {
                return Err(StoreError::Invalid {
                    field: "usage",
                    rule: format!("usage {}: input_tokens, output_tokens and gpu_ms must be >= 0", r.id),
                });
            }
        }
        // Rows travel as one JSON array bound to one parameter and are unpacked by the database
        // (`jsonb_each` / `json_array_elements`): binding 14 parameters per row cost more than the
        // insert itself (`hcp bench metering`: 28,000 rows/s bound row by row, 46,000 through
        // `json_each`, 66,000 through `jsonb_each`, whose values need no re-parsing).
        let sql = match self.backend {
            Backend::Sqlite => {
                "INSERT INTO usage (id, tenant_id, key_id, kind, tier, model, site_id, input_tokens, output_tokens, \
                 gpu_ms, spot, status, tag, at_ms) \
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
                 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), \
                 json_extract(value, '$[6]'), json_extract(value, '$[7]'), json_extract(value, '$[8]'), \
                 json_extract(value, '$[9]'), json_extract(value, '$[10]'), json_extract(value, '$[11]'), \
                 json_extract(value, '$[12]'), json_extract(value, '$[13]') \
                 FROM jsonb_each($1) WHERE true ORDER BY key ON CONFLICT (id) DO NOTHING"
            }
            Backend::Postgres => {
                "INSERT INTO usage (id, tenant_id, key_id, kind, tier, model, site_id, input_tokens, output_tokens, \
                 gpu_ms, spot, status, tag, at_ms) \
                 SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::bigint, e->>5, e->>6, (e->>7)::bigint, \
                 (e->>8)::bigint, (e->>9)::bigint, (e->>10)::bigint, e->>11, e->>12, (e->>13)::bigint \
                 FROM json_array_elements($1::json) WITH ORDINALITY AS t(e, n) ORDER BY n ON CONFLICT (id) DO NOTHING"
            }
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let arr: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    &r.id,
                    &r.tenant_id,
                    &r.key_id,
                    &r.kind,
                    r.tier,
                    &r.model,
                    &r.site_id,
                    r.input_tokens,
                    r.output_tokens,
                    r.gpu_ms,
                    i64::from(r.spot),
                    &r.status,
                    &r.tag,
                    r.at_ms,
                )
            })
            .collect();
        let json = serde_json::to_string(&arr).expect("strings and integers serialise");
        // One statement is one transaction in both databases, so there is no explicit BEGIN: in
        // SQLite a statement inside an explicit transaction also keeps a statement journal (a
        // copy of every page it changes, for a partial rollback; `subjournalPageIfRequired` was
        // 3.6 % of `hcp up`'s CPU under the load test). `hcp bench metering`: 1.12-1.16x the
        // events per second without it.
        Ok(sqlx::query(sql).bind(json).execute(&self.pool).await?.rows_affected())
    }

    /// Usage records in write order, filtered; paged by `seq`.
    pub async fn usage(&self, f: &UsageFilter<'_>, page: &Page) -> Result<Vec<UsageRow>> {
        let mut sql = String::from(
            "SELECT seq, id, tenant_id, key_id, kind, tier, model, site_id, input_tokens, output_tokens, gpu_ms, \
             spot, status, tag, at_ms FROM usage WHERE seq > $1",
        );
        let mut n = 1;
        let mut clause = |sql: &mut String, col: &str| {
            n += 1;
            sql.push_str(&format!(" AND {col} ${n}"));
        };
        if f.tenant.is_some() {
            clause(&mut sql, "tenant_id =");
        }
        if f.tag.is_some() {
            clause(&mut sql, "tag =");
        }
        if f.site.is_some() {
            clause(&mut sql, "site_id =");
        }
        if f.from_ms.is_some() {
            clause(&mut sql, "at_ms >=");
        }
        if f.to_ms.is_some() {
            clause(&mut sql, "at_ms <");
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT {}", page.limit()?));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(page.after.unwrap_or(0));
        for v in [f.tenant, f.tag, f.site].into_iter().flatten() {
            q = q.bind(v);
        }
        for v in [f.from_ms, f.to_ms].into_iter().flatten() {
            q = q.bind(v);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(usage_row).collect()
    }

    /// One usage record by its id (idempotency key).
    pub async fn usage_by_id(&self, id: &str) -> Result<Option<UsageRow>> {
        let r = sqlx::query(
            "SELECT seq, id, tenant_id, key_id, kind, tier, model, site_id, input_tokens, output_tokens, gpu_ms, \
             spot, status, tag, at_ms FROM usage WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(usage_row).transpose()
    }

    /// A tenant's usage in `[from_ms, to_ms)`, summed by kind, tier, model and spot flag.
    pub async fn usage_sums(&self, tenant: &str, from_ms: i64, to_ms: i64) -> Result<Vec<UsageSum>> {
        let rows = sqlx::query(
            "SELECT kind, tier, model, spot, COUNT(*), CAST(SUM(input_tokens) AS BIGINT), \
             CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(gpu_ms) AS BIGINT) \
             FROM usage WHERE tenant_id = $1 AND at_ms >= $2 AND at_ms < $3 \
             GROUP BY kind, tier, model, spot ORDER BY kind, tier, model, spot",
        )
        .bind(tenant)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageSum {
                    kind: r.get::<String, _>(0).parse()?,
                    tier: r.get(1),
                    model: r.get(2),
                    spot: r.get::<i64, _>(3) != 0,
                    records: r.get(4),
                    input_tokens: sum_col(r, 5),
                    output_tokens: sum_col(r, 6),
                    gpu_ms: sum_col(r, 7),
                })
            })
            .collect()
    }

    /// A tenant's usage in `[from_ms, to_ms)` by UTC day, kind, tier and model, oldest day first
    /// (at most 10,000 rows).
    pub async fn usage_daily(&self, tenant: &str, from_ms: i64, to_ms: i64) -> Result<Vec<UsageDay>> {
        let rows = sqlx::query(
            "SELECT (at_ms / 86400000) * 86400000 AS d, kind, tier, model, COUNT(*), \
             CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(gpu_ms) AS BIGINT) \
             FROM usage WHERE tenant_id = $1 AND at_ms >= $2 AND at_ms < $3 \
             GROUP BY d, kind, tier, model ORDER BY d, kind, tier, model LIMIT 10000",
        )
        .bind(tenant)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UsageDay {
                day_ms: r.get(0),
                kind: r.get(1),
                tier: r.get(2),
                model: r.get(3),
                records: r.get(4),
                input_tokens: sum_col(r, 5),
                output_tokens: sum_col(r, 6),
                gpu_ms: sum_col(r, 7),
            })
            .collect())
    }

    /// Tenants with usage in `[from_ms, to_ms)`.
    pub async fn usage_tenants(&self, from_ms: i64, to_ms: i64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT tenant_id FROM usage WHERE at_ms >= $1 AND at_ms < $2 ORDER BY tenant_id LIMIT 100000",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Sets a tenant's price plan from `effective_ms` (replacing one that starts at the same time).
    pub async fn put_price_plan(&self, p: &PricePlanRow) -> Result<()> {
        self.tenant(&p.tenant_id).await?;
        sqlx::query(
            "INSERT INTO price_plans (tenant_id, effective_ms, body, updated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id, effective_ms) DO UPDATE SET body = excluded.body, updated_ms = excluded.updated_ms",
        )
        .bind(&p.tenant_id)
        .bind(p.effective_ms)
        .bind(&p.body)
        .bind(p.updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tenant's plan in force at `at_ms`, if it has one.
    pub async fn price_plan_at(&self, tenant: &str, at_ms: i64) -> Result<Option<PricePlanRow>> {
        let r = sqlx::query(
            "SELECT tenant_id, effective_ms, body, updated_ms FROM price_plans \
             WHERE tenant_id = $1 AND effective_ms <= $2 ORDER BY effective_ms DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(at_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|r| PricePlanRow {
            tenant_id: r.get(0),
            effective_ms: r.get(1),
            body: r.get(2),
            updated_ms: r.get(3),
        }))
    }

    /// Writes site P&L rows (a repeated interval replaces its row).
    pub async fn put_site_pnl(&self, rows: &[SitePnlRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from(
                "INSERT INTO site_pnl (site_id, at_ms, hours, mining_revenue, inference_revenue, energy_cost, \
                 grid_credits) VALUES ",
            );
            sql.push_str(&values(chunk.len(), 7));
            sql.push_str(
                " ON CONFLICT (site_id, at_ms) DO UPDATE SET hours = excluded.hours, \
                 mining_revenue = excluded.mining_revenue, inference_revenue = excluded.inference_revenue, \
                 energy_cost = excluded.energy_cost, grid_credits = excluded.grid_credits",
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(&r.site_id)
                    .bind(r.at_ms)
                    .bind(r.hours)
                    .bind(r.mining_revenue)
                    .bind(r.inference_revenue)
                    .bind(r.energy_cost)
                    .bind(r.grid_credits);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Site P&L rows in `[from_ms, to_ms)`, by site then time (at most [`MAX_PAGE`] x 100).
    pub async fn site_pnl(&self, site: Option<&str>, from_ms: i64, to_ms: i64) -> Result<Vec<SitePnlRow>> {
        let mut sql = String::from(
            "SELECT site_id, at_ms, hours, mining_revenue, inference_revenue, energy_cost, grid_credits FROM site_pnl \
             WHERE at_ms >= $1 AND at_ms < $2",
        );
        if site.is_some() {
            sql.push_str(" AND site_id = $3");
        }
        sql.push_str(" ORDER BY site_id, at_ms LIMIT 100000");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(from_ms).bind(to_ms);
        if let Some(s) = site {
            q = q.bind(s);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| SitePnlRow {
                site_id: r.get(0),
                at_ms: r.get(1),
                hours: r.get(2),
                mining_revenue: r.get(3),
                inference_revenue: r.get(4),
                energy_cost: r.get(5),
                grid_credits: r.get(6),
            })
            .collect())
    }

    // ---- workloads and audit ------------------------------------------------------------------

    pub async fn put_workload(&self, w: &WorkloadRow) -> Result<()> {
        check_text("id", &w.id, 64)?;
        self.tenant(&w.tenant_id).await?;
        sqlx::query(
            "INSERT INTO workloads (id, tenant_id, kind, state, body, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
             body = excluded.body, updated_ms = excluded.updated_ms",
        )
        .bind(&w.id)
        .bind(&w.tenant_id)
        .bind(&w.kind)
        .bind(w.state.as_str())
        .bind(&w.body)
        .bind(w.created_ms)
        .bind(w.updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes a workload's new state only if its row is still as the writer last wrote it
    /// (`updated_ms == expect_updated_ms`): the writer's lease on the workload. False when another
    /// process wrote it since (then nothing changes). `w.updated_ms` must differ from the expected.
    pub async fn update_workload_if(&self, w: &WorkloadRow, expect_updated_ms: i64) -> Result<bool> {
        if w.updated_ms == expect_updated_ms {
            return Err(StoreError::Invalid {
                field: "updated_ms",
                rule: "must change with every write (it is the lease)".into(),
            });
        }
        let r = sqlx::query(
            "UPDATE workloads SET state = $1, body = $2, updated_ms = $3 WHERE id = $4 AND updated_ms = $5",
        )
        .bind(w.state.as_str())
        .bind(&w.body)
        .bind(w.updated_ms)
        .bind(&w.id)
        .bind(expect_updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Workloads of `kind` not finished (deferred, queued or running) whose row was last written before
    /// `before_ms`: ones whose process stopped renewing them. Oldest write first.
    pub async fn stale_workloads(&self, kind: &str, before_ms: i64, limit: u32) -> Result<Vec<WorkloadRow>> {
        let limit = Page { after: None, limit: Some(limit) }.limit()?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, tenant_id, kind, state, body, created_ms, updated_ms FROM workloads \
             WHERE kind = $1 AND state IN ('deferred', 'queued', 'running') AND updated_ms < $2 ORDER BY updated_ms, id LIMIT {limit}"
        )))
        .bind(kind)
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(workload_row).collect()
    }

    pub async fn workload(&self, id: &str) -> Result<WorkloadRow> {
        let r =
            sqlx::query("SELECT id, tenant_id, kind, state, body, created_ms, updated_ms FROM workloads WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        r.as_ref().map(workload_row).transpose()?.ok_or_else(|| StoreError::NotFound(format!("workload {id}")))
    }

    pub async fn workloads_of(&self, tenant: &str, page: &Page) -> Result<Vec<WorkloadRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, tenant_id, kind, state, body, created_ms, updated_ms FROM workloads \
             WHERE tenant_id = $1 AND created_ms > $2 ORDER BY created_ms, id LIMIT {}",
            page.limit()?
        )))
        .bind(tenant)
        .bind(page.after.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(workload_row).collect()
    }

    /// Appends an audit record; returns its id.
    pub async fn audit(
        &self,
        at_ms: i64,
        actor: &str,
        action: &str,
        target: &str,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<i64> {
        let r = sqlx::query(
            "INSERT INTO audit (at_ms, actor, action, target, before_json, after_json) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(at_ms)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(before)
        .bind(after)
        .fetch_one(&self.pool)
        .await?;
        Ok(r.get(0))
    }

    /// Audit records, newest first.
    pub async fn audits(&self, page: &Page) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, at_ms, actor, action, target, before_json, after_json FROM audit WHERE id < $1 \
             ORDER BY id DESC LIMIT {}",
            page.limit()?
        )))
        .bind(page.after.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                at_ms: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                before_json: r.get(5),
                after_json: r.get(6),
            })
            .collect())
    }
}

/// `($1, ..., $cols), ($cols+1, ...), ...` for `rows` rows.
fn values(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", r * cols + c + 1));
        }
        out.push(')');
    }
    out
}

fn policy_row(r: &AnyRow) -> PolicyRow {
    PolicyRow { name: r.get(0), version: r.get(1), body: r.get(2), updated_ms: r.get(3) }
}

fn device_row(r: &AnyRow) -> DeviceRow {
    DeviceRow {
        idx: r.get(0),
        site_id: r.get(1),
        feeder_id: r.get(2),
        rack_idx: r.get(3),
        model: r.get(4),
        kind: r.get(5),
        maintenance: r.get::<i64, _>(6) != 0,
        status: r.get(7),
        status_reason: r.get(8),
        status_ms: r.get(9),
        last_telemetry_ms: r.get(10),
    }
}

fn tenant_row(r: &AnyRow) -> TenantRow {
    TenantRow {
        id: r.get(0),
        name: r.get(1),
        weight: r.get(2),
        guaranteed_gpus: r.get(3),
        borrow_limit_gpus: r.get(4),
        created_ms: r.get(5),
        requests_per_min: r.get(6),
        tokens_per_min: r.get(7),
    }
}

fn key_row(r: &AnyRow) -> ApiKeyRow {
    ApiKeyRow {
        id: r.get(0),
        tenant_id: r.get(1),
        secret_hash: r.get(2),
        default_band: r.get(3),
        rate_per_s: r.get(4),
        created_ms: r.get(5),
        revoked_ms: r.get(6),
    }
}

fn usage_row(r: &AnyRow) -> Result<UsageRow> {
    Ok(UsageRow {
        seq: r.get(0),
        id: r.get(1),
        tenant_id: r.get(2),
        key_id: r.get(3),
        kind: r.get::<String, _>(4).parse()?,
        tier: r.get(5),
        model: r.get(6),
        site_id: r.get(7),
        input_tokens: r.get(8),
        output_tokens: r.get(9),
        gpu_ms: r.get(10),
        spot: r.get::<i64, _>(11) != 0,
        status: r.get::<String, _>(12).parse()?,
        tag: r.get(13),
        at_ms: r.get(14),
    })
}

/// A SUM column (cast to BIGINT: PostgreSQL sums BIGINT as NUMERIC); NULL over no rows.
fn sum_col(r: &AnyRow, i: usize) -> i64 {
    r.get::<Option<i64>, _>(i).unwrap_or(0)
}

fn workload_row(r: &AnyRow) -> Result<WorkloadRow> {
    Ok(WorkloadRow {
        id: r.get(0),
        tenant_id: r.get(1),
        kind: r.get(2),
        state: r.get::<String, _>(3).parse()?,
        body: r.get(4),
        created_ms: r.get(5),
        updated_ms: r.get(6),
    })
}
