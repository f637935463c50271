//! The HTTP side of the endpoint: one thread per agent with its own current-thread tokio
//! runtime, serving HTTP/1.1 with hyper (no keep-alive: one request per connection, each
//! under [`CONNECTION_LIMIT`], at most [`MAX_CONNECTIONS`] at once).
//!
//! - `GET /metrics`: Prometheus text format 0.0.4, or OpenMetrics when the `Accept` header
//!   asks for `application/openmetrics-text` (as the Prometheus server does);
//! - `GET /health`: 200 `{"healthy":true,"role":"hot"}` when [`health_verdict`] says so, 503
//!   with the role and the reason otherwise, 503 `agent not answering` when the main loop
//!   does not answer within [`STATUS_WAIT`];
//! - `GET /status`: the status as `artemis-sync status --json` prints it.
//!
//! Every request asks the agent's main loop for its status through the control socket's
//! channel. A port that cannot be bound does not stop the agent: [`start`] logs it, shows it
//! in `status`, and tries again every [`BIND_RETRY`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{prometheus_text, text};
use serde_json::json;

use super::{health_verdict, role_name, Metrics};
use crate::daemon::control::Incoming;
use crate::daemon::protocol::{AgentStatus, Reply, Request};

/// How long a request waits for the main loop's status.
pub const STATUS_WAIT: Duration = Duration::from_secs(2);
/// How long one connection may take, reading the request included.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// How soon a failed bind is tried again.
pub const BIND_RETRY: Duration = Duration::from_secs(3);
/// OpenMetrics' content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";

/// `/health`'s body.
#[derive(Debug, serde::Serialize)]
struct Health {
    healthy: bool,
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// What the handlers need: the way to the main loop and the event metrics.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The control channel of the agent's main loop.
    pub requests: Sender<Incoming>,
    /// The event metrics.
    pub metrics: Arc<Metrics>,
}

/// The running endpoint's thread, as the agent keeps it.
#[derive(Debug, Clone, Default)]
pub struct EndpointState {
    /// Why the configured address could not be bound (retrying), for `status`.
    pub bind_error: Arc<Mutex<Option<String>>>,
}

impl EndpointState {
    /// The bind error to show in `status`, if any.
    pub fn error(&self) -> Option<String> {
        self.bind_error.lock().expect("bind error lock").clone()
    }

    fn set(&self, e: Option<String>) {
        *self.bind_error.lock().expect("bind error lock") = e;
    }
}

/// Starts the endpoint's thread for `addr`: binds (retrying every [`BIND_RETRY`] while it
/// cannot, saying why in the returned state) and serves until the process ends.
pub fn start(addr: SocketAddr, endpoint: Endpoint) -> std::io::Result<EndpointState> {
    let state = EndpointState::default();
    let st = state.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || rt.block_on(bind_and_serve(addr, endpoint, st)))?;
    Ok(state)
}

async fn bind_and_serve(addr: SocketAddr, endpoint: Endpoint, state: EndpointState) {
    let mut logged = false;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                let text = format!(
                    "metrics endpoint: cannot listen on {addr}: {e} (retrying every {} s; `[metrics] listen` sets another address, \"\" none)",
                    BIND_RETRY.as_secs()
                );
                if !logged {
                    tracing::error!(%addr, "{text}");
                    logged = true;
                }
                state.set(Some(text));
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    state.set(None);
    tracing::info!(%addr, "metrics endpoint listening (/metrics, /health, /status)");
    run(listener, endpoint, std::future::pending()).await;
}

/// Serves `listener` until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("metrics endpoint: accept: {e}");
                    continue;
                }
            },
        };
        let ep = endpoint.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ep = ep.clone();
                async move { Ok::<_, Infallible>(ep.answer(&req).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
            drop(permit);
        });
    }
}

impl Endpoint {
    async fn answer<B>(&self, req: &HttpRequest<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let openmetrics = req.headers().get_all(ACCEPT).iter().any(|v| {
                    v.to_str()
                        .is_ok_and(|v| v.contains("application/openmetrics-text"))
                });
                self.metrics_page(openmetrics).await
            }
            "/health" => self.health().await,
            "/status" => match self.status().await {
                Ok(s) => respond(StatusCode::OK, JSON, json_line(&s)),
                Err(e) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    json_line(&json!({ "error": e })),
                ),
            },
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found: /metrics, /health and /status are served\n",
            ),
        }
    }

    /// The main loop's status, asked through the control channel.
    async fn status(&self) -> Result<AgentStatus, String> {
        let requests = self.requests.clone();
        let ask = move || {
            let (tx, rx) = bounded(1);
            let incoming = Incoming {
                request: Request::Status,
                reply: tx,
            };
            requests
                .send_timeout(incoming, STATUS_WAIT)
                .map_err(|_| "agent not answering".to_owned())?;
            match rx.recv_timeout(STATUS_WAIT) {
                Ok(Ok(Reply::Status(s))) => Ok(s),
                Ok(Ok(other)) => Err(format!("the agent answered status with {}", other.name())),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("agent not answering".to_owned()),
            }
        };
        tokio::task::spawn_blocking(ask)
            .await
            .unwrap_or_else(|e| Err(format!("status task failed: {e}")))
    }

    async fn health(&self) -> Response<Full<Bytes>> {
        match self.status().await {
            Err(reason) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                JSON,
                json_line(&Health {
                    healthy: false,
                    role: None,
                    reason: Some(reason),
                }),
            ),
            Ok(s) => {
                let role = role_name(&s);
                match health_verdict(&s) {
                    Ok(()) => respond(
                        StatusCode::OK,
                        JSON,
                        json_line(&Health {
                            healthy: true,
                            role: Some(role),
                            reason: None,
                        }),
                    ),
                    Err(reason) => respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        JSON,
                        json_line(&Health {
                            healthy: false,
                            role: Some(role),
                            reason: Some(reason),
                        }),
                    ),
                }
            }
        }
    }

    async fn metrics_page(&self, openmetrics: bool) -> Response<Full<Bytes>> {
        let status = self.status().await.ok();
        let registry = self.metrics.registry(status);
        let mut body = String::new();
        let (encoded, content_type) = if openmetrics {
            (text::encode(&mut body, &registry), OPENMETRICS)
        } else {
            (
                prometheus_text::encode(&mut body, &registry),
                prometheus_text::CONTENT_TYPE,
            )
        };
        match encoded {
            Ok(()) => respond(StatusCode::OK, content_type, body),
            Err(_) => plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            ),
        }
    }
}

fn json_line(v: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string(v).expect("JSON values serialize");
    s.push('\n');
    s
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    respond(code, "text/plain; charset=utf-8", text.to_owned())
}

fn respond(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
