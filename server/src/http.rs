//! HTTP helpers the route tables share: which database a request addresses, and resources
//! that answer unknown methods with a JSON 405.

use actix_web::{HttpRequest, HttpResponse, web};

use crate::db::DEFAULT_DB;
use crate::error::ApiError;

/// The name of the database a request addresses: header `X-Dbname`, else query `db`, else
/// `default`. Not checked: [`AppState::db`] resolves and validates it.
pub fn requested_db_name(req: &HttpRequest) -> String {
    let from_header = req
        .headers()
        .get("x-dbname")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    from_header
        .or_else(|| {
            web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.get("db").cloned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_DB.to_string())
}

/// A resource whose unmatched methods get a JSON 405 instead of an empty one.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed("Method not allowed for this route.".into()))
    }))
}
