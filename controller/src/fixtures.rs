//! An in-process mock API server for tests, the kube-rs way: a
//! `tower_test` mock service behind a real `kube::Client`, and a scenario
//! that expects each request in order and answers it. A missing request
//! times out, an unexpected one fails the scenario.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The server side of [`mock_client`].
pub struct ApiServer(Handle);

/// A client whose every request goes to the returned [`ApiServer`]; the
/// client's default namespace is `namespace`. (No retry layer: each request
/// is seen once.)
pub fn mock_client(namespace: &str) -> (kube::Client, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, namespace), ApiServer(handle))
}

/// One request as the server saw it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl ApiServer {
    /// The next request must be `method path` (the path without its query);
    /// `answer` gets it and returns the status and JSON body to send.
    /// Returns the request.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        answer: impl FnOnce(&Seen) -> (StatusCode, Value),
    ) -> Seen {
        self.expect_with(method, Some(path), answer).await
    }

    async fn expect_with(
        &mut self,
        method: Method,
        path: Option<&str>,
        answer: impl FnOnce(&Seen) -> (StatusCode, Value),
    ) -> Seen {
        let path_text = path.unwrap_or("*");
        let next = tokio::time::timeout(Duration::from_secs(10), self.0.next_request()).await;
        let (req, send) = match next {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the client went away; expected {method} {path_text}"),
            Err(_) => panic!("no request within 10 s; expected {method} {path_text}"),
        };
        let seen_method = req.method().clone();
        let seen_path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let bytes = req
            .into_body()
            .collect_bytes()
            .await
            .expect("a request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        let seen = Seen {
            method: seen_method,
            path: seen_path,
            query,
            body,
        };
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path.unwrap_or(seen.path.as_str())),
            "unexpected request {} {}?{} (body {})",
            seen.method,
            seen.path,
            seen.query,
            seen.body
        );
        let (status, value) = answer(&seen);
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&value).expect("JSON")))
                .expect("a response"),
        );
        seen
    }

    /// The next request must be a `method` to any path (for requests whose
    /// order the scenario does not fix); `answer` decides by its path.
    pub async fn expect_path(
        &mut self,
        method: Method,
        answer: impl FnOnce(&Seen) -> (StatusCode, Value),
    ) -> Seen {
        self.expect_with(method, None, answer).await
    }

    /// No further request may come (within a short wait).
    pub async fn done(mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await
        {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

pub fn ok(v: Value) -> (StatusCode, Value) {
    (StatusCode::OK, v)
}

pub fn created(v: Value) -> (StatusCode, Value) {
    (StatusCode::CREATED, v)
}

/// The apiserver's 404, which kube reports as `Error::Api` with code 404.
pub fn not_found(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// An empty list of `kind` (e.g. `JobList`).
pub fn empty_list(api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []})
}
