//! The web console at `/ui` (README "Web console"): four static files (`index.html`, `app.css`,
//! the module `app.js` and the SSE reader it imports, `sse.js`) compiled into the binary, served
//! with a strict Content-Security-Policy. They hold no data and are open to anyone; what
//! the page shows it fetches from `/v1/*` with the bearer token the user typed (kept in the
//! tab's `sessionStorage`, sent as `Authorization`, never a cookie, so no request can be forged
//! cross-site). To change the console, edit `assets/` and rebuild: there is no front-end build.

use std::sync::LazyLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::AppState;

/// Scripts and styles from this origin only, no inline script or style, no framing, requests
/// only back to this api. `img-src data:` is unused today; nothing else is allowed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// Strong ETag from the content's hash: a browser revalidates (`Cache-Control: no-cache`)
    /// and gets a 304 until a new binary ships different bytes.
    etag: HeaderValue,
}

fn asset(body: &'static [u8], content_type: &'static str) -> Asset {
    let hash = hex::encode(&Sha256::digest(body)[..12]);
    Asset {
        body,
        content_type,
        etag: HeaderValue::from_str(&format!("\"{hash}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\"")),
    }
}

static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        include_bytes!("assets/index.html"),
        "text/html; charset=utf-8",
    )
});
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        include_bytes!("assets/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static SSE: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        include_bytes!("assets/sse.js"),
        "text/javascript; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| asset(include_bytes!("assets/app.css"), "text/css; charset=utf-8"));

fn serve(a: &Asset, req: &HeaderMap) -> Response {
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == a.etag.as_bytes());
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        a.body.into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::ETAG, a.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn index(h: HeaderMap) -> Response {
    serve(&INDEX, &h)
}

async fn script(h: HeaderMap) -> Response {
    serve(&SCRIPT, &h)
}

async fn sse(h: HeaderMap) -> Response {
    serve(&SSE, &h)
}

async fn style(h: HeaderMap) -> Response {
    serve(&STYLE, &h)
}

/// `/ui`, `/ui/`, `/ui/app.js`, `/ui/sse.js`, `/ui/app.css`; the pages are `#/...` fragments of `/ui`, so
/// no other path is needed. `/` leads to the console too.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/sse.js", get(sse))
        .route("/ui/app.css", get(style))
}
