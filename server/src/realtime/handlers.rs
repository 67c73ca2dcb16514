//! `/api/realtime`: a WebSocket (`Upgrade: websocket`) or PocketBase's Server-Sent Events
//! stream on GET, and PocketBase's subscription POST.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message};
use serde::Deserialize;
use serde_json::{Value, json};

use super::dispatch::{access, shape, sse_frame};
use super::{Client, Hub, MAX_SUBSCRIPTIONS, Protocol, Subscription, check_limits, parse_topic};
use crate::auth::{Identity, bearer_token, identify_token};
use crate::error::{ApiError, ApiResult, error_body};
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/realtime")
            .route(web::get().to(connect))
            .route(web::post().to(set_subscriptions)),
    );
}

/// Largest WebSocket message a client may send (a subscription command).
const MAX_FRAME: usize = 64 * 1024;

fn unavailable(message: &str) -> HttpResponse {
    error_body(StatusCode::SERVICE_UNAVAILABLE, message, json!({}))
}

/// The client's address for `REALTIME_MAX_PER_IP`: the TCP peer, or behind a proxy of
/// `TRUSTED_PROXIES` the client its `X-Forwarded-For` names (see `http::client_ip`).
fn peer(state: &AppState, req: &HttpRequest) -> Option<std::net::IpAddr> {
    crate::http::client_ip(req, &state.settings.trusted_proxies)
}

/// The answer to a connection the hub did not admit.
fn refusal(refused: super::Refused) -> HttpResponse {
    match refused {
        super::Refused::Full => unavailable("too many realtime connections on this node"),
        super::Refused::PerIp => error_body(
            StatusCode::TOO_MANY_REQUESTS,
            "too many realtime connections from this address (REALTIME_MAX_PER_IP)",
            json!({}),
        ),
    }
}

const REPLICA_OFF: &str = "realtime is off on this replica (REPLICA_REALTIME=off): subscribe on the master";

/// Removes the client from the hub when its connection ends, however it ends.
struct Connected {
    hub: Arc<Hub>,
    client: Arc<Client>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.hub.disconnected(&self.client);
    }
}

async fn connect(state: web::Data<AppState>, req: HttpRequest, body: web::Payload) -> ApiResult<HttpResponse> {
    if !state.realtime.enabled {
        return Ok(unavailable(REPLICA_OFF));
    }
    let db = state.db(&req)?;
    let websocket = req
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if websocket {
        let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
        let token = query.get("auth").map(String::as_str).or_else(|| bearer_token(&req));
        let who = identify_token(&state, token, &db.name).await?;
        let token = token.map(str::to_string);
        let (client, rx) = match state
            .realtime
            .connect(&db.name, Protocol::WebSocket, who, token, peer(&state, &req))
        {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refusal(refused)),
        };
        let (response, session, stream) =
            actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request(format!("WebSocket handshake: {e}")))?;
        let guard = Connected {
            hub: state.realtime.clone(),
            client,
        };
        actix_web::rt::spawn(serve_websocket(
            state.clone(),
            guard,
            rx,
            session,
            stream.max_frame_size(MAX_FRAME),
        ));
        return Ok(response);
    }
    // Server-Sent Events, as PocketBase: the client is a guest until its subscription POST.
    let (client, rx) = match state
        .realtime
        .connect(&db.name, Protocol::Sse, Identity::Guest, None, peer(&state, &req))
    {
        Ok(admitted) => admitted,
        Err(refused) => return Ok(refusal(refused)),
    };
    let hello = sse_frame(&client.id, "PB_CONNECT", &json!({"clientId": client.id}));
    let mut ping = tokio::time::interval(state.realtime.ping);
    ping.reset();
    let stream = SseStream {
        guard: Connected {
            hub: state.realtime.clone(),
            client,
        },
        rx,
        ping,
        first: Some(hello),
        done: false,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.next().await?;
        Some((Ok::<_, Infallible>(chunk), s))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-store"))
        // nginx would otherwise buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

struct SseStream {
    guard: Connected,
    rx: tokio::sync::mpsc::Receiver<String>,
    ping: tokio::time::Interval,
    first: Option<String>,
    done: bool,
}

impl SseStream {
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if let Some(hello) = self.first.take() {
            return Some(Bytes::from(hello));
        }
        let client = self.guard.client.clone();
        tokio::select! {
            m = self.rx.recv() => m.map(Bytes::from),
            reason = client.closing() => {
                self.done = true;
                Some(Bytes::from(sse_frame(&client.id, "disconnect", &json!({"reason": reason}))))
            }
            // A comment: EventSource ignores it, proxies see traffic, and a dead peer is noticed.
            _ = self.ping.tick() => Some(Bytes::from_static(b":ping\n\n")),
        }
    }
}

