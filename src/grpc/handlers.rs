use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{
    convert,
    error::ApiError,
    identity::caller,
    observe::record_conversation,
    parse::{self, Parser},
    proto::{self, conversation_service_server::ConversationService},
};
use crate::{
    domain::{ConversationCursor, Limits, MessageCursor, PageTokenCodec, SearchCursor},
    service::Conversations,
    store::MessageOrder,
};

/// The `convo.v1.ConversationService` handlers. Each reads in the same order:
/// identity, parse, call, convert.
#[derive(Debug, Clone)]
pub struct ConversationApi {
    service: Conversations,
    parser: Parser,
}

impl ConversationApi {
    pub fn new(service: Conversations, limits: Limits, tokens: PageTokenCodec) -> Self {
        Self {
            service,
            parser: Parser { limits, tokens },
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The stream of a WatchConversation call.
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::Message, Status>> + Send>>;

fn reply<T>(result: Result<T, ApiError>) -> Reply<T> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl ConversationService for ConversationApi {
    async fn create_conversation(
        &self,
        request: Request<proto::CreateConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let owner = caller(&request)?;
        reply(
            async {
                let (new, request_id) = self.parser.create_conversation(request.into_inner())?;
                let created = self
                    .service
                    .create_conversation(&owner, new, request_id)
                    .await?;
                Ok(created.into())
            }
            .await,
        )
    }

    async fn get_conversation(
        &self,
        request: Request<proto::GetConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let owner = caller(&request)?;
        reply(
            async {
                let id = parse::conversation_id(&request.get_ref().conversation_id)?;
                record_conversation(id);
                let conversation = self.service.get_conversation(&owner, id).await?;
                Ok(conversation.into())
            }
            .await,
        )
    }

    async fn list_conversations(
        &self,
        request: Request<proto::ListConversationsRequest>,
    ) -> Reply<proto::ListConversationsResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let (size, after) = self.parser.list_conversations(&owner, request.get_ref())?;
                let page = self.service.list_conversations(&owner, size, after).await?;
                let next_page_token = match page.items.last() {
                    Some(last) if page.has_more => self.parser.tokens.encode_conversations(
                        &owner,
                        &ConversationCursor {
                            update_time: last.update_time,
                            id: last.id,
                        },
                    ),
                    _ => String::new(),
                };
                Ok(proto::ListConversationsResponse {
                    conversations: page.items.into_iter().map(Into::into).collect(),
                    next_page_token,
                })
            }
            .await,
        )
    }

    async fn update_conversation(
        &self,
        request: Request<proto::UpdateConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let owner = caller(&request)?;
        reply(
            async {
                let (id, changes) = self.parser.update_conversation(request.into_inner())?;
                record_conversation(id);
                let updated = self
                    .service
                    .update_conversation(&owner, id, changes)
                    .await?;
                Ok(updated.into())
            }
            .await,
        )
    }

    async fn delete_conversation(
        &self,
        request: Request<proto::DeleteConversationRequest>,
    ) -> Reply<()> {
        let owner = caller(&request)?;
        reply(
            async {
                let id = parse::conversation_id(&request.get_ref().conversation_id)?;
                record_conversation(id);
                self.service.delete_conversation(&owner, id).await?;
                Ok(())
            }
            .await,
        )
    }

    async fn append_message(
        &self,
        request: Request<proto::AppendMessageRequest>,
    ) -> Reply<proto::Message> {
        let owner = caller(&request)?;
        reply(
            async {
                let append = self.parser.append_message(request.into_inner())?;
                record_conversation(append.conversation_id);
                let stored = self.service.append_messages(&owner, append).await?;
                // A one-message append stores exactly one message.
                let message = stored.into_iter().next().ok_or_else(|| {
                    ApiError::Service(crate::service::ServiceError::Internal(
                        crate::store::StoreError::Corrupt("an append returned no message".into()),
                    ))
                })?;
                Ok(message.into())
            }
            .await,
        )
    }

