use tonic::{Request, Status};

use crate::domain::UserId;

/// The request metadata that names the caller.
pub const USER_ID_HEADER: &str = "x-user-id";

/// Interceptor: resolves `x-user-id` into a [`UserId`] in the request's
/// extensions, or refuses the call with UNAUTHENTICATED before its body is
/// read and before any database work. Fails closed: no identity, no request.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
pub fn require_user_id(mut request: Request<()>) -> Result<Request<()>, Status> {
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

/// The caller that [`require_user_id`] resolved for this request.
#[allow(clippy::result_large_err)]
pub(super) fn caller<T>(request: &Request<T>) -> Result<UserId, Status> {
    request
        .extensions()
        .get::<UserId>()
        .cloned()
        // Only reachable if the service were mounted without the interceptor.
        .ok_or_else(|| Status::unauthenticated("missing x-user-id metadata"))
}
