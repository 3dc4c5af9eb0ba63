//! `claw.v1.TokenService`: named admin tokens, over
//! [`crate::access::tokens`].

use std::sync::Arc;

use claw_proto::v1::token_service_server::TokenService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, ok};
use crate::access::Access;
use crate::access::tokens::TokenError;
use crate::events::{Events, Topic};

/// Serves named admin tokens.
#[derive(Debug, Clone)]
pub(crate) struct TokenApi {
    access: Arc<Access>,
    events: Events,
}

impl TokenApi {
    /// A service over `access`; token writes are announced on `events`
    /// (their audit records do not move the configuration version).
    pub(crate) fn new(access: Arc<Access>, events: Events) -> Self {
        TokenApi { access, events }
    }
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Status {
        if let TokenError::Store(s) = &e
            && let Some(status) = super::no_space(s)
        {
            return status;
        }
        match &e {
            TokenError::Invalid(f) => Status::invalid_argument(f.to_string()),
            TokenError::AlreadyExists(_) => Status::already_exists(format!("name: {e}")),
            TokenError::NotFound(_) => Status::not_found(e.to_string()),
            TokenError::Corrupt(_) | TokenError::Store(_) => super::internal(&e),
        }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> RpcResult<CreateTokenResponse> {
        let actor = super::actor(&request);
        let req = request.into_inner();
        let (token, secret) = self
            .access
            .tokens()
            .create(&req.name, req.role, &actor)
            .await?;
        tracing::info!(token = %token.id, name = %token.name, role = token.role, by = %actor.token, "admin token created");
        self.events.notify(Topic::Audit);
        ok(CreateTokenResponse {
            token: Some(token),
            secret,
        })
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> RpcResult<ListTokensResponse> {
        ok(ListTokensResponse {
            tokens: self.access.tokens().list()?,
        })
    }

    async fn delete_token(
        &self,
        request: Request<DeleteTokenRequest>,
    ) -> RpcResult<DeleteTokenResponse> {
        let actor = super::actor(&request);
        let ident = request.into_inner().token;
        let token = self.access.tokens().delete(&ident, &actor).await?;
        tracing::info!(token = %token.id, name = %token.name, by = %actor.token, "admin token deleted");
        self.events.notify(Topic::Audit);
        ok(DeleteTokenResponse {})
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> RpcResult<WhoAmIResponse> {
        let actor = super::actor(&request);
        ok(WhoAmIResponse {
            name: actor.token,
            role: actor.role.unwrap_or(Role::Unspecified) as i32,
        })
    }
}
