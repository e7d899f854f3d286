//! The admin listener: `GET /healthz`, `GET /metrics` (Prometheus text format) and
//! `POST /reload`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::gateway::Gateway;
use crate::reload::ReloadHandle;

/// Serves admin requests until the task is dropped. Without a reload handle (the gateway
/// was not started from a file), `POST /reload` answers 404.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, reload: Option<ReloadHandle>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (gateway, reload) = (gateway.clone(), reload.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (gateway, reload) = (gateway.clone(), reload.clone());
                async move {
                    let response = respond(&gateway, reload.as_ref(), &request).await;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    gateway: &Gateway,
    reload: Option<&ReloadHandle>,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/reload") => reloaded(reload, gateway).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            gateway.metrics().render(),
        ),
        (_, path) if ["/reload", "/healthz", "/metrics"].contains(&path) => {
            let allowed = if path == "/reload" { "POST" } else { "GET" };
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("use {allowed}\n"),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static(allowed));
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    }
}

/// Reloads and answers with the outcome: the new generation, or every problem found.
async fn reloaded(reload: Option<&ReloadHandle>, gateway: &Gateway) -> Response<Full<Bytes>> {
    let Some(reload) = reload else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        );
    };
    let (status, body) = match reload.reload().await {
        Ok(generation) => (
            StatusCode::OK,
            serde_json::json!({ "result": "success", "generation": generation }),
        ),
        Err(err) => {
            let generation = gateway.snapshot().generation;
            let body = serde_json::json!({ "result": "failure", "generation": generation, "errors": err.problems });
            (StatusCode::UNPROCESSABLE_ENTITY, body)
        }
    };
    text(status, "application/json", format!("{body}\n"))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
