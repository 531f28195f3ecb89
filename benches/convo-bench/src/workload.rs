//! The workloads, each a loop of one kind of call per worker, measured into an
//! HDR histogram after a warm-up.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::ValueEnum;
use convo::grpc::proto::{
    self, AppendMessageRequest, ListConversationsRequest, ListMessagesRequest,
    ResumeConversationRequest, Role, WatchConversationRequest,
    conversation_service_client::ConversationServiceClient,
};
use hdrhistogram::Histogram;
use tokio_stream::StreamExt;
use tonic::{
    Code, Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{BoxError, report::Measured, seed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Each worker appends to its own conversation.
    Append,
    /// Every worker appends to one conversation: its row lock is the bottleneck.
    HotAppend,
    /// ResumeConversation(50) of a conversation of --messages messages.
    Resume,
    /// ListConversations(50) at --depth into a user's listing.
    List,
    /// An orchestrator turn: resume, append the user message, append the reply.
    Turn,
    /// Delay from sending an append to receiving it on a watch stream.
    Watch,
    /// Each worker appends 3-part assistant messages (reasoning with a
    /// signature, text, a tool call) to its own conversation.
    ToolAppend,
    /// ResumeConversation(50) of a conversation of --messages 3-part messages.
    ToolResume,
    /// ListMessages(50), newest first, of a conversation of --messages
    /// messages: the latest page of its history, as a client shows it.
    History,
    /// Each worker starts new chats: CreateConversation with a title, a
    /// metadata pair and a request_id of its own.
    Create,
}

/// How hard and how long to drive.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub workers: usize,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub requests: Option<u64>,
}

/// Sends `x-user-id` on every call.
#[derive(Clone)]
pub struct UserHeader(AsciiMetadataValue);

impl Interceptor for UserHeader {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("x-user-id", self.0.clone());
        Ok(request)
    }
}

pub type Client = ConversationServiceClient<InterceptedService<Channel, UserHeader>>;

/// The server, over a fixed number of HTTP/2 connections.
pub struct Target {
    channels: Vec<Channel>,
}

impl Target {
    pub async fn connect(addr: &str, connections: usize) -> Result<Self, BoxError> {
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let channel = Endpoint::from_shared(addr.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            channels.push(channel);
        }
        Ok(Self { channels })
    }

    pub fn client(&self, index: usize, user: &str) -> Result<Client, BoxError> {
        let header = AsciiMetadataValue::try_from(user)?;
        Ok(ConversationServiceClient::with_interceptor(
            self.channels[index % self.channels.len()].clone(),
            UserHeader(header),
        )
        .max_decoding_message_size(64 * 1024 * 1024))
    }
}

/// What a workload needs before the clock starts.
#[derive(Clone)]
pub struct Setup {
    workload: Workload,
    label: String,
    user: String,
    /// The shared conversation (hot-append, resume).
    conversation: Option<String>,
    /// The page token of ListConversations at the requested depth.
    page_token: String,
}

/// The messages a resume asks for (the issue's resume(50); `resume.sql`
/// asks for as many).
pub const RESUME_PAGE: i32 = 50;

const CONTENT: &str = "The quick brown fox jumps over the lazy dog, again and again, \
    while the orchestrator keeps the whole conversation in PostgreSQL for the next turn.";

impl Setup {
    pub async fn prepare(
        target: &Target,
        workload: Workload,
        messages: i64,
        depth: i64,
        database_url: Option<&str>,
    ) -> Result<Self, BoxError> {
        let run = uuid::Uuid::now_v7().simple().to_string();
        let user = format!("bench-{run}");
        let mut setup = Self {
            workload,
            label: format!("{workload:?}").to_lowercase(),
            user: user.clone(),
            conversation: None,
            page_token: String::new(),
        };
        match workload {
            Workload::HotAppend => {
                let mut client = target.client(0, &user)?;
                setup.conversation = Some(create(&mut client).await?);
                setup.label = "hot-append".into();
            }
            Workload::Resume | Workload::History => {
                let url = database_url.ok_or_else(|| {
                    format!(
                        "{} needs --database-url to seed its conversation",
                        setup.label
                    )
                })?;
                setup.conversation =
                    Some(seed::conversation(url, &user, messages).await?.to_string());
                setup.label = format!("{} L={messages}", setup.label);
            }
            Workload::List => {
                let url =
                    database_url.ok_or("list needs --database-url to seed the conversations")?;
                seed::conversations(url, &user, depth + 100).await?;
                setup.page_token = page_token_at(&mut target.client(0, &user)?, depth).await?;
                setup.label = format!("list depth={depth}");
            }
            Workload::ToolResume => {
                let mut client = target.client(0, &user)?;
                let conversation = create(&mut client).await?;
                seed_tool_messages(&mut client, &conversation, messages).await?;
                setup.conversation = Some(conversation);
                setup.label = format!("tool-resume L={messages}");
            }
            Workload::ToolAppend => setup.label = "tool-append".into(),
            Workload::Append | Workload::Turn | Workload::Watch | Workload::Create => {}
        }
        Ok(setup)
    }
}

