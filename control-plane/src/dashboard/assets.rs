//! The page's files, compiled into the binary so the dashboard works with
//! no internet and no files next to the binary.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::{Body, full};

/// `(name, content type, bytes)` of every file under `assets/`.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("assets/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/app.css"),
    ),
];

/// The content security policy: everything from this origin only, no
/// inline script or style, never framed.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// Adds the security headers every dashboard response carries.
pub(super) fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves `path` (not under `/api/`): a page file, a redirect to `/`, or 404.
pub(super) fn serve(method: &Method, path: &str) -> Response<Body> {
    let name = match path {
        "/" | "/index.html" => Some("index.html"),
        "/dashboard" | "/dashboard/" | "/ui" | "/ui/" => {
            let mut r = plain(StatusCode::FOUND, "see /\n");
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/"));
            return r;
        }
        p => p.strip_prefix("/assets/"),
    };
    let Some(&(_, content_type, bytes)) =
        name.and_then(|n| FILES.iter().find(|(file, _, _)| *file == n))
    else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !matches!(*method, Method::GET | Method::HEAD) {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(full(bytes));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_served_with_their_type_and_unknown_paths_are_404() {
        let r = serve(&Method::GET, "/");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
        let r = serve(&Method::GET, "/assets/app.js");
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .is_ok_and(|t| t.starts_with("text/javascript"))
        );
        for p in ["/assets/nope.js", "/assets/../Cargo.toml", "/x", "/assets/"] {
            assert_eq!(
                serve(&Method::GET, p).status(),
                StatusCode::NOT_FOUND,
                "{p}"
            );
        }
        assert_eq!(
            serve(&Method::POST, "/").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let r = serve(&Method::GET, "/ui");
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[header::LOCATION], "/");
    }
}
