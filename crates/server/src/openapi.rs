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

/// The answers every operation can give by its shape, added where its annotation does not name
/// them: an authenticated one 401, 403, 429 (its rate, or too many failed tokens) and 503 (token
/// checks all busy); one with a body 413, 415 and 422; one with parameters 422, and 404 with a
/// path parameter. What the server does is what the document says (schemathesis checks it).
struct Standard;

impl Modify for Standard {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{Operation, ParameterIn};
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |why: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(why)
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                    )
                    .build(),
            )
        };
        let add = |op: &mut Operation| {
            let mut codes: Vec<(&str, &str)> = vec![];
            if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                codes.extend([
                    ("401", "Missing or wrong credentials"),
                    ("403", "Role or tenant not allowed"),
                    ("429", "Over the caller's rate, or too many invalid tokens from its address (Retry-After)"),
                    ("503", "Token verifications all busy (Retry-After)"),
                ]);
            }
            if op.request_body.is_some() {
                codes.extend([
                    ("413", "The body is larger than the limit"),
                    ("415", "Content-Type must be application/json"),
                    ("422", "Invalid input, the field named"),
                ]);
            }
            let params: Vec<(ParameterIn, String)> = op
                .parameters
                .iter()
                .flatten()
                .filter_map(|p| match p {
                    RefOr::T(p) => Some((p.parameter_in.clone(), p.name.clone())),
                    RefOr::Ref(_) => None,
                })
                .collect();
            if !params.is_empty() {
                codes.push(("422", "Invalid input, the field named"));
            }
            if params.iter().any(|(at, name)| matches!(at, ParameterIn::Path) || name == "tenant") {
                codes.push(("404", "Not found (or a tenant the caller may not see)"));
            }
            for (code, why) in codes {
                op.responses.responses.entry(code.to_string()).or_insert_with(|| error(why));
            }
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                add(op);
            }
        }
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
    components(schemas(crate::live::SignalsNow, hcp_store::SignalRow, dashboard::BacktestBody, hcp_store::UsageDay, billing::UsagePage, billing::JobBody, hcp_store::UsageRow, ErrorBody, ErrorDetail, SitesPage, DevicesPage, DecisionsPage, SignalsPage, SitePowerPage, DeviceMinutesPage, CommandsPage, TenantsPage, AuditPage)),
    modifiers(&Bearer, &Standard),
)]
pub struct ApiDoc;

/// `/openapi.json` and `/docs`.
pub fn docs() -> Router<Arc<App>> {
    let ui: Router<Arc<App>> =
        utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()).into();
    ui
}
