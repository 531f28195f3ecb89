use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use super::jwt::JwtVerifier;
use crate::domain::UserId;

/// How callers prove who they are. Either way the resolved [`UserId`] goes
/// into the request's extensions, before the body is read; no identity, no
/// request.
#[derive(Debug, Clone)]
pub enum Authenticator {
    /// Trust `x-user-id`: the service sits behind an orchestrator that
    /// authenticates users (ideally reached over mutual TLS).
    TrustedHeader,
    /// Verify `authorization: Bearer <JWT>` and take the user from a claim;
    /// an `x-user-id` that disagrees is refused.
    Jwt(Arc<JwtVerifier>),
}

impl Interceptor for Authenticator {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let request = match self {
            Self::TrustedHeader => require_user_id(request)?,
            Self::Jwt(verifier) => require_bearer_token(request, verifier)?,
        };
        if let Some(user) = request.extensions().get::<UserId>() {
            super::observe::record_user(user);
        }
        Ok(request)
    }
}

#[allow(clippy::result_large_err)] // tonic's interceptor signature
fn require_bearer_token(
    mut request: Request<()>,
    verifier: &JwtVerifier,
) -> Result<Request<()>, Status> {
    let header = request.metadata().get("authorization").ok_or_else(|| {
        Status::unauthenticated(
            "missing authorization metadata: send `authorization: Bearer <JWT>`",
        )
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <JWT>`"))?;
    let user = verifier
        .verify(token.trim())
        .map_err(Status::unauthenticated)?;
    if let Some(asserted) = request.metadata().get(USER_ID_HEADER)
        && asserted.to_str().ok() != Some(user.as_str())
    {
        return Err(Status::unauthenticated(
            "x-user-id does not match the token's user",
        ));
    }
    request.extensions_mut().insert(user);
    Ok(request)
}

/// The request metadata that names the caller.
pub const USER_ID_HEADER: &str = "x-user-id";

/// Interceptor: resolves `x-user-id` into a [`UserId`] in the request's
/// extensions, or refuses the call with UNAUTHENTICATED before its body is
/// read and before any database work. Fails closed: no identity, no request.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
fn require_user_id(mut request: Request<()>) -> Result<Request<()>, Status> {
    let mut values = request.metadata().get_all(USER_ID_HEADER).iter();
    let value = values.next().ok_or_else(|| {
        Status::unauthenticated("missing x-user-id metadata: every call must name its caller")
    })?;
    if values.next().is_some() {
        return Err(Status::unauthenticated(
            "x-user-id must be sent exactly once",
        ));
    }
    let text = value.to_str().map_err(|_| {
        Status::unauthenticated("x-user-id must be 1-128 bytes of visible ASCII (0x21-0x7E)")
    })?;
    let user = UserId::parse(text).map_err(Status::unauthenticated)?;
    request.extensions_mut().insert(user);
    Ok(request)
}

/// The caller that the [`Authenticator`] resolved for this request.
#[allow(clippy::result_large_err)]
pub(super) fn caller<T>(request: &Request<T>) -> Result<UserId, Status> {
    request
        .extensions()
        .get::<UserId>()
        .cloned()
        // Only reachable if the service were mounted without the interceptor.
        .ok_or_else(|| Status::unauthenticated("missing x-user-id metadata"))
}
