use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{
    convert,
    identity::caller,
    limit::CallPermits,
    observe::record_conversation,
    page_token::PageTokenCodec,
    parse::{self, Parser},
    proto::{self, conversation_service_server::ConversationService},
};
use crate::{domain::Limits, service::Conversations};

/// The `convo.v1.ConversationService` handlers. Each reads in the same order:
/// a permit, identity, parse, call, convert; errors convert to `Status` with
/// `?` (`grpc/error.rs`).
#[derive(Debug, Clone)]
pub struct ConversationApi {
    service: Conversations,
    /// Reads requests; its token codec also seals each page's continuation.
    parser: Parser,
    /// Taken once the request is decoded (see `limit.rs`).
    permits: CallPermits,
}

impl ConversationApi {
    /// Handlers with at most `max_in_flight` calls in progress at once.
    pub fn new(
        service: Conversations,
        limits: Limits,
        tokens: PageTokenCodec,
        max_in_flight: usize,
    ) -> Self {
        Self {
            service,
            parser: Parser { limits, tokens },
            permits: CallPermits::new(max_in_flight),
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The stream of a WatchConversation call.
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::Message, Status>> + Send>>;

#[tonic::async_trait]
impl ConversationService for ConversationApi {
    async fn create_conversation(
        &self,
        request: Request<proto::CreateConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let new = self.parser.create_conversation(request.into_inner())?;
        let created = self.service.create_conversation(&owner, new).await?;
        Ok(Response::new(created.into()))
    }

    async fn get_conversation(
        &self,
        request: Request<proto::GetConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let id = parse::conversation_id(&request.get_ref().conversation_id)?;
        record_conversation(id);
        let conversation = self.service.get_conversation(&owner, id).await?;
        Ok(Response::new(conversation.into()))
    }

    async fn list_conversations(
        &self,
        request: Request<proto::ListConversationsRequest>,
    ) -> Reply<proto::ListConversationsResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let list = self.parser.list_conversations(&owner, request.get_ref())?;
        let page = self.service.list_conversations(&owner, list).await?;
        Ok(Response::new(proto::ListConversationsResponse {
            next_page_token: self
                .parser
                .tokens
                .next_conversations(&owner, page.next.as_ref()),
            conversations: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn update_conversation(
        &self,
        request: Request<proto::UpdateConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let (id, changes) = self.parser.update_conversation(request.into_inner())?;
        record_conversation(id);
        let updated = self
            .service
            .update_conversation(&owner, id, changes)
            .await?;
        Ok(Response::new(updated.into()))
    }

    async fn delete_conversation(
        &self,
        request: Request<proto::DeleteConversationRequest>,
    ) -> Reply<()> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let id = parse::conversation_id(&request.get_ref().conversation_id)?;
        record_conversation(id);
        self.service.delete_conversation(&owner, id).await?;
        Ok(Response::new(()))
    }

    async fn append_message(
        &self,
        request: Request<proto::AppendMessageRequest>,
    ) -> Reply<proto::Message> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let append = self.parser.append_message(request.into_inner())?;
        record_conversation(append.conversation_id);
        let message = self.service.append_message(&owner, append).await?;
        Ok(Response::new(message.into()))
    }

    async fn append_messages(
        &self,
        request: Request<proto::AppendMessagesRequest>,
    ) -> Reply<proto::AppendMessagesResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let append = self.parser.append_messages(request.into_inner())?;
        record_conversation(append.conversation_id);
        let stored = self.service.append_messages(&owner, append).await?;
        Ok(Response::new(proto::AppendMessagesResponse {
            messages: convert::messages(stored),
        }))
    }

    async fn list_messages(
        &self,
        request: Request<proto::ListMessagesRequest>,
    ) -> Reply<proto::ListMessagesResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let list = self.parser.list_messages(&owner, request.get_ref())?;
        record_conversation(list.conversation_id);
        let page = self.service.list_messages(&owner, list).await?;
        Ok(Response::new(proto::ListMessagesResponse {
            next_page_token: self.parser.tokens.next_messages(&owner, page.next.as_ref()),
            messages: convert::messages(page.items),
        }))
    }

    async fn resume_conversation(
        &self,
        request: Request<proto::ResumeConversationRequest>,
    ) -> Reply<proto::ResumeConversationResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let resume = self.parser.resume_conversation(request.get_ref())?;
        record_conversation(resume.conversation_id);
        let resumed = self.service.resume_conversation(&owner, resume).await?;
        Ok(Response::new(proto::ResumeConversationResponse {
            conversation: Some(resumed.conversation.into()),
            messages: convert::messages(resumed.messages),
            has_more: resumed.has_more,
        }))
    }

    type WatchConversationStream = WatchStream;

    async fn watch_conversation(
        &self,
        request: Request<proto::WatchConversationRequest>,
    ) -> Reply<Self::WatchConversationStream> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let watch = self.parser.watch_conversation(request.get_ref())?;
        record_conversation(watch.conversation_id);
        let messages = self.service.watch_conversation(&owner, watch).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(messages).map(|item| {
            item.map(|outgoing| proto::Message::from(outgoing.into_message()))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream) as WatchStream))
    }

    async fn fork_conversation(
        &self,
        request: Request<proto::ForkConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let fork = self.parser.fork_conversation(request.into_inner())?;
        record_conversation(fork.source);
        let forked = self.service.fork_conversation(&owner, fork).await?;
        Ok(Response::new(forked.into()))
    }

    async fn search_messages(
        &self,
        request: Request<proto::SearchMessagesRequest>,
    ) -> Reply<proto::SearchMessagesResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let search = self.parser.search_messages(&owner, request.into_inner())?;
        if let Some(id) = search.conversation_id {
            record_conversation(id);
        }
        let page = self.service.search_messages(&owner, &search).await?;
        Ok(Response::new(proto::SearchMessagesResponse {
            next_page_token: self.parser.tokens.next_search(
                &owner,
                page.next.as_ref(),
                search.query.as_str(),
                search.conversation_id,
            ),
            hits: page.items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn truncate_conversation(
        &self,
        request: Request<proto::TruncateConversationRequest>,
    ) -> Reply<proto::TruncateConversationResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let truncate = self.parser.truncate_conversation(request.get_ref())?;
        record_conversation(truncate.conversation_id);
        let (conversation, removed) = self.service.truncate_conversation(&owner, truncate).await?;
        Ok(Response::new(proto::TruncateConversationResponse {
            conversation: Some(conversation.into()),
            messages_deleted: removed,
        }))
    }

    async fn delete_user_data(
        &self,
        request: Request<proto::DeleteUserDataRequest>,
    ) -> Reply<proto::DeleteUserDataResponse> {
        let _permit = self.permits.enter()?;
        let owner = caller(&request)?;
        let erased = self.service.delete_user_data(&owner).await?;
        Ok(Response::new(erased.into()))
    }
}
