//! The OpenAPI 3 document, generated from the route annotations (`#[utoipa::path]` in
//! `routes.rs`), served at `/openapi.json`, with Swagger UI (served from the binary) at `/docs`.

use std::sync::Arc;

use axum::Router;
use hcp_store::{
    AuditRow, CommandRow, DecisionRow, DeviceMinuteRow, DeviceRow, SignalRow, SiteRow, SiteSecondRow, TenantRow,
};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::App;
use crate::{billing, dashboard, graphql, routes};

/// Every error: a stable code, a message, and the offending field where there is one.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// unauthorized, forbidden, invalid, not_found, conflict, rate_limited, too_large, gone, internal.
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SitesPage {
    pub items: Vec<SiteRow>,
}

#[derive(Serialize, ToSchema)]
pub struct DevicesPage {
    pub items: Vec<DeviceRow>,
    /// Pass as `after` for the next page; null on the last.
    pub next_after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct DecisionsPage {
    pub items: Vec<DecisionRow>,
    pub next_after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct SignalsPage {
    pub items: Vec<SignalRow>,
}

#[derive(Serialize, ToSchema)]
pub struct SitePowerPage {
    pub items: Vec<SiteSecondRow>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceMinutesPage {
    pub items: Vec<DeviceMinuteRow>,
}

#[derive(Serialize, ToSchema)]
pub struct CommandsPage {
    pub items: Vec<CommandRow>,
    pub next_after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct TenantsPage {
    pub items: Vec<TenantRow>,
    pub next_after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditRow>,
    pub next_after: Option<i64>,
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("hcpa_<account>_<secret> (operators) or hcpk_<key>_<secret> (tenants)"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "HCP, the Hybrid Compute Platform", description = "Fleet, plans, decisions, signals, policies, tenants and keys. Every list is paged; every change is audited."),
    paths(
        routes::healthz, routes::readyz, routes::metrics_text, routes::me, routes::sites, routes::devices,
        routes::device, routes::device_telemetry, routes::commands, routes::maintenance, routes::plans, routes::decisions, routes::router_state, routes::signals, routes::put_manual_signal,
        routes::site_power, routes::policies, routes::policy, routes::put_policy, routes::tenants,
        routes::create_tenant, routes::tenant, routes::keys, routes::create_key, routes::revoke_key,
        routes::audit, routes::accounts, routes::create_account, routes::events,
        billing::usage, billing::price_plan, billing::put_price_plan, billing::invoice, billing::invoices, billing::pnl,
        billing::submit_job, billing::jobs, billing::job, billing::cancel_job,
        dashboard::fleet, dashboard::economics, dashboard::alerts, dashboard::workloads, dashboard::usage_daily,
        dashboard::backtest_fleets, dashboard::run_backtest, graphql::get_query, graphql::post_query,
    ),
    components(schemas(dashboard::BacktestBody, hcp_store::UsageDay, billing::UsagePage, billing::JobBody, hcp_store::UsageRow, ErrorBody, ErrorDetail, SitesPage, DevicesPage, DecisionsPage, SignalsPage, SitePowerPage, DeviceMinutesPage, CommandsPage, TenantsPage, AuditPage)),
    modifiers(&Bearer),
)]
pub struct ApiDoc;

/// `/openapi.json` and `/docs`.
pub fn docs() -> Router<Arc<App>> {
    let ui: Router<Arc<App>> =
        utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()).into();
    ui
}
