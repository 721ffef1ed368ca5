//! The operator dashboard and the customer portal: one page of HTML, one script and one style
//! sheet, written by hand and compiled into the binary (`ui/`), served on the platform's port.
//! The page reads the same REST API as any script, authenticated by a server-side session that
//! `POST /ui/login` opens after checking the user's token (the HttpOnly cookie carries only the
//! session's secret) and `POST /ui/logout` ends; a change it makes carries the CSRF header.
//! No build step, no Node at run time, nothing fetched from another origin (the Content Security
//! Policy allows only this origin).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::App;
use crate::auth::Principal;
use crate::error::ApiResult;
use crate::routes::{Body, Peer, SESSION_COOKIE};

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// How long a dashboard session lasts (the cookie's Max-Age).
pub const SESSION_S: u64 = 12 * 3_600;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(root))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
}

/// `/`: to the dashboard, with a body that says where things are (for curl).
async fn root() -> Response {
    let body = "HCP: the dashboard is at /ui/, the REST API at /api/v1 (browse it at /docs, OpenAPI at \
                /openapi.json), the OpenAI-compatible gateway at /v1, health at /healthz, metrics at /metrics.\n";
    let mut r = (axum::http::StatusCode::SEE_OTHER, body).into_response();
    r.headers_mut().insert(axum::http::header::LOCATION, axum::http::HeaderValue::from_static("/ui/"));
    r
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    /// An operator account's token (`hcpa_...`) or a tenant API key (`hcpk_...`).
    token: String,
}

/// Checks the token as any API call would, then opens a session the server keeps: the cookie
/// carries the session's secret, not the token. `Secure` when the request came over TLS (a proxy
/// that terminates it says so in `X-Forwarded-Proto`).
async fn login(
    State(app): State<Arc<App>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Body(b): Body<LoginBody>,
) -> ApiResult<Response> {
    let token = b.token.trim();
    // Tokens are ASCII letters, digits, `_` and `-` (account names may hold `-`); anything else is
    // named here (a header would not carry it, and the answer would say the header is missing).
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(crate::error::ApiError::invalid("token", "ASCII letters, digits, _ and - only"));
    }
    let mut h = HeaderMap::new();
    let bearer =
        HeaderValue::from_str(&format!("Bearer {token}")).expect("checked above: ASCII letters, digits, _ and -");
    h.insert(header::AUTHORIZATION, bearer);
    let p = crate::routes::authenticate(&app, &h, peer, true).await?;
    let (kind, subject) = match &p {
        Principal::Account { name, .. } => ("account", name.clone()),
        Principal::Tenant { key, .. } => ("key", key.clone()),
    };
    let session = format!("hcps_{}", crate::auth::secret());
    let now = crate::wall_ms();
    app.store
        .create_session(&hcp_store::SessionRow {
            id_hash: crate::routes::session_hash(&session),
            kind: kind.into(),
            subject,
            created_ms: now,
            expires_ms: now + SESSION_S as i64 * 1_000,
        })
        .await?;
    let secure = if over_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}{secure}");
    let cookie = HeaderValue::from_str(&cookie).map_err(crate::error::ApiError::internal)?;
    Ok((StatusCode::OK, [(header::SET_COOKIE, cookie)], axum::Json(who(&p))).into_response())
}

/// Whether the client reached the platform over TLS: the platform serves plain HTTP, so TLS is
/// a proxy's, which says so in `X-Forwarded-Proto` (or the standard `Forwarded: proto=https`).
fn over_tls(headers: &HeaderMap) -> bool {
    let says = |name: &str, f: &dyn Fn(&str) -> bool| headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(f);
    says("x-forwarded-proto", &|v| v.trim().eq_ignore_ascii_case("https"))
        || says("forwarded", &|v| v.to_ascii_lowercase().split([';', ',']).any(|p| p.trim() == "proto=https"))
}

/// Who the session cookie (or bearer token) is, or `logged_in: false`: the page asks this at
/// start, so that not being logged in is an answer rather than an error.
async fn session(State(app): State<Arc<App>>, Peer(peer): Peer, headers: HeaderMap) -> axum::Json<serde_json::Value> {
    if crate::routes::token_of(&headers).is_none() {
        return axum::Json(serde_json::json!({ "logged_in": false }));
    }
    axum::Json(match crate::routes::authenticate(&app, &headers, peer, true).await {
        Ok(p) => {
            let mut v = who(&p);
            v["logged_in"] = true.into();
            v
        }
        Err(e) => serde_json::json!({ "logged_in": false, "reason": e.message }),
    })
}

/// What the page shows of the principal (as `GET /api/v1/me`).
pub(crate) fn who(p: &Principal) -> serde_json::Value {
    match p {
        Principal::Account { name, role } => serde_json::json!({ "account": name, "role": role.as_str() }),
        Principal::Tenant { tenant, key, band, rate_per_s } => {
            serde_json::json!({ "tenant": tenant, "key": key, "default_band": band, "rate_per_s": rate_per_s })
        }
    }
}

/// Ends the session on the server (every API process forgets it: the store's row is deleted and
/// a notice tells the others' caches) and clears the cookie.
async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some((value, true)) = crate::routes::token_of(&headers) {
        let hash = crate::routes::session_hash(value);
        app.store.end_session(&hash).await?;
        app.gate.forget(&crate::routes::session_cache_key(&hash));
        if let Err(e) = app.bus.publish(SESSION_ENDED, hash.as_bytes()).await {
            tracing::warn!(error = %e, "other API processes may serve the ended session until their cache expires");
        }
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

/// The notice that a session ended (payload: its hash).
pub const SESSION_ENDED: &str = "hcp.session.ended";

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_only_its_own_script_and_style() {
        assert!(super::INDEX.contains(r#"src="/ui/app.js""#));
        assert!(super::INDEX.contains(r#"href="/ui/app.css""#));
        assert!(!super::INDEX.contains("<script>"), "no inline script: the CSP forbids it");
        assert!(!super::INDEX.contains("http://") && !super::INDEX.contains("https://"), "nothing from elsewhere");
    }
}