impl Setup {
    /// The user the workload calls as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The conversation every worker shares, if the workload has one.
    pub fn conversation(&self) -> Option<&str> {
        self.conversation.as_deref()
    }
}

/// An assistant turn as an agent framework stores it: reasoning with the
/// provider's signature, a sentence, and a tool call whose id is `call_id`.
fn tool_message(call_id: String) -> proto::NewMessage {
    use proto::part::Kind;
    proto::NewMessage {
        role: Role::Assistant as i32,
        parts: vec![
            proto::Part {
                kind: Some(Kind::Reasoning(proto::Reasoning {
                    text: "The user wants the weather; look it up first.".into(),
                })),
                signature: (0..64).collect(),
            },
            proto::Part {
                kind: Some(Kind::Text("Let me check the forecast.".into())),
                signature: Vec::new(),
            },
            proto::Part {
                kind: Some(Kind::ToolCall(proto::ToolCall {
                    id: call_id,
                    name: "get_weather".into(),
                    arguments: r#"{"city": "Lisbon", "unit": "celsius"}"#.into(),
                })),
                signature: Vec::new(),
            },
        ],
        model: "bench-model-1".into(),
        usage: Some(proto::Usage {
            input_tokens: 1200,
            output_tokens: 80,
            cached_input_tokens: 1000,
            reasoning_tokens: 40,
        }),
        ..Default::default()
    }
}

/// Appends `messages` 3-part messages through the API, 100 per call.
async fn seed_tool_messages(
    client: &mut Client,
    conversation: &str,
    messages: i64,
) -> Result<(), BoxError> {
    let mut next = 0;
    while next < messages {
        let batch = (next..(next + 100).min(messages))
            .map(|n| tool_message(format!("call_seed_{n}")))
            .collect();
        client
            .append_messages(proto::AppendMessagesRequest {
                conversation_id: conversation.to_owned(),
                messages: batch,
                ..Default::default()
            })
            .await?;
        next += 100;
    }
    Ok(())
}

