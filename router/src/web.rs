//! Static web files, embedded in the binary (`include_str!`), so any router serves
//! them without a file system or a build step:
//!
//! * `GET /client/gs-client.js`, `GET /client/gs-client.d.ts`: the browser client
//!   module and its TypeScript declarations (`web/`);
//! * `GET /play/` (`index.html`), `/play/play.css`, `/play/play.js`: the play page
//!   (`web/play/`), which uses only the client module and the public REST API;
//!   `GET /play` redirects to `/play/`;
//! * `GET /client/routers`: `{"routers": ["http://…", …]}`, the base URLs of the
//!   routers alive in the cluster view (this one first), so a client can resume
//!   through another router when this one goes.
//!
//! Caching: every file answers with a strong `ETag` (a hash of its contents) and
//! `Cache-Control: no-cache`, so browsers revalidate (`If-None-Match` → 304) and a new
//! router version is picked up at once. No token is needed: these are public files.

use crate::RouterCtx;
use gs_shared::membership::MemberKind;
use serde_json::json;
use std::sync::{Arc, OnceLock};
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

/// One embedded file.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Everything served, by request path.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "client/gs-client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/gs-client.js"),
    },
    Asset {
        path: "client/gs-client.d.ts",
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("../../web/gs-client.d.ts"),
    },
    Asset {
        path: "play/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../web/play/index.html"),
    },
    Asset {
        path: "play/play.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../web/play/play.css"),
    },
    Asset {
        path: "play/play.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/play/play.js"),
    },
];

/// The play page may talk to any router (other origins: other ports or hosts), and
/// loads nothing from anywhere else.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self' http: https: ws: wss:; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The strong ETag of each asset (FNV-1a 64 of its bytes), computed once.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in a.body.bytes() {
                    h ^= u64::from(b);
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                format!("\"{h:016x}\"")
            })
            .collect()
    })
}

/// The response for the asset at `path` (without the leading `/`), honouring
/// `If-None-Match`; `None` if there is no such asset.
pub fn asset_reply(path: &str, if_none_match: Option<&str>) -> Option<Response> {
    let i = ASSETS.iter().position(|a| a.path == path)?;
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = if_none_match.is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag || t == "*")
    });
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static(asset.content_type));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert("etag", v);
    }
    if asset.content_type.starts_with("text/html") {
        h.insert(
            "content-security-policy",
            HeaderValue::from_static(PAGE_CSP),
        );
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    }
    Some(r)
}

/// The static routes (above).
pub fn routes(
    ctx: Arc<RouterCtx>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    // warp ignores a trailing slash when matching, so `/play` and `/play/` both land
    // here; relative links in the page need the slash, so `/play` is redirected.
    let play_index = warp::path("play")
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::path::full())
        .and(warp::header::optional::<String>("if-none-match"))
        .and_then(
            |full: warp::path::FullPath, inm: Option<String>| async move {
                if !full.as_str().ends_with('/') {
                    let mut r = StatusCode::MOVED_PERMANENTLY.into_response();
                    r.headers_mut()
                        .insert("location", HeaderValue::from_static("/play/"));
                    return Ok(r);
                }
                asset_reply("play/", inm.as_deref()).ok_or_else(warp::reject::not_found)
            },
        );
    let client_files = warp::path!("client" / String)
        .and(warp::get())
        .and(warp::header::optional::<String>("if-none-match"))
        .and_then(|file: String, inm: Option<String>| async move {
            asset_reply(&format!("client/{file}"), inm.as_deref())
                .ok_or_else(warp::reject::not_found)
        });
    let play_files = warp::path!("play" / String)
        .and(warp::get())
        .and(warp::header::optional::<String>("if-none-match"))
        .and_then(|file: String, inm: Option<String>| async move {
            asset_reply(&format!("play/{file}"), inm.as_deref()).ok_or_else(warp::reject::not_found)
        });
    let routers = warp::path!("client" / "routers")
        .and(warp::get())
        .map(move || {
            let mut urls = vec![ctx.http_base.clone()];
            for m in ctx.cluster.members() {
                if m.kind == MemberKind::Router {
                    if let Some(u) = m.http {
                        if !urls.contains(&u) {
                            urls.push(u);
                        }
                    }
                }
            }
            let mut r = crate::api::json_reply(StatusCode::OK, &json!({ "routers": urls }));
            r.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
            r
        });
    play_index
        .or(routers)
        .unify()
        .or(client_files)
        .unify()
        .or(play_files)
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_type_and_revalidates() {
        for a in ASSETS {
            let r = asset_reply(a.path, None).expect(a.path);
            assert_eq!(r.status(), StatusCode::OK, "{}", a.path);
            assert_eq!(r.headers()["content-type"], a.content_type);
            assert_eq!(r.headers()["cache-control"], "no-cache");
            let etag = r.headers()["etag"].to_str().unwrap().to_string();
            let again = asset_reply(a.path, Some(&etag)).unwrap();
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{}", a.path);
            let other = asset_reply(a.path, Some("\"0\"")).unwrap();
            assert_eq!(other.status(), StatusCode::OK);
        }
        assert!(asset_reply("play/nope.js", None).is_none());
        assert!(asset_reply("client/../play/", None).is_none());
        let page = asset_reply("play/", None).unwrap();
        assert!(page.headers().contains_key("content-security-policy"));
    }

    #[test]
    fn the_page_loads_only_embedded_files() {
        let page = ASSETS.iter().find(|a| a.path == "play/").unwrap().body;
        for needed in ["play.css", "play.js"] {
            assert!(page.contains(needed), "index.html references {needed}");
        }
        let script = ASSETS
            .iter()
            .find(|a| a.path == "play/play.js")
            .unwrap()
            .body;
        assert!(script.contains("/client/gs-client.js"));
    }
}
