//! Who may call what: named admin tokens with roles.
//!
//! Every admin request is resolved to a [`Principal`] (the token's name and
//! role): `CLAW_ADMIN_TOKEN` is the bootstrap admin, named `bootstrap`; named
//! tokens (`clawctl token add NAME --role admin|viewer`) are stored as
//! SHA-256 hashes in [`Tree::AdminTokenHashes`] and looked up on every call,
//! so a removed token stops working at once. [`authorize`] decides, by full
//! gRPC method name, whether a role may call a method: a viewer may call
//! every read and nothing that writes. The same check guards the dashboard's
//! HTTP endpoints, which call the same services.
//!
//! The proxy token opens nothing here (see `api::auth`).

use std::sync::Arc;

use claw_proto::v1;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::Status;

use crate::config::Token;
use crate::store::{Store, StoreError};

pub mod methods;
pub mod tokens;

pub use methods::{Access as MethodAccess, classify};

/// The name the audit log records for `CLAW_ADMIN_TOKEN`.
pub const BOOTSTRAP_NAME: &str = "bootstrap";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads only.
    Viewer,
}

impl Role {
    /// `admin` or `viewer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    /// The wire enum.
    pub fn to_proto(self) -> v1::Role {
        match self {
            Role::Admin => v1::Role::Admin,
            Role::Viewer => v1::Role::Viewer,
        }
    }
}

/// The caller of an admin request, inserted into the request's extensions
/// by the admin authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name (`bootstrap` for `CLAW_ADMIN_TOKEN`).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Resolves bearer tokens to principals.
pub struct Access {
    bootstrap: [u8; 32],
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

/// SHA-256 of a token.
pub(crate) fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Access {
    /// Access with `admin` as the bootstrap admin token and named tokens
    /// from `store`.
    pub fn new(admin: &Token, store: Arc<dyn Store>) -> Access {
        Access {
            bootstrap: digest(admin.as_bytes()),
            store,
        }
    }

    /// The principal a token secret belongs to, if any.
    pub fn resolve(&self, secret: &str) -> Result<Option<Principal>, StoreError> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Ok(None);
        }
        let d = digest(secret.as_bytes());
        if bool::from(d.ct_eq(&self.bootstrap)) {
            return Ok(Some(Principal {
                name: BOOTSTRAP_NAME.to_string(),
                role: Role::Admin,
            }));
        }
        // Named tokens: looked up on every call, so a deleted one stops
        // working at once. A record with an unknown role opens nothing.
        let found = self
            .tokens()
            .by_hash(&hex::encode(d))
            .map_err(|e| match e {
                tokens::TokenError::Store(e) => e,
                other => StoreError::Engine(other.to_string()),
            })?;
        Ok(found.and_then(|rec| {
            let role = rec.role()?;
            Some(Principal {
                name: rec.spec?.name,
                role,
            })
        }))
    }

    /// The named token store.
    pub fn tokens(&self) -> tokens::Tokens<'_> {
        tokens::Tokens::new(self.store.as_ref())
    }

    /// The principal of an `authorization` header value (`Bearer <token>`).
    pub fn resolve_header(&self, value: Option<&str>) -> Result<Option<Principal>, StoreError> {
        let Some(value) = value else { return Ok(None) };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return Ok(None);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        self.resolve(token)
    }
}

/// Whether `principal` may call `method` (a full gRPC path such as
/// `/claw.v1.BackendService/CreateBackend`): `PermissionDenied` naming the
/// role when not. Admins may call everything; viewers only what
/// [`classify`] calls a read (unknown methods count as writes).
pub fn authorize(principal: &Principal, method: &str) -> Result<(), Status> {
    match (principal.role, classify(method)) {
        (Role::Admin, _) | (Role::Viewer, MethodAccess::Read) => Ok(()),
        (Role::Viewer, MethodAccess::Write) => {
            let short = method.rsplit('/').next().unwrap_or(method);
            Err(Status::permission_denied(format!(
                "token {:?} has role {}; {short} needs role admin",
                principal.name,
                principal.role.as_str()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_are_denied_writes_naming_the_role() {
        let viewer = Principal {
            name: "ops".into(),
            role: Role::Viewer,
        };
        let admin = Principal {
            name: "root".into(),
            role: Role::Admin,
        };
        let create = "/claw.v1.BackendService/CreateBackend";
        let err = authorize(&viewer, create).expect_err("denied");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            err.message(),
            "token \"ops\" has role viewer; CreateBackend needs role admin"
        );
        assert!(authorize(&viewer, "/claw.v1.BackendService/ListBackends").is_ok());
        assert!(authorize(&viewer, "/claw.v1.Unknown/Thing").is_err());
        assert!(authorize(&admin, create).is_ok());
    }
}
