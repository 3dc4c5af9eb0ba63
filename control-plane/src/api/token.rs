//! `claw.v1.TokenService`: named admin tokens.

use std::sync::Arc;

use claw_proto::v1::token_service_server::TokenService;
use claw_proto::v1::*;
use tonic::{Request, Status};

use super::{RpcResult, ok};
use crate::access::Access;

/// Serves named admin tokens.
#[derive(Debug, Clone)]
pub(crate) struct TokenApi {
    access: Arc<Access>,
}

impl TokenApi {
    /// A service over `access`.
    pub(crate) fn new(access: Arc<Access>) -> Self {
        TokenApi { access }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        _request: Request<CreateTokenRequest>,
    ) -> RpcResult<CreateTokenResponse> {
        let _ = &self.access;
        Err(Status::unimplemented("CreateToken is not implemented yet"))
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> RpcResult<ListTokensResponse> {
        Err(Status::unimplemented("ListTokens is not implemented yet"))
    }

    async fn delete_token(
        &self,
        _request: Request<DeleteTokenRequest>,
    ) -> RpcResult<DeleteTokenResponse> {
        Err(Status::unimplemented("DeleteToken is not implemented yet"))
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> RpcResult<WhoAmIResponse> {
        let actor = super::actor(&request);
        ok(WhoAmIResponse {
            name: actor.token,
            role: actor.role.unwrap_or(Role::Unspecified) as i32,
        })
    }
}