async fn create(client: &mut Client) -> Result<String, BoxError> {
    Ok(client
        .create_conversation(proto::CreateConversationRequest {
            title: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

/// Walks the listing in pages of 1000 to the token at `depth`.
async fn page_token_at(client: &mut Client, depth: i64) -> Result<String, BoxError> {
    let mut token = String::new();
    let mut walked = 0;
    while walked < depth {
        let size = (depth - walked).min(1000);
        let page = client
            .list_conversations(ListConversationsRequest {
                page_size: size as i32,
                page_token: token,
            })
            .await?
            .into_inner();
        walked += page.conversations.len() as i64;
        token = page.next_page_token;
        if token.is_empty() {
            return Err(format!("the listing ended at {walked}, before depth {depth}").into());
        }
    }
    Ok(token)
}

/// One worker's connection and state.
struct Worker {
    client: Client,
    conversation: String,
    /// The watch stream of `watch`, read on another connection.
    stream: Option<tonic::Streaming<proto::Message>>,
    next_sequence: i64,
    turn: u64,
}

impl Worker {
    async fn new(target: &Target, setup: &Setup, index: usize) -> Result<Self, BoxError> {
        let mut client = target.client(index, &setup.user)?;
        let conversation = match &setup.conversation {
            Some(shared) => shared.clone(),
            None if setup.workload == Workload::List => String::new(),
            None => create(&mut client).await?,
        };
        let stream = if setup.workload == Workload::Watch {
            let mut watcher = target.client(index + 1, &setup.user)?;
            let stream = watcher
                .watch_conversation(WatchConversationRequest {
                    conversation_id: conversation.clone(),
                    after_sequence: 0,
                })
                .await?
                .into_inner();
            Some(stream)
        } else {
            None
        };
        Ok(Self {
            client,
            conversation,
            stream,
            next_sequence: 1,
            turn: 0,
        })
    }

    /// One operation; its latency is measured by the caller.
    async fn step(&mut self, setup: &Setup) -> Result<(), Status> {
        match setup.workload {
            Workload::Append | Workload::HotAppend => {
                self.client
                    .append_message(self.append(Role::User, None, None))
                    .await?;
            }
            Workload::ToolAppend => {
                self.turn += 1;
                let message = tool_message(format!("call_{}", self.turn));
                self.client
                    .append_messages(proto::AppendMessagesRequest {
                        conversation_id: self.conversation.clone(),
                        messages: vec![message],
                        ..Default::default()
                    })
                    .await?;
            }
            Workload::Create => {
                // The worker's own conversation id makes its request ids
                // unique across workers and runs.
                self.turn += 1;
                self.client
                    .create_conversation(proto::CreateConversationRequest {
                        title: "A new chat".into(),
                        metadata: [("channel".to_owned(), "bench".to_owned())].into(),
                        request_id: format!("{}-{}", self.conversation, self.turn),
                    })
                    .await?;
            }
            Workload::Resume | Workload::ToolResume => {
                self.client
                    .resume_conversation(ResumeConversationRequest {
                        conversation_id: self.conversation.clone(),
                        max_messages: RESUME_PAGE,
                    })
                    .await?;
            }
            Workload::History => {
                self.client
                    .list_messages(ListMessagesRequest {
                        conversation_id: self.conversation.clone(),
                        page_size: 50,
                        newest_first: true,
                        ..Default::default()
                    })
                    .await?;
            }
            Workload::List => {
                self.client
                    .list_conversations(ListConversationsRequest {
                        page_size: 50,
                        page_token: setup.page_token.clone(),
                    })
                    .await?;
            }
            Workload::Turn => {
                let resumed = self
                    .client
                    .resume_conversation(ResumeConversationRequest {
                        conversation_id: self.conversation.clone(),
                        max_messages: RESUME_PAGE,
                    })
                    .await?
                    .into_inner();
                let count = resumed.conversation.map_or(0, |c| c.message_count);
                self.turn += 1;
                let turn = self.turn;
                self.client
                    .append_message(self.append(
                        Role::User,
                        Some(format!("t{turn}-user")),
                        Some(count),
                    ))
                    .await?;
                self.client
                    .append_message(self.append(
                        Role::Assistant,
                        Some(format!("t{turn}-assistant")),
                        Some(count + 1),
                    ))
                    .await?;
            }
            Workload::Watch => {
                self.client
                    .append_message(self.append(Role::User, None, None))
                    .await?;
                let expected = self.next_sequence;
                self.next_sequence += 1;
                let stream = self
                    .stream
                    .as_mut()
                    .ok_or_else(|| Status::internal("no watch stream"))?;
                loop {
                    match stream.next().await {
                        Some(Ok(message)) if message.sequence >= expected => break,
                        Some(Ok(_)) => continue,
                        Some(Err(status)) => return Err(status),
                        None => return Err(Status::unavailable("the watch stream ended")),
                    }
                }
            }
        }
        Ok(())
    }

    fn append(
        &self,
        role: Role,
        request_id: Option<String>,
        expected: Option<i64>,
    ) -> AppendMessageRequest {
        AppendMessageRequest {
            conversation_id: self.conversation.clone(),
            role: role as i32,
            content: CONTENT.to_owned(),
            request_id: request_id.unwrap_or_default(),
            expected_last_sequence: expected,
            ..Default::default()
        }
    }
}

/// Runs the workload: workers start together, warm up, then record.
pub async fn drive(target: &Target, setup: &Setup, load: &Load) -> Measured {
    let mut workers = Vec::with_capacity(load.workers);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for index in 0..load.workers {
        match Worker::new(target, setup, index).await {
            Ok(worker) => workers.push(worker),
            Err(error) => *errors.entry(format!("setup: {error}")).or_default() += 1,
        }
    }
    let started = Instant::now();
    let measure_from = started + load.warmup;
    let measure_until = measure_from + load.duration;
    let remaining = Arc::new(AtomicU64::new(load.requests.unwrap_or(u64::MAX)));
    let setup = Arc::new(setup.clone());

    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let setup = setup.clone();
            let remaining = remaining.clone();
            let bounded_by_count = load.requests.is_some();
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .unwrap_or_else(|_| unreachable!("valid histogram bounds"));
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                loop {
                    let now = Instant::now();
                    let measuring = now >= measure_from;
                    if measuring && !bounded_by_count && now >= measure_until {
                        break;
                    }
                    if measuring
                        && bounded_by_count
                        && remaining
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_err()
                    {
                        break;
                    }
                    let call = Instant::now();
                    let outcome = worker.step(&setup).await;
                    if !measuring {
                        continue;
                    }
                    match outcome {
                        Ok(()) => {
                            let micros = call.elapsed().as_micros().max(1) as u64;
                            let _ = histogram.record(micros.min(60_000_000));
                        }
                        Err(status) => *errors.entry(code_name(status.code())).or_default() += 1,
                    }
                }
                (histogram, errors)
            })
        })
        .collect();

    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid histogram bounds"));
    for task in tasks {
        if let Ok((histogram, worker_errors)) = task.await {
            let _ = merged.add(&histogram);
            for (code, n) in worker_errors {
                *errors.entry(code).or_default() += n;
            }
        }
    }
    let seconds = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    Measured::new(
        setup.label.clone(),
        load.workers,
        load.connections,
        seconds,
        &merged,
        errors,
    )
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}
