//! The admin web page, embedded from `web/index.html`.

use axum::response::Html;

const INDEX: &str = include_str!("../../web/index.html");

pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX)
}