async fn serve_websocket(
    state: web::Data<AppState>,
    guard: Connected,
    mut rx: tokio::sync::mpsc::Receiver<String>,
    mut session: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
) {
    let client = guard.client.clone();
    let every = state.realtime.ping;
    let mut ping = tokio::time::interval(every);
    ping.reset();
    let mut heard = Instant::now();
    let reason: Option<String> = loop {
        tokio::select! {
            m = rx.recv() => match m {
                // A client that stops reading must not hold this task: its disconnect wins.
                Some(m) => tokio::select! {
                    sent = session.text(m) => if sent.is_err() { break None },
                    reason = client.closing() => break Some(reason),
                },
                None => break None,
            },
            reason = client.closing() => break Some(reason),
            _ = ping.tick() => {
                if heard.elapsed() > every * 3 {
                    client.disconnect(format!("idle: no answer for {} s", heard.elapsed().as_secs()));
                    continue;
                }
                if session.ping(b"").await.is_err() {
                    break None;
                }
            }
            incoming = stream.recv() => {
                heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => command(&state, &client, &text).await,
                    Some(Ok(Message::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        client.send(error_message("send commands as JSON text messages"));
                    }
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => client.disconnect(format!("protocol error: {e}")),
                    Some(Ok(_)) => {}
                }
            }
        }
    };
    drop(guard);
    let close = reason.map(|r| CloseReason {
        code: CloseCode::Policy,
        // A close frame's reason holds at most 123 bytes.
        description: Some(r.chars().take(100).collect()),
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close(close)).await;
}

fn error_message(message: &str) -> String {
    json!({"type": "ERROR", "message": message}).to_string()
}

#[derive(Deserialize)]
struct Command {
    #[serde(rename = "type")]
    kind: String,
    collection: Option<String>,
    id: Option<String>,
    filter: Option<String>,
    expand: Option<String>,
    fields: Option<String>,
}

/// Handles one WebSocket command; answers go through the client's queue, in order with events.
async fn command(state: &AppState, client: &Arc<Client>, text: &str) {
    let reply = match serde_json::from_str::<Command>(text) {
        Err(e) => error_message(&format!("not a command: {e}")),
        Ok(cmd) => match cmd.kind.to_ascii_uppercase().as_str() {
            "SUBSCRIBE" => match subscribe(state, client, cmd).await {
                Ok(v) => v.to_string(),
                Err(e) => error_message(&e.to_string()),
            },
            "UNSUBSCRIBE" => {
                if let Ok(mut subs) = client.subs.lock() {
                    Arc::make_mut(&mut subs).retain(|s| match (&cmd.collection, &cmd.id) {
                        (None, _) => false,
                        (Some(c), None) => s.collection != *c,
                        (Some(c), Some(id)) => !(s.collection == *c && s.record.as_ref() == Some(id)),
                    });
                }
                json!({"type": "UNSUBSCRIBED", "collection": cmd.collection, "id": cmd.id}).to_string()
            }
            other => error_message(&format!("unknown command type '{other}': SUBSCRIBE or UNSUBSCRIBE")),
        },
    };
    client.send(reply);
}

async fn subscribe(state: &AppState, client: &Client, cmd: Command) -> ApiResult<Value> {
    let Some(collection) = cmd.collection.filter(|c| !c.is_empty()) else {
        return Err(ApiError::bad_request("SUBSCRIBE needs a collection"));
    };
    if let Some(id) = &cmd.id {
        if !crate::records::store::is_valid_record_id(id) {
            return Err(ApiError::bad_request(format!("'{id}' is not a record id")));
        }
    }
    let sub = Subscription {
        topic: collection.clone(),
        collection,
        record: cmd.id,
        filter: cmd.filter,
        expand: cmd.expand,
        fields: cmd.fields,
    };
    let db = state
        .dbs
        .get(&client.db)
        .ok_or_else(|| ApiError::not_found("Database not found."))?;
    let c = state.collection(&db, &sub.collection).await?;
    let schema = state.schemas.get(&db).await?;
    access(&c, &schema, &client.identity(), &sub)?;
    shape(&c, &schema, &sub)?;
    let mut current = client
        .subs
        .lock()
        .map_err(|_| ApiError::internal("realtime", "subscriptions lock"))?;
    let answer = json!({"type": "SUBSCRIBED", "collection": sub.collection, "id": sub.record});
    let mut subs: Vec<Subscription> = current
        .iter()
        .filter(|s| !(s.collection == sub.collection && s.record == sub.record))
        .cloned()
        .collect();
    subs.push(sub);
    check_limits(&subs).map_err(ApiError::bad_request)?;
    *current = Arc::new(subs);
    Ok(answer)
}

#[derive(Deserialize)]
struct SetSubscriptions {
    #[serde(rename = "clientId")]
    client_id: String,
    #[serde(default)]
    subscriptions: Vec<String>,
}

/// The topic a client names to receive `resync` events (PocketBase's SDK listens only to the
/// topics it subscribed to).
const RESYNC_TOPIC: &str = "resync";

/// PocketBase's `POST /api/realtime`: replaces the whole subscription set of an SSE client; the
/// request's Authorization becomes the connection's auth.
async fn set_subscriptions(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<SetSubscriptions>,
) -> ApiResult<HttpResponse> {
    if !state.realtime.enabled {
        return Ok(unavailable(REPLICA_OFF));
    }
    let body = body.into_inner();
    let client = state
        .realtime
        .client(&body.client_id)
        .filter(|c| c.protocol == Protocol::Sse)
        .ok_or_else(|| ApiError::not_found("Missing or invalid client id."))?;
    // A topic named twice is one subscription, as in PocketBase.
    let mut topics: Vec<&String> = Vec::with_capacity(body.subscriptions.len());
    for t in &body.subscriptions {
        if !topics.contains(&t) {
            topics.push(t);
        }
    }
    if topics.len() > MAX_SUBSCRIPTIONS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_SUBSCRIPTIONS} subscriptions per client"
        )));
    }
    let who = identify_token(&state, bearer_token(&req), &client.db).await?;
    if !may_become(&client.identity(), &who) {
        return Err(ApiError::Forbidden(
            "The current and the previous request authorization don't match.".into(),
        ));
    }
    let db = state
        .dbs
        .get(&client.db)
        .ok_or_else(|| ApiError::not_found("Database not found."))?;
    let schema = state.schemas.get(&db).await?;
    let mut subs = Vec::with_capacity(topics.len());
    for topic in topics {
        if topic == RESYNC_TOPIC {
            subs.push(Subscription {
                topic: topic.clone(),
                collection: String::new(),
                record: None,
                filter: None,
                expand: None,
                fields: None,
            });
            continue;
        }
        let sub = parse_topic(topic).map_err(ApiError::bad_request)?;
        // A topic of a collection that does not exist (yet) matches nothing, as in PocketBase.
        if let Some(c) = schema.get(&sub.collection) {
            access(&c, &schema, &who, &sub)?;
            shape(&c, &schema, &sub)?;
        }
        subs.push(sub);
    }
    check_limits(&subs).map_err(ApiError::bad_request)?;
    if let Ok(mut w) = client.who.lock() {
        *w = who;
    }
    if let Ok(mut t) = client.token.lock() {
        *t = bearer_token(&req).map(str::to_string);
    }
    if let Ok(mut s) = client.subs.lock() {
        *s = Arc::new(subs);
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Whether a connection authenticated as `current` may continue as `next`: a guest may sign in,
/// but a signed-in connection stays with its record.
pub(crate) fn may_become(current: &Identity, next: &Identity) -> bool {
    match (current, next) {
        (Identity::Guest, _) => true,
        (Identity::Admin(a), Identity::Admin(b)) => a.id() == b.id(),
        (
            Identity::User {
                collection: c1,
                record: r1,
                ..
            },
            Identity::User {
                collection: c2,
                record: r2,
                ..
            },
        ) => c1.id == c2.id && r1.id() == r2.id(),
        _ => false,
    }
}