    async fn append_messages(
        &self,
        request: Request<proto::AppendMessagesRequest>,
    ) -> Reply<proto::AppendMessagesResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let append = self.parser.append_messages(request.into_inner())?;
                record_conversation(append.conversation_id);
                let stored = self.service.append_messages(&owner, append).await?;
                Ok(proto::AppendMessagesResponse {
                    messages: convert::messages(stored),
                })
            }
            .await,
        )
    }

    async fn list_messages(
        &self,
        request: Request<proto::ListMessagesRequest>,
    ) -> Reply<proto::ListMessagesResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let list = self.parser.list_messages(&owner, request.get_ref())?;
                record_conversation(list.conversation_id);
                let page = self.service.list_messages(&owner, list).await?;
                let next_page_token = match page.items.last() {
                    Some(last) if page.has_more => self.parser.tokens.encode_messages(
                        &owner,
                        &MessageCursor {
                            conversation_id: list.conversation_id,
                            newest_first: list.order == MessageOrder::NewestFirst,
                            sequence: last.sequence,
                        },
                    ),
                    _ => String::new(),
                };
                Ok(proto::ListMessagesResponse {
                    messages: convert::messages(page.items),
                    next_page_token,
                })
            }
            .await,
        )
    }

    async fn resume_conversation(
        &self,
        request: Request<proto::ResumeConversationRequest>,
    ) -> Reply<proto::ResumeConversationResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let (id, max_messages) = self.parser.resume_conversation(request.get_ref())?;
                record_conversation(id);
                let resumed = self
                    .service
                    .resume_conversation(&owner, id, max_messages)
                    .await?;
                Ok(proto::ResumeConversationResponse {
                    conversation: Some(resumed.conversation.into()),
                    messages: convert::messages(resumed.messages),
                    has_more: resumed.has_more,
                })
            }
            .await,
        )
    }

    type WatchConversationStream = WatchStream;

    async fn watch_conversation(
        &self,
        request: Request<proto::WatchConversationRequest>,
    ) -> Reply<Self::WatchConversationStream> {
        let owner = caller(&request)?;
        reply(
            async {
                let (id, after_sequence) = self.parser.watch_conversation(request.get_ref())?;
                record_conversation(id);
                let messages = self
                    .service
                    .watch_conversation(&owner, id, after_sequence)
                    .await?;
                let stream = tokio_stream::wrappers::ReceiverStream::new(messages).map(|item| {
                    item.map(proto::Message::from)
                        .map_err(|error| Status::from(ApiError::from(error)))
                });
                Ok(Box::pin(stream) as WatchStream)
            }
            .await,
        )
    }

    async fn fork_conversation(
        &self,
        request: Request<proto::ForkConversationRequest>,
    ) -> Reply<proto::Conversation> {
        let owner = caller(&request)?;
        reply(
            async {
                let fork = self.parser.fork_conversation(request.into_inner())?;
                record_conversation(fork.source);
                let forked = self.service.fork_conversation(&owner, fork).await?;
                Ok(forked.into())
            }
            .await,
        )
    }

    async fn search_messages(
        &self,
        request: Request<proto::SearchMessagesRequest>,
    ) -> Reply<proto::SearchMessagesResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let search = self.parser.search_messages(&owner, request.into_inner())?;
                if let Some(id) = search.conversation_id {
                    record_conversation(id);
                }
                let page = self.service.search_messages(&owner, &search).await?;
                let next_page_token = match page.items.last() {
                    Some(last) if page.has_more => self.parser.tokens.encode_search(
                        &owner,
                        &SearchCursor {
                            rank: last.rank,
                            conversation_id: last.message.conversation_id,
                            sequence: last.message.sequence,
                        },
                        search.query.as_str(),
                        search.conversation_id,
                    ),
                    _ => String::new(),
                };
                Ok(proto::SearchMessagesResponse {
                    hits: page.items.into_iter().map(Into::into).collect(),
                    next_page_token,
                })
            }
            .await,
        )
    }

    async fn delete_user_data(
        &self,
        request: Request<proto::DeleteUserDataRequest>,
    ) -> Reply<proto::DeleteUserDataResponse> {
        let owner = caller(&request)?;
        reply(
            async {
                let erased = self.service.delete_user_data(&owner).await?;
                Ok(erased.into())
            }
            .await,
        )
    }
}
